"""What a run leaves for people and programs: strict JSON, and a one-file HTML report.

    report.write_json(path, obj)       # NaN and infinities written as null (mgiqa.json_safe): strict JSON
    report.dumps(obj)                  # one JSON line, the same rule
    report.nan_for_null(obj)           # read back: null -> NaN, so the values round-trip
    report.write_report(path, rows, records, summary, title)   # report.html

The report (evaluate.py --report, and the demo for its held-out set) holds, per dataset, the
metrics table, a predicted-against-label scatter per attribute and a grid of the images, each with
its five scores as bars (a tick marks the ground truth where known), the reasoning text and the
raw answer. The grid comes worst-ranked first: unparsed answers, then the images whose predicted
overall rank is furthest from their MOS rank (a few lines of plain JavaScript re-sort it by other
keys; without JavaScript the page reads the same). Thumbnails are embedded as data: URIs and the
charts are inline SVG, so the one file opens anywhere, offline. No run-time dependency beyond PIL.

It draws what it is given: the metrics are those of the summary it is passed (evaluate.summarize);
it computes only the ranks that order the grid.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import os

import numpy as np

from mgiqa import ATTRIBUTES, LABELLED, json_safe, load_image, reasoning_text

# ----------------------------------------------------------------------------- strict JSON

def _numpy(obj):
    """numpy scalars and arrays, which json cannot encode, as Python values (NaN -> None)."""
    if isinstance(obj, (np.generic, np.ndarray)):
        return json_safe(obj.tolist())
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def dumps(obj, **kwargs) -> str:
    """json.dumps with NaN and infinities as null (mgiqa.json_safe, the project's one rule), numpy
    values as Python ones; allow_nan=False, so nothing non-strict can slip through."""
    return json.dumps(json_safe(obj), allow_nan=False, default=_numpy, **kwargs)


def write_json(path, obj, indent: int | None = 1) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(dumps(obj, indent=indent) + "\n")


def strict_loads(text: str):
    """json.loads that refuses NaN, Infinity and -Infinity (as jq, browsers and most languages do)."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")
    return json.loads(text, parse_constant=refuse)


