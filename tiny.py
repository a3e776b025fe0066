"""A tiny offline Qwen2.5-VL: a randomly initialised model built from a config, with a byte-level BPE
tokenizer trained in-process, so tests and the CPU demo need no file or network access.

Its tokenizer splits digits and learns the prompt's phrases as merges (a score is one token, an
answer about 15), which a real Qwen tokenizer does not. `mgiqa.load("tiny")` and grpo.py's
`--model tiny` build it.
"""
from __future__ import annotations

from prompt import ATTRIBUTES, build_prompt

# ----------------------------------------------------------------------------- a tiny offline VLM

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat template, reduced to what image+text messages need (same rendering).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SIZES = {
    # text: hidden, layers, heads, kv heads, mlp; vision: hidden, depth, heads, mlp; vocab
    "tiny": dict(hidden=64, layers=2, heads=4, kv=2, mlp=128, v_hidden=32, v_depth=2, v_heads=2, v_mlp=64, vocab=768),
    # the CPU demo's model (~0.7M parameters; the size the demo's measured recipe learned with).
    # rope_theta 4: with head_dim 24 and Qwen's [4, 4, 4] mrope sections, theta 10000 leaves the
    # width section 0.0002-0.002 rad per image token, so the language model could not tell a subject
    # in the left column from one in the centre; theta 4 gives it 0.28-0.40 (measured: DEMO_NOTES.md)
    "demo": dict(hidden=96, layers=3, heads=4, kv=2, mlp=256, v_hidden=64, v_depth=3, v_heads=2, v_mlp=128, vocab=1024,
                 rope_theta=4.0),
    "small": dict(hidden=512, layers=8, heads=8, kv=4, mlp=1536, v_hidden=256, v_depth=4, v_heads=4, v_mlp=768, vocab=2048),
}


def _tokenizer_corpus(seed: int) -> list[str]:
    """Text the in-process BPE learns from: the prompts, the answer layouts and some prose, so
    the prompt's phrases become merges and prompts stay short."""
    import random

    rng = random.Random(seed)
    words = ["blurry", "noisy", "dull", "offcentre", "clean", "sharp", "natural", "grain", "cast",
             "subject", "frame", "edges", "detail", "the", "image", "is", "quality", "looks", "and", "good"]
    scaffold = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    corpus = [build_prompt(True), build_prompt(False), scaffold] * 20
    for _ in range(400):
        values = [f"{rng.uniform(1, 5):.2f}" if rng.random() < 0.5 else str(rng.randint(1, 5)) for _ in ATTRIBUTES]
        answer = "{" + ", ".join(f'"{a}": {v}' for a, v in zip(ATTRIBUTES, values)) + "}"
        think = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        corpus.append(f"<think>{think}</think><answer>{answer}</answer>")
        corpus.append(f"<answer>{answer}</answer>")
    return corpus


def tiny_tokenizer(vocab_size: int = 768, seed: int = 0):
    """A byte-level BPE tokenizer trained in-process, with Qwen's special tokens; digits are
    always single tokens (as Qwen2's pre-tokenizer does), so a score 1-5 is one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d|<\|[a-z_]+\|>|</?think>|</?answer>"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_corpus(seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", chat_template=CHAT_TEMPLATE,
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                         "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def tiny_vlm(seed: int = 0, size: str = "tiny"):
    """A randomly initialised Qwen2.5-VL built from a config, with its processor. No file or
    network access; the same seed gives the same weights and tokenizer."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    if size not in SIZES:
        raise ValueError(f"tiny_vlm size must be one of {sorted(SIZES)}, got {size!r}")
    s = SIZES[size]
    tokenizer = tiny_tokenizer(s["vocab"], seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = s["hidden"] // s["heads"]
    section = head_dim * 3 // 16  # mrope (t, h, w) sections sum to head_dim / 2, in Qwen's 16:24:24 proportion
    text = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "mrope_section": [head_dim // 2 - 2 * section, section, section], "rope_theta": s.get("rope_theta", 10000.0)},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=s["v_depth"], hidden_size=s["v_hidden"], intermediate_size=s["v_mlp"], num_heads=s["v_heads"],
                  out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[s["v_depth"] - 1])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], bos_token_id=ids["<|endoftext|>"],
                              eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = ids["<|endoftext|>"], ids["<|im_end|>"], ids["<|endoftext|>"]
    # Small images stay small: 28x28-pixel units, from 56x56 up to 448x448.
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=448 * 448)
    video_processor = Qwen2VLVideoProcessor()
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=video_processor, chat_template=CHAT_TEMPLATE)
    return model, processor
