"""Small randomly initialised Qwen-VL models for offline tests and the CPU demo.

`build(name, seed)` returns `(model, processor)`; `NAMES` lists the names it accepts:

- "tiny", "demo", "small": a Qwen2.5-VL built from a config with a byte-level BPE tokenizer trained
  in-process on the caller's `prompts` and answer `keys`. No file or network access. The tokenizer
  splits digits and learns the prompt's phrases as merges (a score is one token, an answer about 15),
  which a real Qwen tokenizer does not; the vocabulary is 768-2,048 tokens.
- "tiny-qwen2.5-vl", "tiny-qwen3-vl": a reduced-depth random Qwen2.5-VL / Qwen3-VL with the REAL
  vocabulary (151,936 embedding rows), the real special ids and image geometry, and the real
  processor files (tokenizer, chat template, image processor) from tests/fixtures/qwen2.5-vl and
  tests/fixtures/qwen3-vl (rebuilt offline; their README.md files say from what). Tokenization, the
  prompt length and the answer length are what a real checkpoint sees; only the weights are toy.

The same name and seed give the same weights and tokenizer. `save(name, out_dir)` (or
`python tiny.py NAME OUT`) writes a checkpoint folder that `--model OUT` loads like any other;
`python mgiqa.py --model tiny-qwen2.5-vl photo.jpg` builds one in memory (untrained: its scores are noise).

Deliberately not imported here: mgiqa.py (it imports this module). The prompt text and the answer
keys that the in-process tokenizer learns come in as arguments.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "tests", "fixtures")

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

# The models with real processor files: the fixture folder and the tokenizer length it must load with.
REAL = {
    "tiny-qwen2.5-vl": dict(fixture=os.path.join(FIXTURES, "qwen2.5-vl"), tokens=151665),
    "tiny-qwen3-vl": dict(fixture=os.path.join(FIXTURES, "qwen3-vl"), tokens=151669),
}
NAMES = (*SIZES, *REAL)

# Qwen's ids (the same in Qwen2.5-VL and Qwen3-VL); build() checks the fixture's tokenizer agrees.
QWEN_IDS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
            "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656}
QWEN3_THINK_IDS = {"<think>": 151667, "</think>": 151668}
QWEN_VOCAB = 151936  # embedding rows of Qwen2.5-VL-3B and Qwen3-VL (the 7B Qwen2.5-VL pads to 152,064)


# ----------------------------------------------------------------------------- in-process tokenizer

def _tokenizer_corpus(seed: int, prompts: Sequence[str] = (), keys: Sequence[str] = ()) -> list[str]:
    """Text the in-process BPE learns from: the prompts, the answer layouts over `keys` and some
    prose, so the prompt's phrases become merges and prompts stay short."""
    import random

    rng = random.Random(seed)
    words = ["blurry", "noisy", "dull", "offcentre", "clean", "sharp", "natural", "grain", "cast",
             "subject", "frame", "edges", "detail", "the", "image", "is", "quality", "looks", "and", "good"]
    scaffold = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    corpus = [*prompts, scaffold] * 20
    for _ in range(400):
        values = [f"{rng.uniform(1, 5):.2f}" if rng.random() < 0.5 else str(rng.randint(1, 5)) for _ in keys]
        answer = "{" + ", ".join(f'"{a}": {v}' for a, v in zip(keys, values)) + "}"
        think = " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))
        corpus.append(f"<think>{think}</think><answer>{answer}</answer>")
        corpus.append(f"<answer>{answer}</answer>")
    return corpus