def nan_for_null(obj):
    """The inverse of json_safe for numbers: None -> NaN (recursively)."""
    if obj is None:
        return math.nan
    if isinstance(obj, dict):
        return {k: nan_for_null(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_for_null(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- pieces of the page

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1d2330;background:#f4f5f7;margin:0}
main{max-width:1280px;margin:0 auto;padding:20px 28px 60px}.scroll{overflow-x:auto}
h1{font-size:24px;margin:4px 0 2px}h2{font-size:19px;margin:34px 0 8px;border-bottom:2px solid #d7dbe3;padding-bottom:4px}
.sub{color:#566074;margin:0 0 10px}.note{background:#fff6dc;border:1px solid #ecd27a;border-radius:6px;padding:8px 12px;margin:10px 0}
table{border-collapse:collapse;background:#fff;margin:8px 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde1e8;padding:3px 9px;text-align:right}th{background:#eef0f4}td:first-child,th:first-child{text-align:left}
.charts{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}.charts svg{background:#fff;border:1px solid #dde1e8;border-radius:6px}
.tools{margin:14px 0 6px;color:#566074}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:0;padding:8px;display:flex;flex-direction:column;gap:5px}
.card.unparsed{border-color:#d9534f;box-shadow:inset 0 0 0 1px #d9534f}
.card img{width:100%;height:168px;object-fit:contain;background:#e9ebef;border-radius:4px;image-rendering:auto}
.card img.small{image-rendering:pixelated}.name{font-weight:600;font-size:12px;overflow-wrap:anywhere}
.rank{font-size:12px;color:#566074}.bars{display:grid;grid-template-columns:78px 1fr 52px;gap:2px 6px;align-items:center;font-size:12px}
.track{position:relative;height:10px;background:#e9ebef;border-radius:5px}.fill{position:absolute;left:0;top:0;bottom:0;border-radius:5px}
.gt{position:absolute;top:-3px;bottom:-3px;width:2px;margin-left:-1px;background:#1d2330}
.val{text-align:right;font-variant-numeric:tabular-nums}.why{font-size:12px;background:#f6f7f9;border-radius:4px;padding:4px 6px;margin:0}
details{font-size:11px;color:#566074}pre{white-space:pre-wrap;overflow-wrap:anywhere;margin:4px 0}
.ladder td,.ladder th{text-align:center;vertical-align:top;font-size:12px}.ladder img{width:112px;height:112px;image-rendering:pixelated}
.legend{font-size:12px;color:#566074}.legend .gt{position:relative;display:inline-block;height:12px;top:2px}
"""

SORT_JS = """
function sortGrid(sel){var key=sel.value,grid=document.getElementById(sel.dataset.grid);
var cards=Array.prototype.slice.call(grid.children);cards.sort(function(a,b){
var x=parseFloat(a.dataset[key]),y=parseFloat(b.dataset[key]);if(key==='err'){x=-x;y=-y;}
if(isNaN(x))x=Infinity;if(isNaN(y))y=Infinity;return x-y||a.dataset.index-b.dataset.index;});
cards.forEach(function(c){grid.appendChild(c);});}
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def num(v, digits: int = 3) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _truth(row: dict, attribute: str) -> float:
    """A result row's ground truth of one attribute (overall: the MOS); NaN if absent."""
    value = row["mos"] if attribute == "overall" else row["labels"].get(attribute)
    return math.nan if value is None else float(value)


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)
    return ((last - counts + 1 + last) / 2.0)[inverse.ravel()]


def _color(score: float) -> str:
    """Red (1) through amber to green (5)."""
    return f"hsl({(min(max(score, 1.0), 5.0) - 1.0) * 30:.0f},62%,46%)"


def thumbnail(image) -> tuple[str, bool]:
    """(data: URI, small): an image at most 168 px a side; small images kept exact (PNG, drawn pixelated)."""
    pil = load_image(image if not isinstance(image, np.ndarray) else _pil(image))
    small = max(pil.size) <= 168
    if not small:
        pil.thumbnail((168, 168))
    buf = io.BytesIO()
    pil.save(buf, "PNG" if small else "JPEG", quality=85)
    return f"data:image/{'png' if small else 'jpeg'};base64," + base64.b64encode(buf.getvalue()).decode(), small


def _pil(array):
    from PIL import Image
    return Image.fromarray(np.asarray(array, dtype=np.uint8))


def gt_scale(values) -> tuple[float, float]:
    """(low, high) that maps ground truth onto the 1-5 bar: as is when every value lies in [1, 5],
    else the dataset's own range (min-max)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if v.size == 0 or (v.min() >= 1 and v.max() <= 5):
        return 1.0, 5.0
    return float(v.min()), float(v.max()) if v.max() > v.min() else float(v.min()) + 1.0


def ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    """Round numbers (1, 2, 2.5 or 5 times a power of ten apart) inside [lo, hi], about n of them."""
    raw = (hi - lo) / max(n - 1, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * 0.999)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step + 1e-9) + 1)]


def scatter_svg(pred, gt, title: str, width: int = 226, height: int = 210) -> str:
    """Predicted (y, 1-5) against ground truth (x, its own range) as an inline SVG; discrete values
    are jittered by a fixed pattern so that coincident points show their count."""
    y, x = np.asarray(pred, dtype=float), np.asarray(gt, dtype=float)  # y: predicted, x: ground truth
    keep = np.isfinite(y) & np.isfinite(x)
    y, x, n_nan = y[keep], x[keep], int((~keep).sum())
    left, right, top, bottom = 40, 10, 26, 34
    pw, ph = width - left - right, height - top - bottom
    lo, hi = (float(x.min()), float(x.max())) if x.size else (1.0, 5.0)
    lo, hi = (lo - 0.5, hi + 0.5) if hi <= lo else (lo - 0.04 * (hi - lo), hi + 0.04 * (hi - lo))
    jitter = np.sin(np.arange(x.size) * 12.9898) * 43758.5453 % 1.0 - 0.5 if x.size else np.zeros(0)
    jx = jitter * (hi - lo) * 0.03 if np.unique(x).size <= 12 else 0.0
    jy = np.roll(jitter, 7) * 0.3 if np.unique(y).size <= 12 else 0.0
    px = left + (x + jx - lo) / (hi - lo) * pw
    py = top + ph - (np.clip(y + jy, 0.6, 5.4) - 0.6) / 4.8 * ph
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{esc(title)}"><text x="{left}" y="16" font-size="12" font-weight="600">{esc(title)}</text>',
             f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#c5cad3"/>']
    for s in range(1, 6):
        yy = top + ph - (s - 0.6) / 4.8 * ph
        parts.append(f'<line x1="{left}" x2="{left + pw}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#eef0f4"/>'
                     f'<text x="{left - 6}" y="{yy + 4:.1f}" font-size="10" text-anchor="end">{s}</text>')
    for t in ticks(lo, hi):
        xx = left + (t - lo) / (hi - lo) * pw
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{top + ph}" y2="{top + ph + 3}" stroke="#8a93a3"/>'
                     f'<text x="{xx:.1f}" y="{top + ph + 13}" font-size="10" text-anchor="middle">{t:.4g}</text>')
    parts.append(f'<text x="{left + pw / 2}" y="{height - 4}" font-size="10" text-anchor="middle">ground truth'
                 f'{f" ({n_nan} unparsed left out)" if n_nan else ""}</text><text x="11" y="{top + ph / 2}" '
                 f'font-size="10" text-anchor="middle" transform="rotate(-90 11 {top + ph / 2})">predicted</text>')
    parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.6" fill="#2f6fd6" fill-opacity="0.45"/>' for a, b in zip(px, py)]
    return "".join(parts) + "</svg>"


def _table(summary_entry: dict) -> str:
    within = summary_entry.get("within_family", {})
    head = "<tr><th>attribute</th><th>SRCC</th><th>KRCC</th><th>PLCC</th><th>PLCC raw</th><th>n</th><th>unparsed</th>" + \
           ("<th>SRCC within family</th>" if within else "") + "</tr>"
    body = [f"<tr><td>{a}</td>" + "".join(f"<td>{num(m[k])}</td>" for k in ("srcc", "krcc", "plcc", "plcc_raw")) +
            f"<td>{m['n']}</td><td>{m['n_nan']}</td>" + (f"<td>{num(within[a]) if a in within else '-'}</td>" if within else "")
            + "</tr>"
            for a, m in summary_entry["metrics"].items()]
    return f"<div class=scroll><table>{head}{''.join(body)}</table></div>"


def _overview(summary: dict) -> str:
    columns = [a for a in ("overall", *LABELLED) if a in summary.get("average", {})]
    head = "<tr><th>dataset</th><th>images</th><th>unparsed</th>" + "".join(f"<th>{a} SRCC</th>" for a in columns) + "</tr>"
    body = []
    for name, d in summary["datasets"].items():
        cells = "".join(f"<td>{num(d['metrics'][a]['srcc']) if a in d['metrics'] else '-'}</td>" for a in columns)
        body.append(f'<tr><td><a href="#{_anchor(name)}">{esc(name)}</a></td><td>{d["n"]}</td>'
                    f'<td>{d["parse_failures"]}</td>{cells}</tr>')
    return f"<div class=scroll><table>{head}{''.join(body)}</table></div>"


def _anchor(name: str) -> str:
    return "ds-" + "".join(c if c.isalnum() else "-" for c in name)


def order(rows) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """Worst-ranked first: (row indices in that order, rank error in [0, 1], predicted rank, MOS
    rank; rank 1 = best, NaN where unparsed or unlabelled). Unparsed rows come first; with no MOS
    at all, the lowest predicted overall first."""
    pred = np.array([r["overall"] for r in rows], dtype=float)
    mos = np.array([r["mos"] for r in rows], dtype=float)
    ok = np.isfinite(pred) & np.isfinite(mos)
    err, rank_p, rank_m = (np.full(len(rows), np.nan) for _ in range(3))
    if ok.sum() >= 2:
        rank_p[ok], rank_m[ok] = _ranks(-pred[ok]), _ranks(-mos[ok])
        err[ok] = np.abs(rank_p[ok] - rank_m[ok]) / (ok.sum() - 1)
    key = [(0, 0.0) if not math.isfinite(p) else (1, -e) if math.isfinite(e) else (2, p) for p, e in zip(pred, err)]
    return sorted(range(len(rows)), key=lambda i: (key[i], i)), err, rank_p, rank_m


def card(i: int, row: dict, rec, scales: dict, err: float, rank_p: float, rank_m: float, n_ranked: int, image) -> str:
    try:
        src, small = thumbnail(image)
        img = f'<img src="{src}" alt="{esc(os.path.basename(row["image"]))}"{" class=small" if small else ""}>'
    except (OSError, ValueError) as error:
        img = f'<div class="why">image not readable: {esc(error)}</div>'
    bars = []
    for a in ATTRIBUTES:
        s, g = row[a], _truth(row, a)
        fill = "" if not math.isfinite(s) else f'<span class="fill" style="width:{s / 5 * 100:.1f}%;background:{_color(s)}"></span>'
        lo, hi = scales[a]
        tick = "" if not math.isfinite(g) else \
            f'<span class="gt" style="left:{(1 + 4 * (g - lo) / (hi - lo)) / 5 * 100:.1f}%" title="ground truth {g:g}"></span>'
        value = "-" if not math.isfinite(s) else f"{s:g}"
        bars.append(f'<span>{a}</span><span class="track" data-attr="{a}" data-score="{s!r}" data-gt="{g!r}">{fill}{tick}</span>'
                    f'<span class="val">{value}{"" if not math.isfinite(g) else f" / {g:.3g}"}</span>')
    parsed = math.isfinite(row["overall"])
    if not parsed:
        rank = "no parsable overall score"
    elif math.isfinite(err):
        rank = f"rank {rank_p:g} of {n_ranked} predicted, {rank_m:g} by MOS (1 = best) · <b>off by {err:.0%}</b>"
    else:
        rank = "no MOS"
    why = reasoning_text(row.get("completion", "")) or "(no reasoning given)"
    where = "" if rec is None else " · clean" if rec.clean else \
        f" · {rec.family} level {rec.level}" if rec.family and rec.level else f" · {rec.family}" if rec.family else ""
    return (f'<figure class="card{"" if parsed else " unparsed"}" data-index="{i}" data-image="{esc(row["image"])}" '
            f'data-err="{err if math.isfinite(err) else (2 if not parsed else -1)}" data-overall="{row["overall"]!r}" '
            f'data-mos="{row["mos"]!r}">{img}<div class="name">{esc(os.path.basename(row["image"]))}{esc(where)}</div>'
            f'<div class="rank">{rank}</div><div class="bars">{"".join(bars)}</div>'
            f'<p class="why">{esc(why)}</p><details><summary>raw answer</summary><pre>{esc(row.get("completion", ""))}'
            f"</pre></details></figure>")


def dataset_section(name: str, rows: list[dict], recs: list, entry: dict, images=None, max_images: int | None = None) -> str:
    scales = {a: gt_scale([_truth(r, a) for r in rows]) for a in ATTRIBUTES}
    charts = [scatter_svg([r[a] for r in rows], [_truth(r, a) for r in rows],
                          f"{a}: SRCC {num(entry['metrics'][a]['srcc'])}") for a in ATTRIBUTES if a in entry["metrics"]]
    idx, err, rank_p, rank_m = order(rows)
    shown = idx if max_images is None else idx[:max_images]
    n_ranked = int(np.isfinite(err).sum())
    cards = [card(i, rows[i], recs[i], scales, err[i], rank_p[i], rank_m[i], n_ranked,
                  images[rows[i]["image"]] if images is not None else rows[i]["image"]) for i in shown]
    ranges = ", ".join(f"{a} {lo:.3g}-{hi:.3g}" for a, (lo, hi) in scales.items() if (lo, hi) != (1.0, 5.0))
    grid_id = _anchor(name) + "-grid"
    return (f'<section id="{_anchor(name)}"><h2>{esc(name)}</h2><p class="sub">{entry["n"]} images, '
            f'{entry["parse_failures"]} without a parsable overall score, strict layout {entry["strict_rate"]:.0%}</p>'
            f'{_table(entry)}<div class="charts">{"".join(charts)}</div>'
            f'<div class="tools">Images{"" if len(shown) == len(rows) else f" (the {len(shown)} worst-ranked of {len(rows)})"}, '
            f'<label>order: <select data-grid="{grid_id}" onchange="sortGrid(this)"><option value="err">worst-ranked first'
            f'</option><option value="overall">lowest predicted overall first</option><option value="mos">lowest MOS first'
            f'</option><option value="index">file order</option></select></label></div>'
            f'<p class="legend">bar: predicted score (1-5); <span class="gt"></span> ground truth'
            f'{f" (rescaled to 1-5 from the range {ranges})" if ranges else ""}; numbers: predicted / ground truth</p>'
            f'<div class="grid" id="{grid_id}">{"".join(cards)}</div></section>')


def html_report(rows, records, summary, title: str, subtitle: str = "", note: str = "", images=None,
                max_images: int | None = None, appendix: str = "", preface: str = "") -> str:
    """The page as a string. rows: evaluate.py's result rows; records: theirs (a card names the
    family and level of its row's record, matched by dataset and image); summary:
    evaluate.summarize's, whose metrics the tables and chart titles show; images: optional
    {row image: array or PIL image} for images held in memory (the demo's); preface: HTML placed
    before the overview table; appendix: HTML placed after the datasets."""
    by_key = {(r.dataset, r.image): r for r in records}
    recs = [by_key.get((row["dataset"], row["image"])) for row in rows]
    sections = []
    for name in summary["datasets"]:
        pick = [i for i, r in enumerate(rows) if r["dataset"] == name]
        sections.append(dataset_section(name, [rows[i] for i in pick], [recs[i] for i in pick],
                                        summary["datasets"][name], images, max_images))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><meta name="viewport" '
            f'content="width=device-width,initial-scale=1"><title>{esc(title)}</title><style>{CSS}</style></head>'
            f'<body><main><h1>{esc(title)}</h1><p class="sub">{esc(subtitle)}</p>'
            f'{f"<p class=note>{esc(note)}</p>" if note else ""}{preface}{_overview(summary)}{"".join(sections)}{appendix}'
            f"</main><script>{SORT_JS}</script></body></html>\n")


def write_report(path, rows, records, summary, title: str, **kwargs) -> str:
    """html_report written to path (UTF-8); returns path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(html_report(rows, records, summary, title, **kwargs))
    return str(path)
