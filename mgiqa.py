"""MG-IQA's scorer (docs/METHOD.md, section 1): the attribute-aware prompt, strict and lenient
parsing of the answer, image and model loading with the pixel cap, `score`, and the scoring command
line.

One vision-language model looks at an image and, in one generation, reasons about sharpness, color
fidelity, noise and composition, then writes a score for each and an overall score, as one JSON
object whose keys run fine to coarse, so the overall score is generated after, and conditioned on,
the attribute scores (MG-IQA, arXiv 2604.09704, built on VisualQuality-R1, arXiv 2505.14460).

    python mgiqa.py --model Qwen/Qwen2.5-VL-7B-Instruct photo.jpg other.png      # a real model
    python mgiqa.py --model runs/mgiqa/merged photo.jpg --json                   # the reasoning too
    python mgiqa.py --model Qwen/Qwen2.5-VL-7B-Instruct --adapter runs/mgiqa/final photo.jpg
    python mgiqa.py --model tiny-qwen2.5-vl photo.jpg                            # offline

Departures (answer layout, NaN for an unparseable score, the instruction before the image):
docs/METHOD.md, section 7.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

import tiny

# ----------------------------------------------------------------------------- the prompt

# The one list of scores, in answer order (fine to coarse: "overall" last, conditioned on the rest).
# A new attribute needs an entry here, in ATTRIBUTE_DEFINITIONS and in EXAMPLE_SCORES (checked at
# import), and one in FAMILY_TO_ATTRIBUTE if a distortion family degrades it.
ATTRIBUTES = ("sharpness", "color", "noise", "composition", "overall")
LABELLED = tuple(a for a in ATTRIBUTES if a != "overall")  # a dataset may label these; overall: MOS
# which attribute a distortion family degrades (synthetic datasets' metadata; docs/METHOD.md,
# section 4)
FAMILY_TO_ATTRIBUTE = {"blur": "sharpness", "noise": "noise", "color": "color",
                       "composition": "composition"}

ATTRIBUTE_DEFINITIONS = {
    "sharpness": "how clear the edges and fine details are; 5 means crisp, "
                 "1 means heavily blurred.",
    "color": "how natural and faithful the colors are; 5 means natural color, "
             "1 means a strong cast or washed-out color.",
    "noise": "how free the image is of noise and grain; 5 means no visible noise, "
             "1 means heavy noise.",
    "composition": "how well the subject is framed; 5 means a well-composed frame, "
                   "1 means the subject is badly placed or cut off.",
}

# The VisualQuality-R1 question for the overall score, kept verbatim (docs/METHOD.md, section 1).
OVERALL_QUESTION = (
    "What is your overall rating on the quality of this picture? The rating should be a float "
    "between 1 and 5, rounded to two decimal places, with 1 representing very poor quality and 5 "
    "representing excellent quality."
)
# the example answer's score of each attribute (the prompt shows it: keep two decimals)
EXAMPLE_SCORES = {"sharpness": 4.10, "color": 3.80, "noise": 4.50, "composition": 3.20,
                  "overall": 3.90}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _check_attributes() -> None:
    """Fail at import, naming the value, where the attribute tables disagree with ATTRIBUTES."""
    if not ATTRIBUTES or ATTRIBUTES[-1] != "overall" or ATTRIBUTES.count("overall") != 1:
        raise ValueError(f"ATTRIBUTES must end with 'overall' (once), got {ATTRIBUTES}")
    if len(set(ATTRIBUTES)) != len(ATTRIBUTES):
        raise ValueError(f"ATTRIBUTES has a repeated name: {ATTRIBUTES}")
    for table, names in (("ATTRIBUTE_DEFINITIONS", LABELLED), ("EXAMPLE_SCORES", ATTRIBUTES)):
        keys = globals()[table]
        for name in names:
            if name not in keys:
                raise ValueError(f"attribute {name!r} has no entry in mgiqa.{table}")
        for name in keys:
            if name not in names:
                raise ValueError(f"mgiqa.{table} has {name!r}, which is not in {names}")
    for family, name in FAMILY_TO_ATTRIBUTE.items():
        if name not in LABELLED:
            raise ValueError(f"FAMILY_TO_ATTRIBUTE[{family!r}] = {name!r} is not in {LABELLED}")
    if len(LABELLED) >= len(NUMBER_WORDS):
        raise ValueError(f"{len(LABELLED)} attributes: the prompt spells counts up to "
                         f"{len(NUMBER_WORDS) - 1} (NUMBER_WORDS)")


_check_attributes()
EXAMPLE_ANSWER = "{" + ", ".join(f'"{a}": {EXAMPLE_SCORES[a]:.2f}' for a in ATTRIBUTES) + "}"


def build_prompt(thinking: bool = True) -> str:
    lines = ["You are an expert in image quality assessment. "
             f"Rate this picture on {NUMBER_WORDS[len(LABELLED)]} attributes and overall."]
    for name in LABELLED:
        lines.append(f"- {name}: {ATTRIBUTE_DEFINITIONS[name]}")
    lines.append(OVERALL_QUESTION)
    lines.append("Every score is a float between 1 and 5, rounded to two decimal places; "
                 "higher is better for every key.")
    if thinking:
        lines.append("First reason briefly about each attribute and how they combine inside "
                     "<think> </think> tags, then give the scores as one JSON object inside "
                     "<answer> </answer> tags, keys in this order:")
        lines.append(f"<think> ... </think><answer>{EXAMPLE_ANSWER}</answer>")
    else:
        lines.append("Give only the scores as one JSON object inside <answer> </answer> tags, "
                     "keys in this order:")
        lines.append(f"<answer>{EXAMPLE_ANSWER}</answer>")
    return "\n".join(lines)


def build_messages(thinking: bool = True) -> list[dict]:
    """Chat messages with one image slot, in the Qwen-VL content layout."""
    # The instruction before the image (departure 3): every prompt then starts with the same tokens.
    # No path here computes them once for several images (rollouts.sample_shared shares one image's
    # prompt across its K completions); a serving engine's prefix cache can.
    content = [{"type": "text", "text": build_prompt(thinking)}, {"type": "image"}]
    return [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------- parsing

_STRICT_THINK = re.compile(r"<think>(.+?)</think>\s*<answer>(.+?)</answer>", re.DOTALL)
_STRICT_FAST = re.compile(r"<answer>(.+?)</answer>", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = {a: re.compile(r"[\"']?\b" + a + r"\b[\"']?\s*[:=]\s*[\"']?(" + _NUMBER + ")",
                      re.IGNORECASE)
         for a in ATTRIBUTES}


def _as_float(value) -> float:
    if isinstance(value, bool):
        return math.nan
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return math.nan
    return math.nan


def _strict(text: str, thinking: bool) -> dict[str, float] | None:
    match = (_STRICT_THINK if thinking else _STRICT_FAST).fullmatch(text.strip())
    if match is None:
        return None
    try:
        obj = json.loads(match.group(2 if thinking else 1).strip())
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or set(obj) != set(ATTRIBUTES):
        return None
    out = {}
    for key in ATTRIBUTES:
        value = obj[key]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or not 1.0 <= value <= 5.0:
            return None
        out[key] = float(value)
    return out


def _last_json_object(block: str) -> dict | None:
    """The last `{...}` span that parses as a JSON object (no nesting needed for our answers)."""
    for match in reversed(list(re.finditer(r"\{[^{}]*\}", block))):
        try:
            obj = json.loads(match.group(0))
        except (ValueError, RecursionError):
            continue
        if isinstance(obj, dict):
            return obj
    return None


def parse_answer(text: str, strict: bool = False, thinking: bool = True,
                 clip: bool = True) -> dict[str, float] | None:
    """Scores from a completion (docs/METHOD.md, section 1).

    strict: None unless the whole completion is exactly the requested layout with every key of
    ATTRIBUTES in [1, 5]. Lenient: always a dict with the keys of ATTRIBUTES, each a float in [1, 5]
    or NaN; never raises. With clip=False, a value outside [1, 5] becomes NaN instead of being
    clipped.
    """
    if not isinstance(text, str):
        return None if strict else {a: math.nan for a in ATTRIBUTES}
    if strict:
        return _strict(text, thinking)
    blocks = _ANSWER_BLOCK.findall(text)
    block = blocks[-1] if blocks and blocks[-1].strip() else text
    block = _FENCE.sub(" ", block)
    obj = _last_json_object(block)
    scores = {}
    for key in ATTRIBUTES:
        value = math.nan
        if obj is not None and key in obj:
            value = _as_float(obj[key])
        if math.isnan(value):
            found = _PAIR[key].findall(block)
            if found:
                value = _as_float(found[-1])
        if not math.isfinite(value):
            value = math.nan
        elif not 1.0 <= value <= 5.0:
            value = min(max(value, 1.0), 5.0) if clip else math.nan
        scores[key] = value
    return scores


def reasoning_text(text: str) -> str:
    match = re.search(r"<think>(.*?)</think>", text or "", re.DOTALL)
    return match.group(1).strip() if match else ""


# ----------------------------------------------------------------------------- images

class ImageLoadError(ValueError):
    """An image file that is missing, truncated or not an image. The message names the file."""


def load_image(image):
    """Any path or PIL image -> an RGB PIL image: EXIF orientation applied, alpha composited on
    white, 16-bit and float data scaled to 8 bits. Raises ImageLoadError naming the file."""
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    name = getattr(image, "filename", None) or "<PIL image>"
    if not isinstance(image, Image.Image):
        name = str(image)
        if not os.path.exists(name):
            raise ImageLoadError(f"{name}: no such file")
        if os.path.isdir(name):
            raise ImageLoadError(f"{name}: is a directory, not an image")
        try:
            with Image.open(name) as opened:
                opened.load()
                image = ImageOps.exif_transpose(opened)  # always a loaded copy
        except UnidentifiedImageError:
            raise ImageLoadError(f"{name}: not an image file (PIL cannot identify it)") from None
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(f"{name}: unreadable or truncated image ({err})") from None
    else:
        image = ImageOps.exif_transpose(image)
    try:
        mode = image.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
            arr = np.asarray(image, dtype=np.float64)
            top = 65535.0 if (mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
            if mode == "F" and arr.max(initial=0) <= 1.0:
                top = 1.0
            image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            mode = "L"
        if mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
            mode = "RGBA"
        if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ImageLoadError(f"{name}: cannot convert image of mode {image.mode} to RGB "
                             f"({err})") from None


# ----------------------------------------------------------------------------- loading checkpoints

# scoring; grpo.py trains TRAINABLE_MODEL_TYPES
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")
TRAINABLE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # dense; the MoE one scores only
TINY_MODELS = tiny.NAMES  # offline models built in-process (tests, the demo); --model takes them
DEFAULT_IMAGE_TOKENS = 1280  # transformers' default for these processors: at most 1,280 tokens
DEFAULT_MAX_PIXELS = DEFAULT_IMAGE_TOKENS * 28 * 28  # 1,003,520 px with Qwen2.5-VL's 28 px tokens


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def apply_adapter(model, adapter_dir: str | os.PathLike) -> None:
    """Merge LoRA weights saved in PEFT's layout (adapter_config.json, adapter_model.safetensors,
    keys `base_model.model.<module>.lora_A.weight`) into the model: W + alpha / r * B @ A in
    fp32."""
    import torch
    from safetensors.torch import load_file

    from lora import merged_weight

    adapter_dir = Path(adapter_dir)
    config_path = adapter_dir / "adapter_config.json"
    weights_path = adapter_dir / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; an adapter folder holds adapter_config.json "
                                    "and adapter_model.safetensors")
    config = json.loads(config_path.read_text())
    scale = float(config["lora_alpha"]) / float(config["r"])
    weights = load_file(str(weights_path))
    modules = dict(model.named_modules())
    prefix = "base_model.model."
    names = sorted({k[len(prefix):].rsplit(".lora_", 1)[0] for k in weights if ".lora_A." in k})
    for name in names:
        if name not in modules:
            raise ValueError(f"{weights_path}: adapter targets {name!r}, which this model does "
                             "not have")
        linear = modules[name]
        a = weights[f"base_model.model.{name}.lora_A.weight"]
        b = weights[f"base_model.model.{name}.lora_B.weight"]
        with torch.no_grad():
            device = linear.weight.device
            linear.weight.copy_(merged_weight(linear.weight, a.to(device), b.to(device), scale))


def load(name_or_path: str, device: str = "auto", dtype: str = "auto", adapter: str | None = None,
         max_pixels: int | None = 0, seed: int = 0):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (local folder or hub id), or one of
    TINY_MODELS. Returns (model, processor) in eval mode, left padding for batching, the processor's
    pixel cap lowered to max_pixels (0: DEFAULT_IMAGE_TOKENS image tokens in the family's own units:
    28 px for Qwen2.5-VL, 32 px for Qwen3-VL; None: the processor's own cap). The family is the
    checkpoint's config.model_type, never its name."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    target = resolve_device(device)
    if name_or_path in TINY_MODELS:
        torch.manual_seed(seed)
        prompts = (build_prompt(True), build_prompt(False))
        model, processor = tiny.build(name_or_path, seed, prompts=prompts, keys=ATTRIBUTES)
        if dtype != "auto":
            model = model.to(getattr(torch, dtype))
    else:
        path = str(name_or_path)
        # a hub id is "org/name"
        looks_local = os.path.isabs(path) or path.startswith(".") or path.count("/") > 1
        if os.path.exists(path) and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"{path}: no config.json there, so it is not a model "
                                    "checkpoint folder")
        if not os.path.exists(path) and looks_local:
            raise FileNotFoundError(f"{path}: no such model folder")
        try:
            config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        except OSError as err:
            first_line = str(err).splitlines()[0]
            raise FileNotFoundError(f"{path}: cannot load a model config ({first_line})") from None
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"{path}: model type {config.model_type!r} is not a supported VLM "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if dtype == "auto":
            torch_dtype = torch.bfloat16 if target.type == "cuda" else torch.float32
        else:
            torch_dtype = getattr(torch, dtype)
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype,
                                                            trust_remote_code=False).eval()
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=False)
    processor.tokenizer.padding_side = "left"
    if max_pixels == 0:
        max_pixels = default_max_pixels(processor.image_processor)
    cap_pixels(processor.image_processor, max_pixels)
    if adapter is not None:
        apply_adapter(model, adapter)
    return model.to(target), processor


def default_max_pixels(image_processor) -> int:
    """DEFAULT_IMAGE_TOKENS merged tokens of the family's size (patch x merge: 28 px for
    Qwen2.5-VL, 32 px for Qwen3-VL)."""
    side = image_processor.patch_size * image_processor.merge_size
    return DEFAULT_IMAGE_TOKENS * side * side


def cap_pixels(image_processor, max_pixels: int | None) -> None:
    """Lower the processor's pixel cap to max_pixels (never raise it: a checkpoint saved with a
    smaller cap, such as the demo's 84 x 84 scenes, keeps it). Qwen's published processors allow
    12.8 MP: 15,301 image tokens for a 4000 x 3000 photo; 1,003,520 pixels is at most 1,280
    tokens."""
    if max_pixels is None:
        return
    size = image_processor.size  # a dict, or transformers' SizeDict (item access works on both)
    cap = min(int(max_pixels), int(size["longest_edge"] or max_pixels))
    size["longest_edge"] = cap
    if (size.get("shortest_edge") or 0) > cap:
        size["shortest_edge"] = cap
    if getattr(image_processor, "max_pixels", None):
        image_processor.max_pixels = min(image_processor.max_pixels, cap)


# ----------------------------------------------------------------------------- scoring

def banned_token_ids(processor, vocab_size: int | None = None) -> list[int]:
    """Token ids a completion must never contain: special tokens (a sampled <|image_pad|> breaks the
    next forward: "Image features and image tokens do not match") and, given the model's vocab_size,
    the embedding rows past the tokenizer's last token (151,665-151,935 in Qwen2.5-VL: they decode
    to '')."""
    tok = processor.tokenizer
    names = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>",
             "<|vision_pad|>"]
    vocab = tok.get_vocab()  # a fresh dict of the whole vocabulary on every call: build it once
    ids = {vocab[n] for n in names if n in vocab} - {tok.unk_token_id}
    return sorted(ids | set(range(len(tok), vocab_size or len(tok))))


def prompt_text(processor, thinking: bool = True) -> str:
    return processor.apply_chat_template(build_messages(thinking), add_generation_prompt=True,
                                         tokenize=False)


def token_ids(processor, tokens: list[str]) -> list[int]:
    """The ids of tokens that are single entries of the tokenizer's vocabulary; an error names any
    other."""
    vocab = processor.tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise ValueError(f"{missing} are not single tokens of this tokenizer")
    return [vocab[t] for t in tokens]


def eos_ids(model, processor) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    eos.append(processor.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return sorted({int(e) for e in eos if e is not None and e >= 0})


def template_opening(processor, thinking: bool = True) -> str:
    """What the chat template itself writes after the assistant header, such as "<think>\n" for a
    template that opens the reasoning block (Qwen3-VL Thinking checkpoints do): the completion
    continues it, so decode_completions puts it back in front before the answer is parsed."""
    text = prompt_text(processor, thinking)
    header = "<|im_start|>assistant\n"
    return text[text.rfind(header) + len(header):] if header in text else ""


def decode_completions(processor, sequences, eos: list[int], opening: str = "") -> list[str]:
    """Token rows -> text, each cut at its first EOS (what follows is padding), after `opening`
    (template_opening: text the template wrote on the completion's behalf)."""
    texts = []
    for row in sequences.tolist():
        cut = next((i for i, t in enumerate(row) if t in eos), len(row))
        texts.append(opening + processor.tokenizer.decode(row[:cut], skip_special_tokens=True))
    return texts


def plain_generation_config(model):
    """A generation config holding only the model's special-token ids: what scoring decodes under
    and what merged checkpoints are saved with, so no checkpoint setting (Qwen's repetition_penalty,
    top_k ...) changes a score."""
    from transformers import GenerationConfig

    gc = model.generation_config
    return GenerationConfig(bos_token_id=gc.bos_token_id, eos_token_id=gc.eos_token_id,
                            pad_token_id=gc.pad_token_id)


class _generation_config:
    """generate() fills every setting its argument leaves None from model.generation_config: swap
    that for the plain one during the call, so nothing of the checkpoint's leaks in."""

    def __init__(self, model, config):
        self.model, self.config = model, config

    def __enter__(self):
        self.saved, self.model.generation_config = self.model.generation_config, self.config

    def __exit__(self, *exc):
        self.model.generation_config = self.saved


def decoding_settings(temperature: float, max_new_tokens: int, num_samples: int = 1) -> dict:
    """Every sampling setting of generate, explicit (the decoding contract shared with grpo's
    rollouts): plain temperature sampling, or greedy at temperature 0; no top-k, top-p, repetition
    penalty or beams."""
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0)  # top_k 0: none
    else:  # greedy: a top_k would only draw a warning
        sampling = dict(do_sample=False, temperature=1.0, top_k=None)
    return dict(max_new_tokens=max_new_tokens, min_new_tokens=0, num_return_sequences=num_samples,
                num_beams=1, top_p=1.0, min_p=None, typical_p=1.0, repetition_penalty=1.0,
                no_repeat_ngram_size=0, length_penalty=1.0, **sampling)


