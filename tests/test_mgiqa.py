"""The scorer: prompt, parsing, image loading, the offline models, load, score, token budgets and the CLI."""
import hashlib
import json
import math
import os
import random
import string
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import mgiqa
import rollouts
import tiny
from mgiqa import ATTRIBUTES, parse_answer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOOD = '{"sharpness": 4.10, "color": 3.80, "noise": 4.50, "composition": 3.20, "overall": 3.90}'
GOOD_VALUES = dict(sharpness=4.1, color=3.8, noise=4.5, composition=3.2, overall=3.9)


def nan_keys(d):
    return {k for k, v in d.items() if math.isnan(v)}


# ----------------------------------------------------------------------------- prompt

def test_prompt_names_every_attribute_scale_direction_and_layout():
    for thinking in (True, False):
        messages = mgiqa.build_messages(thinking)
        assert messages[0]["role"] == "user"
        content = messages[0]["content"]
        assert [c["type"] for c in content] == ["text", "image"]
        text = content[0]["text"]
        for name, definition in mgiqa.ATTRIBUTE_DEFINITIONS.items():
            assert f"{name}: {definition}" in text
        assert "between 1 and 5" in text and "two decimal places" in text
        assert "higher is better" in text and "1 representing very poor quality" in text
        assert "<answer>" in text and '"overall"' in text
        assert ("<think>" in text) == thinking
        # keys appear in answer order in the example layout
        example = text[text.rindex("<answer>"):]
        assert [example.index(f'"{a}"') for a in ATTRIBUTES] == sorted(example.index(f'"{a}"') for a in ATTRIBUTES)


# sha256 of the default prompts: the text the model reads (and the checkpoints learned) stays
# byte for byte what it was before the prompt was built from ATTRIBUTES
PROMPT_SHA256 = {True: "5667bdaf3d0900b5b855659b6ab278d4cd0c74edd63f415d3f996e290b689db1",
                 False: "7637c7ffb4fbddceac66d115d4e35444114d5cc9426c131bae05e3641ab4303d"}


def test_default_prompt_and_example_answer_are_unchanged():
    assert mgiqa.EXAMPLE_ANSWER == GOOD
    for thinking, digest in PROMPT_SHA256.items():
        text = mgiqa.build_prompt(thinking)
        assert text.startswith("You are an expert in image quality assessment. Rate this picture on "
                               "four attributes and overall.\n- sharpness: ")
        assert hashlib.sha256(text.encode()).hexdigest() == digest, thinking


# ----------------------------------------------------------------------------- parsing

STRICT_CASES = [
    (f"<think>looks fine</think><answer>{GOOD}</answer>", True, GOOD_VALUES),
    (f"  <think>a\nb</think>\n<answer>{GOOD}</answer>\n", True, GOOD_VALUES),
    (f"<think>x</think><answer>{GOOD}</answer> trailing", True, None),
    (f"<answer>{GOOD}</answer>", True, None),  # thinking mode needs the think block
    (f"<answer>{GOOD}</answer>", False, GOOD_VALUES),  # fast mode
    (f"<think>x</think><answer>{GOOD}</answer>", False, None),  # fast mode: answer only
    (f"<think></think><answer>{GOOD}</answer>", True, None),  # empty reasoning
    ('<think>x</think><answer>{"sharpness": 4, "color": 3, "noise": 4, "composition": 3}</answer>', True, None),
    ('<think>x</think><answer>{"sharpness": 6, "color": 3, "noise": 4, "composition": 3, "overall": 3}</answer>', True, None),
    ('<think>x</think><answer>{"sharpness": "4", "color": 3, "noise": 4, "composition": 3, "overall": 3}</answer>', True, None),
    ('<think>x</think><answer>sharpness=4 color=3 noise=4 composition=3 overall=3</answer>', True, None),
    (f"<think>x</think><answer>```json\n{GOOD}\n```</answer>", True, None),
    (f"<think>x</think><answer>{GOOD}</answer><answer>{GOOD}</answer>", True, None),
    ('<think>x</think><answer>{"sharpness": 1, "color": 5, "noise": 1.0, "composition": 5.0, "overall": 1}</answer>', True,
     dict(sharpness=1, color=5, noise=1, composition=5, overall=1)),
    ('<think>x</think><answer>{"sharpness": true, "color": 3, "noise": 4, "composition": 3, "overall": 3}</answer>', True, None),
    ("", True, None),
]


