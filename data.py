"""MG-IQA data: benchmark datasets as their publishers ship them, splits, the cross-domain sampler
(SPEC 4), and procedural images with graded distortions for the CPU demo (PITFALLS, issue 8).

    python data.py summary koniq=/data/koniq10k kadid=/data/kadid10k pyiqa=/data/koniq,meta_info_KonIQ.csv
    python data.py synth runs/synth --n 15000 --size 96 --seed 0 [--mode family|mixed] [--heldout-frac 0.02]

Library: load_dataset(name, root) -> [Record]; split_records / save_split / load_split / apply_split;
Sampler(datasets, batch_size).sample() -> {"dataset", "domain", "records", "labels" (B, A), "P" (A, B, B),
"M" (A, B, B)}; synthesize(n, size) -> (uint8 (N, S, S, 3), [Record]) in memory; make_synthetic(out, n, size).

Readers (SPEC 6). Annotation files are found anywhere under root; image names are matched first under
the listed folders, then anywhere, case-insensitively (TID2013 ships I01_01_1.bmp as i01_01_1.bmp).
  koniq    koniq10k_distributions_sets.csv (MOS, else MOS_zscore; official split from `set`), else
           koniq10k_scores_and_distributions.csv; images from 1024x768/ before 512x384/.
  spaq     MOS and Image attribute scores.xlsx; Sharpness/Colorfulness/Noisiness -> sharpness/color/noise.
  livec    AllImages_release.mat + AllMOS_release.mat (Data/); t1-t7 dropped by name; Images/.
  kadid    dmos.csv (dist_img, ref_img, dmos = MOS 1-5); family from TT, level from LL of Irr_TT_LL.
  csiq     csiq.DMOS.xlsx (image, dst_type, dst_lev, dmos; the header row may sit below a title, on any
           sheet); files dst_imgs/<type>/<image>.<TYPE>.<lev>.png (AWGN, BLUR, contrast, fnoise, JPEG,
           jpeg2000); mos = 1 - dmos.
  tid2013  mos_with_names.txt ("5.51429 I01_01_1.bmp", MOS 0-9); family from TT (TID2013_FAMILIES).
  bid      DatabaseGrades.xlsx (Image Number, Average Subjective Grade 0-5) -> ImageDatabase/DatabaseImage0001.*
  agiqa3k  data.csv (name, mos_quality; mos_align and the other columns kept in extra).
  agiqa1k  AIGC_MOS_Zscore.xlsx (or .csv) from the publisher's repo: Image (or name), MOS.
  pipal    Train_Label/*.txt, lines "A0001_00_00.bmp,1500.5" (ELO, higher better), images Train_Distort/;
           ref = A0001, the two numeric fields kept in extra (type, subtype).
  live     LIVE release 2: refnames_all.mat + dmos_realigned.mat (dmos_new; else dmos.mat, dmos) with orgs;
           images jp2k/img1..227 jpeg/..233 wn/..174 gblur/..174 fastfading/..174 in that order;
           reference copies (orgs = 1) dropped, as pyiqa does; mos = 100 - dmos.
  pyiqa    a pyiqa meta-info CSV: first column the image (relative to root), second the score.
           root is the CSV itself, or the image folder with file= (CLI: pyiqa=ROOT,FILE).
  manifest this project's CSV (manifest.csv in root, or the CSV as root): image, mos, optional
           sharpness/color/noise/composition, split, ref, family, level, dataset, domain.

Departures (ours; SPEC 4 and 6 fix the rest):
1. LIVE and PIPAL carry no discrete levels, so they give no metadata pairs, only overall from MOS.
2. pyiqa scores are taken as higher-is-better; flip a DMOS meta-info file before reading it.
3. The sampler draws batches independently (with replacement across batches), not in epochs;
   a dataset smaller than the batch gives a smaller batch.
4. Label pairs take precedence over metadata pairs; two clean images of one reference tie.
5. Synthetic color distortion is desaturation only (no cast), as in PITFALLS' recipe; mixed mode's
   overall is (min + mean) / 2 of the four attributes, family mode's the minimum.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from mgiqa import ATTRIBUTES

LABELLED = ATTRIBUTES[:-1]  # attributes a dataset may label; overall always comes from MOS
FAMILY_TO_ATTRIBUTE = {"blur": "sharpness", "noise": "noise", "color": "color", "composition": "composition"}
KADID_FAMILIES = {**dict.fromkeys(range(1, 4), "blur"), **dict.fromkeys(range(4, 9), "color"),
                  9: "compression", 10: "compression", **dict.fromkeys(range(11, 16), "noise"),
                  **dict.fromkeys(range(16, 19), "brightness"), **dict.fromkeys(range(19, 24), "spatial"),
                  24: "sharpen", 25: "contrast"}
TID2013_FAMILIES = {**dict.fromkeys((1, 2, 3, 4, 5, 6, 7, 9, 19, 20), "noise"), 8: "blur",
                    **dict.fromkeys((10, 11, 12, 13, 21, 24), "compression"), 14: "spatial", 15: "spatial",
                    16: "brightness", 17: "contrast", **dict.fromkeys((18, 22, 23), "color")}
CSIQ_TYPES = {"noise": ("awgn", "noise"), "awgn": ("awgn", "noise"), "f noise": ("fnoise", "noise"),
              "fnoise": ("fnoise", "noise"), "blur": ("blur", "blur"), "jpeg": ("jpeg", "compression"),
              "jpeg 2000": ("jpeg2000", "compression"), "jpeg2000": ("jpeg2000", "compression"),
              "contrast": ("contrast", "contrast")}
LIVE_FOLDERS = (("jp2k", 227, "compression"), ("jpeg", 233, "compression"), ("wn", 174, "noise"),
                ("gblur", 174, "blur"), ("fastfading", 174, "compression"))


@dataclass
class Record:
    image: str                      # root joined with the listed name
    dataset: str
    domain: str                     # synthetic | authentic | aigc
    split: str = "all"              # train | val | test | all (no official split)
    mos: float = math.nan           # higher is better, the dataset's own scale
    attributes: dict[str, float] = field(default_factory=dict)
    ref: str | None = None
    family: str | None = None       # None with level 0 = a clean image
    level: int | None = None
    extra: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- annotation files

def _lazy(package: str, what: str):
    try:
        return __import__(package)
    except ImportError:
        raise ImportError(f"reading {what} needs {package}: pip install {package}") from None


def _float(path, row, col, value) -> float:
    try:
        out = float(str(value).strip())
    except ValueError:
        out = math.nan
    if not math.isfinite(out):
        raise ValueError(f"{path}: row {row}, column '{col}': {value!r} is not a number")
    return out


def _rows(path: str) -> list[list]:
    """All rows of a CSV or .xlsx (every sheet, concatenated with a None separator) as lists."""
    if path.lower().endswith(".xlsx"):
        openpyxl = _lazy("openpyxl", f".xlsx files ({path})")
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        rows = []
        for sheet in book.worksheets:
            rows += [list(r) for r in sheet.iter_rows(values_only=True)] + [None]
        book.close()
        return rows
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.reader(f))


def _pick(header, columns):
    names = [str(c).strip().lower() if c is not None else "" for c in header or []]
    return {k: next((names.index(c.lower()) for c in cands if c.lower() in names), None) for k, cands in columns.items()}


def _table(path: str, columns: dict[str, tuple[str, ...]]):
    """Yield (row number, {key: value}, {other column: value}) below the first header row (of any
    sheet, within its first 50 rows) that holds every wanted column; candidates tried in order."""
    rows = _rows(path)
    filled = [i for i, r in enumerate(rows) if r and any(c not in (None, "") for c in r)]
    if not filled:
        raise ValueError(f"{path}: row 1: empty file, expected columns {[c[0] for c in columns.values()]}")
    h = next((i for i in filled[:50] if None not in _pick(rows[i], columns).values()), None)
    if h is None:
        pick = _pick(rows[filled[0]], columns)
        missing = next(columns[k][0] for k, i in pick.items() if i is None)
        raise ValueError(f"{path}: row {filled[0] + 1}: missing column '{missing}' (header: {rows[filled[0]]})")
    header, pick = rows[h], _pick(rows[h], columns)
    n_data = 0
    for r, row in enumerate(rows[h + 1:], start=h + 2):
        if row is None:
            break  # end of this sheet
        if not any(c not in (None, "") for c in row):
            continue
        row, n_data = list(row) + [None] * (len(header) - len(row)), n_data + 1
        yield r, {k: row[i] for k, i in pick.items()}, {str(header[i]): row[i] for i in range(len(header))
                                                        if i not in pick.values() and header[i] not in (None, "")}
    if n_data == 0:
        raise ValueError(f"{path}: row {h + 2}: no data rows below the header")


def _loadmat(path: str, var: str) -> np.ndarray:
    scipy = _lazy("scipy", f".mat files ({path})")
    import scipy.io  # noqa: F401
    mat = scipy.io.loadmat(path)
    if var not in mat:
        raise ValueError(f"{path}: no variable '{var}' (has {[k for k in mat if not k.startswith('__')]})")
    return mat[var]


def _mat_strings(x) -> list[str]:
    return [str(np.asarray(v).ravel()[0]) if isinstance(v, np.ndarray) else str(v) for v in np.asarray(x, dtype=object).ravel()]


def _mat_floats(path, var, x) -> list[float]:
    return [_float(path, i + 1, var, v) for i, v in enumerate(np.asarray(x, dtype=object).ravel())]


class _Files:
    """Every file under root, looked up by relative path, basename or stem (case-insensitive)."""

    def __init__(self, root: str):
        self.root, self.path, self.base, self.stem = root, {}, {}, {}
        for d, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                rel = os.path.relpath(os.path.join(d, f), root)
                self.path.setdefault(rel.lower().replace(os.sep, "/"), rel)
                self.base.setdefault(f.lower(), rel)
                self.stem.setdefault(os.path.splitext(f)[0].lower(), rel)

    def find(self, name: str, subdirs=("",)) -> str | None:
        if os.path.isabs(name):
            return name if os.path.isfile(name) else None
        name = name.replace("\\", "/")
        for sub in subdirs:
            rel = self.path.get(f"{sub}/{name}".strip("/").lower())
            if rel:
                return os.path.join(self.root, rel)
        if "/" not in name:  # a bare name may live in any folder
            rel = self.base.get(name.lower()) or self.stem.get(name.lower())
            return os.path.join(self.root, rel) if rel else None
        return None

    def annotation(self, dataset: str, *names: str) -> str:
        for n in names:
            if n.lower() in self.base:
                return os.path.join(self.root, self.base[n.lower()])
        raise FileNotFoundError(f"{dataset}: none of {list(names)} under {self.root}")


def _name_fields(path, row, col, name) -> tuple[str, int, int]:
    m = re.match(r"(i\d+)_(\d+)_(\d+)", os.path.basename(str(name)), re.IGNORECASE)
    if not m:
        raise ValueError(f"{path}: row {row}, column '{col}': {name!r} is not named Irr_TT_LL")
    return m.group(1).upper(), int(m.group(2)), int(m.group(3))


# ----------------------------------------------------------------------------- readers
# Each returns (records with listed names as image, image subfolders to try first).

def _koniq(fs, opts):
    try:
        path, sets = fs.annotation("koniq", "koniq10k_distributions_sets.csv"), True
    except FileNotFoundError:
        path, sets = fs.annotation("koniq", "koniq10k_scores_and_distributions.csv"), False
    cols = {"image": ("image_name",), "mos": ("MOS", "MOS_zscore")} | ({"set": ("set",)} if sets else {})
    names = {"training": "train", "train": "train", "validation": "val", "val": "val", "test": "test"}
    out = []
    for r, v, extra in _table(path, cols):
        split = names.get(str(v["set"]).strip().lower()) if sets else "all"
        if split is None:
            raise ValueError(f"{path}: row {r}, column 'set': unknown set {v['set']!r}")
        out.append(Record(str(v["image"]), "koniq", "authentic", split, _float(path, r, "MOS", v["mos"]), extra=extra))
    return out, ("1024x768", "512x384", "")


def _spaq(fs, opts):
    path = fs.annotation("spaq", "MOS and Image attribute scores.xlsx")
    cols = {"image": ("Image name",), "mos": ("MOS",), "sharpness": ("Sharpness",), "color": ("Colorfulness",),
            "noise": ("Noisiness",)}
    out = [Record(str(v["image"]), "spaq", "authentic", mos=_float(path, r, "MOS", v["mos"]), extra=extra,
                  attributes={a: _float(path, r, cols[a][0], v[a]) for a in ("sharpness", "color", "noise")})
           for r, v, extra in _table(path, cols)]
    return out, ("TestImage", "")


def _livec(fs, opts):
    ipath, mpath = fs.annotation("livec", "AllImages_release.mat"), fs.annotation("livec", "AllMOS_release.mat")
    names, mos = _mat_strings(_loadmat(ipath, "AllImages_release")), _loadmat(mpath, "AllMOS_release")
    mos = _mat_floats(mpath, "AllMOS_release", mos)
    if len(names) != len(mos):
        raise ValueError(f"{ipath} lists {len(names)} images but {mpath} has {len(mos)} scores")
    return [Record(n, "livec", "authentic", mos=m) for n, m in zip(names, mos)
            if not re.fullmatch(r"t[1-7]\.\w+", n)], ("Images", "")


def _kadid(fs, opts):
    path, out = fs.annotation("kadid", "dmos.csv"), []
    for r, v, extra in _table(path, {"image": ("dist_img",), "ref": ("ref_img",), "mos": ("dmos",)}):
        _, tt, level = _name_fields(path, r, "dist_img", v["image"])
        out.append(Record(str(v["image"]), "kadid", "synthetic", mos=_float(path, r, "dmos", v["mos"]),
                          ref=str(v["ref"]), family=KADID_FAMILIES.get(tt), level=level, extra=extra))
    return out, ("images", "")


def _csiq(fs, opts):
    path, out = fs.annotation("csiq", "csiq.DMOS.xlsx"), []
    cols = {"image": ("image",), "type": ("dst_type",), "level": ("dst_lev",), "dmos": ("dmos",)}
    for r, v, extra in _table(path, cols):
        kind = CSIQ_TYPES.get(str(v["type"]).strip().lower())
        if kind is None:
            raise ValueError(f"{path}: row {r}, column 'dst_type': unknown type {v['type']!r}")
        level, dmos = int(_float(path, r, "dst_lev", v["level"])), _float(path, r, "dmos", v["dmos"])
        image = str(v["image"]).strip().removesuffix(".0")
        out.append(Record(f"{image}.{kind[0]}.{level}.png", "csiq", "synthetic", mos=1.0 - dmos, ref=image,
                          family=kind[1], level=level, extra=extra | {"dmos": dmos}))
    return out, ("dst_imgs", "")


def _tid2013(fs, opts):
    path, out = fs.annotation("tid2013", "mos_with_names.txt"), []
    with open(path, encoding="utf-8-sig") as f:
        lines = [(i, ln.split()) for i, ln in enumerate(f, start=1) if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: row 1: empty file, expected 'MOS name' lines")
    for r, parts in lines:
        if len(parts) < 2:
            raise ValueError(f"{path}: row {r}, column 2 (name): missing in {' '.join(parts)!r}")
        ref, tt, level = _name_fields(path, r, "2 (name)", parts[1])
        out.append(Record(parts[1], "tid2013", "synthetic", mos=_float(path, r, "1 (MOS)", parts[0]),
                          ref=ref, family=TID2013_FAMILIES.get(tt), level=level))
    return out, ("distorted_images", "")


def _bid(fs, opts):
    path, out = fs.annotation("bid", "DatabaseGrades.xlsx"), []
    cols = {"image": ("Image Number", "Image"), "mos": ("Average Subjective Grade", "MOS")}
    for r, v, extra in _table(path, cols):
        image = v["image"]
        if not isinstance(image, str) or image.strip().isdigit():
            image = f"DatabaseImage{int(_float(path, r, 'Image Number', image)):04d}"
        out.append(Record(image, "bid", "authentic", mos=_float(path, r, cols["mos"][0], v["mos"]), extra=extra))
    return out, ("ImageDatabase", "")


def _agiqa3k(fs, opts):
    path = fs.annotation("agiqa3k", "data.csv")
    return [Record(str(v["image"]), "agiqa3k", "aigc", mos=_float(path, r, "mos_quality", v["mos"]), extra=extra)
            for r, v, extra in _table(path, {"image": ("name",), "mos": ("mos_quality",)})], ("AGIQA-3K", "")


def _agiqa1k(fs, opts):
    path = fs.annotation("agiqa1k", "AIGC_MOS_Zscore.xlsx", "AIGC_MOS_Zscore.csv")
    return [Record(str(v["image"]), "agiqa1k", "aigc", mos=_float(path, r, "MOS", v["mos"]), extra=extra)
            for r, v, extra in _table(path, {"image": ("Image", "name"), "mos": ("MOS", "mos")})], ("file", "")


def _pipal(fs, opts):
    labels = sorted(p for k, p in fs.path.items() if "label" in os.path.dirname(k) and k.endswith(".txt"))
    if not labels:
        raise FileNotFoundError(f"pipal: no Train_Label/*.txt under {fs.root}")
    out = []
    for rel in labels:
        path = os.path.join(fs.root, rel)
        with open(path, encoding="utf-8-sig") as f:
            for r, line in enumerate(f, start=1):
                if line.strip():
                    name, _, score = line.strip().partition(",")
                    parts = os.path.splitext(name)[0].split("_") + [None, None]
                    out.append(Record(name, "pipal", "synthetic", mos=_float(path, r, "2 (score)", score),
                                      ref=parts[0], extra={"type": parts[1], "subtype": parts[2]}))
    return out, ("Train_Distort", "")


def _live(fs, opts):
    npath = fs.annotation("live", "refnames_all.mat")
    try:
        dpath, var = fs.annotation("live", "dmos_realigned.mat"), "dmos_new"
    except FileNotFoundError:
        dpath, var = fs.annotation("live", "dmos.mat"), "dmos"
    refs, dmos = _mat_strings(_loadmat(npath, "refnames_all")), _mat_floats(dpath, var, _loadmat(dpath, var))
    orgs = _mat_floats(dpath, "orgs", _loadmat(dpath, "orgs"))
    names = [(f"{d}/img{k}.bmp", fam) for d, n, fam in LIVE_FOLDERS for k in range(1, n + 1)]
    if not len(refs) == len(dmos) == len(orgs) == len(names):
        raise ValueError(f"{dpath}: {len(dmos)} scores, {len(orgs)} orgs; {npath}: {len(refs)} names; "
                         f"LIVE release 2 has {len(names)}")
    return [Record(n, "live", "synthetic", mos=100.0 - d, ref=ref, family=fam, extra={"dmos": d})
            for (n, fam), ref, d, o in zip(names, refs, dmos, orgs) if o == 0], ("", "databaserelease2")


def _pyiqa(fs, opts):
    path = opts["csv"]
    rows = [(r, row) for r, row in enumerate(_rows(path), start=1) if row and any(row)]
    if not rows:
        raise ValueError(f"{path}: row 1: empty file, expected image,mos")
    if len(rows[0][1]) < 2 or not re.fullmatch(r"\s*[-+]?[\d.]+(e[-+]?\d+)?\s*", rows[0][1][1], re.IGNORECASE):
        rows = rows[1:]  # a header row
    name, out = re.sub(r"^meta_info_|Dataset$", "", os.path.splitext(os.path.basename(path))[0]), []
    for r, row in rows:
        if len(row) < 2:
            raise ValueError(f"{path}: row {r}, column 2 (MOS): missing")
        out.append(Record(row[0], name, opts.get("domain") or "authentic", mos=_float(path, r, "2 (MOS)", row[1])))
    return out, ("",)


def _manifest(fs, opts):
    path, out = opts["csv"], []
    for r, v, extra in _table(path, {"image": ("image",), "mos": ("mos",)}):
        get = lambda k: str(extra.pop(k, None) or "").strip()  # noqa: E731
        attrs = {a: _float(path, r, a, s) for a in LABELLED if (s := get(a))}
        ref, family, level = get("ref") or None, get("family") or None, get("level")
        out.append(Record(str(v["image"]), get("dataset") or os.path.basename(os.path.abspath(fs.root)),
                          get("domain") or ("synthetic" if ref else "authentic"), get("split") or "all",
                          _float(path, r, "mos", v["mos"]), attrs, ref, family,
                          int(_float(path, r, "level", level)) if level else None, extra))
    return out, ("",)


READERS = {"koniq": _koniq, "spaq": _spaq, "livec": _livec, "kadid": _kadid, "csiq": _csiq, "tid2013": _tid2013,
           "bid": _bid, "agiqa3k": _agiqa3k, "agiqa1k": _agiqa1k, "pipal": _pipal, "live": _live,
           "pyiqa": _pyiqa, "manifest": _manifest}
DIRECTION = {"csiq": "higher is better (mos = 1 - DMOS)", "live": "higher is better (mos = 100 - DMOS)",
             "pyiqa": "taken as is (assumed higher is better)"}


def _load(name: str, root: str, **opts) -> tuple[list[Record], list[Record]]:
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(READERS)}")
    if name in ("pyiqa", "manifest"):  # root: the CSV itself, or a folder with file= naming the CSV
        if os.path.isfile(root):
            opts["csv"], root = root, os.path.dirname(root) or "."
        elif opts.get("file") or name == "manifest":
            opts["csv"] = os.path.join(root, opts.get("file") or "manifest.csv")  # file= may be absolute
        else:
            raise ValueError(f"pyiqa: {root!r} is a folder; pass the meta-info CSV as root, or file=")
        if not os.path.isfile(opts["csv"]):
            raise FileNotFoundError(f"{name}: no CSV at {opts['csv']!r}")
        if name == "manifest":
            root = os.path.dirname(opts["csv"]) or "."  # manifest images are relative to the CSV
    elif not os.path.isdir(root):
        raise FileNotFoundError(f"{name}: root {root!r} is not a folder")
    fs = _Files(root)
    records, subdirs = READERS[name](fs, opts)
    found, missing = [], []
    for rec in records:
        path = fs.find(rec.image, subdirs)
        (found if path else missing).append(replace(rec, image=path) if path else rec)
    return found, missing


def load_dataset(name: str, root: str, strict: bool = False, **opts) -> list[Record]:
    """Records of one dataset (module docstring lists the files). Listed images missing on disk are
    skipped with a warning naming the first few, or raise FileNotFoundError with strict=True."""
    found, missing = _load(name, root, **opts)
    if missing:
        msg = f"{name}: {len(missing)} of {len(found) + len(missing)} listed images missing under {root}: " + \
              ", ".join(r.image for r in missing[:5]) + (" ..." if len(missing) > 5 else "")
        if strict:
            raise FileNotFoundError(msg)
        warnings.warn(msg + " (skipped)", stacklevel=2)
    return found


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
    return {str(v["image"]): str(v["split"]) for _, v, _ in _table(path, {"image": ("image",), "split": ("split",)})}


def apply_split(records: list[Record], split: dict[str, str]) -> list[Record]:
    """Records with the saved split; an image the split does not list is an error (never guessed)."""
    absent = [r.image for r in records if r.image not in split]
    if absent:
        raise ValueError(f"{len(absent)} images are not in the saved split, e.g. {absent[:3]}")
    return [replace(r, split=split[r.image]) for r in records]


# ----------------------------------------------------------------------------- the sampler (SPEC 4)

def preferences(records: list[Record]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """labels (B, A) with NaN where absent; ground truth P and mask M, both (A, B, B), ATTRIBUTES order.
    Labelled pairs: P = 1 / 0.5 / 0 as y_i >, =, < y_j. Unlabelled pairs of one reference whose
    families map to the attribute (a clean image counts for every family) are ordered by level."""
    import torch  # here, not at the top: `data.py synth` and `summary` start in a second without it
    labels = np.array([[r.attributes.get(a, np.nan) for a in LABELLED] + [r.mos] for r in records])  # (B, A)
    y, off = labels.T, ~np.eye(len(records), dtype=bool)  # y: (A, B)
    with np.errstate(invalid="ignore"):
        M = ~np.isnan(y)[:, :, None] & ~np.isnan(y)[:, None, :] & off  # (A, B, B)
        P = (y[:, :, None] > y[:, None, :]) + 0.5 * (y[:, :, None] == y[:, None, :])
    refs = np.array([r.ref or "" for r in records])
    level = np.array([np.nan if r.level is None else r.level for r in records], dtype=float)
    same_ref = (refs[:, None] == refs[None, :]) & (refs != "")[:, None] & off
    by_level = (level[:, None] < level[None, :]) + 0.5 * (level[:, None] == level[None, :])
    clean = np.array([r.level == 0 and r.family is None for r in records])
    for a, name in enumerate(LABELLED):
        ok = clean | np.array([FAMILY_TO_ATTRIBUTE.get(r.family) == name and r.level is not None for r in records])
        meta = same_ref & ok[:, None] & ok[None, :] & ~M[a]
        P[a] = np.where(meta, by_level, P[a])
        M[a] |= meta
    return (torch.tensor(labels, dtype=torch.float32), torch.tensor(np.where(M, P, 0.5), dtype=torch.float32),
            torch.from_numpy(M))


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


# ----------------------------------------------------------------------------- synthetic distortions

SYNTH_FAMILIES = ("blur", "color", "noise", "composition")  # -> sharpness, color, noise, composition
LEVELS = {  # index = level 0-5; level 1 as PITFALLS' recipe (noise sigma 8, offset 0.1, saturation 0.8)
    "blur": (0.0, 0.8, 1.3, 1.9, 2.6, 3.5),          # gaussian sigma, pixels
    "color": (1.0, 0.8, 0.6, 0.4, 0.2, 0.0),         # saturation kept
    "noise": (0.0, 8.0, 16.0, 25.0, 36.0, 50.0),     # gaussian sigma, 0-255 scale
    "composition": (0.0, 0.1, 0.2, 0.3, 0.42, 0.55),  # subject offset from the centre, fraction of the side
}


def _wave(g: np.ndarray, freq: np.ndarray, cx: np.ndarray, cy: np.ndarray) -> np.ndarray:
    """sin(2 pi freq (cx x + cy y)) on the grid, (n, S, S), from the angle-sum identity: trig on (n, S) only."""
    ax, ay = 2 * np.pi * (freq * cx)[:, None] * g, 2 * np.pi * (freq * cy)[:, None] * g
    return np.sin(ay)[:, :, None] * np.cos(ax)[:, None, :] + np.cos(ay)[:, :, None] * np.sin(ax)[:, None, :]


def _scenes(rng, n: int, size: int) -> dict:
    """Backgrounds (n, 3, S, S) in [0, 1] (gradient, grating, three soft discs) and subject parameters.
    Channels first inside the generator: numpy broadcasts fast over a long last axis, slowly over 3."""
    u = lambda lo, hi, shape=(n,): rng.uniform(lo, hi, shape).astype(np.float32)  # noqa: E731
    g = np.linspace(0, 1, size, dtype=np.float32)
    X, Y = g[None, None, :], g[None, :, None]
    c, s = np.cos(u(0, 2 * np.pi, (2, n))), np.sin(u(0, 2 * np.pi, (2, n)))
    t = (X * c[0, :, None, None] + Y * s[0, :, None, None] - np.minimum(c[0], 0)[:, None, None]
         - np.minimum(s[0], 0)[:, None, None]) / (np.abs(c[0]) + np.abs(s[0]))[:, None, None]
    c0, c1 = u(0.15, 0.85, (2, n, 3, 1, 1))
    bg = c0 + (c1 - c0) * t[:, None] + (u(0.02, 0.06)[:, None, None] * _wave(g, u(3, 9), c[1], s[1]))[:, None]
    for _ in range(3):
        cx, cy, r = u(0, 1, (n, 1, 1)), u(0, 1, (n, 1, 1)), u(0.04, 0.14, (n, 1, 1))
        m = 0.5 * np.clip((r * r - (X - cx) ** 2 - (Y - cy) ** 2) / (2 * r) * size + 0.5, 0, 1)[:, None]
        bg += (u(0.1, 0.9, (n, 3, 1, 1)) - bg) * m
    rx = u(0.16, 0.24)
    color = rng.permuted(np.stack([np.ones(n), rng.uniform(0.1, 0.4, n), rng.uniform(0.5, 0.9, n)], 1), axis=1)
    return {"bg": bg, "centre": 0.5 + u(-0.04, 0.04, (n, 2)), "rx": rx, "ry": rx * u(0.8, 1.25),
            "square": rng.random(n) < 0.5, "color": (color * rng.uniform(0.7, 1.0, (n, 1))).astype(np.float32),
            "stripes": u(5, 10)}


def _render(sc: dict, idx: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Scenes idx with the subject (an ellipse or a rounded square, striped) moved by offset (N, 2):
    float images (N, 3, S, S)."""
    size = sc["bg"].shape[-1]
    g = np.linspace(0, 1, size, dtype=np.float32)
    cx, cy = (sc["centre"][idx] + offset.astype(np.float32)).T
    x2, y2 = ((g - cx[:, None]) / sc["rx"][idx, None]) ** 2, ((g - cy[:, None]) / sc["ry"][idx, None]) ** 2  # (N, S)
    sq = sc["square"][idx, None]
    x2, y2 = np.where(sq, x2 ** 3, x2), np.where(sq, y2 ** 3, y2)  # |.|^6: rounded square; |.|^2: ellipse
    q = y2[:, :, None] + x2[:, None, :]  # superellipse level, 1 on the outline
    p = np.where(sq[:, 0], 6, 2).astype(np.float32)[:, None, None]
    m = np.clip((1 - q) / p * (sc["rx"][idx, None, None] * size) + 0.5, 0, 1)  # ~one-pixel soft edge (d ~ 1 + (q-1)/p)
    pattern = 0.85 + 0.15 * _wave(g, sc["stripes"][idx], np.ones(len(idx), np.float32), np.ones(len(idx), np.float32))
    bg = sc["bg"][idx]
    return bg + (sc["color"][idx][:, :, None, None] * pattern[:, None] - bg) * m[:, None]


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    r, S = int(3 * sigma + 0.5), x.shape[-1]
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    p = np.pad(x, ((0, 0), (0, 0), (r, r), (0, 0)), mode="reflect")
    x = sum(w * p[:, :, j:j + S] for j, w in enumerate(k))
    p = np.pad(x, ((0, 0), (0, 0), (0, 0), (r, r)), mode="reflect")
    return sum(w * p[..., j:j + S] for j, w in enumerate(k))