# Completion budgets, in tokens. Thinking: VisualQuality-R1's 256. Fast: the longest valid answer
# (five two-decimal scores, every digit its own token in Qwen's tokenizer: 50 tokens, +1 EOS) with
# room for a pretty-printed JSON object (tests/test_mgiqa.py measures both with the real tokenizer).
MAX_NEW_TOKENS = {True: 256, False: 96}


def score(model, processor, images, thinking: bool = True, batch_size: int = 8,
          num_samples: int = 1, temperature: float = 0.0, max_new_tokens: int | None = None,
          progress: bool = False) -> list[dict]:
    """Score images (paths or PIL images) in batches; results in input order.

    Each result: the scores of ATTRIBUTES (lenient parse, clipped to [1, 5], NaN if missing; the
    mean over samples), `std` per key when num_samples > 1, `reasoning`, `completion` (the first
    sample's raw text), `completions`, `strict` (every sample in the exact layout) and
    `strict_rate`.
    Greedy when temperature == 0, so repeated calls give identical scores."""
    import numpy as np
    import torch

    if max_new_tokens is None:
        max_new_tokens = MAX_NEW_TOKENS[thinking]
    if num_samples > 1 and temperature <= 0:
        raise ValueError("num_samples > 1 needs temperature > 0 (greedy samples would all be "
                         "equal)")
    images = list(images)
    processor.tokenizer.padding_side = "left"  # batched generation continues each row's last token
    text, opening = prompt_text(processor, thinking), template_opening(processor, thinking)
    eos = eos_ids(model, processor)
    banned = banned_token_ids(processor, model.get_output_embeddings().out_features)
    device = next(model.parameters()).device
    generation_config = plain_generation_config(model)  # not the checkpoint's (decoding_settings)
    generation_config.update(**decoding_settings(temperature, max_new_tokens, num_samples),
                             eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id,
                             suppress_tokens=banned or None)
    results = []
    starts = range(0, len(images), batch_size)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="scoring", unit="batch")
    for start in starts:
        chunk = images[start:start + batch_size]
        pil = [load_image(im) for im in chunk]
        enc = processor(text=[text] * len(pil), images=pil, padding=True, return_tensors="pt")
        enc = enc.to(device)
        with torch.no_grad():
            with _generation_config(model, generation_config):
                out = model.generate(**enc, generation_config=generation_config)
        new_tokens = out[:, enc["input_ids"].shape[1]:]
        completions = decode_completions(processor, new_tokens, eos, opening)
        for i, image in enumerate(chunk):
            samples = completions[i * num_samples:(i + 1) * num_samples]
            parsed = np.array([[parse_answer(c)[a] for a in ATTRIBUTES] for c in samples])  # (S, A)
            strict = [parse_answer(c, strict=True, thinking=thinking) is not None for c in samples]
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: NaN is right
                mean = np.nanmean(parsed, axis=0)
                std = np.nanstd(parsed, axis=0, ddof=1) if num_samples > 1 else None
            if isinstance(image, str):
                name = image
            else:
                name = getattr(image, "filename", "") or f"<image {start + i}>"
            result = {"image": name}
            result.update({a: float(mean[j]) for j, a in enumerate(ATTRIBUTES)})
            if std is not None:
                result["std"] = {a: float(std[j]) for j, a in enumerate(ATTRIBUTES)}
            result.update(reasoning=reasoning_text(samples[0]), completion=samples[0],
                          completions=samples, strict=all(strict),
                          strict_rate=sum(strict) / len(strict))
            results.append(result)
    return results