@pytest.mark.parametrize("text,thinking,expected", STRICT_CASES)
def test_parse_strict(text, thinking, expected):
    assert parse_answer(text, strict=True, thinking=thinking) == expected


LENIENT_CASES = [
    (f"<think>x</think><answer>{GOOD}</answer>", GOOD_VALUES, set()),
    (f"<answer>```json\n{GOOD}\n```</answer>", GOOD_VALUES, set()),
    (f"```json\n{GOOD}\n```", GOOD_VALUES, set()),
    ("<answer>sharpness=4 color=3.5 noise: 2 composition : 1.25 overall=3</answer>",
     dict(sharpness=4, color=3.5, noise=2, composition=1.25, overall=3), set()),
    ("<answer>overall: 3.3</answer>", dict(overall=3.3), {"sharpness", "color", "noise", "composition"}),
    ('<answer>{"sharpness": 7, "color": -2, "noise": 4, "composition": 3, "overall": 0.5}</answer>',
     dict(sharpness=5, color=1, noise=4, composition=3, overall=1), set()),
    (f"<answer>{GOOD}</answer> and then some trailing words overall=1", GOOD_VALUES, set()),
    ('<answer>{"overall": 2}</answer> text <answer>{"sharpness": 4.10, "color": 3.80, "noise": 4.50, "composition": 3.20, "overall": 3.90}</answer>',
     GOOD_VALUES, set()),
    ('<answer>{"sharpness": "4.5", "color": null, "noise": "bad", "composition": [3], "overall": 2}',
     dict(sharpness=4.5, overall=2), {"color", "noise", "composition"}),
    ("", {}, set(ATTRIBUTES)),
    ("the image is nice", {}, set(ATTRIBUTES)),
    ('<answer>{"sharpness": NaN, "color": 3, "noise": 3, "composition": 3, "overall": Infinity}</answer>',
     dict(color=3, noise=3, composition=3), {"sharpness", "overall"}),
    ("<answer></answer> overall=2.5", dict(overall=2.5), {"sharpness", "color", "noise", "composition"}),
    ("Overall = 4.2, Sharpness: 3", dict(overall=4.2, sharpness=3), {"color", "noise", "composition"}),
]


@pytest.mark.parametrize("text,expected,missing", LENIENT_CASES)
def test_parse_lenient(text, expected, missing):
    parsed = parse_answer(text)
    assert list(parsed) == list(ATTRIBUTES)
    assert nan_keys(parsed) == missing
    for key, value in expected.items():
        assert parsed[key] == pytest.approx(value)


def test_parse_lenient_without_clip_turns_out_of_range_into_nan():
    parsed = parse_answer('<answer>{"sharpness": 7, "color": 0.99, "noise": 4, "composition": 5, "overall": 1}</answer>', clip=False)
    assert nan_keys(parsed) == {"sharpness", "color"}
    assert parsed["composition"] == 5 and parsed["overall"] == 1


def test_parse_never_raises_on_random_strings():
    rng = random.Random(0)
    alphabet = string.printable + "{}\"'<>:=.-eE" * 4 + "ñ€\x00"
    pieces = ["<answer>", "</answer>", "<think>", "</think>", "```", "{", "}", '"overall":', "sharpness=", "1e999", "NaN", "3.5"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) if rng.random() < 0.3 else rng.choice(alphabet) for _ in range(rng.randint(0, 80)))
        lenient = parse_answer(text)
        assert list(lenient) == list(ATTRIBUTES)
        assert all(math.isnan(v) or 1.0 <= v <= 5.0 for v in lenient.values())
        for thinking in (True, False):
            strict = parse_answer(text, strict=True, thinking=thinking)
            assert strict is None or all(1.0 <= v <= 5.0 for v in strict.values())
    assert parse_answer(None)["overall"] != parse_answer(None)["overall"]  # NaN, not an exception


