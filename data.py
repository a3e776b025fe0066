"""MG-IQA data: the datasets, their splits, the cross-domain sampler and the command line.

    python data.py summary koniq=/data/koniq10k kadid=/data/kadid10k pyiqa=/data/csiq,meta_info_CSIQDataset.csv
    python data.py summary pyiqa=/data/mine,meta_info_MineDataset.csv,direction=lower
    python data.py synth runs/synth --n 15000 --size 96 --seed 0 [--mode family|mixed] [--heldout-frac 0.02]

Library (one concept per file, all re-exported here):
  records.py           Record, LABELLED, FAMILY_TO_ATTRIBUTE
  annotation_files.py  CSV / .xlsx / .mat parsing with file, row and column in every error
  readers.py           load_dataset(name, root, **options) -> [Record]: the published annotation
                       files of 11 datasets, pyiqa meta-info CSVs (both layouts) and this project's
                       manifest; READERS; parse_spec("NAME=ROOT[,FILE][,KEY=VALUE ...]")
  synth.py             synthesize(n, size) -> (uint8 (N, S, S, 3), [Record]); make_synthetic(out, n, size)
  data.py              split_records / save_split / load_split / apply_split, stratified_subset,
                       preferences, Sampler(datasets, batch_size).sample() -> {"dataset", "domain",
                       "records", "labels" (B, A), "P" (A, B, B), "M" (A, B, B)}

Departures (ours; docs/METHOD.md gives the method):
1. LIVE and PIPAL carry no discrete levels, so they give no metadata pairs, only overall from MOS.
2. A lower-is-better score (CSIQ, LIVE, a pyiqa file read with direction=lower) becomes mos = TOP - score.
3. The sampler draws batches independently (with replacement across batches), not in epochs;
   a dataset smaller than the batch gives a smaller batch.
4. Label pairs take precedence over metadata pairs; two clean images of one reference tie.
5. Synthetic color distortion is desaturation only (no cast); mixed mode's overall is (min + mean) / 2
   of the four attributes, family mode's the minimum (synth.py).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import zlib
from dataclasses import replace

import numpy as np

from mgiqa import ATTRIBUTES
from readers import (CSIQ_TYPES, DIRECTION, KADID_FAMILIES, LIVE_FOLDERS, PYIQA_FILES, READERS,
                     TID2013_FAMILIES, _load, load_dataset, parse_spec, pyiqa_direction)
from records import FAMILY_TO_ATTRIBUTE, LABELLED, Record
from synth import LEVELS, SYNTH_FAMILIES, contact_sheet, ladder, make_synthetic, synthesize
from annotation_files import table

__all__ = ["ATTRIBUTES", "CSIQ_TYPES", "DIRECTION", "FAMILY_TO_ATTRIBUTE", "KADID_FAMILIES", "LABELLED", "LEVELS",
           "LIVE_FOLDERS", "PYIQA_FILES", "READERS", "Record", "SYNTH_FAMILIES", "Sampler", "TID2013_FAMILIES",
           "apply_split", "contact_sheet", "ladder", "load_dataset", "load_split", "make_synthetic", "parse_spec",
           "preferences", "save_split", "split_records", "stratified_subset", "summary", "synthesize"]


# ----------------------------------------------------------------------------- splits

def split_records(records: list[Record], seed: int = 0, synthetic_fractions=(0.6, 0.2, 0.2),
                  test_fraction: float = 0.2) -> list[Record]:
    """Per dataset: keep an official split; else a seeded reference-disjoint train/val/test split for
    synthetic datasets with references (as VisualQuality-R1 for KADID-10k); else seeded train/test."""
    by_set: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_set.setdefault(r.dataset, []).append(i)
    out = list(records)
    for name, idx in by_set.items():
        if all(records[i].split != "all" for i in idx):
            continue
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        refs = [records[i].ref for i in idx]
        grouped = records[idx[0]].domain == "synthetic" and None not in refs
        units = sorted(set(refs)) if grouped else sorted(records[i].image for i in idx)
        units = [units[j] for j in rng.permutation(len(units))]
        cuts = np.cumsum(synthetic_fractions)[:-1] if grouped else [1 - test_fraction]
        bounds = [round(c * len(units)) for c in cuts] + [len(units)]
        names = ("train", "val", "test") if grouped else ("train", "test")
        split_of = {u: names[next(k for k, b in enumerate(bounds) if j < b)] for j, u in enumerate(units)}
        for i in idx:
            out[i] = replace(records[i], split=split_of[records[i].ref if grouped else records[i].image])
    return out


def save_split(records: list[Record], path: str) -> None:
    """A CSV image,dataset,split, written beside a run's outputs so evaluation uses the same images."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "dataset", "split"])
        w.writerows([r.image, r.dataset, r.split] for r in records)


