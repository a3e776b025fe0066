"""MG-IQA evaluation: benchmark runs, their summaries, the HTML report, paired model comparison.

In this order: the metrics (SRCC, KRCC tau-b, PLCC raw and after the 4-parameter logistic,
bootstrap intervals, the within-family attribute SRCC), result rows and runs, summaries, paired
comparison, the command line. report.py draws what these compute.

    python evaluate.py --model runs/demo/final --data manifest=runs/synth --split test \
        --out runs/ev --report
    python evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct --data koniq=/data/koniq10k --out runs/ev
    python evaluate.py --model M --data pyiqa=/data/csiq,meta_info_CSIQDataset.csv --out runs/csiq
    python evaluate.py --model tiny --data manifest=runs/synth --limit 20 --out runs/ev  # offline
    python evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct --suite --data-root /data --out runs/s
    python evaluate.py --compare runs/a/koniq.jsonl runs/b/koniq.jsonl  # files or folders of jsonl
    python evaluate.py --model runs/m/merged --data kadid=/data/kadid10k,frozen=frozen/kadid.csv ...

A run writes, in --out: run.json (model, adapter, mode, pixel cap: a rerun with other settings is
refused), <name>.jsonl per --data entry (one JSON line per image: dataset, image, mos, labels, the
five scores (null when unparsed), parsed, strict, thinking, completion; appended and fsync'd after
every batch, so rerunning the same command resumes: images already there are skipped),
summary.json, results.md (rows: datasets and their average; SRCC and PLCC of overall and of each
attribute the dataset labels), with --report report.html (report.py: metrics, scatter plots and
every image with its scores and reasoning, worst-ranked first, in one self-contained file) and,
when matplotlib is installed, scatter_<dataset>.png. Every .json and .jsonl is strict JSON (NaN
written as null).

--suite reads the eight benchmarks of docs/METHOD.md from these folders under --data-root (see
data.py for the files each must hold): koniq10k (official test split, needs
koniq10k_distributions_sets.csv), spaq (all), livec (all, t1-t7 dropped), bid (all), kadid10k
(reference-disjoint test split of data.split_records, seed --seed), csiq (all), tid2013 (all),
agiqa3k (all).

No test image trained on (docs/METHOD.md, "The protocol"): the model (and adapter) folder's
training_data.csv, written by grpo.py, lists what it trained on by SHA-256. A dataset it trained on
is scored on the run's own held-out test split from that list ("in-domain test split"), whatever
the suite or --split would select; any other image whose bytes match a trained one is left out and
counted ("cross-dataset" datasets). results.md shows the two groups apart. --allow-trained scores
trained images, marked; a model without the list is scored as given ("training images unknown").
--data NAME=ROOT,frozen=FILE (a data.py freeze list), or a manifest with a sha256 column, scores
only files whose bytes match, and names every missing or changed one instead of scoring.

Departures (PLCC after the fit, NaN predictions, the average row, compare): docs/METHOD.md, section
7, departure 10.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys

import numpy as np

import data
import mgiqa
import report
from mgiqa import ATTRIBUTES, FAMILY_TO_ATTRIBUTE, LABELLED


# ----------------------------------------------------------------------------- metrics
# Per dataset and per attribute: SRCC, KRCC (tau-b), PLCC raw and PLCC after the 4-parameter
# logistic yhat = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2 (start b1 = max(y), b2 = min(y),
# b3 = mean(x), b4 = std(x) / 4, as pyiqa and DeQA-Score; docs/METHOD.md, section 5). Ties are
# handled as scipy.stats does; the fit is Levenberg-Marquardt (tests check it is as good as scipy's
# curve_fit). A NaN prediction (an unparsed answer) is left out of a metric and counted, never
# replaced. Within-family attribute SRCC: with one distortion family per image, an attribute's SRCC
# over all images mostly measures which family an image has, so it is also reported over that
# family's images plus the clean ones (attribute_srcc_within_family).

def finite_pairs(pred, gt) -> tuple[np.ndarray, np.ndarray, int]:
    """The (pred, gt) pairs where both are finite, and how many were dropped."""
    pred, gt = np.asarray(pred, dtype=float).ravel(), np.asarray(gt, dtype=float).ravel()
    if pred.shape != gt.shape:
        raise ValueError(f"pred has {pred.size} values but gt has {gt.size}")
    keep = np.isfinite(pred) & np.isfinite(gt)
    return pred[keep], gt[keep], int((~keep).sum())


def rankdata(x) -> np.ndarray:
    """1-based ranks, ties get their average rank (scipy.stats.rankdata, method 'average')."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="mergesort")
    new = np.r_[True, x[order][1:] != x[order][:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size)
    ranks[order] = ((starts + ends + 1) / 2.0)[np.cumsum(new) - 1]
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if x.size < 2:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    den = math.sqrt(float(x @ x) * float(y @ y))
    return float(np.clip((x @ y) / den, -1.0, 1.0)) if den > 0 else math.nan


def srcc(pred, gt) -> float:
    x, y, _ = finite_pairs(pred, gt)
    return _pearson(rankdata(x), rankdata(y)) if x.size >= 2 else math.nan


def krcc(pred, gt) -> float:
    """Kendall tau-b = (C - D) / sqrt((n0 - n1)(n0 - n2)): summed sign products over all pairs,
    in row chunks so 11k images need ~16 MB."""
    x, y, _ = finite_pairs(pred, gt)
    n = x.size
    if n < 2:
        return math.nan
    concordance, chunk = 0.0, max(1, 1_000_000 // n)
    for i in range(0, n, chunk):
        signs = np.sign(x[i:i + chunk, None] - x) * np.sign(y[i:i + chunk, None] - y)
        concordance += float(signs.sum())
    untied = []
    for v in (x, y):
        counts = np.unique(v, return_counts=True)[1]
        untied.append(n * (n - 1) - float((counts * (counts - 1)).sum()))
    return float(concordance / math.sqrt(untied[0] * untied[1])) if min(untied) > 0 else math.nan


def logistic4(x, b) -> np.ndarray:
    """The logistic above; the sigmoid written with tanh so no exp() overflows."""
    b1, b2, b3, b4 = b
    return (b1 - b2) * 0.5 * (1.0 + np.tanh((np.asarray(x) - b3) / max(abs(b4), 1e-300) / 2.0)) + b2


def fit_logistic4(x, y, max_iter: int = 1000) -> np.ndarray:
    """Least-squares b for logistic4 from the start above: Levenberg-Marquardt with MINPACK's
    scaling (the largest diag(J^T J) seen so far, as scipy's curve_fit) and Nielsen's damping
    update."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    b = np.array([y.max(), y.min(), x.mean(), x.std() / 4.0])
    r = y - logistic4(x, b)
    sse, lam, nu, scale = float(r @ r), 1e-3, 2.0, np.zeros(4)
    for _ in range(max_iter):
        a = max(abs(b[3]), 1e-300)
        z = (x - b[2]) / a
        s = 0.5 * (1.0 + np.tanh(z / 2.0))
        ds = (b[0] - b[1]) * s * (1.0 - s)
        sign = 1.0 if b[3] >= 0 else -1.0
        jac = np.stack([s, 1.0 - s, -ds / a, -ds * z / a * sign], axis=1)  # (N, 4)
        jtj, jtr = jac.T @ jac, jac.T @ r
        scale = np.maximum(scale, np.diag(jtj))
        damping = scale + 1e-12 * (1.0 + scale.max())
        while lam < 1e16:
            step = np.linalg.solve(jtj + lam * np.diag(damping), jtr)  # damping > 0: pos. definite
            r_new = y - logistic4(x, b + step)
            sse_new = float(r_new @ r_new)
            if sse_new < sse:
                break
            lam, nu = lam * nu, nu * 2.0
        else:
            return b  # no step lowers the error: a minimum
        predicted = float(step @ (lam * damping * step + jtr))  # decrease the linear model promised
        rho = (sse - sse_new) / predicted if predicted > 0 else 1.0
        lam, nu = lam * max(1.0 / 3.0, 1.0 - (2.0 * rho - 1.0) ** 3), 2.0
        b, r, old, sse = b + step, r_new, sse, sse_new
        if old - sse <= 1e-15 * old:
            break
    return b


def plcc(pred, gt, fit: str | None = None) -> float:
    """Pearson of gt with pred (fit=None) or with logistic4(pred) fitted to gt (fit="logistic4")."""
    x, y, _ = finite_pairs(pred, gt)
    if fit is None:
        return _pearson(x, y)
    if fit != "logistic4":
        raise ValueError(f"fit must be None or 'logistic4', got {fit!r}")
    if x.size < 4 or x.std() == 0:  # 4 parameters; a constant prediction has no correlation
        return math.nan
    return _pearson(logistic4(x, fit_logistic4(x, y)), y)


def metrics(pred, gt) -> dict:
    _, y, n_nan = finite_pairs(pred, gt)
    return {"srcc": srcc(pred, gt), "krcc": krcc(pred, gt), "plcc": plcc(pred, gt, fit="logistic4"),
            "plcc_raw": plcc(pred, gt), "n": int(y.size), "n_nan": n_nan}


def plcc_logistic(pred, gt) -> float:
    """PLCC after the 4-parameter logistic fit: the PLCC of tables."""
    return plcc(pred, gt, fit="logistic4")


METRICS = {"srcc": srcc, "krcc": krcc, "plcc": plcc_logistic, "plcc_raw": plcc}


def bootstrap_ci(pred, gt, metric=srcc, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(point estimate, low, high): percentile interval over n resamples of the finite pairs."""
    metric = METRICS[metric] if isinstance(metric, str) else metric
    x, y, _ = finite_pairs(pred, gt)
    rng = np.random.default_rng(seed)
    resamples = (rng.integers(0, x.size, x.size) for _ in range(n))
    values = np.array([metric(x[idx], y[idx]) for idx in resamples])
    if not np.isfinite(values).any():
        return metric(x, y), math.nan, math.nan
    low, high = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return metric(x, y), float(low), float(high)


def label(row_or_record, attribute: str) -> float:
    """The ground truth of one attribute (overall: the MOS) of a result row or a Record; NaN if
    absent."""
    if isinstance(row_or_record, dict):
        mos, labels = row_or_record["mos"], row_or_record["labels"]
    else:
        mos, labels = row_or_record.mos, row_or_record.attributes
    value = mos if attribute == "overall" else labels.get(attribute)
    return math.nan if value is None else float(value)


def match(rows, records) -> list:
    """The record of each result row, by (dataset, image)."""
    by_key = {(r.dataset, r.image): r for r in records}
    try:
        return [by_key[(row["dataset"], row["image"])] for row in rows]
    except KeyError as err:
        raise ValueError(f"result row for {err.args[0]} has no record") from None


def attribute_srcc_within_family(rows, records) -> dict[str, float]:
    """Per attribute: SRCC over the images of the family that degrades it plus clean images (no
    family, level 0), against the attribute label; NaN with fewer than 3 usable images."""
    recs, out = match(rows, records), {}
    for a in LABELLED:
        pairs = [(row[a], label(rec, a)) for row, rec in zip(rows, recs)
                 if FAMILY_TO_ATTRIBUTE.get(rec.family) == a or rec.clean]
        x, y, _ = finite_pairs([p for p, _ in pairs], [g for _, g in pairs])
        out[a] = srcc(x, y) if x.size >= 3 else math.nan
    return out


# (dataset reader, folder under --data-root, split: "official" test, "reference-disjoint" test, or
# None: all); a dataset the scored model trained on takes its run's test split instead (held_out)
SUITE = (
    ("koniq", "koniq10k", "official"), ("spaq", "spaq", None), ("livec", "livec", None),
    ("bid", "bid", None), ("kadid", "kadid10k", "reference-disjoint"), ("csiq", "csiq", None),
    ("tid2013", "tid2013", None), ("agiqa3k", "agiqa3k", None))

# ----------------------------------------------------------------------------- result rows


def read_rows(path: str) -> list[dict]:
    """Rows of one .jsonl file, or of every *.jsonl in a folder. A last line without its newline (a
    write cut short) is skipped; any other bad line raises, naming file and line."""
    if os.path.isdir(path):
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".jsonl")]
        return [row for f in files for row in read_rows(f)]
    with open(path, encoding="utf-8") as f:
        lines, rows = f.read().split("\n"), []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1] is "" or an unfinished write
        try:
            row = json.loads(line)
            for key in ("mos", *ATTRIBUTES):
                row[key] = math.nan if row[key] is None else float(row[key])
            row["labels"] = {k: math.nan if v is None else float(v)
                             for k, v in row["labels"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: line {number}: not a result row ({err})") from None
        rows.append(row)
    return rows


def result_row(rec, res: dict, thinking: bool) -> dict:
    """One image's row: the record's labels beside an mgiqa.score result (the scores, strict,
    completion)."""
    return {"dataset": rec.dataset, "image": rec.image, "mos": float(rec.mos),
            "labels": {a: float(rec.attributes[a]) for a in LABELLED if a in rec.attributes},
            **{a: float(res[a]) for a in ATTRIBUTES}, "parsed": not math.isnan(res["overall"]),
            "strict": bool(res["strict"]), "thinking": thinking, "completion": res["completion"]}


def evaluate_records(model, processor, records, out_jsonl: str | None = None,
                     thinking: bool = True, batch_size: int = 8, max_new_tokens: int | None = None,
                     progress: bool = False) -> list[dict]:
    """Score records with mgiqa.score; one row per record, in records order. With out_jsonl, rows
    already in that file are reused and new ones are appended and fsync'd after every batch."""
    keys = [(r.dataset, r.image) for r in records]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"records list image {dup[1]} of dataset {dup[0]} more than once")
    done = {}
    if out_jsonl and os.path.exists(out_jsonl):
        with open(out_jsonl, "rb+") as f:  # drop an unfinished last line left by an interrupted run
            content = f.read()
            f.truncate(content.rfind(b"\n") + 1)
        for row in read_rows(out_jsonl):
            if row["thinking"] != thinking:
                raise ValueError(f"{out_jsonl}: has rows scored with thinking={row['thinking']}; "
                                 f"this run uses thinking={thinking}. Use another --out.")
            done[(row["dataset"], row["image"])] = row
    todo = [r for r, k in zip(records, keys) if k not in done]
    missing = [r.image for r in todo if not os.path.isfile(r.image)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing, first: {', '.join(missing[:3])}")
    from tqdm import tqdm
    out = open(out_jsonl, "a", encoding="utf-8") if out_jsonl else contextlib.nullcontext()
    desc = f"evaluating {records[0].dataset if records else ''}"
    with out, tqdm(total=len(todo), desc=desc, unit="img", disable=not progress or not todo) as bar:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            results = mgiqa.score(model, processor, [r.image for r in chunk], thinking=thinking,
                                  batch_size=len(chunk), max_new_tokens=max_new_tokens)
            for rec, res in zip(chunk, results):
                row = result_row(rec, res, thinking)
                done[(rec.dataset, rec.image)] = row
                if out_jsonl:
                    out.write(report.dumps(row) + "\n")
            if out_jsonl:  # every finished batch on disk: a rerun resumes after it
                out.flush()
                os.fsync(out.fileno())
            bar.update(len(chunk))
    return [done[k] for k in keys]


# ----------------------------------------------------------------------------- summaries

def summarize(rows, records) -> dict:
    """Per dataset (in order of first appearance): counts, parse failures, metrics of overall (MOS)
    and of each attribute some record labels; `average` over datasets of srcc and plcc."""
    recs, groups = match(rows, records), {}
    for row, rec in zip(rows, recs):
        group_rows, group_recs = groups.setdefault(row["dataset"], ([], []))
        group_rows.append(row)
        group_recs.append(rec)
    datasets = {}
    for name, (group, group_recs) in groups.items():
        entry = {"n": len(group),
                 "parse_failures": sum(not math.isfinite(r["overall"]) for r in group),
                 "unparsed": {a: sum(not math.isfinite(r[a]) for r in group) for a in ATTRIBUTES},
                 "strict_rate": sum(r["strict"] for r in group) / len(group), "metrics": {}}
        for a in ATTRIBUTES:
            gt = [label(rec, a) for rec in group_recs]
            if a == "overall" or any(math.isfinite(g) for g in gt):
                entry["metrics"][a] = metrics([r[a] for r in group], gt)
        if any(rec.family for rec in group_recs):
            entry["within_family"] = attribute_srcc_within_family(group, group_recs)
        datasets[name] = entry
    return {"datasets": datasets, "average": average_of(datasets)}


def average_of(datasets: dict) -> dict:
    """Per attribute: srcc, krcc, plcc, plcc_raw, the plain mean over the datasets labelling it."""
    average = {}
    for a in ATTRIBUTES:
        having = [d["metrics"][a] for d in datasets.values() if a in d["metrics"]]
        if having:
            average[a] = {m: float(np.mean([h[m] for h in having]))
                          for m in ("srcc", "krcc", "plcc", "plcc_raw")}
            average[a]["datasets"] = len(having)
    return average


def _cell(value) -> str:
    return "-" if value is None else ("nan" if math.isnan(value) else f"{value:.3f}")


def markdown_table(summary: dict) -> str:
    """The results table; when the model's training images are known, two tables, each with its
    average: the in-domain test splits (datasets it trained on) and the cross-dataset ones."""
    headings = {IN_DOMAIN: "datasets the model trained on: the run's own held-out test images",
                CROSS: "datasets the model never trained on"}
    blocks = []
    for role, heading in headings.items():
        datasets = {n: d for n, d in summary["datasets"].items() if d.get("role") == role}
        if datasets:
            table = results_table({"datasets": datasets, "average": average_of(datasets)})
            blocks.append(f"{role} ({heading})\n\n{table}")
    return "\n".join(blocks) if blocks else results_table(summary)


def results_table(summary: dict) -> str:
    columns = [a for a in ("overall", *LABELLED) if a in summary["average"]]
    head = ["dataset", "n", "unparsed"] + [f"{a} {m}" for a in columns for m in ("SRCC", "PLCC")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in summary["datasets"].items():
        cells = [_cell(d["metrics"][a][m]) if a in d["metrics"] else "-"
                 for a in columns for m in ("srcc", "plcc")]
        lines.append(f"| {name} | {d['n']} | {d['parse_failures']} | " + " | ".join(cells) + " |")
    cells = [_cell(summary["average"][a][m]) for a in columns for m in ("srcc", "plcc")]
    lines.append("| average | | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scatter_plots(rows, out_dir: str) -> str:
    """One PNG per dataset: predicted overall against MOS. Returns a one-line note."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return ("note: matplotlib is not installed, so no scatter plots were drawn "
                "(pip install matplotlib)")
    names = list(dict.fromkeys(row["dataset"] for row in rows))
    for name in names:
        group = [row for row in rows if row["dataset"] == name]
        fig = Figure(figsize=(4, 4))
        ax = fig.subplots()
        ax.scatter([r["mos"] for r in group], [r["overall"] for r in group], s=4)
        rho = srcc([r["overall"] for r in group], [r["mos"] for r in group])
        ax.set(xlabel="MOS", ylabel="predicted overall", title=f"{name}: SRCC {rho:.3f}")
        fig.savefig(os.path.join(out_dir, f"scatter_{name}.png"), dpi=100)
    return f"wrote {len(names)} scatter plots to {out_dir}"


def compare(a_rows, b_rows, attribute: str = "overall", n: int = 1000, seed: int = 0) -> dict:
    """Paired bootstrap of SRCC(A) - SRCC(B) per dataset over the images both scored: the
    difference, its 95% interval and the share of resamples in which A beats B; plus the average
    over datasets."""
    b_by_key = {(r["dataset"], r["image"]): r for r in b_rows}
    groups = {}
    for ra in a_rows:
        rb = b_by_key.get((ra["dataset"], ra["image"]))
        if rb is not None:
            la, lb = label(ra, attribute), label(rb, attribute)
            if la != lb and not (math.isnan(la) and math.isnan(lb)):
                raise ValueError(f"{ra['image']} ({ra['dataset']}): the two files disagree on its "
                                 f"{attribute} label")
            groups.setdefault(ra["dataset"], []).append((ra[attribute], rb[attribute], la))
    if not groups:
        raise ValueError("the two result files share no (dataset, image)")
    rng, out, boots = np.random.default_rng(seed), {}, []
    for name, triples in groups.items():
        pa, pb, gt = (np.array(v, dtype=float) for v in zip(*triples))
        unparsed = [int(np.isnan(pa).sum()), int(np.isnan(pb).sum())]
        keep = np.isfinite(pa) & np.isfinite(pb) & np.isfinite(gt)
        pa, pb, gt = pa[keep], pb[keep], gt[keep]
        boots.append(np.array([srcc(pa[i], gt[i]) - srcc(pb[i], gt[i])
                               for i in (rng.integers(0, gt.size, gt.size) for _ in range(n))]))
        out[name] = _paired(srcc(pa, gt), srcc(pb, gt), boots[-1], gt.size, unparsed)
    parts = list(out.values())
    mean = {k: float(np.mean([d[k] for d in parts])) for k in ("srcc_a", "srcc_b")}
    out["average"] = _paired(mean["srcc_a"], mean["srcc_b"], np.mean(boots, axis=0),
                             sum(d["n"] for d in parts),
                             np.sum([d["unparsed"] for d in parts], axis=0).tolist())
    return out


def _paired(srcc_a: float, srcc_b: float, boot: np.ndarray, n: int, unparsed: list[int]) -> dict:
    finite = boot[np.isfinite(boot)]
    low, high = np.percentile(finite, [2.5, 97.5]) if finite.size else (math.nan, math.nan)
    a_better = float((finite > 0).mean()) if finite.size else math.nan
    return {"n": int(n), "unparsed": unparsed, "srcc_a": srcc_a, "srcc_b": srcc_b,
            "diff": srcc_a - srcc_b, "low": float(low), "high": float(high), "a_better": a_better}


def compare_table(result: dict) -> str:
    lines = ["| dataset | n | unparsed A/B | SRCC A | SRCC B | A - B | 95% interval | A better |",
             "|---" * 8 + "|"]
    for name, d in result.items():
        lines.append(f"| {name} | {d['n']} | {d['unparsed'][0]}/{d['unparsed'][1]} | "
                     f"{_cell(d['srcc_a'])} | {_cell(d['srcc_b'])} | {_cell(d['diff'])} | "
                     f"[{_cell(d['low'])}, {_cell(d['high'])}] | {d['a_better']:.1%} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line

def select_split(records, split: str | None, seed: int = 0, official: bool = False) -> list:
    """Records of one split: the dataset's own split when it has one, else (official=False) the
    seeded split of data.split_records (reference-disjoint for a synthetic dataset with
    references)."""
    if split in (None, "all"):
        return list(records)
    if not any(r.split == split for r in records):
        if official:
            raise ValueError(f"{records[0].dataset}: no official '{split}' split in its "
                             "annotation files")
        records = data.split_records(records, seed=seed)
    return [r for r in records if r.split == split]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Evaluate an MG-IQA model on IQA benchmarks, or compare runs.")
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="checkpoint folder or hub id; one of mgiqa.TINY_MODELS ('tiny', "
                                   "...) for an untrained offline model")
    g.add_argument("--adapter", default=None, help="LoRA adapter folder written by grpo.py")
    g.add_argument("--device", default="auto",
                   help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--fast", action="store_true",
                   help="answer only, no reasoning (non-thinking prompt)")
    g.add_argument("--batch-size", type=int, default=8,
                   help="images per generate call; rows are flushed per batch")
    g.add_argument("--max-new-tokens", type=int, default=None,
                   help="default: mgiqa.score's (mgiqa.MAX_NEW_TOKENS)")
    g.add_argument("--max-pixels", type=int, default=0,
                   help="pixel cap for the processor (0: 1,280 image tokens in the family's units, "
                        "1,003,520 px for Qwen2.5-VL, 1,310,720 for Qwen3-VL); a checkpoint saved "
                        "with a smaller cap keeps its own")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=[], metavar="NAME=ROOT[,FILE][,KEY=VALUE]",
                   help=f"datasets: {', '.join(data.READERS)}; e.g. "
                        "pyiqa=/data/csiq,meta_info_CSIQDataset.csv or "
                        "pyiqa=/data/x,meta.csv,direction=lower (data.py lists the options); "
                        "frozen=FILE: only the images of a data.py freeze list, hashes checked")
    g.add_argument("--suite", action="store_true",
                   help="the eight benchmarks of docs/METHOD.md under --data-root")
    g.add_argument("--data-root", default=None, help="folder holding the suite's dataset folders")
    g.add_argument("--split", default=None,
                   help="train / val / test of each --data (the suite fixes its own; a dataset the "
                        "model trained on: its run's test split)")
    g.add_argument("--seed", type=int, default=0,
                   help="seed of data.split_records where a dataset has no split")
    g.add_argument("--limit", type=int, default=None,
                   help="only the first N images of each dataset")
    g.add_argument("--allow-trained", action="store_true",
                   help="score images the model trained on too (by SHA-256, from the "
                        "training_data.csv its folder carries), each dataset as --split / the "
                        "suite selects it; marked in the summary and the report")
    g = parser.add_argument_group("output and comparison")
    g.add_argument("--out", default=None,
                   help="output folder (required for a run; resumes when it holds results)")
    g.add_argument("--report", action="store_true",
                   help="also write report.html: metrics, scatter plots and every image with its "
                        "scores, worst-ranked first")
    g.add_argument("--report-images", type=int, default=300, metavar="N",
                   help="with --report: at most N images per dataset in the grid, the worst-ranked "
                        "first (default 300, about 3 MB of thumbnails per dataset; 0: all)")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"),
                   help="two result files (or folders of *.jsonl) to compare")
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for --compare")
    return parser, parser.parse_args(argv)


def load_sets(parser, args) -> list[tuple[str, list, list]]:
    """(file stem, every record of the dataset, the records its split selects) for each --data entry
    and each suite benchmark. A frozen=FILE option selects the images of that frozen list."""
    sets = []
    for spec in args.data:
        try:
            name, root, opts = data.parse_spec(spec)
        except ValueError as err:
            parser.error(f"--data: {err}")
        if name not in data.READERS:
            parser.error(f"--data {spec!r}: NAME must be one of {', '.join(data.READERS)}")
        frozen = opts.pop("frozen", None)
        records = data.load_dataset(name, root, **opts)
        if frozen:
            selected, missing = data.frozen_records(records, root, frozen)
            if missing:
                sys.exit(f"error: {frozen}: {len(missing)} listed images are missing under {root}: "
                         + ", ".join(missing) + "; nothing was scored")
            records = selected
        elif any("sha256" in r.extra for r in records):  # a manifest with hashes: all files needed
            try:
                data.load_dataset(name, root, strict=True, **opts)
            except FileNotFoundError as err:
                sys.exit(f"error: {err}; nothing was scored")
            selected = records
        else:
            selected = select_split(records, args.split, args.seed)
        stem = records[0].dataset if name == "pyiqa" and records else name
        sets.append((stem, records, selected))
    if args.suite:
        for name, folder, how in SUITE:
            records = data.load_dataset(name, os.path.join(args.data_root, folder))
            split = None if how is None else "test"
            selected = select_split(records, split, args.seed, official=how == "official")
            sets.append((name, records, selected))
    for stem, _, records in sets:
        if not records or [s for s, _, _ in sets].count(stem) > 1:
            parser.error(f"{stem}: named twice, or no images to evaluate (split {args.split!r})")
    return sets


# ----------------------------------------------------------------------------- no trained image
# A model folder grpo.py writes carries data.TRAINING_DATA: every image of each dataset it trained
# on, with its split (train: trained on; val / test: held out) and the SHA-256 of its bytes. For a
# dataset the model trained on (half or more of its images are in that list, by bytes), evaluation
# scores the run's own test split from the list; any other image whose bytes match a trained one,
# under any name or dataset, is left out and counted (--allow-trained scores it, marked). Expected
# hashes (a frozen list, a manifest's sha256 column) are checked before anything is scored.

IN_DOMAIN, CROSS, UNKNOWN = "in-domain test split", "cross-dataset", "training images unknown"


def training_lists(model: str, adapter: str | None) -> tuple[list[dict] | None, list[str]]:
    """(rows of every data.TRAINING_DATA in the adapter and model folders, the files read); rows
    None when neither carries one (a hub checkpoint, a model trained elsewhere)."""
    folders = [f for f in (adapter, model) if f and os.path.isdir(f)]
    files = [os.path.join(f, data.TRAINING_DATA) for f in folders]
    files = [f for f in files if os.path.isfile(f)]
    if not files:
        return None, []
    return [row for f in files for row in data.load_image_list(f)], files


def check_hashes(stem: str, records, hash_of: dict) -> list[str]:
    """One line per record whose file's SHA-256 differs from the one it carries, extra["sha256"]."""
    return [f"{stem}: {r.image}: changed (SHA-256 {hash_of[r.image][:12]}..., "
            f"expected {r.extra['sha256'][:12]}...)"
            for r in records if "sha256" in r.extra and hash_of[r.image] != r.extra["sha256"]]


def held_out(records, selected, listed, hash_of: dict, allow_trained: bool) -> tuple[list, dict]:
    """(records to score, what was done) for one dataset under the model's training list (listed,
    None when unknown): its role, and how many images were left out as trained on or outside the
    run's test split (or, with allow_trained, how many trained ones are scored)."""
    if listed is None:
        return selected, {"role": UNKNOWN}
    trained = {row["sha256"] for row in listed if row["split"] == "train"}
    tested = {row["sha256"] for row in listed if row["split"] == "test"} - trained
    known = {row["sha256"] for row in listed}
    in_domain = 2 * sum(hash_of[r.image] in known for r in records) >= len(records)
    info = {"role": IN_DOMAIN if in_domain else CROSS}
    if allow_trained:
        info["trained_scored"] = sum(hash_of[r.image] in trained for r in selected)
        return selected, info
    pool = records if in_domain else selected  # in-domain: the run's split, not --split / --seed's
    if in_domain:
        keep = [r for r in pool if hash_of[r.image] in tested]
    else:
        keep = [r for r in pool if hash_of[r.image] not in trained]
    info["trained_left_out"] = sum(hash_of[r.image] in trained for r in pool)
    if in_domain:
        info["outside_test_split"] = len(pool) - len(keep) - info["trained_left_out"]
    return keep, info


def protocol_line(name: str, n: int, info: dict) -> str:
    """What was scored of one dataset and why, for the console."""
    line = f"{name}: {info['role']}, {n:,} images scored"
    if "trained_left_out" in info:
        line += f"; {info['trained_left_out']:,} trained-on images left out"
    if info.get("outside_test_split"):
        line += f"; {info['outside_test_split']:,} outside the run's test split left out"
    if info.get("trained_scored"):
        line += f"; {info['trained_scored']:,} TRAINED-ON IMAGES SCORED (--allow-trained)"
    return line


def select_protocol(sets, args) -> tuple[list[tuple[str, list]], dict, str]:
    """(file stem, records to score) per set under the scored model's training list (held_out),
    after every expected hash is checked (exit naming each changed file; nothing scored), then
    --limit; what was done per dataset (held_out's dict); where the training list came from."""
    listed, files = training_lists(args.model, args.adapter)
    need = list(dict.fromkeys(r.image for _, records, _ in sets for r in records
                              if listed is not None or "sha256" in r.extra))
    hash_of = dict(zip(need, data.sha256_files(need, what="evaluation images")))
    changed = [line for stem, records, _ in sets for line in check_hashes(stem, records, hash_of)]
    if changed:
        sys.exit(f"error: {len(changed)} images differ from their recorded SHA-256; "
                 "nothing was scored:\n" + "\n".join(changed))
    out, protocol = [], {}
    for stem, records, selected in sets:
        keep, info = held_out(records, selected, listed, hash_of, args.allow_trained)
        keep = keep[:args.limit] if args.limit is not None else keep
        if not keep:
            sys.exit(f"error: {protocol_line(stem, 0, info)}: nothing left to evaluate")
        out.append((stem, keep))
        protocol |= dict.fromkeys((r.dataset for r in keep), info)  # summaries are per dataset
    return out, protocol, ", ".join(files) if files else UNKNOWN


def roles_line(summary: dict) -> str:
    """Which datasets are in-domain test splits and which cross-dataset, or that nobody knows."""
    if summary["training_images"] == UNKNOWN:
        return f"{UNKNOWN} (the model carries no {data.TRAINING_DATA})"
    parts = []
    for role in (IN_DOMAIN, CROSS):
        names = [n for n, d in summary["datasets"].items() if d.get("role") == role]
        parts += [f"{role}: {', '.join(names)}"] if names else []
    return " · ".join(parts)


def protocol_summary(summary: dict) -> str:
    """Console lines: where the training list came from, and per dataset what was scored."""
    lines = [f"training images: {summary['training_images']}"]
    datasets = summary["datasets"]
    lines += [protocol_line(name, d["n"], d) for name, d in datasets.items() if "role" in d]
    if summary["training_images"] != UNKNOWN:
        left = sum(d.get("trained_left_out", 0) for d in datasets.values())
        line = f"{left:,} images the model trained on were left out"
        line += " (--allow-trained scores them)" if left else ""
        if summary["trained_scored"]:
            line += f"; {summary['trained_scored']:,} TRAINED-ON IMAGES WERE SCORED"
            line += " (--allow-trained)"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.compare:
        result = compare(read_rows(args.compare[0]), read_rows(args.compare[1]), n=args.n_boot,
                         seed=args.seed)
        print(f"A = {args.compare[0]}, B = {args.compare[1]}, overall SRCC, "
              f"paired bootstrap ({args.n_boot})")
        print(compare_table(result), end="")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            report.write_json(os.path.join(args.out, "compare.json"), result)
        return 0
    if not args.model or not args.out or not (args.data or args.suite) \
            or (args.suite and not args.data_root):
        parser.error("a run needs --model, --out and --data NAME=ROOT ... "
                     "or --suite --data-root ROOT")
    sets, protocol, source = select_protocol(load_sets(parser, args), args)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model in mgiqa.TINY_MODELS:
        print(f"note: --model {args.model} is an untrained random model: its scores are noise.",
              file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    run = {"model": args.model, "adapter": args.adapter, "thinking": not args.fast,
           "max_new_tokens": args.max_new_tokens, "max_pixels": args.max_pixels,
           "allow_trained": args.allow_trained}
    run_path = os.path.join(args.out, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            earlier = json.load(f)
        if earlier != run:
            parser.error(f"{run_path}: the results there come from {earlier}, not {run}; "
                         "use another --out")
    report.write_json(run_path, run, indent=None)
    model, processor = mgiqa.load(args.model, device=args.device, adapter=args.adapter,
                                  max_pixels=args.max_pixels)
    rows, records = [], []
    for stem, recs in sets:
        rows += evaluate_records(model, processor, recs, os.path.join(args.out, f"{stem}.jsonl"),
                                 thinking=not args.fast, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, progress=True)
        records += recs
    summary = {**run, "split": args.split, **summarize(rows, records)}
    for name, info in protocol.items():
        summary["datasets"][name] |= info
    summary["training_images"] = source
    summary["trained_scored"] = sum(d.get("trained_scored", 0) for d in protocol.values())
    report.write_json(os.path.join(args.out, "summary.json"), summary)
    table = markdown_table(summary)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table, end="")
    for name, d in summary["datasets"].items():
        if d["parse_failures"]:
            print(f"{name}: {d['parse_failures']} of {d['n']} completions had no parsable overall "
                  "score (left out of the metrics, counted)")
    print(protocol_summary(summary))
    print(scatter_plots(rows, args.out))
    if args.report:
        try:  # the cap in force: the checkpoint's own where it is smaller (mgiqa.cap_pixels)
            cap = f"pixel cap {int(processor.image_processor.size['longest_edge']):,}"
        except (AttributeError, KeyError, TypeError):
            cap = f"--max-pixels {args.max_pixels:,}"
        trained = summary["trained_scored"]
        path = report.write_report(
            os.path.join(args.out, "report.html"), rows, records, summary,
            f"MG-IQA evaluation: {args.model}"
            + (f" · INCLUDES {trained:,} TRAINING IMAGES (--allow-trained)" if trained else ""),
            subtitle=f"adapter {args.adapter or 'none'} · "
                     f"{'reasoning' if not args.fast else 'answer only'} · "
                     f"split {args.split or 'as given'} · {cap} · {roles_line(summary)}",
            note=("an untrained random model: its scores are noise"
                  if args.model in mgiqa.TINY_MODELS else ""),
            max_images=args.report_images or None)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
