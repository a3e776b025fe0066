"""The attribute-aware prompt and the answer parser of MG-IQA (docs/METHOD.md, "Prompt and answer").

One generation reasons about sharpness, color fidelity, noise and composition, then writes a score for
each and an overall score, as one JSON object whose keys run fine to coarse, so the overall score is
generated after, and conditioned on, the attribute scores.

Departures (from the paper's abstract, which fixes none of these, and from VisualQuality-R1):
1. The answer is one JSON object with five keys in a fixed order (ours).
2. Lenient parsing keeps an unparseable score as NaN; VisualQuality-R1 draws a random score.
   `clip=False` (used by the reward) also turns a number outside [1, 5] into NaN.
3. The instruction comes before the image in the user turn (VisualQuality-R1 puts the image first),
   so all prompts share one text prefix that training computes once per batch.
"""
from __future__ import annotations

import json
import math
import re

ATTRIBUTES = ("sharpness", "color", "noise", "composition", "overall")
LABELLED = ATTRIBUTES[:-1]  # attributes a dataset may label; overall always comes from MOS
# which attribute a distortion family degrades (synthetic datasets' metadata; docs/METHOD.md, section 4)
FAMILY_TO_ATTRIBUTE = {"blur": "sharpness", "noise": "noise", "color": "color", "composition": "composition"}

ATTRIBUTE_DEFINITIONS = {
    "sharpness": "how clear the edges and fine details are; 5 means crisp, 1 means heavily blurred.",
    "color": "how natural and faithful the colors are; 5 means natural color, 1 means a strong cast or washed-out color.",
    "noise": "how free the image is of noise and grain; 5 means no visible noise, 1 means heavy noise.",
    "composition": "how well the subject is framed; 5 means a well-composed frame, 1 means the subject is badly placed or cut off.",
}

# The VisualQuality-R1 question for the overall score, kept verbatim (docs/METHOD.md, section 1).
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
    # The instruction before the image: every prompt then starts with the same tokens, which a
    # trainer computes once per batch instead of once per image (rollouts.prefill).
    return [{"role": "user", "content": [{"type": "text", "text": build_prompt(thinking)}, {"type": "image"}]}]


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
    """Scores from a completion (docs/METHOD.md, section 1).

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
