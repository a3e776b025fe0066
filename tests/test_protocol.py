"""The paper's experiment run right: every model folder grpo.py writes carries the list of its
images (data.TRAINING_DATA, SHA-256 each), and evaluate.py never scores an image the model trained
on, under any name (its adapter, its merged folder, copies under other file names); a dataset it
trained on is scored on the run's own test split, in a table apart from the cross-dataset ones.
Frozen test lists are checked byte for byte. A used --out is refused, --resume refuses changed
flags, --top-p < 1 and an auxiliary loss under torchrun are refused, and long work shows progress.

One module-scoped run of grpo.main (the offline tiny model, two datasets, 2 steps, --merge) feeds
most tests; evaluation runs use the real model with 2 new tokens, or a stand-in scorer."""
import contextlib
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import data
import distributed
import evaluate
import grpo
import mgiqa
import synth
from conftest import small_cfg
from data import Record

pytestmark = pytest.mark.usefixtures("one_thread")
GOOD = "<answer>{" + ", ".join(f'"{a}": 3' for a in mgiqa.ATTRIBUTES) + "}</answer>"


def write_rows(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def photos(root, n, dataset, seed):
    """n random 56 px images, a manifest without references: an authentic dataset (80/20 split)."""
    rng = np.random.default_rng(seed)
    rows = [["image", "mos", "dataset"]]
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, f"p{i}.png"))
        rows.append([f"p{i}.png", round(float(rng.uniform(1, 5)), 2), dataset])
    write_rows(os.path.join(root, "manifest.csv"), rows)
    return root


def copies(root, images, dataset):
    """The given files under other names (c0.png, ...) in a manifest of their own."""
    os.makedirs(root, exist_ok=True)
    rows = [["image", "mos", "dataset"]]
    for i, image in enumerate(images):
        shutil.copyfile(image, os.path.join(root, f"c{i}.png"))
        rows.append([f"c{i}.png", float(i), dataset])
    write_rows(os.path.join(root, "manifest.csv"), rows)
    return root


