import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

# Two cores: oversubscribed threads made steps up to 100x slower on this machine.
torch.set_num_threads(int(os.environ.get("MGIQA_TEST_THREADS", "2")))


# ---- report helpers
# Shared by test_report.py, test_evaluate.py and test_demo.py: report.html read back with Python's
# own HTML parser, and every .json / .jsonl of a run read with a reader that refuses NaN.
import base64  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
from html.parser import HTMLParser  # noqa: E402

from PIL import Image  # noqa: E402

from mgiqa import ATTRIBUTES  # noqa: E402


class ReportParser(HTMLParser):
    """Cards (one per image: its data-* attributes, the <img> src, the bars' data-score / data-gt),
    every src/href, the tags seen, the SVG charts and the text of table cells."""

    def __init__(self):
        super().__init__()
        self.cards, self.links, self.tags, self.svgs, self.cells, self._in_cell = [], [], [], 0, [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        self.links += [a[k] for k in ("src", "href") if k in a]
        if tag == "figure" and "card" in a.get("class", ""):
            self.cards.append({**{k[5:]: v for k, v in a.items() if k.startswith("data-")}, "bars": {}, "img": None})
        elif tag == "img" and self.cards:
            self.cards[-1]["img"] = a["src"]
        elif tag == "span" and "data-attr" in a:
            self.cards[-1]["bars"][a["data-attr"]] = (float(a["data-score"]), float(a["data-gt"]))
        elif tag == "svg":
            self.svgs += 1
        self._in_cell = tag == "td"

    def handle_data(self, text):
        if self._in_cell:
            self.cells.append(text)


def parse_report(text: str) -> ReportParser:
    p = ReportParser()
    p.feed(text)
    p.close()
    return p


def assert_self_contained(p: ReportParser) -> None:
    assert "link" not in p.tags and "iframe" not in p.tags
    assert all(x.startswith(("data:", "#")) for x in p.links), [x for x in p.links if not x.startswith(("data:", "#"))][:3]


def same(a, b) -> bool:
    """Equal, or both NaN (values read back from the page against the row they were written from)."""
    return (math.isnan(a) and math.isnan(b)) or a == b


def row_label(row: dict, attribute: str) -> float:
    """A result row's ground truth (overall: the MOS; NaN if absent), as the test reads it."""
    value = row["mos"] if attribute == "overall" else row["labels"].get(attribute)
    return math.nan if value is None else float(value)


def assert_cards_match_rows(p: ReportParser, rows) -> None:
    """One card per row, the image embedded and decodable, each score (and label) as in the row."""
    by_image = {c["image"]: c for c in p.cards}
    assert len(p.cards) == len(rows) and set(by_image) == {r["image"] for r in rows}
    for row in rows:
        c = by_image[row["image"]]
        assert c["img"].startswith("data:image/")
        Image.open(io.BytesIO(base64.b64decode(c["img"].split(",", 1)[1]))).verify()
        for a in ATTRIBUTES:
            score, gt = c["bars"][a]
            assert same(score, row[a]) and same(gt, row_label(row, a)), (row["image"], a)


def strict_json_files(folder) -> list[str]:
    """Every .json / .jsonl under folder, each parsed with a reader that refuses NaN and Infinity."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    names = []
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            if not f.endswith((".json", ".jsonl")):
                continue
            with open(path) as fh:
                text = fh.read()
            lines = text.splitlines() if f.endswith(".jsonl") else [text]
            [json.loads(line, parse_constant=refuse) for line in lines if line.strip()]
            names.append(os.path.relpath(path, folder))
    return names


# ---- GRPO helpers
# Shared by test_rollouts.py, test_grpo.py, test_lora.py and tests/launch.py: a widened tiny model (an
# untrained one is nearly uniform over its vocabulary, which hides errors), images of unequal sizes (so
# left padding is exercised), sampling, a deterministic stand-in reward, gradient comparison.
import copy  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import grpo  # noqa: E402
import lora  # noqa: E402
import mgiqa  # noqa: E402
import rollouts  # noqa: E402


def text_reward(completions, P, M, **kwargs):
    """A stand-in for reward.mg_reward with the same output keys: total = a hash of the text in [0, 1).
    An untrained model never writes the answer layout, so the real reward would give no gradient."""
    B = P.shape[1]
    K = len(completions) // B
    total = torch.tensor([(sum(map(ord, c)) % 97) / 97 for c in completions]).view(B, K)
    A = len(ATTRIBUTES)
    return {"total": total, "per_attribute": total[..., None].expand(B, K, A) / A, "format": torch.zeros(B, K),
            "scores": torch.full((B, K, A), float("nan"))}


def widen(model, seed=0, std=0.1):
    """Wider weights (matrices only: norms stay at 1) make the comparisons below sensitive."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def random_images(n=2, seed=0, sizes=((56, 84), (84, 84), (56, 56), (84, 56))):
    """Different sizes, so prompts differ in length and left padding is exercised."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8)) for i in range(n)]


def randomize_lora(model, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def tokens_of(model, processor, **cfg):
    return grpo.Tokens.resolve(grpo.Config(**cfg), model, processor)


def encode(model, processor, images, thinking=True):
    return rollouts.encode_prompts(model, processor, images, mgiqa.prompt_text(processor, thinking))


def sample(model, processor, images, K=3, T=10, seed=0, shared_prefix=True, temperature=1.0, **kw):
    """(prompts, ids, mask): K completions per image through the shared or the plain sampler."""
    p = encode(model, processor, images)
    tok = tokens_of(model, processor)
    torch.manual_seed(seed)
    fn = rollouts.sample_shared if shared_prefix else rollouts.sample_plain
    ids = fn(model, p, K=K, max_new_tokens=T, eos_ids=tok.eos, pad_id=tok.pad, banned=tok.banned,
             temperature=temperature, **kw)
    return p, ids, rollouts.completion_mask(ids, tok.eos)


def cut_row(ids, row, at, eos, pad):
    """Row `row` ends with EOS at position `at`, padding after (so masks and padding are exercised)."""
    ids = ids.clone()
    ids[row, at] = eos
    ids[row, at + 1:] = pad
    return ids


def full_logits(model, processor, images):
    enc = processor(text=[mgiqa.prompt_text(processor)] * len(images), images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_close_grads(a, b, rel=1e-4):
    assert a.keys() == b.keys() and a
    for n in a:
        scale = b[n].abs().max().clamp(min=1e-12)
        err = (a[n] - b[n]).abs().max() / scale
        assert err < rel, f"{n}: relative gradient error {err:.2e}"


def small_cfg(**kw):
    return grpo.Config(**{"model": "tiny", "batch_size": 2, "num_generations": 3, "max_new_tokens": 8, "lr": 1e-2,
                          "lora_rank": 4, "lora_alpha": 8, **kw})


def fake_batch(B):
    A = len(ATTRIBUTES)
    return {"P": torch.full((A, B, B), 0.5), "M": torch.zeros(A, B, B, dtype=torch.bool)}


@pytest.fixture(scope="module")
def base():
    model, processor = mgiqa.load("tiny", device="cpu")
    return widen(model), processor


@pytest.fixture
def fresh(base):
    return copy.deepcopy(base[0]), base[1]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second thread; a busy neighbour made 2-thread steps 5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class EosBiased(torch.nn.Linear):
    """An LM head (sharing the model's weight) that makes EOS likelier by `bias`: rows end at different
    lengths, or with a large bias at once."""

    def __init__(self, head, eos, bias=30.0):
        super().__init__(head.in_features, head.out_features, bias=False)
        self.weight, self.eos, self.eos_bias = head.weight, eos, bias

    def forward(self, x):
        out = super().forward(x).clone()
        out[..., self.eos] += self.eos_bias
        return out
