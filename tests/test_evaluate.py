"""evaluate.py: hand-computed metrics, scipy cross-checks, the logistic fit,
bootstrap, resume after an interruption, full runs of the offline tiny model, comparison, plots, the suite."""
import csv
import json
import math
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate as ev
import mgiqa
import report
import synth
from conftest import assert_cards_match_rows, assert_self_contained, parse_report, strict_json_files
from data import Record
from mgiqa import ATTRIBUTES, FAMILY_TO_ATTRIBUTE, LABELLED

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAN = math.nan
# a valid answer, sharpness and overall {0}, the other scores 3
GOOD = ("<think>ok</think><answer>{{"
        + ", ".join(f'"{a}": ' + ("{0}" if a in ("sharpness", "overall") else "3")
                    for a in ATTRIBUTES)
        + "}}</answer>")


# ----------------------------------------------------------------------------- metrics

def test_metrics_hand_computed():
    pred, gt = [1, 2, 3, 4, 5], [2, 1, 4, 3, 5]  # d = 1,-1,1,-1,0: SRCC 1 - 6*4/120; 2 of 10 pairs discordant
    assert ev.srcc(pred, gt) == pytest.approx(0.8)
    assert ev.krcc(pred, gt) == pytest.approx(0.6)
    assert ev.plcc(pred, gt) == pytest.approx(0.8)  # sum dx*dy = 8, sxx = syy = 10
    pred, gt = [1, 1, 2, 3], [1, 2, 2, 3]  # ranks 1.5 1.5 3 4 / 1 2.5 2.5 4: 3.75 / 4.5; tau-b 4 / sqrt(5 * 5)
    assert list(ev.rankdata(pred)) == [1.5, 1.5, 3, 4]
    assert ev.srcc(pred, gt) == pytest.approx(3.75 / 4.5)
    assert ev.krcc(pred, gt) == pytest.approx(0.8)
    m = ev.metrics([1, NAN, 2, 3, 4, 5, NAN], [2, 3, 1, 4, 3, 5, NAN])  # NaN pairs dropped and counted
    assert (m["n"], m["n_nan"]) == (5, 2) and m["srcc"] == pytest.approx(0.8) and m["krcc"] == pytest.approx(0.6)
    for f in (ev.srcc, ev.krcc, ev.plcc):  # constant or too short: undefined, as scipy
        assert math.isnan(f([2, 2, 2], [1, 2, 3])) and math.isnan(f([1], [1]))
    assert math.isnan(ev.plcc([2, 2, 2, 2, 2], [1, 2, 3, 4, 5], fit="logistic4"))
    with pytest.raises(ValueError, match="5 values"):
        ev.srcc([1, 2, 3, 4, 5], [1, 2])