# ----------------------------------------------------------------------------- images

def test_load_image_modes(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red -> white
    assert mgiqa.load_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    assert mgiqa.load_image(Image.new("L", (4, 4), 100)).getpixel((0, 0)) == (100, 100, 100)
    assert mgiqa.load_image(Image.new("CMYK", (4, 4), (0, 0, 0, 0))).getpixel((0, 0)) == (255, 255, 255)
    sixteen = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert mgiqa.load_image(sixteen).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert mgiqa.load_image(palette).getpixel((0, 0)) == (10, 20, 30)
    # EXIF orientation 6 (rotate 90 CW to view): an 8x4 stored image is shown 4x8
    path = tmp_path / "rot.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (8, 4), (0, 128, 0)).save(path, exif=exif)
    assert mgiqa.load_image(str(path)).size == (4, 8)


def bad_files(tmp_path):
    missing = tmp_path / "missing.png"
    good = tmp_path / "good.jpg"
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(good, quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:300])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not an image\n")
    return missing, truncated, text


def test_load_image_errors_name_the_file(tmp_path):
    for path in bad_files(tmp_path):
        with pytest.raises(mgiqa.ImageLoadError) as err:
            mgiqa.load_image(str(path))
        assert str(path) in str(err.value) and "\n" not in str(err.value)


# ----------------------------------------------------------------------------- offline models, load, score

@pytest.fixture(scope="module")
def tiny_model():
    return mgiqa.load("tiny", device="cpu")


def test_tiny_model_is_deterministic_and_small(tiny_model):
    model, processor = tiny_model
    model2, processor2 = mgiqa.load("tiny", device="cpu")
    n = sum(p.numel() for p in model.parameters())
    assert n < 1_000_000
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), k
    assert processor.tokenizer.get_vocab() == processor2.tokenizer.get_vocab()
    model3, _ = mgiqa.load("tiny", device="cpu", seed=1)
    assert not torch.equal(model.lm_head.weight, model3.lm_head.weight)
    # a score is one token, Qwen's special tokens are single tokens
    tok = processor.tokenizer
    for digit in "12345":
        assert tok.tokenize(f'"overall": {digit}')[-1] == digit
    for special in tiny.SPECIAL_TOKENS:
        assert tok.tokenize(special) == [special]


def test_small_size_parameter_count():
    model, _ = mgiqa.load("small", device="cpu")
    assert 20e6 <= sum(p.numel() for p in model.parameters()) <= 50e6


