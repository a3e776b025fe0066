"""The demo, reduced: a few minutes on 2 cores, fixed seed and threads, deterministic.

GRPO must raise the held-out SRCC above the warm-up checkpoint's; the warm-up never sees a label.
The full demo (`python demo.py`) is the README's first command; this is its smoke version. A tiny
variant (seconds) checks what every run writes: strict JSON, report.html, the sized checkpoint."""
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import data
import demo
import grpo
import mgiqa
import report
import synth
from conftest import assert_cards_match_rows, assert_self_contained, parse_report, strict_json_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# All 15,000 images with a shorter warm-up (900 probe and 600 format steps instead of 1,200 and
# 1,000: held-out family accuracy .825, then sharpness .92, color .85, noise .93 after GRPO, 170 s in
# all, measured; perception needs the images: with 6,000 images and 600 probe steps, family accuracy
# .73, and 300 GRPO steps left every answer constant), then 120 GRPO steps instead of 450 (the cosine
# learning-rate schedule is compressed into these 120; the full runs' held-out attribute mean is
# already .8-.9 at step 75-150, docs/DEMO_NOTES.md).
# With the probe on the tokens (c771500) 90 GRPO steps ended with every answer constant (their
# first steps pass through constant answers: all nan at step 60); 120 reached a five-SRCC mean of .513
# against the warm-up's .178 (130 s in all, measured).
REDUCED = {"grpo_steps": 120, "eval_every": 60, "source": "procedural", "probe_steps": 700, "format_steps": 600}


@contextlib.contextmanager
def threads_kept():
    """torch's thread count as it was after the block (demo.main and scripts/probe.py set their own)."""
    import torch
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run_demo_here(out, overrides, monkeypatch, *flags):
    """demo.main in this process (the imports are paid once), torch's thread count restored after."""
    monkeypatch.setenv("MGIQA_DEMO", json.dumps(overrides))
    with threads_kept():
        assert demo.main(demo.parse_args(["--out", str(out), "--threads", "2", *flags])) == 0


def run_demo(out, overrides, *flags):
    env = {**os.environ, "MGIQA_DEMO": json.dumps(overrides), "OMP_NUM_THREADS": "2"}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "demo.py"), "--out", str(out), "--threads", "2", *flags],
                         capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]


def check_outputs(out, n_heldout):
    """What every demo run must leave: strict JSON everywhere (the demo's own files, grpo.train's
    log.jsonl and config.json, the checkpoints'), a self-contained report of the held-out images
    whose scores are those of heldout.jsonl, and checkpoints saved with the demo's image size."""
    files = strict_json_files(out)
    assert {"summary.json", "heldout.jsonl", os.path.join("grpo-run", "log.jsonl"), os.path.join("grpo-run", "config.json"),
            os.path.join("final", "config.json")} <= set(files), files
    rows = [report.nan_for_null(json.loads(line)) for line in open(out / "heldout.jsonl")]
    assert len(rows) == n_heldout
    p = parse_report((out / "report.html").read_text(encoding="utf-8"))
    assert_self_contained(p)
    assert_cards_match_rows(p, rows)
    summary = report.nan_for_null(json.loads((out / "summary.json").read_text()))
    assert set(summary["final"]) >= set(mgiqa.ATTRIBUTES) and summary["config"]["image_size"] == 84
    for ckpt in ("warmup", "final"):
        size = json.loads((out / ckpt / "processor_config.json").read_text())["image_processor"]["size"]
        assert size == {"longest_edge": 84 * 84, "shortest_edge": 84 * 84}, (ckpt, size)
    return summary


def photo(path, size=(720, 477)):
    """A photo-sized image (smooth colour gradients and a disc), not one of the demo's scenes."""
    from PIL import Image, ImageDraw
    x, y = np.meshgrid(np.linspace(0, 1, size[0]), np.linspace(0, 1, size[1]))
    im = Image.fromarray((np.stack([x, y, 1 - x * y], -1) * 255).astype(np.uint8))
    ImageDraw.Draw(im).ellipse([300, 150, 460, 330], fill=(200, 60, 40))
    im.save(path)
    return str(path)