def load_split(path: str) -> dict[str, str]:
    """{image: split} from save_split's CSV."""
    return {str(v["image"]): str(v["split"]) for _, v, _ in table(path, {"image": ("image",), "split": ("split",)})}


def apply_split(records: list[Record], split: dict[str, str]) -> list[Record]:
    """Records with the saved split; an image the split does not list is an error (never guessed)."""
    absent = [r.image for r in records if r.image not in split]
    if absent:
        raise ValueError(f"{len(absent)} images are not in the saved split, e.g. {absent[:3]}")
    return [replace(r, split=split[r.image]) for r in records]


def stratified_subset(records: list[Record], n: int, seed: int = 0) -> list[Record]:
    """At most n records, drawn from every dataset present in proportion to its size (largest
    remainders), at least one from each (with n below the number of datasets: one from each of the
    n largest); seeded per dataset, deterministic for a seed, in the order of records. n at least
    len(records) returns them all."""
    if n >= len(records):
        return list(records)
    by_set: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_set.setdefault(r.dataset, []).append(i)
    names = sorted(by_set, key=lambda k: -len(by_set[k]))  # stable: ties keep first appearance
    if n < len(names):
        quota = {k: int(i < n) for i, k in enumerate(names)}
    else:
        exact = {k: (n - len(names)) * (len(by_set[k]) - 1) / (len(records) - len(names)) for k in names}
        quota = {k: 1 + math.floor(exact[k]) for k in names}
        for k in sorted(names, key=lambda k: -(exact[k] - math.floor(exact[k])))[:n - sum(quota.values())]:
            quota[k] += 1
    keep = []
    for name, idx in by_set.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        keep += [idx[j] for j in rng.choice(len(idx), size=quota[name], replace=False)]
    return [records[i] for i in sorted(keep)]


# ----------------------------------------------------------------------------- the sampler

def preferences(records: list[Record]):
    """labels (B, A), ground truth P and mask M (A, B, B) of a batch: reward.preferences, the one
    rule (imported here, not at the top, so that `data.py synth` and `summary` start without torch)."""
    from reward import preferences as rule
    return rule(records)


class Sampler:
    """Domain-pure batches: a dataset drawn with probability proportional to n^alpha, then B of its
    images; a dataset with references is drawn as a few references with several images each,
    those of one family (and the clean ones) first, so metadata pairs exist.

    Each batch: {"dataset", "domain", "records" (B), "labels" (B, A), "P" (A, B, B), "M" (A, B, B)}."""

    def __init__(self, datasets: dict[str, list[Record]], batch_size: int, alpha: float = 0.5, seed: int = 0,
                 refs_per_batch: int | None = None):
        self.names = sorted(n for n in datasets if datasets[n])
        if not self.names:
            raise ValueError("Sampler needs at least one non-empty dataset")
        self.datasets, self.batch_size = {n: datasets[n] for n in self.names}, batch_size
        sizes = np.array([len(self.datasets[n]) for n in self.names], dtype=float)
        self.probs = sizes ** alpha / (sizes ** alpha).sum()
        self.refs_per_batch = refs_per_batch or max(1, math.ceil(batch_size / 4))
        self.by_ref = {}
        for n in self.names:
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(self.datasets[n]):
                if r.ref is not None:
                    groups.setdefault(r.ref, []).append(i)
            if groups:
                self.by_ref[n] = [groups[k] for k in sorted(groups)]
        self.rng = np.random.default_rng(seed)

    def _from_refs(self, name: str) -> list[int]:
        groups, rng = self.by_ref[name], self.rng
        recs, chosen = self.datasets[name], []
        n_refs = min(self.refs_per_batch, len(groups))
        per = [self.batch_size // n_refs + (k < self.batch_size % n_refs) for k in range(n_refs)]
        for g, take in zip(rng.choice(len(groups), size=n_refs, replace=False), per):
            members = [groups[g][j] for j in rng.permutation(len(groups[g]))]
            family = next((recs[i].family for i in members if recs[i].family), None)  # in proportion to its images
            first = [i for i in members if recs[i].family == family or (recs[i].family is None and recs[i].level == 0)]
            chosen += (first + [i for i in members if i not in first])[:take]
        rest = np.setdiff1d(np.arange(len(recs)), chosen)
        return chosen + list(rng.choice(rest, size=min(self.batch_size - len(chosen), len(rest)), replace=False))

    def sample(self) -> dict:
        name = self.names[self.rng.choice(len(self.names), p=self.probs)]
        recs = self.datasets[name]
        idx = self._from_refs(name) if name in self.by_ref else \
            self.rng.choice(len(recs), size=min(self.batch_size, len(recs)), replace=False)
        batch = [recs[int(i)] for i in idx]
        labels, P, M = preferences(batch)
        return {"dataset": name, "domain": batch[0].domain, "records": batch, "labels": labels, "P": P, "M": M}

    __next__ = sample

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"names": self.names, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"sampler state is for datasets {state['names']}, this sampler has {self.names}")
        self.rng.bit_generator.state = state["rng"]



