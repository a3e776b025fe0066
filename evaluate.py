"""MG-IQA evaluation: benchmark runs, their summaries, the HTML report, paired model comparison.

The metrics (SRCC, KRCC, PLCC raw and after the 4-parameter logistic, bootstrap intervals, the
within-family attribute SRCC) are metrics.py's, importable from here as before (evaluate.srcc ...).

    python evaluate.py --model runs/demo/final --data manifest=runs/synth --split test --out runs/ev --report
    python evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct --data koniq=/data/koniq10k spaq=/data/spaq --out runs/eval
    python evaluate.py --model M --data pyiqa=/data/csiq,meta_info_CSIQDataset.csv --out runs/csiq
    python evaluate.py --model tiny --data manifest=runs/synth --split test --limit 20 --out runs/ev  # offline
    python evaluate.py --model Qwen/Qwen2.5-VL-7B-Instruct --suite --data-root /data --out runs/eval_suite
    python evaluate.py --compare runs/a/koniq.jsonl runs/b/koniq.jsonl     # files or folders of *.jsonl

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
readers.py for the files each must hold): koniq10k (official test split, needs
koniq10k_distributions_sets.csv), spaq (all), livec (all, t1-t7 dropped), bid (all), kadid10k
(reference-disjoint test split of data.split_records, seed --seed), csiq (all), tid2013 (all),
agiqa3k (all).

Departures (ours; docs/METHOD.md gives the method):
1. PLCC in tables is after the logistic fit; `plcc_raw` (no fit) is in summary.json.
2. An image whose prediction is NaN is left out of that metric and counted (n_nan); the average row
   is the plain mean over the datasets that label the column, NaN if any of their values is NaN.
3. `compare` uses the images both files scored and both parsed (unparsed counts are reported per
   file); the average row resamples each dataset independently and averages the differences.
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
from metrics import (METRICS, attribute_srcc_within_family, bootstrap_ci, finite_pairs, fit_logistic4, krcc, label,
                     logistic4, match, metrics, plcc, rankdata, srcc)
from mgiqa import ATTRIBUTES
from records import FAMILY_TO_ATTRIBUTE, LABELLED

__all__ = ["FAMILY_TO_ATTRIBUTE", "LABELLED", "METRICS", "SUITE", "attribute_srcc_within_family", "bootstrap_ci",
           "compare", "compare_table", "evaluate_records", "finite_pairs", "fit_logistic4", "krcc", "label",
           "logistic4", "markdown_table", "match", "metrics", "plcc", "rankdata", "read_rows", "result_row",
           "scatter_plots", "select_split", "srcc", "summarize"]

SUITE = (  # (dataset reader, folder under --data-root, split: "official" test, "reference-disjoint" test, or all)
    ("koniq", "koniq10k", "official"), ("spaq", "spaq", None), ("livec", "livec", None), ("bid", "bid", None),
    ("kadid", "kadid10k", "reference-disjoint"), ("csiq", "csiq", None), ("tid2013", "tid2013", None),
    ("agiqa3k", "agiqa3k", None))

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
            row["labels"] = {k: math.nan if v is None else float(v) for k, v in row["labels"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{path}: line {number}: not a result row ({err})") from None
        rows.append(row)
    return rows


def result_row(rec, res: dict, thinking: bool) -> dict:
    """One image's row: the record's labels beside an mgiqa.score result (the five scores, strict,
    completion)."""
    return {"dataset": rec.dataset, "image": rec.image, "mos": float(rec.mos),
            "labels": {a: float(rec.attributes[a]) for a in LABELLED if a in rec.attributes},
            **{a: float(res[a]) for a in ATTRIBUTES}, "parsed": not math.isnan(res["overall"]),
            "strict": bool(res["strict"]), "thinking": thinking, "completion": res["completion"]}


def evaluate_records(model, processor, records, out_jsonl: str | None = None, thinking: bool = True,
                     batch_size: int = 8, max_new_tokens: int | None = None, progress: bool = False) -> list[dict]:
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
                raise ValueError(f"{out_jsonl}: has rows scored with thinking={row['thinking']}; this run uses "
                                 f"thinking={thinking}. Use another --out.")
            done[(row["dataset"], row["image"])] = row
    todo = [r for r, k in zip(records, keys) if k not in done]
    missing = [r.image for r in todo if not os.path.isfile(r.image)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images missing, first: {', '.join(missing[:3])}")
    from tqdm import tqdm
    out = open(out_jsonl, "a", encoding="utf-8") if out_jsonl else contextlib.nullcontext()
    with out, tqdm(total=len(todo), desc=f"evaluating {records[0].dataset if records else ''}", unit="img",
                   disable=not progress or not todo) as bar:
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
        entry = {"n": len(group), "parse_failures": sum(not math.isfinite(r["overall"]) for r in group),
                 "unparsed": {a: sum(not math.isfinite(r[a]) for r in group) for a in ATTRIBUTES},
                 "strict_rate": sum(r["strict"] for r in group) / len(group), "metrics": {}}
        for a in ATTRIBUTES:
            gt = [label(rec, a) for rec in group_recs]
            if a == "overall" or any(math.isfinite(g) for g in gt):
                entry["metrics"][a] = metrics([r[a] for r in group], gt)
        if any(rec.family for rec in group_recs):
            entry["within_family"] = attribute_srcc_within_family(group, group_recs)
        datasets[name] = entry
    average = {}
    for a in ATTRIBUTES:
        having = [d["metrics"][a] for d in datasets.values() if a in d["metrics"]]
        if having:
            average[a] = {m: float(np.mean([h[m] for h in having])) for m in ("srcc", "krcc", "plcc", "plcc_raw")}
            average[a]["datasets"] = len(having)
    return {"datasets": datasets, "average": average}


def _cell(value) -> str:
    return "-" if value is None else ("nan" if math.isnan(value) else f"{value:.3f}")


def markdown_table(summary: dict) -> str:
    columns = [a for a in ("overall", *LABELLED) if a in summary["average"]]
    head = ["dataset", "n", "unparsed"] + [f"{a} {m}" for a in columns for m in ("SRCC", "PLCC")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, d in summary["datasets"].items():
        cells = [_cell(d["metrics"][a][m]) if a in d["metrics"] else "-" for a in columns for m in ("srcc", "plcc")]
        lines.append(f"| {name} | {d['n']} | {d['parse_failures']} | " + " | ".join(cells) + " |")
    cells = [_cell(summary["average"][a][m]) for a in columns for m in ("srcc", "plcc")]
    lines.append("| average | | | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def scatter_plots(rows, out_dir: str) -> str:
    """One PNG per dataset: predicted overall against MOS. Returns a one-line note."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return "note: matplotlib is not installed, so no scatter plots were drawn (pip install matplotlib)"
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
    """Paired bootstrap of SRCC(A) - SRCC(B) per dataset over the images both scored: the difference,
    its 95% interval and the share of resamples in which A beats B; plus the average over datasets."""
    b_by_key = {(r["dataset"], r["image"]): r for r in b_rows}
    groups = {}
    for ra in a_rows:
        rb = b_by_key.get((ra["dataset"], ra["image"]))
        if rb is not None:
            la, lb = label(ra, attribute), label(rb, attribute)
            if la != lb and not (math.isnan(la) and math.isnan(lb)):
                raise ValueError(f"{ra['image']} ({ra['dataset']}): the two files disagree on its {attribute} label")
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
    out["average"] = _paired(mean["srcc_a"], mean["srcc_b"], np.mean(boots, axis=0), sum(d["n"] for d in parts),
                             np.sum([d["unparsed"] for d in parts], axis=0).tolist())
    return out


