"""report.py: strict JSON that round-trips, and the HTML report's structure read back with Python's
own HTML parser (every image present and embedded, the scores as in the rows, worst-ranked first,
nothing fetched from outside the file)."""
import base64
import io
import json
import math
import os
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

import evaluate as ev
import report
from data import Record
from mgiqa import ATTRIBUTES

NAN = math.nan


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
    return (math.isnan(a) and math.isnan(b)) or a == b


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
            assert same(score, row[a]) and same(gt, ev.label(row, a)), (row["image"], a)


def strict_json_files(folder) -> list[str]:
    """Every .json / .jsonl under folder, each parsed with a reader that refuses NaN and Infinity."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    names = []
    for d, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(d, f)
            if f.endswith(".json"):
                json.loads(open(path).read(), parse_constant=refuse)
            elif f.endswith(".jsonl"):
                [json.loads(line, parse_constant=refuse) for line in open(path) if line.strip()]
            else:
                continue
            names.append(os.path.relpath(path, folder))
    return names


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
    assert [int(c["index"]) for c in p.cards] == report.order(rows)[0]
    srcc = summary["datasets"]["toy"]["metrics"]["overall"]["srcc"]
    assert f"{srcc:.3f}" in p.cells  # the metrics table
    limited = parse_report(report.html_report(rows, recs, summary, "t", max_images=3))
    assert [c["image"] for c in limited.cards] == [c["image"] for c in p.cards[:3]]


def test_report_from_images_in_memory_and_ground_truth_ticks(tmp_path):
    images = {f"s{i}.png": np.full((84, 84, 3), 40 * i, np.uint8) for i in range(4)}
    recs = [Record(name, "demo", "synthetic", mos=5.0 - i, attributes=dict.fromkeys(ATTRIBUTES[:-1], 5.0 - i),
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