def forward_logits(model, processor, image):
    enc = processor(text=[mgiqa.prompt_text(processor)], images=[image], return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_save_load_roundtrip(tiny_model, tmp_path):
    model, processor = tiny_model
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    model2, processor2 = mgiqa.load(str(tmp_path), device="cpu")
    image = Image.fromarray((np.random.RandomState(1).rand(56, 84, 3) * 255).astype("uint8"))
    assert torch.equal(forward_logits(model, processor, image), forward_logits(model2, processor2, image))
    assert processor2.tokenizer.padding_side == "left"


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mgiqa.load(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        mgiqa.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a supported VLM"):
        mgiqa.load(str(tmp_path))


@pytest.mark.parametrize("name, padding_side", [("tiny-qwen2.5-vl", "right"), ("tiny-qwen2.5-vl", "left"),
                                                ("tiny-qwen3-vl", "right")])
def test_score_batch_size_does_not_change_results(name, padding_side):
    """Batched greedy scoring with the real processors equals one image at a time, with images of
    different sizes (padding), whichever padding side the checkpoint's tokenizer declares."""
    model, processor = tiny.build(name, seed=0, init_scale=0.2)
    processor.tokenizer.padding_side = padding_side
    rng = np.random.RandomState(0)
    images = [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for h, w in [(56, 56), (84, 56), (112, 84), (56, 140)]]
    one = mgiqa.score(model, processor, images, batch_size=1, max_new_tokens=12)
    four = mgiqa.score(model, processor, images, batch_size=4, max_new_tokens=12)
    assert [r["completion"] for r in one] == [r["completion"] for r in four]
    assert len({r["completion"] for r in one}) > 1  # outputs depend on the image, so the check means something
    again = mgiqa.score(model, processor, images[:2], batch_size=2, max_new_tokens=12)
    assert [r["completion"] for r in again] == [r["completion"] for r in one[:2]]
    for r in one:
        assert set(ATTRIBUTES) <= set(r) and isinstance(r["strict"], bool) and "reasoning" in r


def test_score_num_samples_reports_std(tiny_model):
    model, processor = tiny_model
    image = Image.new("RGB", (56, 56), (100, 120, 140))
    [result] = mgiqa.score(model, processor, [image], num_samples=3, temperature=1.0, max_new_tokens=8)
    assert len(result["completions"]) == 3 and set(result["std"]) == set(ATTRIBUTES)
    with pytest.raises(ValueError, match="temperature"):
        mgiqa.score(model, processor, [image], num_samples=3)


@pytest.fixture
def run_cli(capsys):
    """mgiqa.main in this process: its exit code, stdout and stderr."""
    def run(*args):
        capsys.readouterr()
        code = mgiqa.main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


def test_cli_scores_png_and_jpeg_and_reports_bad_files(tmp_path, run_cli):
    png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
    Image.new("RGB", (60, 50), (200, 10, 10)).save(png)
    Image.new("RGB", (90, 70), (10, 200, 10)).save(jpg)
    out = run_cli("--model", "tiny", "--max-new-tokens", "8", str(png), str(jpg))
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(rows) == 3 and "a.png" in rows[1] and "b.jpg" in rows[2]
    assert "noise" in out.stderr  # the untrained-model warning
    out = run_cli("--model", "tiny", "--json", "--max-new-tokens", "8", str(png))
    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert record["image"] == str(png) and set(ATTRIBUTES) <= set(record) and "reasoning" in record

    missing, truncated, text = bad_files(tmp_path)
    out = run_cli("--model", "tiny", "--max-new-tokens", "8", str(png), str(missing), str(truncated), str(text))
    assert out.returncode == 2
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and all(str(p) in e for p, e in zip((missing, truncated, text), errors))
    assert "a.png" in out.stdout  # the good image is still scored


# ----------------------------------------------------------------------------- token budgets, real tokenizer

def longest_valid_answer(thinking: bool, indent=None) -> str:
    """Five two-decimal scores (the prompt's layout), optionally pretty-printed; with a one-sentence reasoning."""
    answer = json.dumps({a: 4.75 for a in ATTRIBUTES}, indent=indent)
    think = "<think>The edges are soft, colors natural, a little grain in the shadows, and the subject sits off-centre.</think>"
    return (think if thinking else "") + f"<answer>{answer}</answer>"


@pytest.mark.parametrize("name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_default_budgets_hold_the_longest_valid_answer_in_real_tokens(name):
    """Qwen's tokenizers spend one token per digit: the answer alone is ~50 tokens. Each default budget
    holds the longest valid answer (pretty-printed JSON too) plus its EOS, and parses strictly."""
    processor = tiny.real_processor(name)
    for thinking in (True, False):
        for indent in (None, 2):
            text = longest_valid_answer(thinking, indent)
            assert mgiqa.parse_answer(text, strict=True, thinking=thinking) is not None
            n = len(processor.tokenizer(text).input_ids) + 1  # + <|im_end|>
            assert n <= mgiqa.MAX_NEW_TOKENS[thinking], (thinking, indent, n)
    compact = len(processor.tokenizer(longest_valid_answer(False)).input_ids)
    assert 45 <= compact <= 55  # 50 with two decimals, measured with this tokenizer


def test_prompt_token_counts_with_the_real_processor():
    """What a real prompt costs: the text (~285 tokens thinking) plus the image (640x480: 391 tokens)."""
    processor = tiny.real_processor("tiny-qwen2.5-vl")
    image = Image.new("RGB", (640, 480), (90, 120, 150))
    counts = {}
    for thinking in (True, False):
        enc = processor(text=[mgiqa.prompt_text(processor, thinking)], images=[image], return_tensors="pt")
        counts[thinking] = int(enc["input_ids"].shape[1])
        assert int((enc["input_ids"] == 151655).sum()) == 391
    assert 391 + 200 < counts[True] < 391 + 350 and counts[False] < counts[True]


def test_a_template_that_opens_the_think_block_still_parses():
    """A Qwen3-VL Thinking-style template writes "<think>\\n" after the assistant header itself: the
    completion continues inside the block, and the decoded text gets the opening back, so the strict
    format and the scores parse (the Instruct template opens nothing)."""
    processor = tiny.real_processor("tiny-qwen3-vl")
    assert mgiqa.template_opening(processor) == ""
    header = "<|im_start|>assistant\\n"
    assert header in processor.chat_template
    processor.chat_template = processor.chat_template.replace(header, header + "<think>\\n")
    assert mgiqa.prompt_text(processor).endswith("<think>\n")
    opening = mgiqa.template_opening(processor)
    assert opening == "<think>\n"
    scores = {a: 2 if a in ("sharpness", "overall") else 5 for a in ATTRIBUTES}
    answer = f"blurry edges</think><answer>{json.dumps(scores)}</answer>"
    ids = torch.tensor([processor.tokenizer(answer).input_ids + [151645]])
    [text] = mgiqa.decode_completions(processor, ids, [151645], opening)
    assert mgiqa.parse_answer(text, strict=True) == scores
    [bare] = mgiqa.decode_completions(processor, ids, [151645])
    assert mgiqa.parse_answer(bare, strict=True) is None  # without the opening the format reward would be 0


def test_default_pixel_cap_holds_a_4000x3000_photo(tmp_path):
    model, processor = mgiqa.load("tiny", device="cpu")
    processor.image_processor.size["longest_edge"] = 12845056  # Qwen's published 12.8 MP
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    photo = Image.new("RGB", (4000, 3000), (90, 120, 150))
    uncapped = processor.image_processor(images=[photo], return_tensors="pt")["image_grid_thw"].prod() // 4
    assert uncapped == 15301  # what Qwen's own cap gives
    _, loaded = mgiqa.load(str(tmp_path / "m"), device="cpu")
    enc = rollouts.encode_prompts(model, loaded, [photo], mgiqa.prompt_text(loaded))
    assert enc.image_grid_thw.prod() // 4 <= 1280  # the default cap: 1,280 tokens of 28 x 28 px
    assert mgiqa.default_max_pixels(loaded.image_processor) == mgiqa.DEFAULT_MAX_PIXELS == 1280 * 28 * 28
    _, small = mgiqa.load("tiny", device="cpu")  # a smaller saved cap (448 x 448) wins
    assert small.image_processor.size["longest_edge"] == 448 * 448


def test_checkpoint_generation_config_cannot_change_scores(tmp_path):
    model, processor = mgiqa.load("tiny", device="cpu")
    model.save_pretrained(tmp_path / "plain")
    gc = model.generation_config  # in the manner of Qwen's published file, with stronger values
    gc.do_sample, gc.temperature, gc.top_k, gc.repetition_penalty, gc.no_repeat_ngram_size = True, 0.1, 3, 1.5, 2
    model.save_pretrained(tmp_path / "penalised")
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (56, 84, 3), dtype=np.uint8)) for i in range(3)]
    scored = {}
    for name in ("plain", "penalised"):
        processor.save_pretrained(tmp_path / name)
        m, proc = mgiqa.load(str(tmp_path / name), device="cpu")
        assert (m.generation_config.repetition_penalty == 1.5) == (name == "penalised")
        greedy = mgiqa.score(m, proc, images, max_new_tokens=24)
        torch.manual_seed(0)
        sampled = mgiqa.score(m, proc, images, max_new_tokens=24, temperature=1.0, num_samples=2)
        scored[name] = [r["completions"] for r in greedy + sampled]
    assert scored["plain"] == scored["penalised"]