def tiny_tokenizer(vocab_size: int = 768, seed: int = 0, prompts: Sequence[str] = (), keys: Sequence[str] = ()):
    """A byte-level BPE tokenizer trained in-process on `prompts` and answers over `keys`, with Qwen's
    special tokens; digits are always single tokens (as Qwen2's pre-tokenizer does), so a score 1-5
    is one token. Pads on the left."""
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
    tok.train_from_iterator(_tokenizer_corpus(seed, prompts, keys), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   padding_side="left", chat_template=CHAT_TEMPLATE,
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                                         "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def _build_in_process(name: str, seed: int, prompts: Sequence[str], keys: Sequence[str], init_scale: float | None):
    """"tiny" / "demo" / "small": a Qwen2.5-VL from SIZES[name] with the in-process tokenizer."""
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    s = SIZES[name]
    tokenizer = tiny_tokenizer(s["vocab"], seed, prompts, keys)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = s["hidden"] // s["heads"]
    section = head_dim * 3 // 16  # mrope (t, h, w) sections sum to head_dim / 2, in Qwen's 16:24:24 proportion
    scale = {} if init_scale is None else {"initializer_range": init_scale}
    text = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["mlp"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv"],
                max_position_embeddings=4096, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "mrope_section": [head_dim // 2 - 2 * section, section, section], "rope_theta": s.get("rope_theta", 10000.0)},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], **scale)
    vision = dict(depth=s["v_depth"], hidden_size=s["v_hidden"], intermediate_size=s["v_mlp"], num_heads=s["v_heads"],
                  out_hidden_size=s["hidden"], patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  window_size=112, fullatt_block_indexes=[s["v_depth"] - 1], **scale)
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


# ----------------------------------------------------------------------------- real processor files

def real_processor(name: str):
    """The fixture processor of "tiny-qwen2.5-vl" / "tiny-qwen3-vl", loaded offline and checked
    (tokenizer length and Qwen's special ids). Its tokenizer pads on the right, as shipped."""
    from transformers import AutoProcessor

    spec = REAL[name]
    processor = AutoProcessor.from_pretrained(spec["fixture"], local_files_only=True)
    tokenizer = processor.tokenizer
    # transformers 5.24 can silently build a 1-entry vocabulary from vocab.json + merges.txt
    if len(tokenizer) != spec["tokens"]:
        raise RuntimeError(f"{spec['fixture']}: tokenizer has {len(tokenizer)} tokens, expected {spec['tokens']}")
    want = {**QWEN_IDS, **(QWEN3_THINK_IDS if name == "tiny-qwen3-vl" else {})}
    got = {t: tokenizer.convert_tokens_to_ids(t) for t in want}
    if got != want:
        raise RuntimeError(f"{spec['fixture']}: special token ids {got}, expected {want}")
    return processor


def _set_generation_ids(model) -> None:
    gc = model.generation_config
    gc.bos_token_id, gc.eos_token_id, gc.pad_token_id = (QWEN_IDS["<|endoftext|>"], QWEN_IDS["<|im_end|>"],
                                                         QWEN_IDS["<|endoftext|>"])


_SPECIAL_IDS = dict(bos_token_id=QWEN_IDS["<|endoftext|>"], eos_token_id=QWEN_IDS["<|im_end|>"],
                    pad_token_id=QWEN_IDS["<|endoftext|>"])
_VISION_IDS = dict(image_token_id=QWEN_IDS["<|image_pad|>"], video_token_id=QWEN_IDS["<|video_pad|>"],
                   vision_start_token_id=QWEN_IDS["<|vision_start|>"], vision_end_token_id=QWEN_IDS["<|vision_end|>"])


def _build_qwen25(seed: int, init_scale: float):
    """Qwen2.5-VL's architecture at toy width and depth: text 64 wide, 2 layers, 4 heads (2 kv), head
    dim 16, mrope [2, 3, 3] (Qwen's 16:24:24), rope theta 1e6; vision 32 wide, depth 2, 2 heads,
    patch 14, merge 2, window 112 px with block 0 windowed and block 1 full attention."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=128000,
                rms_norm_eps=1e-6, tie_word_embeddings=True, initializer_range=init_scale,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1000000.0},
                **_SPECIAL_IDS)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, hidden_act="silu", out_hidden_size=64,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, window_size=112,
                  fullatt_block_indexes=[1], initializer_range=init_scale)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_VISION_IDS,
                              **_SPECIAL_IDS)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _build_qwen3(seed: int, init_scale: float):
    """Qwen3-VL's architecture at toy width and depth: text 64 wide, 2 layers, 4 heads (2 kv), head dim
    16, interleaved mrope [4, 2, 2] (Qwen's 24:20:20), rope theta 5e6; vision 32 wide, depth 3, 2 heads,
    patch 16, merge 2, 2,304 learned position embeddings (a 48x48 grid, interpolated), deepstack
    from vision blocks 0 and 1 into text layers 0 and 1."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    text = dict(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, hidden_act="silu",
                max_position_embeddings=262144, rms_norm_eps=1e-6, tie_word_embeddings=True,
                initializer_range=init_scale,
                rope_parameters={"rope_type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True,
                                 "rope_theta": 5000000.0},
                **_SPECIAL_IDS)
    vision = dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, hidden_act="gelu_pytorch_tanh",
                  out_hidden_size=64, patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                  num_position_embeddings=2304, deepstack_visual_indexes=[0, 1], initializer_range=init_scale)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **_VISION_IDS,
                           **_SPECIAL_IDS)
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


# ----------------------------------------------------------------------------- the interface

def build(name: str, seed: int = 0, prompts: Sequence[str] = (), keys: Sequence[str] = (),
          init_scale: float | None = None):
    """(model, processor) for one of NAMES, model in eval mode; the same arguments give the same
    weights and tokenizer.

    prompts, keys: the text the in-process tokenizer of "tiny" / "demo" / "small" learns its merges
    from (the prompt variants; the answer's attribute names); ignored by the "tiny-qwen*" models,
    whose tokenizer is the real one. init_scale: the std of the random weights (the config's
    initializer_range; None keeps 0.02). At 0.02 a random model answers the same first token to
    every image; tests that need answers to differ between images use a larger scale (0.2 does).

    The "tiny-qwen*" processors keep Qwen's pixel limits (a 640x480 photo is 391 / 300 image tokens;
    Qwen3-VL upscales anything under 65,536 px) and their tokenizers pad on the right, as shipped.
    Their models have 151,936 embedding rows but the tokenizers 151,665 / 151,669 tokens: a random
    model can emit an id above those, which decodes to ''.
    """
    if name in SIZES:
        return _build_in_process(name, seed, prompts, keys, init_scale)
    if name not in REAL:
        raise ValueError(f"tiny model name must be one of {', '.join(NAMES)}; got {name!r}")
    scale = 0.02 if init_scale is None else float(init_scale)
    processor = real_processor(name)
    model = _build_qwen25(seed, scale) if name == "tiny-qwen2.5-vl" else _build_qwen3(seed, scale)
    _set_generation_ids(model)
    return model, processor


def save(name: str, out_dir: str, seed: int = 0, prompts: Sequence[str] = (), keys: Sequence[str] = (),
         init_scale: float | None = None) -> str:
    """Write build(...)'s model and processor to out_dir (a checkpoint folder `--model out_dir` and
    `AutoModelForImageTextToText` / `AutoProcessor.from_pretrained` load). Returns out_dir."""
    model, processor = build(name, seed, prompts, keys, init_scale)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- command line

def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write a small random Qwen-VL checkpoint folder (model + processor) "
                                             "that --model OUT loads.")
    ap.add_argument("name", choices=NAMES, help="which model: " + ", ".join(NAMES))
    ap.add_argument("out", help="output folder (created; files in it are overwritten)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the weights (and of the in-process "
                                                        "tokenizer's corpus); default 0")
    ap.add_argument("--init-scale", type=float, default=None,
                    help="std of the random weights (initializer_range); default 0.02")
    ap.add_argument("--prompt", action="append", default=[],
                    help="prompt text the in-process tokenizer of tiny/demo/small learns (repeatable; "
                         "ignored by tiny-qwen*)")
    ap.add_argument("--key", action="append", default=[],
                    help="answer attribute name for that tokenizer's corpus (repeatable; ignored by tiny-qwen*)")
    args = ap.parse_args(argv)
    save(args.name, args.out, args.seed, args.prompt, args.key, args.init_scale)
    print(args.out)


if __name__ == "__main__":
    main()