def test_tiny_demo_writes_strict_json_report_and_sized_checkpoint(tmp_path, monkeypatch):
    tiny = {"n_train": 300, "n_heldout": 40, "probe_steps": 20, "format_steps": 20, "grpo_steps": 4, "eval_every": 2,
            "batch_size": 4, "num_generations": 4, "aux_batch": 4}
    run_demo_here(tmp_path / "demo", tiny, monkeypatch)
    summary = check_outputs(tmp_path / "demo", 40)
    assert summary["config"]["grpo_steps"] == 4 and math.isnan(summary["final"]["overall"])  # NaN came back from null
    assert summary["config"]["source"] == "procedural" and summary["photos"] == {"train": [], "heldout": []}
    ladder = sorted(p.name for p in (tmp_path / "demo" / "ladder").glob("*.png"))
    # clean + 4 families x levels 1, 3, 5 of a photo: with procedural scenes, none was trained on
    assert len(ladder) == 13 and ladder[0].startswith(synth.HELDOUT_PHOTOS[0])
    assert "ablation" not in summary["settings"]
    run_demo_here(tmp_path / "demo", tiny, monkeypatch, "--ablation")
    assert strict_json_files(tmp_path / "demo") and (tmp_path / "demo" / "report_ablation.html").is_file()
    summary = report.nan_for_null(json.loads((tmp_path / "demo" / "summary.json").read_text()))
    final, ablation = summary["settings"]["final"], summary["settings"]["ablation"]
    assert set(final) == set(ablation) and "out" not in final
    # the fair ablation: the same GRPO settings but for the reward weights, overall-only there
    reward_keys = {f.name for f in dataclasses.fields(grpo.Config) if f.metadata["group"] == "reward"}
    assert {k for k in final if final[k] != ablation[k]} == {"weights"} <= reward_keys
    assert final["weights"] == list(demo.DemoConfig.weights) and final["credit"] == ablation["credit"] == "attribute"
    assert ablation["weights"] == [0.0, 0.0, 0.0, 0.0, 1.0] and final["entropy_coef"] == ablation["entropy_coef"] > 0
    assert set(summary["ablation_overall_difference"]) >= {"diff", "low", "high", "agrees_with_paper"}
    assert "mean" in summary["final"] and "mean" not in summary["ablation"]  # the ablation's attributes had no reward
    run_demo_here(tmp_path / "demo", tiny, monkeypatch)  # a new warm-up: the old ablation is no longer its own
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert "ablation" not in summary and "ablation" not in summary["settings"]
    # any photo is scaled to about the demo's image size (720 x 477 -> 84 x 56), whatever mgiqa.load's own cap
    _, processor = mgiqa.load(str(tmp_path / "demo" / "final"), device="cpu")
    from PIL import Image
    grid = processor.image_processor(images=[Image.open(photo(tmp_path / "p.png"))], return_tensors="pt")["image_grid_thw"]
    assert grid.tolist() == [[1, 4, 6]]  # 56 x 84 pixels in 14-pixel patches


@pytest.mark.slow
def test_reduced_demo_grpo_beats_warmup(tmp_path):
    out = tmp_path / "demo"
    run_demo(out, REDUCED)
    summary = check_outputs(out, 240)
    warm, final = summary["warmup"], summary["final"]
    print("warm-up", warm, "final", final)
    assert demo.mean_srcc(final) > demo.mean_srcc(warm) + 0.05, (warm, final)  # a constant answer (NaN SRCC) counts as 0
    assert final["mean"] == pytest.approx(demo.mean_srcc(final))  # summary.json's "mean" is the five's
    assert (out / "learning_curve.png").is_file() and (out / "final" / "config.json").is_file()
    model, processor = mgiqa.load(str(out / "final"), device="cpu")  # the final checkpoint opens as a plain model
    assert model.config.model_type == "qwen2_5_vl"
    # a 720 x 477 photo is scaled to the size the model learned on, so the answer keeps its layout
    results = mgiqa.score(model, processor, [photo(tmp_path / "photo.png")], max_new_tokens=20)
    assert all(math.isfinite(results[0][a]) for a in mgiqa.ATTRIBUTES), results[0]["completion"]