def _paired(srcc_a: float, srcc_b: float, boot: np.ndarray, n: int, unparsed: list[int]) -> dict:
    finite = boot[np.isfinite(boot)]
    low, high = np.percentile(finite, [2.5, 97.5]) if finite.size else (math.nan, math.nan)
    return {"n": int(n), "unparsed": unparsed, "srcc_a": srcc_a, "srcc_b": srcc_b, "diff": srcc_a - srcc_b,
            "low": float(low), "high": float(high), "a_better": float((finite > 0).mean()) if finite.size else math.nan}


def compare_table(result: dict) -> str:
    lines = ["| dataset | n | unparsed A/B | SRCC A | SRCC B | A - B | 95% interval | A better |", "|---" * 8 + "|"]
    for name, d in result.items():
        lines.append(f"| {name} | {d['n']} | {d['unparsed'][0]}/{d['unparsed'][1]} | {_cell(d['srcc_a'])} | {_cell(d['srcc_b'])} | {_cell(d['diff'])} | "
                     f"[{_cell(d['low'])}, {_cell(d['high'])}] | {d['a_better']:.1%} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- command line

def select_split(records, split: str | None, seed: int = 0, official: bool = False) -> list:
    """Records of one split: the dataset's own split when it has one, else (official=False) the seeded
    split of data.split_records (reference-disjoint for a synthetic dataset with references)."""
    if split in (None, "all"):
        return list(records)
    if not any(r.split == split for r in records):
        if official:
            raise ValueError(f"{records[0].dataset}: no official '{split}' split in its annotation files")
        records = data.split_records(records, seed=seed)
    return [r for r in records if r.split == split]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate an MG-IQA model on IQA benchmarks, or compare runs.")
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="checkpoint folder or hub id; 'tiny' / 'small' for an untrained offline model")
    g.add_argument("--adapter", default=None, help="LoRA adapter folder written by grpo.py")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    g.add_argument("--fast", action="store_true", help="answer only, no reasoning (non-thinking prompt)")
    g.add_argument("--batch-size", type=int, default=8, help="images per generate call; rows are flushed per batch")
    g.add_argument("--max-new-tokens", type=int, default=None, help="default: mgiqa.score's (256 thinking, 64 fast)")
    g.add_argument("--max-pixels", type=int, default=mgiqa.DEFAULT_MAX_PIXELS,
                   help=f"pixel cap for the processor (default mgiqa.DEFAULT_MAX_PIXELS = {mgiqa.DEFAULT_MAX_PIXELS:,} "
                        "= 1280*28*28); a checkpoint saved with a smaller cap keeps its own")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", default=[], metavar="NAME=ROOT[,FILE][,KEY=VALUE]",
                   help=f"datasets: {', '.join(data.READERS)}; e.g. pyiqa=/data/csiq,meta_info_CSIQDataset.csv "
                        "or pyiqa=/data/x,meta.csv,direction=lower (readers.py lists the options)")
    g.add_argument("--suite", action="store_true", help="the eight benchmarks of docs/METHOD.md under --data-root")
    g.add_argument("--data-root", default=None, help="folder holding the suite's dataset folders")
    g.add_argument("--split", default=None, help="train / val / test of each --data (the suite fixes its own)")
    g.add_argument("--seed", type=int, default=0, help="seed of data.split_records where a dataset has no split")
    g.add_argument("--limit", type=int, default=None, help="only the first N images of each dataset")
    g = parser.add_argument_group("output and comparison")
    g.add_argument("--out", default=None, help="output folder (required for a run; resumes when it holds results)")
    g.add_argument("--report", action="store_true",
                   help="also write report.html: metrics, scatter plots and every image with its scores, worst-ranked first")
    g.add_argument("--report-images", type=int, default=300, metavar="N",
                   help="with --report: at most N images per dataset in the grid, the worst-ranked first (default "
                        "300, about 3 MB of thumbnails per dataset; 0: all)")
    g.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two result files (or folders of *.jsonl) to compare")
    g.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for --compare")
    return parser, parser.parse_args(argv)


