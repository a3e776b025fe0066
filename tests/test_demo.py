"""The demo, reduced: a few minutes on 2 cores, fixed seed and threads, deterministic.

GRPO must raise the held-out SRCC above the warm-up checkpoint's; the warm-up never sees a label.
The full demo (`python grpo.py --demo`) is the README's first command; this is its smoke version."""
import json
import os
import subprocess
import sys

import demo
import mgiqa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The full warm-up (perception needs it: with 6,000 images and 600 probe steps, family accuracy .73,
# and 300 GRPO steps left every answer constant), then 250 GRPO steps instead of 525 (the cosine
# learning-rate schedule is stretched over these 250).
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
