"""tiny.py: the real processor fixtures (tests/fixtures), the tiny-qwen2.5-vl / tiny-qwen3-vl models
built on them, the in-process-tokenizer models, determinism, and save -> from_pretrained."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the processors load from tests/fixtures, never the hub

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import mgiqa  # noqa: E402
import tiny  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
QWEN_NAMES = ("tiny-qwen2.5-vl", "tiny-qwen3-vl")
MESSAGE = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Rate this image."}]}]
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
QWEN25_RENDERING = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    f"{VISION}Rate this image.<|im_end|>\n<|im_start|>assistant\n")
# The fixture's (reconstructed) Qwen3-VL template: no default system prompt.
QWEN3_RENDERING = f"<|im_start|>user\n{VISION}Rate this image.<|im_end|>\n<|im_start|>assistant\n"
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653


def photo(width=640, height=480, seed=0):
    rng = np.random.RandomState(seed)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3))
    return Image.fromarray(np.clip(ramp + rng.normal(0, 20, (height, width, 3)), 0, 255).astype("uint8"))


def processor_of(folder):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(os.path.join(FIXTURES, folder), local_files_only=True)


@pytest.fixture(scope="module")
def qwen25_processor():
    return processor_of("qwen2.5-vl")


@pytest.fixture(scope="module")
def qwen3_processor():
    return processor_of("qwen3-vl")


@pytest.fixture(scope="module")
def built():
    """Each tiny-qwen model, built once for this module (seed 0, default scale)."""
    return {name: tiny.build(name) for name in QWEN_NAMES}


# ----------------------------------------------------------------------------- the fixtures

def test_qwen3_fixture_shares_vocab_and_merges_through_relative_symlinks():
    for name in ("vocab.json", "merges.txt"):
        link = os.path.join(FIXTURES, "qwen3-vl", name)
        assert os.path.islink(link) and os.readlink(link) == f"../qwen2.5-vl/{name}"
        assert os.path.samefile(link, os.path.join(FIXTURES, "qwen2.5-vl", name))


def real_tokenizer(proc, cls: str, tokens: int):
    """The checks both families share: the class, the vocabulary size, one encoding, EOS and pad as
    shipped, right padding (callers that batch set left padding themselves)."""
    tok = proc.tokenizer
    assert type(proc).__name__ == cls and len(tok) == tokens
    assert tok.encode("Hello world") == [9707, 1879]
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token, tok.pad_token_id) == ("<|im_end|>", 151645, "<|endoftext|>", 151643)
    assert tok.padding_side == "right"
    return tok


def test_qwen25_processor_is_the_real_one(qwen25_processor):
    proc = qwen25_processor
    tok = real_tokenizer(proc, "Qwen2_5_VLProcessor", 151665)
    # digits one by one, the point and the leading space separate; <think> is plain text here
    assert tok.encode(" 3.72") == [220, 18, 13, 22, 17]
    assert len(tok.encode("<think>")) > 1
    text = proc.apply_chat_template(MESSAGE, add_generation_prompt=True, tokenize=False)
    assert text == QWEN25_RENDERING
    enc = proc(text=[text], images=[photo()], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 34, 46]]  # 644 x 476 px, 28 px per merged token
    ids = enc["input_ids"][0].tolist()
    assert ids.count(IMAGE_PAD) == 391 and len(ids) == 416


def test_qwen3_processor_is_the_real_one(qwen3_processor):
    proc = qwen3_processor
    tok = real_tokenizer(proc, "Qwen3VLProcessor", 151669)
    assert tok.convert_tokens_to_ids(["<think>", "</think>"]) == [151667, 151668]
    assert tok.encode("<think>x</think>") == [151667, 87, 151668]
    text = proc.apply_chat_template(MESSAGE, add_generation_prompt=True, tokenize=False)
    assert text == QWEN3_RENDERING
    enc = proc(text=[text], images=[photo()], return_tensors="pt")
    assert enc["image_grid_thw"].tolist() == [[1, 30, 40]]  # 640 x 480 px, 32 px per merged token
    ids = enc["input_ids"][0].tolist()
    # <|im_start|>user\n, then the image block, then the text
    head = tok.encode("<|im_start|>user\n")
    assert ids[:len(head)] == head
    block = ids[len(head):len(head) + 302]
    assert block == [VISION_START] + [IMAGE_PAD] * 300 + [VISION_END]
    assert ids.count(IMAGE_PAD) == 300
    assert tok.decode(ids[len(head) + 302:]) == "Rate this image.<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- tiny-qwen models

def test_names():
    assert tiny.NAMES == ("tiny", "demo", "small", "tiny-qwen2.5-vl", "tiny-qwen3-vl")
    with pytest.raises(ValueError, match="tiny-qwen3-vl"):
        tiny.build("huge")


@pytest.mark.parametrize("name, cls, tokens, vision", [
    ("tiny-qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration", 151665, (14, 2, 2)),
    ("tiny-qwen3-vl", "Qwen3VLForConditionalGeneration", 151669, (16, 2, 3))])
def test_tiny_qwen_config(built, name, cls, tokens, vision):
    model, proc = built[name]
    c = model.config
    assert type(model).__name__ == cls
    assert len(proc.tokenizer) == tokens and proc.tokenizer.padding_side == "right"
    assert model.get_input_embeddings().weight.shape == (151936, 64)
    assert (c.vision_config.patch_size, c.vision_config.spatial_merge_size, c.vision_config.depth) == vision
    if name == "tiny-qwen2.5-vl":
        assert list(c.vision_config.fullatt_block_indexes) == [1] and c.vision_config.window_size == 112
        assert sum(c.text_config.rope_parameters["mrope_section"]) == 64 // 4 // 2
    else:
        assert list(c.vision_config.deepstack_visual_indexes) == [0, 1]
        assert len(model.model.visual.deepstack_merger_list) == 2
        rope = c.text_config.rope_parameters
        assert rope["mrope_interleaved"] is True and sum(rope["mrope_section"]) == c.text_config.head_dim // 2


@pytest.mark.parametrize("name", QWEN_NAMES)
def test_tiny_qwen_special_ids_everywhere(built, name):
    model, _ = built[name]
    c = model.config
    for cfg in (c, c.text_config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (151643, 151645, 151643), cfg
    assert (c.image_token_id, c.video_token_id, c.vision_start_token_id, c.vision_end_token_id) == (151655, 151656, 151652, 151653)


@pytest.mark.parametrize("name", QWEN_NAMES)
def test_tiny_qwen_forward_and_generate(built, name):
    model, proc = built[name]
    text = proc.apply_chat_template(MESSAGE, add_generation_prompt=True, tokenize=False)
    enc = proc(text=[text], images=[photo(160, 120)], return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert logits.shape == (1, enc["input_ids"].shape[1], 151936) and torch.isfinite(logits).all()
    new = out[0, enc["input_ids"].shape[1]:]
    assert len(new) == 5  # an untrained model never emits <|im_end|> this early
    assert new[0].item() == logits[0, -1].argmax().item()  # greedy: the forward's choice


@pytest.mark.parametrize("name", QWEN_NAMES)
def test_tiny_qwen_same_seed_same_weights(built, name):
    model, _ = built[name]
    again, _ = tiny.build(name, seed=0)
    other, _ = tiny.build(name, seed=1)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


@pytest.mark.parametrize("name", QWEN_NAMES)
def test_tiny_qwen_init_scale(name):
    """At 0.02 a random model answers the same token to every image; at 0.2 answers depend on the image."""
    answers = {}
    for scale in (0.02, 0.2):
        model, proc = tiny.build(name, init_scale=scale)
        weight = model.model.language_model.layers[0].mlp.gate_proj.weight
        assert abs(weight.std().item() - scale) < 0.1 * scale
        text = proc.apply_chat_template(MESSAGE, add_generation_prompt=True, tokenize=False)
        answers[scale] = []
        for image in (photo(160, 120, seed=0), Image.new("RGB", (160, 120), (255, 0, 0))):
            enc = proc(text=[text], images=[image], return_tensors="pt")
            with torch.no_grad():
                answers[scale].append(model.generate(**enc, max_new_tokens=3, do_sample=False)[0, -3:].tolist())
    assert answers[0.02][0] == answers[0.02][1]
    assert answers[0.2][0] != answers[0.2][1]


# ----------------------------------------------------------------------------- save -> from_pretrained

@pytest.mark.parametrize("name", QWEN_NAMES)
def test_save_roundtrip(built, name, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = str(tmp_path / name)
    tiny.main([name, out])  # the CLI: python tiny.py NAME OUT
    model, proc = built[name]
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    loaded_proc = AutoProcessor.from_pretrained(out)
    assert type(loaded) is type(model) and type(loaded_proc) is type(proc)
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(loaded_proc.tokenizer) == len(proc.tokenizer) == {"tiny-qwen2.5-vl": 151665, "tiny-qwen3-vl": 151669}[name]
    assert loaded_proc.tokenizer.get_vocab() == proc.tokenizer.get_vocab()
    assert loaded_proc.tokenizer.padding_side == "right"
    assert loaded.generation_config.eos_token_id == 151645
    text = loaded_proc.apply_chat_template(MESSAGE, add_generation_prompt=True, tokenize=False)
    assert text == {"tiny-qwen2.5-vl": QWEN25_RENDERING, "tiny-qwen3-vl": QWEN3_RENDERING}[name]


# ----------------------------------------------------------------------------- in-process tokenizer models

RATE = f"Rate {', '.join(mgiqa.LABELLED)} and overall."
PROMPTS = (f"{RATE} <think> ... </think><answer>{mgiqa.EXAMPLE_ANSWER}</answer>",
           f"{RATE} <answer>{mgiqa.EXAMPLE_ANSWER}</answer>")
KEYS = mgiqa.ATTRIBUTES


def test_in_process_demo_model_is_deterministic_and_short():
    model, proc = tiny.build("demo", seed=0, prompts=PROMPTS, keys=KEYS)
    again, proc2 = tiny.build("demo", seed=0, prompts=PROMPTS, keys=KEYS)
    a, b = model.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tok = proc.tokenizer
    assert tok.get_vocab() == proc2.tokenizer.get_vocab()
    assert len(tok) == 1024 and tok.padding_side == "left"
    assert model.get_input_embeddings().weight.shape[0] == 1024
    answer = '<think>blurry</think><answer>{"sharpness": 2, "color": 5, "noise": 5, "composition": 4, "overall": 3}</answer>'
    pieces = tok.tokenize(answer)
    assert len(pieces) <= 20, pieces  # the prompt's phrases are merges
    assert [p for p in pieces if p.isdigit()] == ["2", "5", "5", "4", "3"]
    for special in tiny.SPECIAL_TOKENS:
        assert tok.tokenize(special) == [special]
    # other prompts, another tokenizer: the corpus is the caller's
    _, plain = tiny.build("tiny", seed=0)
    assert len(plain.tokenizer) == 768 and plain.tokenizer.get_vocab() != tiny.build("tiny", seed=0, prompts=PROMPTS, keys=KEYS)[1].tokenizer.get_vocab()