def load_sets(parser, args) -> list[tuple[str, list]]:
    """(file stem, records) for each --data entry and each suite benchmark, split and limited."""
    sets = []
    for spec in args.data:
        try:
            name, root, opts = data.parse_spec(spec)
        except ValueError as err:
            parser.error(f"--data: {err}")
        if name not in data.READERS:
            parser.error(f"--data {spec!r}: NAME must be one of {', '.join(data.READERS)}")
        records = select_split(data.load_dataset(name, root, **opts), args.split, args.seed)
        sets.append((records[0].dataset if name == "pyiqa" and records else name, records))
    if args.suite:
        for name, folder, how in SUITE:
            records = data.load_dataset(name, os.path.join(args.data_root, folder))
            split = None if how is None else "test"
            sets.append((name, select_split(records, split, args.seed, official=how == "official")))
    sets = [(stem, records[:args.limit] if args.limit is not None else records) for stem, records in sets]
    for stem, records in sets:
        if not records or [s for s, _ in sets].count(stem) > 1:
            parser.error(f"{stem}: named twice, or no images to evaluate (split {args.split!r})")
    return sets


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    if args.compare:
        result = compare(read_rows(args.compare[0]), read_rows(args.compare[1]), n=args.n_boot, seed=args.seed)
        print(f"A = {args.compare[0]}, B = {args.compare[1]}, overall SRCC, paired bootstrap ({args.n_boot})")
        print(compare_table(result), end="")
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            report.write_json(os.path.join(args.out, "compare.json"), result)
        return 0
    if not args.model or not args.out or not (args.data or args.suite) or (args.suite and not args.data_root):
        parser.error("a run needs --model, --out and --data NAME=ROOT ... or --suite --data-root ROOT")
    sets = load_sets(parser, args)

    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model in mgiqa.SIZES:
        print(f"note: --model {args.model} is an untrained random model: its scores are noise.", file=sys.stderr)
    os.makedirs(args.out, exist_ok=True)
    run = {"model": args.model, "adapter": args.adapter, "thinking": not args.fast, "max_new_tokens": args.max_new_tokens,
           "max_pixels": args.max_pixels}
    run_path = os.path.join(args.out, "run.json")
    if os.path.exists(run_path):
        with open(run_path) as f:
            earlier = json.load(f)
        if earlier != run:
            parser.error(f"{run_path}: the results there come from {earlier}, not {run}; use another --out")
    report.write_json(run_path, run, indent=None)
    model, processor = mgiqa.load(args.model, device=args.device, adapter=args.adapter, max_pixels=args.max_pixels)
    rows, records = [], []
    for stem, recs in sets:
        rows += evaluate_records(model, processor, recs, os.path.join(args.out, f"{stem}.jsonl"),
                                 thinking=not args.fast, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, progress=True)
        records += recs
    summary = {**run, "split": args.split, **summarize(rows, records)}
    report.write_json(os.path.join(args.out, "summary.json"), summary)
    table = markdown_table(summary)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table, end="")
    for name, d in summary["datasets"].items():
        if d["parse_failures"]:
            print(f"{name}: {d['parse_failures']} of {d['n']} completions had no parsable overall score "
                  "(left out of the metrics, counted)")
    print(scatter_plots(rows, args.out))
    if args.report:
        try:  # the cap in force: the checkpoint's own where it is smaller (mgiqa.cap_pixels)
            cap = f"pixel cap {int(processor.image_processor.size['longest_edge']):,}"
        except (AttributeError, KeyError, TypeError):
            cap = f"--max-pixels {args.max_pixels:,}"
        path = report.write_report(
            os.path.join(args.out, "report.html"), rows, records, summary, f"MG-IQA evaluation: {args.model}",
            subtitle=f"adapter {args.adapter or 'none'} · {'reasoning' if not args.fast else 'answer only'} · "
                     f"split {args.split or 'as given'} · {cap}",
            note="an untrained random model: its scores are noise" if args.model in mgiqa.SIZES else "",
            max_images=args.report_images or None)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
