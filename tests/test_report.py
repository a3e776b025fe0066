"""report.py: strict JSON that round-trips, and the HTML report's structure read back with Python's
own HTML parser (every image present and embedded, the scores as in the rows, worst-ranked first,
nothing fetched from outside the file; the parser and checks are conftest.py's report helpers)."""
import math

import numpy as np
import pytest
from PIL import Image

import evaluate as ev
import report
from conftest import assert_cards_match_rows, assert_self_contained, parse_report, strict_json_files
from data import Record
from mgiqa import ATTRIBUTES, LABELLED

NAN = math.nan


# ----------------------------------------------------------------------------- strict JSON

def test_strict_json_nan_as_null_round_trips(tmp_path):
    obj = {"a": NAN, "b": [1.5, math.inf, -math.inf, (2, NAN)], "c": np.float32(0.25), "d": np.array([1.0, np.nan]),
           "e": {"f": None, "g": "x", "h": np.int64(3), "i": True}}
    text = report.dumps(obj)
    assert "NaN" not in text and "Infinity" not in text
    back = report.strict_loads(text)
    assert back == {"a": None, "b": [1.5, None, None, [2, None]], "c": 0.25, "d": [1.0, None],
                    "e": {"f": None, "g": "x", "h": 3, "i": True}}
    restored = report.nan_for_null(back)
    assert math.isnan(restored["a"]) and restored["b"][0] == 1.5 and math.isnan(restored["d"][1])
    with pytest.raises(ValueError, match="not strict JSON: NaN"):
        report.strict_loads('{"x": NaN}')
    report.write_json(tmp_path / "s.json", obj)
    assert strict_json_files(tmp_path) == ["s.json"] and report.strict_loads((tmp_path / "s.json").read_text()) == back


# ----------------------------------------------------------------------------- the HTML report

def rows_and_records(tmp_path, n=9, unparsed=(4,)):
    """n images on disk (two sizes), a dataset whose labels lie outside 1-5 (MOS 0-100)."""
    rows, recs, rng = [], [], np.random.default_rng(0)
    for i in range(n):
        path = str(tmp_path / f"im{i}.{'png' if i % 2 else 'jpg'}")
        side = 64 if i % 2 else 400
        Image.fromarray(rng.integers(0, 255, (side, side + 30, 3), dtype=np.uint8)).save(path)
        mos = 10.0 * i + 5
        pred = {a: float(1 + (i * 7 + k) % 5) for k, a in enumerate(ATTRIBUTES)}
        if i in unparsed:
            pred = dict.fromkeys(ATTRIBUTES, NAN)
        recs.append(Record(path, "toy", "authentic", mos=mos, attributes={"sharpness": 1 + i % 5},
                           family="blur" if i % 3 else None, level=i % 3))
        rows.append({"dataset": "toy", "image": path, "mos": mos, "labels": {"sharpness": float(1 + i % 5)}, **pred,
                     "parsed": i not in unparsed, "strict": True, "thinking": True,
                     "completion": f"<think>looks {'blurry' if i % 3 else 'clean'} & <fine></think><answer>{{}}</answer>"})
    return rows, recs


def test_report_structure_scores_order_self_contained(tmp_path):
    rows, recs = rows_and_records(tmp_path)
    summary = ev.summarize(rows, recs)
    text = report.html_report(rows, recs, summary, "toy <run>", subtitle="s", note="a note")
    p = parse_report(text)
    assert_self_contained(p)
    assert_cards_match_rows(p, rows)
    assert "script" in p.tags and p.tags.count("script") == 1  # the small inline sorter, nothing loaded
    assert p.svgs == 2  # a scatter for overall (MOS) and for the one labelled attribute
    assert "toy &lt;run&gt;" in text and "looks blurry &amp; &lt;fine&gt;" in text  # escaped
    # worst-ranked first: the unparsed image, then by |predicted rank - MOS rank| descending
    assert p.cards[0]["image"] == rows[4]["image"] and p.cards[0]["err"] == "2"
    errs = [float(c["err"]) for c in p.cards[1:]]
    assert errs == sorted(errs, reverse=True) and max(errs) <= 1
    idx, err, rank_p, rank_m = report.order(rows)
    assert [int(c["index"]) for c in p.cards] == idx
    ok = np.isfinite(rank_p)  # report.py's own ranks (it imports no metric code) are evaluate.rankdata's
    assert np.array_equal(rank_p[ok], ev.rankdata([-r["overall"] for r, k in zip(rows, ok) if k]))
    assert np.array_equal(rank_m[ok], ev.rankdata([-r["mos"] for r, k in zip(rows, ok) if k]))
    srcc = summary["datasets"]["toy"]["metrics"]["overall"]["srcc"]
    assert f"{srcc:.3f}" in p.cells  # the metrics table
    limited = parse_report(report.html_report(rows, recs, summary, "t", max_images=3))
    assert [c["image"] for c in limited.cards] == [c["image"] for c in p.cards[:3]]


def test_report_from_images_in_memory_and_ground_truth_ticks(tmp_path):
    images = {f"s{i}.png": np.full((84, 84, 3), 40 * i, np.uint8) for i in range(4)}
    recs = [Record(name, "demo", "synthetic", mos=5.0 - i,
                   attributes=dict.fromkeys(LABELLED, 5.0 - i),
                   family=None if i == 0 else "noise", level=i) for i, name in enumerate(images)]
    rows = [ev.result_row(r, {**dict.fromkeys(ATTRIBUTES, 5.0 - i), "strict": True,
                              "completion": "<think>noisy</think><answer>{}</answer>"}, True) for i, r in enumerate(recs)]
    path = report.write_report(tmp_path / "r.html", rows, recs, ev.summarize(rows, recs), "demo", images=images)
    p = parse_report(open(path, encoding="utf-8").read())
    assert_cards_match_rows(p, rows)
    assert all(c["img"].startswith("data:image/png") for c in p.cards)  # small images kept exact
    assert p.svgs == 5
    assert report.gt_scale([1.0, 2.5, 5.0]) == (1.0, 5.0) and report.gt_scale([10.0, 90.0]) == (10.0, 90.0)
    assert 'left:40.0%" title="ground truth 2"' in open(path).read()  # labels already on 1-5: 2 sits at 2/5 of the track


def test_scatter_ground_truth_across_prediction_up():
    import re
    svg = report.scatter_svg([1, 2, 3, 4, 5], [10.0, 20.0, 30.0, 40.0, 50.0], "t")
    points = [(float(x), float(y)) for x, y in re.findall(r'<circle cx="([\d.]+)" cy="([\d.]+)"', svg)]
    assert len(points) == 5
    assert [x for x, _ in points] == sorted(x for x, _ in points)  # ground truth grows to the right
    assert [y for _, y in points] == sorted((y for _, y in points), reverse=True)  # prediction grows upwards
    assert report.ticks(0.84, 5.16) == [1, 2, 3, 4, 5] and report.ticks(1.8, 93.2) == [20, 40, 60, 80]
    assert "2 unparsed left out" in report.scatter_svg([1, NAN, NAN], [1.0, 2.0, 3.0], "t")