def _distort(img: np.ndarray, levels: np.ndarray, rng) -> np.ndarray:
    """Blur, desaturate, add noise (in that order) at levels (N, 4) in SYNTH_FAMILIES order -> uint8."""
    for lv in range(1, 6):
        sel = levels[:, 0] == lv
        if sel.any():
            img[sel] = _blur(img[sel], LEVELS["blur"][lv])
    sel = levels[:, 1] > 0
    x = img[sel]
    gray = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    img[sel] = gray + np.take(np.float32(LEVELS["color"]), levels[sel, 1])[:, None, None, None] * (x - gray)
    sel = levels[:, 2] > 0
    sigma = np.take(np.float32(LEVELS["noise"]), levels[sel, 2])[:, None, None, None] / 255
    img[sel] += rng.standard_normal(img[sel].shape, dtype=np.float32) * sigma
    img = np.minimum(np.maximum(img * 255 + 0.5, 0, out=img), 255, out=img)  # np.clip is slower
    return img.transpose(0, 2, 3, 1).astype(np.uint8)  # (N, S, S, 3)


def _offsets(levels: np.ndarray, rng) -> np.ndarray:
    """Composition: the subject moves along a random axis direction by the level's offset."""
    direction = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]])[rng.integers(0, 4, len(levels))]
    return direction * np.take(LEVELS["composition"], levels)[:, None]