def test_metrics_match_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(3, 300))
        x = rng.integers(0, 6, n).astype(float) if trial % 2 else np.round(rng.normal(size=n), 1)
        y = x * rng.uniform(-1, 1) + rng.integers(0, 4, n)
        assert ev.srcc(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
        assert ev.krcc(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)
        assert ev.plcc(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
        assert np.array_equal(ev.rankdata(x), stats.rankdata(x))


def test_krcc_chunks_match_scipy_on_many_images():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    x = rng.integers(0, 50, 3000).astype(float)  # 3000 images: several row chunks, many ties
    y = x + rng.integers(0, 30, 3000)
    assert ev.krcc(x, y) == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def logistic_data(rng, n, b, noise):
    x = rng.uniform(1, 5, n)
    return x, ev.logistic4(x, b) + rng.normal(0, noise, n)


def test_logistic_fit_recovers_known_parameters():
    rng = np.random.default_rng(0)
    true = (90.0, 10.0, 3.2, 0.4)
    x, y = logistic_data(rng, 4000, true, 2.0)
    b = ev.fit_logistic4(x, y)
    assert b[:3] == pytest.approx(true[:3], rel=0.02) and abs(b[3]) == pytest.approx(0.4, rel=0.05)
    start_sse = ((y - ev.logistic4(x, [y.max(), y.min(), x.mean(), x.std() / 4])) ** 2).sum()
    assert ((y - ev.logistic4(x, b)) ** 2).sum() < 0.1 * start_sse
    # a decreasing relation (negative slope) is fitted too, and PLCC after the fit beats the raw one
    x, y = logistic_data(rng, 500, (1.0, 5.0, 3.0, 0.3), 0.2)
    assert ev.plcc(x, y, fit="logistic4") > abs(ev.plcc(x, y)) > 0.8
    with pytest.raises(ValueError, match="logistic4"):
        ev.plcc(x, y, fit="cubic")


def test_logistic_fit_as_good_as_curve_fit():
    optimize = pytest.importorskip("scipy.optimize")

    def f(x, b1, b2, b3, b4):  # pyiqa's form
        return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2
    rng = np.random.default_rng(2)
    for _ in range(40):
        b = rng.uniform([60, 0, 2, 0.2], [100, 30, 4, 1.5])
        x, y = logistic_data(rng, int(rng.integers(10, 300)), b, rng.uniform(1, 20))
        ours = ((y - ev.logistic4(x, ev.fit_logistic4(x, y))) ** 2).sum()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            p, _ = optimize.curve_fit(f, x, y, p0=[y.max(), y.min(), x.mean(), x.std() / 4], maxfev=10000)
        assert ours <= ((y - f(x, *p)) ** 2).sum() * (1 + 1e-6)


def test_bootstrap_contains_point_and_narrows():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400, 4000):
        gt = rng.normal(size=n)
        pred = gt + rng.normal(size=n)
        point, low, high = ev.bootstrap_ci(pred, gt, "srcc", n=100, seed=0)
        assert point == ev.srcc(pred, gt) and low < point < high
        widths.append(high - low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]
    assert ev.bootstrap_ci(pred[:100], gt[:100], ev.krcc, n=20, seed=3) == ev.bootstrap_ci(pred[:100], gt[:100], ev.krcc, n=20, seed=3)


# ----------------------------------------------------------------------------- runs

def write_manifest(root, n=6, size=56, dataset="toy"):
    """n random images: clean, then blur, noise, color, composition at rising levels, cycling."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.RandomState(0)
    families = [None, "blur", "blur", "noise", "noise", "color", "composition"]
    with open(os.path.join(root, "manifest.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mos", *LABELLED, "ref", "family", "level", "dataset", "split"])
        for i in range(n):
            name = f"im{i}.png"
            Image.fromarray((rng.rand(size, size, 3) * 255).astype("uint8")).save(os.path.join(root, name))
            fam, level = families[i % len(families)], i % 5 + 1
            attrs = {a: 5.0 - (0.8 * level if FAMILY_TO_ATTRIBUTE.get(fam) == a else 0) for a in LABELLED}
            w.writerow([name, round(1 + 4 * rng.rand(), 2), *attrs.values(), f"r{i % 2}", fam or "",
                        level if fam else 0, dataset, "test" if i % 3 else "train"])
    return data.load_dataset("manifest", str(root))


class FakeScore:
    """Stands in for mgiqa.score: completions chosen per image; optionally fails on a given call."""

    def __init__(self, completion_of, fail_on_call=None):
        self.completion_of, self.fail_on_call, self.calls = completion_of, fail_on_call, 0

    def __call__(self, model, processor, images, thinking=True, batch_size=8, max_new_tokens=None, **kw):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt
        out = []
        for image in images:
            text = self.completion_of(image)
            out.append({**mgiqa.parse_answer(text), "completion": text,
                        "strict": mgiqa.parse_answer(text, strict=True, thinking=thinking) is not None})
        return out


def good_or_garbage(image):
    i = int(os.path.basename(image)[2:-4])
    return "no idea" if i % 4 == 3 else GOOD.format(1 + i % 5)


def test_unparseable_is_counted_not_fatal(tmp_path, monkeypatch):
    records = write_manifest(tmp_path / "d", n=8)
    monkeypatch.setattr(mgiqa, "score", FakeScore(good_or_garbage))
    rows = ev.evaluate_records(None, None, records, batch_size=3)
    summary = ev.summarize(rows, records)
    d = summary["datasets"]["toy"]
    assert d["n"] == 8 and d["parse_failures"] == 2 and d["unparsed"]["color"] == 2 and d["strict_rate"] == 0.75
    assert d["metrics"]["overall"]["n_nan"] == 2 and d["metrics"]["overall"]["n"] == 6
    assert math.isfinite(d["metrics"]["overall"]["srcc"]) and set(d["metrics"]) == set(ATTRIBUTES)
    assert [r["parsed"] for r in rows] == [i % 4 != 3 for i in range(8)]
    table = ev.markdown_table(summary)
    assert "| toy | 8 | 2 |" in table and "| average |" in table and "sharpness SRCC" in table


def test_resume_after_interruption_in_process(tmp_path, monkeypatch):
    records = write_manifest(tmp_path / "d", n=7)
    fresh, resumed = str(tmp_path / "fresh.jsonl"), str(tmp_path / "resumed.jsonl")
    monkeypatch.setattr(mgiqa, "score", FakeScore(good_or_garbage))
    rows = ev.evaluate_records(None, None, records, fresh, batch_size=2)
    monkeypatch.setattr(mgiqa, "score", FakeScore(good_or_garbage, fail_on_call=3))
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate_records(None, None, records, resumed, batch_size=2)
    assert len(ev.read_rows(resumed)) == 4  # two batches flushed before the interruption
    with open(resumed, "a") as f:
        f.write('{"dataset": "toy", "image": "half a li')  # a write cut short
    monkeypatch.setattr(mgiqa, "score", FakeScore(good_or_garbage))
    again = ev.evaluate_records(None, None, records, resumed, batch_size=2)
    assert open(resumed).read() == open(fresh).read()
    assert report.dumps(again) == report.dumps(rows)
    with pytest.raises(ValueError, match="thinking=True"):
        ev.evaluate_records(None, None, records, resumed, thinking=False)
    with pytest.raises(ValueError, match="more than once"):
        ev.evaluate_records(None, None, records + records[:1])


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def run(*argv):
    return ev.main([str(a) for a in argv])


def test_cli_resume_with_limit_gives_identical_files(tmp_path, one_thread, capsys):
    write_manifest(tmp_path / "d", n=6)
    common = ["--model", "tiny", "--data", f"manifest={tmp_path / 'd'}", "--batch-size", "2",
              "--max-new-tokens", "4", "--threads", "1"]
    assert run(*common, "--limit", "3", "--out", tmp_path / "a") == 0
    assert len(ev.read_rows(str(tmp_path / "a" / "manifest.jsonl"))) == 3
    assert run(*common, "--out", tmp_path / "a") == 0
    assert run(*common, "--out", tmp_path / "b") == 0
    for name in ("manifest.jsonl", "summary.json", "results.md"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    rows = ev.read_rows(str(tmp_path / "a" / "manifest.jsonl"))
    assert len(rows) == 6 and len({r["image"] for r in rows}) == 6
    with pytest.raises(SystemExit):  # other settings into the same folder would mix two models' rows
        run(*common, "--fast", "--out", tmp_path / "a")
    assert "use another --out" in capsys.readouterr().err


def test_full_tiny_run_on_synthetic_data_writes_all_outputs(tmp_path, one_thread, capsys, monkeypatch):
    synth.make_synthetic(str(tmp_path / "d"), 20, 56, seed=0)  # 4 scenes of 5 images, one scene held out
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # absent here anyway; a one-line note
    assert run("--model", "tiny", "--data", f"manifest={tmp_path / 'd'}", "--split", "test", "--fast",
               "--max-new-tokens", "4", "--threads", "1", "--out", tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert "matplotlib is not installed" in out and "5 of 5 completions had no parsable overall score" in out
    rows = ev.read_rows(str(tmp_path / "o" / "manifest.jsonl"))
    assert len(rows) == 5 and all(r["thinking"] is False and "completion" in r for r in rows)
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    d = summary["datasets"]["synthetic"]
    assert summary["thinking"] is False and d["n"] == 5 and set(d["metrics"]) == set(ATTRIBUTES)
    assert d["parse_failures"] == 5 and d["metrics"]["overall"]["srcc"] is None  # the untrained model writes '\n'
    assert set(d["within_family"]) == set(LABELLED)
    table = (tmp_path / "o" / "results.md").read_text()
    assert table.startswith("| dataset | n | unparsed | overall SRCC | overall PLCC | sharpness SRCC")
    assert "| synthetic | 5 | 5 |" in table


def test_report_and_strict_json_of_a_run(tmp_path, monkeypatch):
    synth.make_synthetic(str(tmp_path / "d"), 20, 56, seed=0)
    loads = []
    monkeypatch.setattr(mgiqa, "load", lambda *a, **k: loads.append(k) or (None, None))
    monkeypatch.setattr(mgiqa, "score", FakeScore(lambda im: "garbage" if im.endswith("_3.png") else GOOD.format(1 + int(im[-5]) % 5)))
    assert run("--model", "m", "--data", f"manifest={tmp_path / 'd'}", "--out", tmp_path / "o", "--report") == 0
    assert loads[0]["max_pixels"] == 0  # the documented default: 1,280 image tokens in the family's units (mgiqa.load)
    assert json.loads((tmp_path / "o" / "run.json").read_text())["max_pixels"] == 0
    rows = ev.read_rows(str(tmp_path / "o" / "manifest.jsonl"))
    p = parse_report((tmp_path / "o" / "report.html").read_text(encoding="utf-8"))
    assert_self_contained(p)
    assert_cards_match_rows(p, rows)  # every image, scores as in the JSONL
    assert sorted(strict_json_files(tmp_path / "o")) == ["manifest.jsonl", "run.json", "summary.json"]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["datasets"]["synthetic"]["parse_failures"] == 4
    assert run("--model", "m", "--data", f"manifest={tmp_path / 'd'}", "--out", tmp_path / "p", "--max-pixels", "7056",
               "--report", "--report-images", "3") == 0
    assert loads[-1]["max_pixels"] == 7056
    p = parse_report((tmp_path / "p" / "report.html").read_text(encoding="utf-8"))
    assert len(p.cards) == 3 and "the 3 worst-ranked of 20" in (tmp_path / "p" / "report.html").read_text()
    assert not (tmp_path / "q").exists() and run("--model", "m", "--data", f"manifest={tmp_path / 'd'}", "--out",
                                                   tmp_path / "q") == 0 and not (tmp_path / "q" / "report.html").exists()


def test_every_option_has_help():
    parser, _ = ev.parse_args(["--model", "m"])
    assert all(a.help for a in parser._actions if a.dest != "help")


def test_within_family_srcc():
    recs, rows = [], []
    for i, (fam, level) in enumerate([(None, 0), ("blur", 1), ("blur", 3), ("blur", 5), ("noise", 2), ("noise", 4)]):
        attrs = {a: 5.0 - (0.8 * level if FAMILY_TO_ATTRIBUTE.get(fam) == a else 0) for a in LABELLED}
        recs.append(Record(f"i{i}", "s", "synthetic", mos=5 - level, attributes=attrs, family=fam, level=level))
        # sharpness predicted right inside blur+clean, but noisy images get a low sharpness score
        rows.append({"dataset": "s", "image": f"i{i}", **dict.fromkeys(ATTRIBUTES, 3.0),
                     "sharpness": 4.5 - level if fam != "noise" else 1.0,
                     "noise": 3.0 - (level if fam == "noise" else 0)})
    got = ev.attribute_srcc_within_family(rows, recs)
    assert got["sharpness"] == pytest.approx(1.0) and got["noise"] == pytest.approx(1.0)
    assert ev.srcc([r["sharpness"] for r in rows], [r.attributes["sharpness"] for r in recs]) < 0.9
    assert math.isnan(got["color"])  # constant predictions
    assert math.isnan(ev.attribute_srcc_within_family(rows[:2], recs[:2])["sharpness"])  # fewer than 3 images
    rows[0]["sharpness"] = 0.0  # the clean image now predicted worst: counted, it breaks the order
    assert ev.attribute_srcc_within_family(rows, recs)["sharpness"] < 0.5
    recs[0].level = None  # no family and no level: several distortions (synth.py's mixed mode), not clean
    assert ev.attribute_srcc_within_family(rows, recs)["sharpness"] == pytest.approx(1.0)


def fake_rows(rng, n, spread, dataset="d", start=0):
    gt = np.linspace(1, 5, n)
    return [{"dataset": dataset, "image": f"img{start + i}", "mos": float(g), "labels": {}, "thinking": True,
             **{a: float(g + rng.normal(0, spread)) for a in ATTRIBUTES}, "parsed": True, "strict": True,
             "completion": ""} for i, g in enumerate(gt)]


def test_compare_two_result_files(tmp_path):
    rng = np.random.default_rng(0)
    a = fake_rows(rng, 200, 0.3) + fake_rows(rng, 100, 0.5, "e")
    b = fake_rows(rng, 200, 2.0) + fake_rows(rng, 100, 0.5, "e") + fake_rows(rng, 30, 0.1, "d", start=500)
    a[0]["overall"] = NAN
    for path, rows in (("a.jsonl", a), ("b.jsonl", b)):
        with open(tmp_path / path, "w") as f:
            f.writelines(report.dumps(r) + "\n" for r in rows)
    result = ev.compare(ev.read_rows(str(tmp_path / "a.jsonl")), ev.read_rows(str(tmp_path / "b.jsonl")), n=300)
    d = result["d"]
    assert d["n"] == 199 and d["unparsed"] == [1, 0] and d["low"] < d["diff"] < d["high"]
    assert d["low"] > 0 and d["a_better"] == 1.0  # A's noise is much smaller
    assert 0.05 < result["e"]["a_better"] < 0.95 and result["e"]["low"] < 0 < result["e"]["high"]
    assert result["average"]["diff"] == pytest.approx((d["diff"] + result["e"]["diff"]) / 2)
    # paired: B = A plus a tiny perturbation differs by far less than either SRCC's own spread
    near = [{**r, "overall": r["overall"] + rng.normal(0, 0.01)} for r in a[1:200]]
    paired = ev.compare(a[1:200], near, n=300)["d"]
    _, low, high = ev.bootstrap_ci([r["overall"] for r in a[1:200]], [r["mos"] for r in a[1:200]], n=300)
    assert paired["high"] - paired["low"] < 0.2 * (high - low)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--compare", str(tmp_path / "a.jsonl"),
                           str(tmp_path / "b.jsonl"), "--n-boot", "100", "--out", str(tmp_path / "cmp")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "| d | 199 | 1/0 |" in proc.stdout and "| average |" in proc.stdout
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["d"]["n"] == 199
    b[3]["mos"] = 9.0
    with pytest.raises(ValueError, match="disagree"):
        ev.compare(a, b, n=10)


def test_scatter_plots_with_and_without_matplotlib(tmp_path, monkeypatch):
    rows = fake_rows(np.random.default_rng(0), 20, 0.5) + fake_rows(np.random.default_rng(1), 10, 0.5, "e")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert "not installed" in ev.scatter_plots(rows, str(tmp_path))
    saved = []

    class Figure:
        def __init__(self, figsize):
            self.ax = types.SimpleNamespace(scatter=lambda x, y, s: saved.append((len(x), len(y))), set=lambda **kw: None)

        def subplots(self):
            return self.ax

        def savefig(self, path, dpi):
            saved.append(os.path.basename(path))
    fake = types.ModuleType("matplotlib.figure")
    fake.Figure = Figure
    monkeypatch.setitem(sys.modules, "matplotlib", types.ModuleType("matplotlib"))
    monkeypatch.setitem(sys.modules, "matplotlib.figure", fake)
    assert ev.scatter_plots(rows, str(tmp_path)) == f"wrote 2 scatter plots to {tmp_path}"
    assert saved == [(20, 20), "scatter_d.png", (10, 10), "scatter_e.png"]


def test_suite_reads_eight_folders_with_their_splits(tmp_path, monkeypatch):
    png = tmp_path / "x.png"
    Image.new("RGB", (56, 56)).save(png)
    loaded = []

    def fake_load(name, root, strict=False):  # 20 images; koniq has an official split, half of it test
        loaded.append((name, os.path.relpath(root, tmp_path)))
        records = []
        for i in range(20):
            image = tmp_path / f"{name}{i}.png"
            image.write_bytes(png.read_bytes())
            split = ("test" if i % 2 else "train") if name == "koniq" else "all"
            records.append(Record(str(image), name, "synthetic", split, mos=float(i), ref=f"r{i % 5}"))
        return records
    monkeypatch.setattr(data, "load_dataset", fake_load)
    monkeypatch.setattr(mgiqa, "load", lambda *a, **k: (None, None))
    monkeypatch.setattr(mgiqa, "score", FakeScore(lambda im: GOOD.format(1 + int(im[-5]) % 5)))
    assert run("--model", "m", "--suite", "--data-root", tmp_path, "--out", tmp_path / "o") == 0
    assert loaded == [(n, folder) for n, folder, _ in ev.SUITE]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())["datasets"]
    assert list(summary) == [n for n, _, _ in ev.SUITE] and summary["koniq"]["n"] == 10 and summary["spaq"]["n"] == 20
    kadid = ev.read_rows(str(tmp_path / "o" / "kadid.jsonl"))
    refs = {int(os.path.basename(r["image"])[5:-4]) % 5 for r in kadid}
    assert len(kadid) == 4 and len(refs) == 1  # the test split: all images of one of the 5 references
    monkeypatch.setattr(data, "load_dataset", lambda name, root, strict=False: [Record("a", name, "authentic")])
    with pytest.raises(ValueError, match="official 'test' split"):
        run("--model", "m", "--suite", "--data-root", tmp_path, "--out", tmp_path / "o2")