# ----------------------------------------------------------------------------- command line

def summary(name: str, root: str, **opts) -> str:
    found, missing = _load(name, root, **opts)
    mos = [r.mos for r in found]
    splits = {s: sum(r.split == s for r in found) for s in ("train", "val", "test", "all")}
    attrs = sorted({a for r in found for a in r.attributes}, key=LABELLED.index)
    meta = {FAMILY_TO_ATTRIBUTE.get(r.family) for r in found if r.level is not None}
    by_ref = bool(found) and found[0].domain == "synthetic" and all(r.ref for r in found)
    made = "a reference-disjoint 60/20/20" if by_ref else "a seeded 80/20"
    direction = DIRECTION.get(name, "higher is better")
    if name == "pyiqa":  # the file's own direction
        lower, top = pyiqa_direction(root if os.path.isfile(root) else os.path.join(root, opts.get("file", "")), opts)
        direction = f"lower-is-better score flipped: mos = {top:g} - score" if lower == "lower" else "higher is better, as given"
        name = f"pyiqa {found[0].dataset}" if found else name
    return (f"{name}: {len(found)} images ({len(missing)} listed but missing on disk)\n"
            f"  splits: {', '.join(f'{k} {v}' for k, v in splits.items() if v)}"
            f"{f' (none official: split_records makes {made})' if splits['all'] else ''}\n"
            f"  MOS {min(mos, default=math.nan):.3f} .. {max(mos, default=math.nan):.3f}, "
            f"{direction}\n"
            f"  labels: overall (MOS); attributes {attrs or 'none'}; from metadata "
            f"{[a for a in LABELLED if a in meta] or 'none'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, help="synth: make a synthetic dataset; summary: check datasets")
    s = sub.add_parser("synth", help="procedural images with graded distortions + manifest.csv + contact sheet")
    s.add_argument("out", help="output folder")
    s.add_argument("--n", type=int, default=2000, help="number of images")
    s.add_argument("--size", type=int, default=96, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    s.add_argument("--mode", choices=("family", "mixed"), default="family",
                   help="family: each image clean or one family at level 1-5 (KADID-like); mixed: independent levels")
    s.add_argument("--per-ref", type=int, default=5, help="images per scene (family mode: 1 clean + distorted)")
    s.add_argument("--heldout-frac", type=float, default=0.2, help="fraction of scenes in the test split")
    m = sub.add_parser("summary", help="images, splits, MOS range, labels and missing files per dataset")
    m.add_argument("datasets", nargs="+", help=f"NAME=ROOT[,FILE][,KEY=VALUE ...], NAME in {', '.join(READERS)}")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "synth":
        import time
        t0 = time.time()
        recs = make_synthetic(args.out, args.n, args.size, args.seed, args.mode, args.per_ref, args.heldout_frac)
        n_test = sum(r.split == "test" for r in recs)
        print(f"wrote {len(recs)} images ({n_test} test) to {args.out} in {time.time() - t0:.1f} s")
        return 0
    failed = 0
    for spec in args.datasets:
        name = spec.partition("=")[0]
        try:
            name, root, opts = parse_spec(spec)
            print(summary(name, root, **opts))
        except (OSError, ValueError) as err:  # report every dataset, then fail
            print(f"{name}: error: {err}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