def test_heldout_srcc_within_family_all_images_and_overall_in_place():
    # two clean images (MOS 5) and every family at levels 1 and 2 (MOS 4, 3; the family's attribute
    # likewise, the other attributes 5)
    recs = [data.Record(f"c{i}", "demo", "synthetic", mos=5.0,
                        attributes=dict.fromkeys(mgiqa.LABELLED, 5.0),
                        family=None, level=0) for i in range(2)]
    for fam, attr in mgiqa.FAMILY_TO_ATTRIBUTE.items():
        for level, q in ((1, 4.0), (2, 3.0)):
            recs.append(data.Record(f"{fam}{level}", "demo", "synthetic", mos=q, family=fam, level=level,
                                    attributes={a: (q if a == attr else 5.0)
                                                for a in mgiqa.LABELLED}))
    mos = np.array([r.mos for r in recs])
    columns = {"sharpness": mos,                                         # the overall copied
               "color": np.array([r.attributes["color"] for r in recs]),  # the attribute itself
               "noise": np.full(len(recs), 3.0),                          # constant
               "composition": mos, "overall": mos}                        # copied; overall
    pred = np.stack([columns[a] for a in mgiqa.ATTRIBUTES], 1)
    out = demo.heldout_srcc(pred, recs)
    assert out["overall"] == pytest.approx(1.0)
    assert out["sharpness"] == pytest.approx(1.0) and out["color"] == pytest.approx(1.0)  # within family both are perfect
    # over all ten images the copy falls to 2/9 (worked by hand: Pearson of average ranks 12 / sqrt(40.5 * 72))
    assert out["all_images"]["sharpness"] == pytest.approx(2 / 9) and out["all_images"]["color"] == pytest.approx(1.0)
    assert math.isnan(out["noise"])  # a constant answer has no rank correlation
    assert out["overall_as_attribute"] == pytest.approx(dict.fromkeys(mgiqa.LABELLED, 1.0))


def test_precomputed_vision_indices_give_the_same_features():
    """demo.pooled_tokens hands the tower its position and window indices, computed once per grid;
    the output must equal transformers' own path bit for bit (two grids, two batch sizes)."""
    import torch

    model, processor = mgiqa.load("demo", device="cpu")
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


def test_answer_hidden_equals_the_plain_forward():
    """demo.answer_hidden (the instruction once per batch, its KV cache expanded) gives the hidden states
    of rollouts.hidden_plain, values and gradients."""
    import torch

    import rollouts
    from conftest import encode, widen

    model, processor = mgiqa.load("demo", device="cpu")
    widen(model)
    images = [np.random.default_rng(i).integers(0, 256, (84, 84, 3), dtype=np.uint8) for i in range(3)]
    from PIL import Image
    p = encode(model, processor, [Image.fromarray(im) for im in images])
    ids = torch.randint(10, 500, (3, 6), generator=torch.Generator().manual_seed(0))
    model.train()
    got = demo.answer_hidden(model, p, ids)
    want = rollouts.hidden_plain(model, p, ids, torch.ones_like(ids), K=1)
    assert (got - want).abs().max() < 1e-5
    got.sum().backward()
    g1 = {n: q.grad.clone() for n, q in model.named_parameters() if q.grad is not None}
    model.zero_grad()
    want.sum().backward()
    for n, q in model.named_parameters():
        if q.grad is not None:
            assert (g1[n] - q.grad).abs().max() <= 1e-4 * q.grad.abs().max().clamp(min=1e-8), n


def test_procedural_scenes_join_training_only_and_heldout_photos_are_chosen():
    """DemoConfig.procedural adds procedural scenes to the TRAINING set only; heldout_photos picks the
    photos every held-out crop comes from, and training never sees them."""
    _, processor = mgiqa.load("demo", device="cpu")
    demo.fit_processor(processor, 84)
    cfg = demo.DemoConfig(source="photos", n_train=200, n_heldout=40, procedural=50, heldout_photos="coffee,ihc")
    d = demo.Demo(cfg, processor, log=lambda msg: None)
    assert d.photos == {"train": ["astronaut", "chelsea", "hubble_deep_field", "retina", "rocket"], "heldout": ["coffee", "ihc"]}
    assert sum(r.dataset == "synthetic" for r in d.train) == 50 and len(d.train) == 250
    assert all("photo" in r.extra for r in d.heldout) and len(d.heldout) == 40
    assert len(d.pixels) == 290 and len(d.index) == 290  # every image once, no name shared by two


def test_confusion_counts_true_rows_against_predicted_columns():
    import torch
    m = demo.confusion(torch.tensor([0, 0, 1, 4, 4, 4]), torch.tensor([0, 3, 1, 0, 4, 4]))
    want = np.zeros((5, 5), int)
    want[0, 0] = want[0, 3] = want[1, 1] = want[4, 0] = 1
    want[4, 4] = 2
    assert (m == want).all()


