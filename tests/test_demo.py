"""The demo, reduced: a few minutes on 2 cores, fixed seed and threads, deterministic.

GRPO must raise the held-out SRCC above the warm-up checkpoint's; the warm-up never sees a label.
The full demo (`python grpo.py --demo`) is the README's first command; this is its smoke version."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import demo
import mgiqa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The full warm-up (perception needs it: with 6,000 images and 600 probe steps, family accuracy .73,
# and 300 GRPO steps left every answer constant), then 250 GRPO steps instead of 450 (the cosine
# learning-rate schedule is compressed into these 250).
REDUCED = {"grpo_steps": 250, "eval_every": 125}


def test_reduced_demo_grpo_beats_warmup(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "MGIQA_DEMO": json.dumps(REDUCED), "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--demo", "--out", str(out), "--threads", "2"],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    warm, final = summary["warmup"], summary["final"]
    print("warm-up", warm, "final", final)
    assert demo.attribute_mean(final) > demo.attribute_mean(warm) + 0.05, (warm, final)  # a constant answer (NaN SRCC) counts as 0
    assert (out / "learning_curve.png").is_file() and (out / "final" / "config.json").is_file()
    model, processor = mgiqa.load(str(out / "final"), device="cpu")  # the final checkpoint opens as a plain model
    assert model.config.model_type == "qwen2_5_vl"


def test_heldout_srcc_within_family_all_images_and_overall_in_place():
    # two clean images (MOS 5) and every family at levels 1 and 2 (MOS 4, 3; the family's attribute
    # likewise, the other attributes 5)
    recs = [data.Record(f"c{i}", "demo", "synthetic", mos=5.0, attributes=dict.fromkeys(mgiqa.ATTRIBUTES[:-1], 5.0),
                        family=None, level=0) for i in range(2)]
    for fam, attr in data.FAMILY_TO_ATTRIBUTE.items():
        for level, q in ((1, 4.0), (2, 3.0)):
            recs.append(data.Record(f"{fam}{level}", "demo", "synthetic", mos=q, family=fam, level=level,
                                    attributes={a: (q if a == attr else 5.0) for a in mgiqa.ATTRIBUTES[:-1]}))
    mos = np.array([r.mos for r in recs])
    pred = np.stack([mos,                                            # sharpness: the overall copied
                     np.array([r.attributes["color"] for r in recs]),  # color: the attribute itself
                     np.full(len(recs), 3.0),                        # noise: constant
                     mos, mos], 1)                                   # composition copied; overall
    out = demo.heldout_srcc(pred, recs)
    assert out["overall"] == pytest.approx(1.0)
    assert out["sharpness"] == pytest.approx(1.0) and out["color"] == pytest.approx(1.0)  # within family both are perfect
    # over all ten images the copy falls to 2/9 (worked by hand: Pearson of average ranks 12 / sqrt(40.5 * 72))
    assert out["all_images"]["sharpness"] == pytest.approx(2 / 9) and out["all_images"]["color"] == pytest.approx(1.0)
    assert math.isnan(out["noise"])  # a constant answer has no rank correlation
    assert out["overall_as_attribute"] == pytest.approx(dict.fromkeys(mgiqa.ATTRIBUTES[:-1], 1.0))


def test_precomputed_vision_indices_give_the_same_features():
    """demo.pooled_tokens hands the tower its position and window indices, computed once per grid;
    the output must equal transformers' own path bit for bit (two grids, two batch sizes)."""
    import torch

    model, processor = mgiqa.tiny_vlm(0, "demo")
    visual = model.model.visual
    for side, n in ((84, 4), (112, 5)):  # patchify checks its first 4 against the processor
        images = np.random.default_rng(side).integers(0, 256, (n, side, side, 3), dtype=np.uint8)
        pixels, grid = demo.patchify(images, processor.image_processor)
        grids = grid.expand(n, 3)
        flat = pixels.reshape(-1, pixels.shape[-1])
        with torch.no_grad():
            plain = model.model.get_image_features(flat, grids, return_dict=True).pooler_output
            fast = model.model.get_image_features(flat, grids, return_dict=True, **demo.vision_indices(visual, grids)).pooler_output
        assert len(fast) == n and all(torch.equal(a, b) for a, b in zip(plain, fast))
        assert demo.vision_indices(visual, grids) is demo.vision_indices(visual, grids.clone())  # cached by grid