# ----------------------------------------------------------------------------- command line

def json_safe(obj):
    """NaN and infinities -> None (null), recursively: what strict JSON readers (jq, browsers)
    accept."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score image quality (sharpness, color, noise, "
                                                 "composition, overall) with a VLM.")
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", required=True,
                        help="checkpoint folder or hub id; untrained offline models: "
                             + ", ".join(TINY_MODELS))
    parser.add_argument("--adapter", default=None,
                        help="LoRA adapter folder written by grpo.py (PEFT layout)")
    parser.add_argument("--fast", action="store_true",
                        help="no reasoning, only the answer (non-thinking prompt)")
    parser.add_argument("--json", action="store_true",
                        help="one JSON line per image, with the reasoning")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generate call")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"default {MAX_NEW_TOKENS[True]} (thinking) or "
                             f"{MAX_NEW_TOKENS[False]} (--fast)")
    parser.add_argument("--max-pixels", type=int, default=0,
                        help="pixel cap for the processor (0: 1,280 image tokens, 1,003,520 px for "
                             "Qwen2.5-VL; a smaller saved cap wins)")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    good, failed = [], 0
    for path in args.images:
        try:
            good.append((path, load_image(path)))
        except ImageLoadError as err:
            print(f"error: {err}", file=sys.stderr)
            failed += 1
    if args.model in TINY_MODELS:
        print(f"note: --model {args.model} is an untrained random model: its scores are noise.",
              file=sys.stderr)
    try:
        model, processor = load(args.model, device=args.device, adapter=args.adapter,
                                max_pixels=args.max_pixels)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = score(model, processor, [im for _, im in good], thinking=not args.fast,
                    batch_size=args.batch_size, max_new_tokens=args.max_new_tokens) if good else []
    if not args.json:
        print(f"{'image':40s} " + " ".join(f"{a:>11s}" for a in ATTRIBUTES) + "  parse")
    for (path, _), result in zip(good, results):
        result["image"] = path
        if args.json:  # strict JSON: an unparsed score is null
            print(json.dumps(json_safe({k: v for k, v in result.items() if k != "completions"})))
        else:
            print(f"{path[-40:]:40s} " + " ".join(f"{result[a]:11.2f}" for a in ATTRIBUTES)
                  + ("  strict" if result["strict"] else "  lenient"))
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