def test_probe_script_logs_the_heldout_confusion(monkeypatch, capsys):
    """scripts/probe.py: the perception stage alone; its last line is the held-out confusion matrix,
    whose counts add up to the held-out images. An MGIQA_DEMO key that is not a field is refused."""
    import runpy

    monkeypatch.setenv("MGIQA_DEMO", json.dumps({"n_train": 100, "n_heldout": 40, "probe_steps": 3}))
    probe = runpy.run_path(os.path.join(ROOT, "scripts", "probe.py"))
    with threads_kept():
        assert probe["main"](["--source", "procedural"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("probe's held-out confusion")
    m = np.array(json.loads(last.rsplit("): ", 1)[1]))
    assert m.shape == (5, 5) and m.sum() == 40
    monkeypatch.setenv("MGIQA_DEMO", json.dumps({"probe_step": 3}))
    with pytest.raises(SystemExit, match="probe_step"):
        demo.config(demo.parse_args([]))


def test_overall_difference_is_paired_with_a_bootstrap_interval():
    """With a perfect ranking against a noisy one the difference is their SRCCs' difference, its
    interval holds it and lies above 0; swapped, the sign and the paper's direction turn."""
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 120)
    noisy = mos + rng.normal(0, 1.0, mos.size)

    def rows(pred):
        return [{"dataset": "demo", "image": f"i{i}", "overall": float(p), "mos": float(m), "labels": {}}
                for i, (p, m) in enumerate(zip(pred, mos, strict=True))]

    d = demo.overall_difference(rows(mos), rows(noisy), seed=0, n=300)
    import evaluate
    assert d["diff"] == pytest.approx(1.0 - evaluate.srcc(noisy, mos)) and d["srcc_a"] == pytest.approx(1.0)
    assert 0 < d["low"] <= d["diff"] <= d["high"] and d["n"] == 120 and demo.agrees_with_paper(d["diff"])
    back = demo.overall_difference(rows(noisy), rows(mos), seed=0, n=300)
    assert back["diff"] == pytest.approx(-d["diff"]) and back["high"] < 0 and not demo.agrees_with_paper(back["diff"])


def test_mean_is_the_five_with_a_constant_answer_as_zero():
    values = [0.9 - 0.1 * k for k in range(len(mgiqa.ATTRIBUTES))]
    m = dict(zip(mgiqa.ATTRIBUTES, values)) | {"noise": math.nan}
    kept = sum(values) - values[mgiqa.ATTRIBUTES.index("noise")]
    assert demo.mean_srcc(m) == pytest.approx(kept / len(mgiqa.ATTRIBUTES))
    weights = [1.0 + k for k in range(len(mgiqa.ATTRIBUTES) - 1)] + [0.5]
    assert demo.overall_only(weights) == (0.0,) * len(mgiqa.LABELLED) + (0.5,)


def test_families_and_words_follow_mgiqa_by_name():
    assert demo.FAMILIES == (None, "blur", "noise", "color", "composition")  # the probe's class order, unchanged
    assert set(demo.FAMILIES[1:]) == set(mgiqa.FAMILY_TO_ATTRIBUTE) and demo.WORDS[demo.FAMILIES.index("color")] == "dull"


def test_no_verdict_without_a_difference():
    assert demo.agrees_with_paper(math.nan) is None and demo.agrees_with_paper(0.0) is False


def test_every_family_word_is_one_token_and_a_longer_one_is_named():
    _, processor = mgiqa.load("demo", device="cpu")
    think_end = processor.tokenizer.convert_tokens_to_ids("</think>")
    for word in demo.WORDS:
        assert demo.answer_ids(processor, word)[2] == think_end, word
    with pytest.raises(ValueError, match="'overexposedness' is not one token"):
        demo.answer_ids(processor, "overexposedness")


def test_every_attribute_has_its_own_curve_colour():
    colors = demo.curve_colors()
    assert list(colors) == list(mgiqa.ATTRIBUTES)
    assert len(set(colors.values())) == len(mgiqa.ATTRIBUTES) and colors["overall"] == "#000000"


def test_comparison_says_when_the_interval_holds_zero():
    """The report's verdict: the direction of the paired difference, and whether its interval holds 0."""
    def summary(low, high):
        d = {"n": 240, "srcc_a": 0.848, "srcc_b": 0.843, "diff": 0.004, "low": low, "high": high,
             "agrees_with_paper": True}
        return {"config": {"seed": 0}, "ablation_overall_difference": d}
    assert "agrees with the paper's direction, but its 95% interval contains 0" in demo.comparison_html(summary(-0.021, 0.031))
    clear = demo.comparison_html(summary(0.003, 0.057))
    assert "agrees with the paper's direction." in clear and "contains 0" not in clear