TRAIN = ["-B", "2", "-K", "2", "--max-new-tokens", "4", "--lora-rank", "4", "--lora-alpha", "8",
         "--steps", "2", "--save-every", "1", "--keep", "2", "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """grpo.main on an authentic (alpha: 8 train, 2 test) and a synthetic dataset (beta: 4 scenes
    of 5, one held out by its manifest), 2 steps, --merge; its stdout."""
    root = tmp_path_factory.mktemp("protocol")
    alpha = photos(str(root / "alpha"), 10, "alpha", seed=0)
    synth.make_synthetic(str(root / "beta"), 20, 56, seed=0, dataset="beta")
    argv = ["--data", f"manifest={alpha}", f"manifest={root / 'beta'}", *TRAIN,
            "--out", str(root / "run"), "--merge", str(root / "merged")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert grpo.main(argv) == 0
    rows = data.load_image_list(str(root / "run" / data.TRAINING_DATA))
    return {"root": root, "run": root / "run", "merged": root / "merged", "argv": argv,
            "stdout": out.getvalue(), "rows": rows}


def evaluate_main(*argv) -> tuple[dict, list]:
    """evaluate.main with the real model, 2 new tokens; returns its summary.json and scored rows."""
    out = argv[argv.index("--out") + 1]
    fast = ["--fast", "--max-new-tokens", "2", "--threads", "1", "--device", "cpu"]
    assert evaluate.main([str(a) for a in argv] + fast) == 0
    return json.loads(open(os.path.join(out, "summary.json")).read()), evaluate.read_rows(str(out))


def test_every_model_folder_carries_its_training_images(run):
    want = (run["run"] / data.TRAINING_DATA).read_text()
    for folder in ("run/final", "run/checkpoint-1", "run/checkpoint-2", "run/checkpoint-2/adapter",
                   "merged"):
        assert (run["root"] / folder / data.TRAINING_DATA).read_text() == want, folder
    rows = run["rows"]
    assert {r["dataset"] for r in rows} == {"alpha", "beta"} and len(rows) == 30
    assert all(data.sha256_file(r["image"]) == r["sha256"] for r in rows)  # by path as read
    for name in ("alpha", "beta"):  # the split the run trained with
        split = data.load_split(str(run["run"] / f"split-{name}.csv"))
        assert {r["image"]: r["split"] for r in rows if r["dataset"] == name} == split
    assert sum(r["split"] == "train" for r in rows if r["dataset"] == "alpha") == 8
    lines = [ln for ln in run["stdout"].splitlines() if ln.startswith("step")]
    assert len(lines) == 2 and all(" elapsed " in ln and " eta " in ln for ln in lines)
    assert lines[-1].endswith("eta 0s")


def test_adapter_merged_and_renamed_copies_score_no_training_image(run, tmp_path, capsys):
    trained = {r["sha256"] for r in run["rows"] if r["split"] == "train"}
    tested = {r["sha256"] for r in run["rows"] if r["split"] == "test"}
    alpha = run["root"] / "alpha"
    # every image of both datasets under a new name, read as a pyiqa CSV (named by its file)
    renamed = copies(str(tmp_path / "renamed"), [r["image"] for r in run["rows"]], "renamed")
    models = {"adapter": ["--model", "tiny", "--adapter", run["run"] / "final"],
              "merged": ["--model", run["merged"]]}
    for how, model in models.items():
        sets = (("alpha", f"manifest={alpha}"), ("manifest", f"pyiqa={renamed}/manifest.csv"))
        for name, spec in sets:
            out = tmp_path / f"{how}-{name}"
            summary, rows = evaluate_main(*model, "--data", spec, "--out", out)
            scored = {data.sha256_file(r["image"]) for r in rows}
            assert scored and not scored & trained and scored <= tested, (how, name)
            if name == "manifest":  # every held-out image of both datasets, under its new name
                assert scored == tested
            d = summary["datasets"][name]
            left = [r for r in run["rows"]
                    if r["split"] == "train" and name in ("manifest", r["dataset"])]
            assert d["role"] == evaluate.IN_DOMAIN and d["trained_left_out"] == len(left) >= 8
            assert summary["training_images"].endswith(data.TRAINING_DATA)
            assert summary["trained_scored"] == 0
            printed = capsys.readouterr().out
            assert "trained-on images left out" in printed and "in-domain test split" in printed
            assert (out / "results.md").read_text().startswith("in-domain test split (")


class Scorer:
    """Stands in for mgiqa.score (the same answer for every image) and records what it was asked."""

    def __init__(self):
        self.images = []

    def __call__(self, model, processor, images, **kwargs):
        self.images += images
        return [{**mgiqa.parse_answer(GOOD), "completion": GOOD, "strict": True} for _ in images]


def no_model(*args, **kwargs):
    return None, None


@pytest.fixture
def scorer(monkeypatch):
    fake = Scorer()
    monkeypatch.setattr(mgiqa, "load", no_model)
    monkeypatch.setattr(mgiqa, "score", fake)
    return fake


def test_allow_trained_scores_them_and_marks_summary_and_report(run, tmp_path, scorer, capsys):
    alpha = run["root"] / "alpha"
    assert evaluate.main(["--model", str(run["merged"]), "--data", f"manifest={alpha}",
                          "--allow-trained", "--report", "--out", str(tmp_path / "o")]) == 0
    assert len(scorer.images) == 10  # every image, 8 of them trained on
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["trained_scored"] == 8 and summary["allow_trained"] is True
    page = (tmp_path / "o" / "report.html").read_text()
    assert "<h1>MG-IQA evaluation: " in page
    assert "INCLUDES 8 TRAINING IMAGES (--allow-trained)</h1>" in page
    assert "8 TRAINED-ON IMAGES WERE SCORED" in capsys.readouterr().out


def test_cross_dataset_set_loses_only_its_copies_of_training_images(run, tmp_path, scorer, capsys):
    trained = [r["image"] for r in run["rows"] if r["split"] == "train"]
    gamma = photos(str(tmp_path / "gamma"), 5, "gamma", seed=9)
    shutil.copyfile(trained[0], os.path.join(gamma, "dup.png"))  # a trained image, new name
    with open(os.path.join(gamma, "manifest.csv"), "a", newline="") as f:
        csv.writer(f).writerow(["dup.png", 3.0, "gamma"])
    assert evaluate.main(["--model", str(run["merged"]), "--data", f"manifest={gamma}", "--out",
                          str(tmp_path / "o")]) == 0
    assert len(scorer.images) == 5 and not any(im.endswith("dup.png") for im in scorer.images)
    d = json.loads((tmp_path / "o" / "summary.json").read_text())["datasets"]["gamma"]
    assert d["role"] == evaluate.CROSS and d["trained_left_out"] == 1
    printed = capsys.readouterr().out
    assert "gamma: cross-dataset, 5 images scored; 1 trained-on images left out" in printed


def test_a_model_without_a_list_is_evaluated_as_before_and_says_so(tmp_path, scorer, capsys):
    alpha = photos(str(tmp_path / "alpha"), 4, "alpha", seed=0)
    out = tmp_path / "o"
    assert evaluate.main(["--model", "tiny", "--data", f"manifest={alpha}", "--out", str(out)]) == 0
    assert len(scorer.images) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["training_images"] == evaluate.UNKNOWN
    assert "training images: training images unknown" in capsys.readouterr().out


# ----------------------------------------------------------------------------- the suite

def test_suite_on_a_model_trained_on_spaq_scores_only_its_held_out_part(tmp_path, monkeypatch,
                                                                        scorer):
    openpyxl = pytest.importorskip("openpyxl")
    spaq, rng = tmp_path / "root" / "spaq", np.random.default_rng(3)
    book = openpyxl.Workbook()
    book.active.append(["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness",
                        "Sharpness"])
    os.makedirs(spaq / "TestImage")
    for i in range(10):  # SPAQ's published layout: the .xlsx and TestImage/
        pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(spaq / "TestImage" / f"{i:05d}.png")
        book.active.append([f"{i:05d}.png", float(i), 1, 2, 3, 4, 5])
    os.makedirs(spaq / "Annotations")
    book.save(spaq / "Annotations" / "MOS and Image attribute scores.xlsx")
    cfg = grpo.Config(data=[f"spaq={spaq}"], out=str(tmp_path / "run"))
    grpo.load_data(cfg)  # what grpo.main writes before training
    grpo.carry_training_data(cfg.out, tmp_path / "model")
    split = data.load_image_list(str(tmp_path / "run" / "split-spaq.csv"))
    held = {r["image"] for r in split if r["split"] == "test"}
    assert len(held) == 2
    real_load = data.load_dataset

    def load(name, root, strict=False):  # the other seven: 20 images each, none trained on
        if name == "spaq":
            return real_load(name, root)
        records = []
        for i in range(20):
            image = tmp_path / f"{name}{i}.png"
            Image.new("RGB", (8, 8), (i, 7, 7)).save(image)
            split = ("test" if i % 2 else "train") if name == "koniq" else "all"
            records.append(Record(str(image), name, "synthetic", split, mos=float(i),
                                  ref=f"r{i % 5}"))
        return records
    monkeypatch.setattr(data, "load_dataset", load)
    assert evaluate.main(["--model", str(tmp_path / "model"), "--suite", "--data-root",
                          str(tmp_path / "root"), "--out", str(tmp_path / "o")]) == 0
    assert {r["image"] for r in evaluate.read_rows(str(tmp_path / "o" / "spaq.jsonl"))} == held
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())["datasets"]
    assert summary["spaq"]["role"] == evaluate.IN_DOMAIN
    assert summary["spaq"]["trained_left_out"] == 8
    cross = {n for n, d in summary.items() if d["role"] == evaluate.CROSS}
    assert cross == {n for n, _, _ in evaluate.SUITE} - {"spaq"}
    in_domain, cross = (tmp_path / "o" / "results.md").read_text().split("\n\ncross-dataset (")
    assert in_domain.startswith("in-domain test split (") and "| spaq | 2 |" in in_domain
    assert "| koniq |" in cross and "| spaq |" not in cross
    assert in_domain.count("| average |") == 1 and cross.count("| average |") == 1


# ----------------------------------------------------------------------------- frozen test lists

def test_frozen_test_list_refuses_a_changed_or_missing_image(tmp_path, scorer):
    alpha = photos(str(tmp_path / "alpha"), 10, "alpha", seed=0)
    assert data.main(["freeze", f"manifest={alpha}", "--out", str(tmp_path / "frozen")]) == 0
    frozen = tmp_path / "frozen" / "alpha.csv"
    listed = data.load_image_list(str(frozen))
    assert len(listed) == 2
    assert all(r["split"] == "test" and not os.path.isabs(r["image"]) for r in listed)
    spec = f"manifest={alpha},frozen={frozen}"
    assert evaluate.main(["--model", "tiny", "--data", spec, "--out", str(tmp_path / "a")]) == 0
    assert sorted(os.path.basename(p) for p in scorer.images) == sorted(r["image"] for r in listed)
    changed, gone = (os.path.join(alpha, r["image"]) for r in listed)
    Image.new("RGB", (56, 56)).save(changed)  # other bytes under the same name
    with pytest.raises(SystemExit, match=f"{changed}: changed"):
        evaluate.main(["--model", "tiny", "--data", spec, "--out", str(tmp_path / "b")])
    assert not (tmp_path / "b" / "manifest.jsonl").exists() and len(scorer.images) == 2
    os.remove(gone)
    with pytest.raises(SystemExit, match=f"missing under {alpha}: {os.path.basename(gone)}"), \
            pytest.warns(UserWarning, match="listed images missing"):
        evaluate.main(["--model", "tiny", "--data", spec, "--out", str(tmp_path / "c")])


def test_a_manifests_sha256_column_is_checked(tmp_path, scorer):
    alpha = photos(str(tmp_path / "alpha"), 3, "alpha", seed=0)
    rows = list(csv.reader(open(os.path.join(alpha, "manifest.csv"))))
    hashes = [data.sha256_file(os.path.join(alpha, row[0])) for row in rows[1:]]
    hashes[0] = "0" * 64  # p0.png is recorded with other bytes
    write_rows(os.path.join(alpha, "manifest.csv"),
               [rows[0] + ["sha256"]] + [row + [h] for row, h in zip(rows[1:], hashes)])
    with pytest.raises(SystemExit, match="p0.png: changed"):
        evaluate.main(["--model", "tiny", "--data", f"manifest={alpha}", "--out",
                       str(tmp_path / "o")])
    assert scorer.images == []


def test_hashing_shows_progress_on_large_sets(tmp_path, capsys):
    root = photos(str(tmp_path), 3, "x", seed=0)
    paths = [os.path.join(root, f"p{i}.png") for i in range(3)]
    hashes = data.sha256_files(paths, what="x", every=2)
    printed = capsys.readouterr().err.splitlines()
    assert printed == ["hashing x: 2 / 3 files", "hashing x: 3 / 3 files"]
    assert hashes == data.sha256_files(paths, every=4) and len(set(hashes)) == 3
    assert capsys.readouterr().err == ""  # fewer files than `every`: quiet


# ----------------------------------------------------------------------------- no surprise resume

def test_the_same_command_on_a_used_out_is_refused(run):
    before = (run["run"] / "config.json").read_text()
    with pytest.raises(SystemExit) as refused:
        grpo.main(run["argv"])
    message = str(refused.value.code)
    assert f"--out {run['run']} already holds a run" in message
    assert f"--resume {run['run']}" in message and "another --out" in message
    assert (run["run"] / "config.json").read_text() == before


def test_resume_refuses_changed_flags_and_honours_any_steps(run):
    path = str(run["run"])

    def config(*argv):
        args = grpo.build_parser().parse_args(argv)
        return grpo.config_from_args(args, grpo.given_flags(list(argv)))
    for flags, named in ((["--lr", "0.5"], "--lr 0.5"), (["-K", "3"], "--num-generations 3"),
                         (["--top-p", "0.5"], "--top-p 0.5"), (["--out", "x"], "--out x")):
        with pytest.raises(SystemExit, match=named):
            config("--resume", path, *flags)
    with pytest.raises(SystemExit, match="reached step 2"):
        config("--resume", path, "--steps", "1")
    # the default --steps (1000) extends too; flags equal to the run's pass
    cfg = config("--resume", path, "--steps", "1000", "--save-every", "5", "--threads", "1",
                 "--merge", "m", "--lr", "1e-5", "--max-new-tokens", "4")
    assert (cfg.steps, cfg.save_every, cfg.out, cfg.max_new_tokens) == (1000, 5, path, 4)


def test_continuing_from_a_trained_model_carries_the_union(run, tmp_path):
    gamma = photos(str(tmp_path / "gamma"), 5, "gamma", seed=9)
    cfg = grpo.Config(model=str(run["merged"]), data=[f"manifest={gamma}"],
                      out=str(tmp_path / "run"))
    grpo.load_data(cfg)
    rows = data.load_image_list(str(tmp_path / "run" / data.TRAINING_DATA))
    assert {r["dataset"] for r in rows} == {"alpha", "beta", "gamma"}
    assert [r for r in rows if r["dataset"] != "gamma"] == run["rows"]


# ----------------------------------------------------------------------------- flags

def test_top_p_below_one_is_refused_with_the_reason(tmp_path):
    with pytest.raises(SystemExit, match="truncated distribution while the ratio and the KL use"):
        grpo.main(["--data", "manifest=x", "--top-p", "0.9", "--out", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="--top-p 0.9"):
        grpo.train(small_cfg(top_p=0.9, out=str(tmp_path / "run")), None, None, None)


def under_torchrun():
    return True


def zero_loss(model):
    return 0.0


def test_auxiliary_loss_is_refused_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "is_distributed", under_torchrun)
    with pytest.raises(ValueError, match="torchrun"):
        grpo.train(small_cfg(out=str(tmp_path / "run")), None, None, None, aux_loss=zero_loss)
