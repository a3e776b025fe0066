"""MG-IQA scorer: the attribute-aware prompt, answer parsing, image and model loading, scoring.

One vision-language model looks at an image and, in one generation, reasons about sharpness,
color fidelity, noise and composition, then writes a score for each and an overall score
(SPEC section 1; MG-IQA, arXiv 2604.09704, built on VisualQuality-R1, arXiv 2505.14460).

    python mgiqa.py --model Qwen/Qwen2.5-VL-7B-Instruct photo.jpg other.png      # a real model
    python mgiqa.py --model tiny photo.jpg                                       # offline, untrained
    python mgiqa.py --model runs/demo/final photo.jpg --json                     # with the reasoning

Departures (from the paper's abstract, which fixes none of these, and from VisualQuality-R1):
1. The answer is one JSON object with five keys in a fixed order, fine to coarse, so that the
   overall score is generated after, and conditioned on, the attribute scores (SPEC 1, ours).
2. Lenient parsing keeps an unparseable score as NaN; VisualQuality-R1 draws a random score.
   `clip=False` (used by the reward) also turns a number outside [1, 5] into NaN.
3. `tiny_vlm` builds a randomly initialised Qwen2.5-VL with a tokenizer trained in-process, so
   everything runs offline; its tokenizer splits digits and learns the prompt's phrases as merges
   (a score is one token, an answer about 15), which a real Qwen tokenizer does not.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

ATTRIBUTES = ("sharpness", "color", "noise", "composition", "overall")

ATTRIBUTE_DEFINITIONS = {
    "sharpness": "how clear the edges and fine details are; 5 means crisp, 1 means heavily blurred.",
    "color": "how natural and faithful the colors are; 5 means natural color, 1 means a strong cast or washed-out color.",
    "noise": "how free the image is of noise and grain; 5 means no visible noise, 1 means heavy noise.",
    "composition": "how well the subject is framed; 5 means a well-composed frame, 1 means the subject is badly placed or cut off.",
}

# The VisualQuality-R1 question for the overall score, kept verbatim (SPEC 1).
OVERALL_QUESTION = (
    "What is your overall rating on the quality of this picture? The rating should be a float "
    "between 1 and 5, rounded to two decimal places, with 1 representing very poor quality and 5 "
    "representing excellent quality."
)
EXAMPLE_ANSWER = '{"sharpness": 4.10, "color": 3.80, "noise": 4.50, "composition": 3.20, "overall": 3.90}'


def build_prompt(thinking: bool = True) -> str:
    lines = ["You are an expert in image quality assessment. Rate this picture on four attributes and overall."]
    for name, definition in ATTRIBUTE_DEFINITIONS.items():
        lines.append(f"- {name}: {definition}")
    lines.append(OVERALL_QUESTION)
    lines.append("Every score is a float between 1 and 5, rounded to two decimal places; higher is better for every key.")
    if thinking:
        lines.append("First reason briefly about each attribute and how they combine inside <think> </think> tags, "
                     "then give the scores as one JSON object inside <answer> </answer> tags, keys in this order:")
        lines.append(f"<think> ... </think><answer>{EXAMPLE_ANSWER}</answer>")
    else:
        lines.append("Give only the scores as one JSON object inside <answer> </answer> tags, keys in this order:")
        lines.append(f"<answer>{EXAMPLE_ANSWER}</answer>")
    return "\n".join(lines)


def build_messages(thinking: bool = True) -> list[dict]:
    """Chat messages with one image slot, in the Qwen-VL content layout."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": build_prompt(thinking)}]}]


# ----------------------------------------------------------------------------- parsing

_STRICT_THINK = re.compile(r"<think>(.+?)</think>\s*<answer>(.+?)</answer>", re.DOTALL)
_STRICT_FAST = re.compile(r"<answer>(.+?)</answer>", re.DOTALL)
_ANSWER_BLOCK = re.compile(r"<answer>(.*?)(?:</answer>|$)", re.DOTALL)
_FENCE = re.compile(r"```(?:json)?", re.IGNORECASE)
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = {a: re.compile(r"[\"']?\b" + a + r"\b[\"']?\s*[:=]\s*[\"']?(" + _NUMBER + ")", re.IGNORECASE) for a in ATTRIBUTES}


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
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 1.0 <= value <= 5.0:
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


def parse_answer(text: str, strict: bool = False, thinking: bool = True, clip: bool = True) -> dict[str, float] | None:
    """Scores from a completion (SPEC 1).

    strict: None unless the whole completion is exactly the requested layout with all five keys
    in [1, 5]. Lenient: always a dict with the five keys, each a float in [1, 5] or NaN; never
    raises. With clip=False, a value outside [1, 5] becomes NaN instead of being clipped.
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
        raise ImageLoadError(f"{name}: cannot convert image of mode {image.mode} to RGB ({err})") from None