def _plan(n, seed, mode, per_ref, heldout_frac, dataset) -> tuple[np.ndarray, list[Record]]:
    """Levels (N, 4) in SYNTH_FAMILIES order and the records; scene s has images s_0 .. s_{per_ref-1}."""
    if mode not in ("family", "mixed") or (mode == "family" and per_ref < 2):
        raise ValueError(f"mode must be family (per_ref >= 2) or mixed, got {mode!r}, per_ref={per_ref}")
    rng = np.random.default_rng([seed, 0])
    n_scenes = math.ceil(n / per_ref)
    test = np.zeros(n_scenes, bool)
    test[rng.permutation(n_scenes)[:round(heldout_frac * n_scenes)]] = True
    levels = np.zeros((n_scenes, per_ref, 4), int)  # version 0 of a scene: clean (family mode)
    if mode == "family":  # versions cycle through a shuffled family order, each family at distinct levels
        rows, fams, lv = np.arange(n_scenes), rng.random((n_scenes, 4)).argsort(1), rng.random((n_scenes, 4, 5)).argsort(2) + 1
        for v in range(1, per_ref):
            levels[rows, v, fams[:, (v - 1) % 4]] = lv[rows, fams[:, (v - 1) % 4], (v - 1) // 4 % 5]
    else:
        levels = rng.integers(0, 6, (n_scenes, per_ref, 4))
    levels = levels.reshape(-1, 4)[:n]
    attrs = np.round(5 - 0.8 * levels, 2)
    mos = attrs.min(1) if mode == "family" else np.round((attrs.min(1) + attrs.mean(1)) / 2, 2)
    records = []
    for i, (lv, at, y) in enumerate(zip(levels.tolist(), attrs.tolist(), mos.tolist())):
        s, hit = i // per_ref, [f for f, l in zip(SYNTH_FAMILIES, lv) if l > 0]
        family, level = (hit[0], max(lv)) if mode == "family" and hit else (None, None if hit else 0)
        records.append(Record(f"s{s:05d}_{i % per_ref}.png", dataset, "synthetic", "test" if test[s] else "train",
                              y, dict(zip(LABELLED, at)), f"s{s:05d}", family, level))
    return levels, records


def _chunk(k: int, levels: np.ndarray, size: int, seed: int, per_ref: int, chunk: int) -> np.ndarray:
    """uint8 images of scenes k*chunk ... (k+1)*chunk - 1, from their own generator: any order, same pixels."""
    rng = np.random.default_rng([seed, 1, k])
    ids = np.arange(k * chunk * per_ref, min((k + 1) * chunk * per_ref, len(levels)))
    sc = _scenes(rng, math.ceil(len(ids) / per_ref), size)
    img = _render(sc, np.arange(len(sc["rx"])), np.zeros((1, 2)))[ids // per_ref - k * chunk]
    moved = levels[ids, 3] > 0  # only these need the subject drawn again
    img[moved] = _render(sc, ids[moved] // per_ref - k * chunk, _offsets(levels[ids[moved], 3], rng))
    return _distort(img, levels[ids], rng)


def _synth(n, size, seed, mode, per_ref, heldout_frac, dataset, work, chunk=32, threads=2):
    """Records and, chunk by chunk (numpy and PNG encoding release the GIL, so threads run in parallel),
    work(images, records) for each chunk's images."""
    from concurrent.futures import ThreadPoolExecutor
    levels, records = _plan(n, seed, mode, per_ref, heldout_frac, dataset)
    per = chunk * per_ref

    def job(k):
        return work(_chunk(k, levels, size, seed, per_ref, chunk), records[k * per:(k + 1) * per])
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(job, range(math.ceil(n / per))))
    return records, results


def synthesize(n: int, size: int, seed: int = 0, mode: str = "family", per_ref: int = 5, heldout_frac: float = 0.2,
               dataset: str = "synthetic", threads: int = 2) -> tuple[np.ndarray, list[Record]]:
    """In memory: uint8 images (N, S, S, 3) and their records (image = the file name make_synthetic uses)."""
    records, chunks = _synth(n, size, seed, mode, per_ref, heldout_frac, dataset, lambda a, r: a, threads=threads)
    return np.concatenate(chunks), records


def make_synthetic(out: str, n: int, size: int, seed: int = 0, mode: str = "family", per_ref: int = 5,
                   heldout_frac: float = 0.2, dataset: str = "synthetic", threads: int = 2) -> list[Record]:
    """PNG files, manifest.csv (the manifest format) and contact_sheet.png under out; deterministic."""
    from PIL import Image
    os.makedirs(out, exist_ok=True)

    def write(images, recs):
        for a, r in zip(images, recs):
            Image.fromarray(a).save(os.path.join(out, r.image), compress_level=1)
    records, _ = _synth(n, size, seed, mode, per_ref, heldout_frac, dataset, write, threads=threads)
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mos", *LABELLED, "split", "ref", "family", "level", "dataset"])
        w.writerows([r.image, r.mos, *(r.attributes[a] for a in LABELLED), r.split, r.ref, r.family or "",
                     "" if r.level is None else r.level, r.dataset] for r in records)
    contact_sheet(os.path.join(out, "contact_sheet.png"), max(size, 96), seed)
    return [replace(r, image=os.path.join(out, r.image)) for r in records]


def ladder(size: int = 96, seed: int = 0) -> np.ndarray:
    """One scene at every level of every family: uint8 (4, 6, S, S, 3), rows in SYNTH_FAMILIES order."""
    rng = np.random.default_rng([seed, 2])
    levels = np.zeros((24, 4), int)
    levels[np.arange(24), np.arange(24) // 6] = np.arange(24) % 6
    img = _render(_scenes(rng, 1, size), np.zeros(24, int), _offsets(levels[:, 3], rng))
    return _distort(img, levels, rng).reshape(4, 6, size, size, 3)


def contact_sheet(path: str, size: int = 96, seed: int = 0) -> None:
    """ladder() as a PNG: a row per attribute, its levels 0-5 left to right."""
    from PIL import Image, ImageDraw
    images, (pad, left, top) = ladder(size, seed), (4, 90, 18)
    sheet = Image.new("RGB", (left + 6 * (size + pad), top + 4 * (size + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for row in range(4):
        draw.text((4, top + row * (size + pad) + size // 2), LABELLED[row], fill="black")
        for lv in range(6):
            sheet.paste(Image.fromarray(images[row, lv]), (left + lv * (size + pad), top + row * (size + pad)))
            draw.text((left + lv * (size + pad) + size // 3, 3), f"level {lv}", fill="black")
    sheet.save(path)


# ----------------------------------------------------------------------------- command line

def summary(name: str, root: str, **opts) -> str:
    found, missing = _load(name, root, **opts)
    mos = [r.mos for r in found]
    splits = {s: sum(r.split == s for r in found) for s in ("train", "val", "test", "all")}
    attrs = sorted({a for r in found for a in r.attributes}, key=LABELLED.index)
    meta = {FAMILY_TO_ATTRIBUTE.get(r.family) for r in found if r.level is not None}
    by_ref = bool(found) and found[0].domain == "synthetic" and all(r.ref for r in found)
    made = "a reference-disjoint 60/20/20" if by_ref else "a seeded 80/20"
    return (f"{name}: {len(found)} images ({len(missing)} listed but missing on disk)\n"
            f"  splits: {', '.join(f'{k} {v}' for k, v in splits.items() if v)}"
            f"{f' (none official: split_records makes {made})' if splits['all'] else ''}\n"
            f"  MOS {min(mos, default=math.nan):.3f} .. {max(mos, default=math.nan):.3f}, "
            f"{DIRECTION.get(name, 'higher is better')}\n"
            f"  labels: overall (MOS); attributes {attrs or 'none'}; from metadata "
            f"{[a for a in LABELLED if a in meta] or 'none'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
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
    m.add_argument("datasets", nargs="+", help=f"NAME=ROOT[,FILE], NAME in {', '.join(READERS)}")
    args = parser.parse_args()
    if args.command == "synth":
        import time
        t0 = time.time()
        recs = make_synthetic(args.out, args.n, args.size, args.seed, args.mode, args.per_ref, args.heldout_frac)
        n_test = sum(r.split == "test" for r in recs)
        print(f"wrote {len(recs)} images ({n_test} test) to {args.out} in {time.time() - t0:.1f} s")
    else:
        failed = 0
        for spec in args.datasets:
            name, _, root = spec.partition("=")
            root, _, file = root.partition(",")
            try:
                print(summary(name, root, **({"file": file} if file else {})))
            except (OSError, ValueError) as err:  # report every dataset, then fail
                print(f"{name}: error: {err}")
                failed += 1
        raise SystemExit(1 if failed else 0)
