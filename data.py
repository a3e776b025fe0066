"""MG-IQA data: the Record, the benchmark datasets as their publishers ship them, splits, and the
domain-pure sampler that feeds GRPO (docs/METHOD.md, section 4 for the method, section 6 for the
files).

    records = data.load_dataset("kadid", "/data/kadid10k")
    records = data.load_dataset("pyiqa", "/data/csiq", file="meta_info_CSIQDataset.csv")
    name, root, opts = data.parse_spec("pyiqa=/data/x,meta.csv,direction=lower")   # the CLI form
    sampler = data.Sampler({"kadid": records}, batch_size=8)   # next(sampler): one batch
    python data.py summary koniq=/data/koniq10k pyiqa=/data/csiq,meta_info_CSIQDataset.csv
    python data.py summary pyiqa=/data/mine,meta_info_MineDataset.csv,direction=lower
    python data.py freeze kadid=/data/kadid10k spaq=/data/spaq --out frozen   # test lists, hashed

In this order: the Record; annotation files (CSV, .xlsx, .mat; every error names file, row and
column); the readers of 11 datasets, pyiqa meta-info CSVs and this project's manifest, in one table
(READERS), parse_spec and load_dataset; splits (split_records, save_split, load_split,
apply_split); image lists with SHA-256 hashes (what a model trained on, frozen test lists);
stratified_subset; the Sampler, whose batches carry the preferences of
reward.preferences; the command line (summary, freeze). The synthetic scenes are synth.py's.

Departures (levels, directions, the sampler, pair precedence): docs/METHOD.md, section 7,
departure 8.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import math
import os
import re
import sys
import warnings
import zlib
from dataclasses import dataclass, field, replace

import numpy as np

import reward
from mgiqa import FAMILY_TO_ATTRIBUTE, LABELLED


# ----------------------------------------------------------------------------- the record

@dataclass
class Record:
    """One image of a dataset, as every reader, split, sampler and report passes it around."""
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

    @property
    def clean(self) -> bool:
        """The undistorted image of its reference: it counts as the best of every family."""
        return self.family is None and self.level == 0


# ----------------------------------------------------------------------------- annotation files
# As their publishers ship them: CSV, .xlsx (any sheet, header below a title), .mat; every error
# names the file, the row and the column (`ValueError: dmos.csv: row 3, column 'dmos': 'n/a' is not
# a number`). openpyxl and scipy are imported only when an .xlsx or .mat is read.

def _lazy_import(package: str, what: str):
    try:
        return __import__(package)
    except ImportError:
        raise ImportError(f"reading {what} needs {package}: pip install {package}") from None


def _number(path, row, col, value) -> float:
    """value as a finite float, else ValueError naming file, row and column."""
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
        openpyxl = _lazy_import("openpyxl", f".xlsx files ({path})")
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
        out = []
        for sheet in book.worksheets:
            out += [list(r) for r in sheet.iter_rows(values_only=True)] + [None]
        book.close()
        return out
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.reader(f))


def _pick(header, columns):
    names = [str(c).strip().lower() if c is not None else "" for c in header or []]
    return {k: next((names.index(c.lower()) for c in cands if c.lower() in names), None)
            for k, cands in columns.items()}


def _table(path: str, columns: dict[str, tuple[str, ...]]):
    """Yield (row number, {key: value}, {other column: value}) below the first header row (of any
    sheet, within its first 50 rows) that holds every wanted column; candidates tried in order."""
    all_rows = _rows(path)
    filled = [i for i, r in enumerate(all_rows) if r and any(c not in (None, "") for c in r)]
    if not filled:
        wanted = [c[0] for c in columns.values()]
        raise ValueError(f"{path}: row 1: empty file, expected columns {wanted}")
    h = next((i for i in filled[:50] if None not in _pick(all_rows[i], columns).values()), None)
    if h is None:
        pick = _pick(all_rows[filled[0]], columns)
        missing = next(columns[k][0] for k, i in pick.items() if i is None)
        raise ValueError(f"{path}: row {filled[0] + 1}: missing column '{missing}' "
                         f"(header: {all_rows[filled[0]]})")
    header, pick = all_rows[h], _pick(all_rows[h], columns)
    n_data = 0
    for r, row in enumerate(all_rows[h + 1:], start=h + 2):
        if row is None:
            break  # end of this sheet
        if not any(c not in (None, "") for c in row):
            continue
        row, n_data = list(row) + [None] * (len(header) - len(row)), n_data + 1
        others = {str(header[i]): row[i] for i in range(len(header))
                  if i not in pick.values() and header[i] not in (None, "")}
        yield r, {k: row[i] for k, i in pick.items()}, others
    if n_data == 0:
        raise ValueError(f"{path}: row {h + 2}: no data rows below the header")


def _loadmat(path: str, var: str) -> np.ndarray:
    scipy = _lazy_import("scipy", f".mat files ({path})")
    import scipy.io  # noqa: F401
    mat = scipy.io.loadmat(path)
    if var not in mat:
        names = [k for k in mat if not k.startswith("__")]
        raise ValueError(f"{path}: no variable '{var}' (has {names})")
    return mat[var]


def _mat_strings(x) -> list[str]:
    return [str(np.asarray(v).ravel()[0]) if isinstance(v, np.ndarray) else str(v)
            for v in np.asarray(x, dtype=object).ravel()]


def _mat_floats(path, var, x) -> list[float]:
    return [_number(path, i + 1, var, v) for i, v in enumerate(np.asarray(x, dtype=object).ravel())]


class _Files:
    """Every file under root, looked up by relative path (with or without its extension: pyiqa's
    LIVE file lists jp2k/img2 for jp2k/img2.bmp), basename or stem (case-insensitive)."""

    def __init__(self, root: str):
        self.root, self.path, self.base, self.stem, self.relstem = root, {}, {}, {}, {}
        for d, _, files in sorted(os.walk(root)):
            for f in sorted(files):
                rel = os.path.relpath(os.path.join(d, f), root)
                key = rel.lower().replace(os.sep, "/")
                self.path.setdefault(key, rel)
                self.relstem.setdefault(os.path.splitext(key)[0], rel)
                self.base.setdefault(f.lower(), rel)
                self.stem.setdefault(os.path.splitext(f)[0].lower(), rel)

    def find(self, name: str, subdirs=("",)) -> str | None:
        if os.path.isabs(name):
            return name if os.path.isfile(name) else None
        name = name.replace("\\", "/")
        for index in (self.path, self.relstem):
            for sub in subdirs:
                rel = index.get(f"{sub}/{name}".strip("/").lower())
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


# ----------------------------------------------------------------------------- official annotations
# One reader per dataset; each returns its records with the listed names as image (load_dataset
# finds them on disk: first under the image folders of its READERS row, then anywhere,
# case-insensitively: TID2013 ships I01_01_1.bmp as i01_01_1.bmp). Annotation files are found
# anywhere under the dataset's root.
#   koniq    koniq10k_distributions_sets.csv (MOS, else MOS_zscore; official split from `set`), else
#            koniq10k_scores_and_distributions.csv; images from 1024x768/ before 512x384/.
#   spaq     MOS and Image attribute scores.xlsx; Sharpness/Colorfulness/Noisiness ->
#            sharpness/color/noise.
#   livec    AllImages_release.mat + AllMOS_release.mat (Data/); t1-t7 dropped by name; Images/.
#   kadid    dmos.csv (dist_img, ref_img, dmos = MOS 1-5); family from TT, level from LL of
#            Irr_TT_LL.
#   csiq     csiq.DMOS.xlsx (image, dst_type, dst_lev, dmos; the header row may sit below a title,
#            on any sheet); files dst_imgs/<type>/<image>.<TYPE>.<lev>.png (AWGN, BLUR, contrast,
#            fnoise, JPEG, jpeg2000); mos = 1 - dmos.
#   tid2013  mos_with_names.txt ("5.51429 I01_01_1.bmp", MOS 0-9); family from TT
#            (TID2013_FAMILIES).
#   bid      DatabaseGrades.xlsx (Image Number, Average Subjective Grade 0-5) ->
#            ImageDatabase/DatabaseImage0001.*
#   agiqa3k  data.csv (name, mos_quality; mos_align and the other columns kept in extra).
#   agiqa1k  AIGC_MOS_Zscore.xlsx (or .csv) from the publisher's repo: Image (or name), MOS.
#   pipal    Train_Label/*.txt, lines "A0001_00_00.bmp,1500.5" (ELO, higher better), images
#            Train_Distort/; ref = A0001, the two numeric fields kept in extra (type, subtype).
#   live     LIVE release 2: refnames_all.mat + dmos_realigned.mat (dmos_new; else dmos.mat,
#            dmos) with orgs; images jp2k/img1..227 jpeg/..233 wn/..174 gblur/..174
#            fastfading/..174 in that order; reference copies (orgs = 1) dropped, as pyiqa does;
#            mos = 100 - dmos.
#   pyiqa and manifest: their own sections below.

KADID_FAMILIES = {**dict.fromkeys(range(1, 4), "blur"), **dict.fromkeys(range(4, 9), "color"),
                  9: "compression", 10: "compression", **dict.fromkeys(range(11, 16), "noise"),
                  **dict.fromkeys(range(16, 19), "brightness"),
                  **dict.fromkeys(range(19, 24), "spatial"), 24: "sharpen", 25: "contrast"}
TID2013_FAMILIES = {**dict.fromkeys((1, 2, 3, 4, 5, 6, 7, 9, 19, 20), "noise"), 8: "blur",
                    **dict.fromkeys((10, 11, 12, 13, 21, 24), "compression"), 14: "spatial",
                    15: "spatial", 16: "brightness", 17: "contrast",
                    **dict.fromkeys((18, 22, 23), "color")}
CSIQ_TYPES = {"noise": ("awgn", "noise"), "awgn": ("awgn", "noise"), "f noise": ("fnoise", "noise"),
              "fnoise": ("fnoise", "noise"), "blur": ("blur", "blur"),
              "jpeg": ("jpeg", "compression"), "jpeg 2000": ("jpeg2000", "compression"),
              "jpeg2000": ("jpeg2000", "compression"),
              "contrast": ("contrast", "contrast")}
LIVE_FOLDERS = (("jp2k", 227, "compression"), ("jpeg", 233, "compression"), ("wn", 174, "noise"),
                ("gblur", 174, "blur"), ("fastfading", 174, "compression"))
SPAQ_ATTRIBUTES = {"sharpness": "Sharpness", "color": "Colorfulness", "noise": "Noisiness"}
KONIQ_SETS = {"training": "train", "train": "train", "validation": "val", "val": "val",
              "test": "test"}


def _name_fields(path, row, col, name) -> tuple[str, int, int]:
    m = re.match(r"(i\d+)_(\d+)_(\d+)", os.path.basename(str(name)), re.IGNORECASE)
    if not m:
        raise ValueError(f"{path}: row {row}, column '{col}': {name!r} is not named Irr_TT_LL")
    return m.group(1).upper(), int(m.group(2)), int(m.group(3))


def kadid_meta(path, row, col, name) -> tuple[str | None, int]:
    """(family, level) of a KADID-10k name I01_TT_LL."""
    _, tt, level = _name_fields(path, row, col, name)
    return KADID_FAMILIES.get(tt), level


def tid2013_meta(path, row, col, name) -> tuple[str | None, int]:
    """(family, level) of a TID2013 (or TID2008: the same first 17 types) name I01_TT_L."""
    _, tt, level = _name_fields(path, row, col, name)
    return TID2013_FAMILIES.get(tt), level


def csiq_kind(path, row, col, kind) -> tuple[str, str]:
    """(file-name token, family) of a CSIQ distortion type."""
    found = CSIQ_TYPES.get(str(kind).strip().lower())
    if found is None:
        raise ValueError(f"{path}: row {row}, column '{col}': unknown type {kind!r}")
    return found


def csiq_meta(path, row, col, name) -> tuple[str, int]:
    """(family, level) of a CSIQ file name <image>.<TYPE>.<lev>.png."""
    m = re.fullmatch(r"(.+)\.([^./]+)\.(\d+)\.\w+", os.path.basename(str(name)))
    if not m:
        raise ValueError(f"{path}: row {row}, column '{col}': {name!r} is not named "
                         "<image>.<TYPE>.<level>.png")
    return csiq_kind(path, row, col, m.group(2))[1], int(m.group(3))


def live_meta(path, row, col, name) -> tuple[str | None, None]:
    """(family, no level) of a LIVE name <folder>/imgN: LIVE has no discrete levels."""
    folder = str(name).replace("\\", "/").split("/")[0].lower()
    return {d: fam for d, _, fam in LIVE_FOLDERS}.get(folder), None


def _livec_keep(name: str) -> bool:
    return not re.fullmatch(r"t[1-7]\.\w+", os.path.basename(name))  # LIVE-C's 7 trial images


def _koniq(fs, opts):
    try:
        path, sets = fs.annotation("koniq", "koniq10k_distributions_sets.csv"), True
    except FileNotFoundError:
        path, sets = fs.annotation("koniq", "koniq10k_scores_and_distributions.csv"), False
    cols = {"image": ("image_name",), "mos": ("MOS", "MOS_zscore")}
    cols |= {"set": ("set",)} if sets else {}
    out = []
    for r, v, extra in _table(path, cols):
        split = KONIQ_SETS.get(str(v["set"]).strip().lower()) if sets else "all"
        if split is None:
            raise ValueError(f"{path}: row {r}, column 'set': unknown set {v['set']!r}")
        out.append(Record(str(v["image"]), "koniq", "authentic", split,
                          _number(path, r, "MOS", v["mos"]), extra=extra))
    return out


def _spaq(fs, opts):
    path = fs.annotation("spaq", "MOS and Image attribute scores.xlsx")
    cols = {"image": ("Image name",), "mos": ("MOS",)}
    cols |= {a: (c,) for a, c in SPAQ_ATTRIBUTES.items()}
    return [Record(str(v["image"]), "spaq", "authentic", mos=_number(path, r, "MOS", v["mos"]),
                   extra=extra,
                   attributes={a: _number(path, r, c, v[a]) for a, c in SPAQ_ATTRIBUTES.items()})
            for r, v, extra in _table(path, cols)]


def _livec(fs, opts):
    ipath = fs.annotation("livec", "AllImages_release.mat")
    mpath = fs.annotation("livec", "AllMOS_release.mat")
    names = _mat_strings(_loadmat(ipath, "AllImages_release"))
    mos = _mat_floats(mpath, "AllMOS_release", _loadmat(mpath, "AllMOS_release"))
    if len(names) != len(mos):
        raise ValueError(f"{ipath} lists {len(names)} images but {mpath} has {len(mos)} scores")
    return [Record(n, "livec", "authentic", mos=m) for n, m in zip(names, mos) if _livec_keep(n)]


def _kadid(fs, opts):
    path, out = fs.annotation("kadid", "dmos.csv"), []
    cols = {"image": ("dist_img",), "ref": ("ref_img",), "mos": ("dmos",)}
    for r, v, extra in _table(path, cols):
        family, level = kadid_meta(path, r, "dist_img", v["image"])
        out.append(Record(str(v["image"]), "kadid", "synthetic",
                          mos=_number(path, r, "dmos", v["mos"]), ref=str(v["ref"]), family=family,
                          level=level, extra=extra))
    return out


def _csiq(fs, opts):
    path, out = fs.annotation("csiq", "csiq.DMOS.xlsx"), []
    cols = {"image": ("image",), "type": ("dst_type",), "level": ("dst_lev",), "dmos": ("dmos",)}
    for r, v, extra in _table(path, cols):
        token, family = csiq_kind(path, r, "dst_type", v["type"])
        level = int(_number(path, r, "dst_lev", v["level"]))
        dmos = _number(path, r, "dmos", v["dmos"])
        image = str(v["image"]).strip().removesuffix(".0")
        out.append(Record(f"{image}.{token}.{level}.png", "csiq", "synthetic", mos=1.0 - dmos,
                          ref=image, family=family, level=level, extra=extra | {"dmos": dmos}))
    return out


def _tid2013(fs, opts):
    path, out = fs.annotation("tid2013", "mos_with_names.txt"), []
    with open(path, encoding="utf-8-sig") as f:
        lines = [(i, ln.split()) for i, ln in enumerate(f, start=1) if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: row 1: empty file, expected 'MOS name' lines")
    for r, parts in lines:
        if len(parts) < 2:
            raise ValueError(f"{path}: row {r}, column 2 (name): missing in {' '.join(parts)!r}")
        ref = _name_fields(path, r, "2 (name)", parts[1])[0]
        family, level = tid2013_meta(path, r, "2 (name)", parts[1])
        out.append(Record(parts[1], "tid2013", "synthetic",
                          mos=_number(path, r, "1 (MOS)", parts[0]), ref=ref, family=family,
                          level=level))
    return out


def _bid(fs, opts):
    path, out = fs.annotation("bid", "DatabaseGrades.xlsx"), []
    cols = {"image": ("Image Number", "Image"), "mos": ("Average Subjective Grade", "MOS")}
    for r, v, extra in _table(path, cols):
        image = v["image"]
        if not isinstance(image, str) or image.strip().isdigit():
            image = f"DatabaseImage{int(_number(path, r, 'Image Number', image)):04d}"
        mos = _number(path, r, cols["mos"][0], v["mos"])
        out.append(Record(image, "bid", "authentic", mos=mos, extra=extra))
    return out


def _agiqa3k(fs, opts):
    path = fs.annotation("agiqa3k", "data.csv")
    cols = {"image": ("name",), "mos": ("mos_quality",)}
    return [Record(str(v["image"]), "agiqa3k", "aigc",
                   mos=_number(path, r, "mos_quality", v["mos"]), extra=extra)
            for r, v, extra in _table(path, cols)]


def _agiqa1k(fs, opts):
    path = fs.annotation("agiqa1k", "AIGC_MOS_Zscore.xlsx", "AIGC_MOS_Zscore.csv")
    cols = {"image": ("Image", "name"), "mos": ("MOS", "mos")}
    return [Record(str(v["image"]), "agiqa1k", "aigc", mos=_number(path, r, "MOS", v["mos"]),
                   extra=extra)
            for r, v, extra in _table(path, cols)]


def _pipal(fs, opts):
    labels = sorted(p for k, p in fs.path.items()
                    if "label" in os.path.dirname(k) and k.endswith(".txt"))
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
                    mos = _number(path, r, "2 (score)", score)
                    out.append(Record(name, "pipal", "synthetic", mos=mos, ref=parts[0],
                                      extra={"type": parts[1], "subtype": parts[2]}))
    return out


def _live(fs, opts):
    npath = fs.annotation("live", "refnames_all.mat")
    try:
        dpath, var = fs.annotation("live", "dmos_realigned.mat"), "dmos_new"
    except FileNotFoundError:
        dpath, var = fs.annotation("live", "dmos.mat"), "dmos"
    refs = _mat_strings(_loadmat(npath, "refnames_all"))
    dmos = _mat_floats(dpath, var, _loadmat(dpath, var))
    orgs = _mat_floats(dpath, "orgs", _loadmat(dpath, "orgs"))
    names = [(f"{d}/img{k}.bmp", fam) for d, n, fam in LIVE_FOLDERS for k in range(1, n + 1)]
    if not len(refs) == len(dmos) == len(orgs) == len(names):
        raise ValueError(f"{dpath}: {len(dmos)} scores, {len(orgs)} orgs; {npath}: "
                         f"{len(refs)} names; LIVE release 2 has {len(names)}")
    return [Record(n, "live", "synthetic", mos=100.0 - d, ref=ref, family=fam, extra={"dmos": d})
            for (n, fam), ref, d, o in zip(names, refs, dmos, orgs) if o == 0]


# ----------------------------------------------------------------------------- pyiqa meta-info CSVs
# A pyiqa meta_info_<Name>Dataset.csv (root: the CSV, or the image folder with file=). No-reference
# layout: the image first (img_name, "Image name"), then mos, std, ...; full-reference, recognised
# by dist_name beside ref_name (PIPAL: hq_name): the distorted image, its score (mos, dmos or
# elo_score), the reference as ref, domain synthetic (reference-disjoint splits). The direction
# comes from the published file's name (PYIQA_FILES: CSIQ's dmos and LIVE's mos hold DMOS and are
# flipped as their readers flip them; KADID-10k's dmos is a MOS), else from direction=higher|lower;
# an unknown file is taken as higher is better (the documented default), with a warning if its
# column is called dmos. Family and level of KADID-10k, TID2013/2008 and CSIQ names (LIVE: family
# from the folder), SPAQ's attributes, a `split` column (KonIQ-10k's: training / validation / test,
# or pyiqa's codes 0 / 1 / 2), LIVEChallenge without t1-t7: as their own readers take them.
# Options: direction, domain, dataset (default <Name> of meta_info_<Name>Dataset.csv). A headerless
# file is read as image, score.

# (score direction, TOP of mos = TOP - score when lower is better, the (family, level) of a
# distorted image's name)
PYIQA_FILES = {"KADID10k": ("higher", None, kadid_meta), "TID2013": ("higher", None, tid2013_meta),
               "TID2008": ("higher", None, tid2013_meta), "CSIQ": ("lower", 1.0, csiq_meta),
               "LIVEIQA": ("lower", 100.0, live_meta), "PIPAL": ("higher", None, None),
               "KonIQ10k": ("higher", None, None), "SPAQ": ("higher", None, None),
               "LIVEChallenge": ("higher", None, None)}
PYIQA_COLUMNS = {"image": ("img_name", "image name", "image_name", "image", "name", "dist_name"),
                 "ref": ("ref_name", "hq_name"),
                 "score": ("mos", "dmos", "elo_score", "mos_zscore", "score")}
# pyiqa's KonIQ-10k file: 7,058 / 1,000 / 2,015
PYIQA_SPLITS = KONIQ_SETS | {"0": "train", "1": "val", "2": "test"}


def _pyiqa_name(path: str) -> str:
    return re.sub(r"^meta_info_|Dataset$", "", os.path.splitext(os.path.basename(path))[0])


def pyiqa_direction(path: str, opts: dict) -> tuple[str, float]:
    """(higher | lower, TOP) of a pyiqa file: the direction= option, else the published file's
    (PYIQA_FILES), else higher; a lower-is-better score becomes mos = TOP - score."""
    published = PYIQA_FILES.get(_pyiqa_name(path))
    direction = opts.get("direction") or (published[0] if published else "higher")
    if direction not in ("higher", "lower"):
        raise ValueError(f"pyiqa: direction must be higher or lower, got {direction!r}")
    return direction, (published[1] if published else None) or 0.0


def _pyiqa(fs, opts):
    path = opts["csv"]
    rows = [(r, [str(c).strip() for c in row]) for r, row in enumerate(_rows(path), start=1)
            if row and any(row)]
    if not rows:
        raise ValueError(f"{path}: row 1: empty file, expected img_name,mos,... or "
                         "ref_name,dist_name,mos,...")
    name, published = _pyiqa_name(path), PYIQA_FILES.get(_pyiqa_name(path))
    r0, header = rows[0]
    try:
        float(header[1] if len(header) > 1 else "")
        # headerless: image, score
        cols, header, full = {"image": 0, "ref": None, "score": 1}, [], False
    except ValueError:
        rows, low = rows[1:], [c.lower() for c in header]
        cols = {k: next((low.index(c) for c in cands if c in low), None)
                for k, cands in PYIQA_COLUMNS.items()}
        full = cols["ref"] is not None and "dist_name" in low
        if full:
            cols["image"] = low.index("dist_name")
        if cols["image"] is None or cols["score"] is None:
            missing = "image" if cols["image"] is None else "score"
            raise ValueError(f"{path}: row {r0}: unknown pyiqa layout {','.join(header)!r}: "
                             f"no {missing} column (one of {', '.join(PYIQA_COLUMNS[missing])}); "
                             "expected img_name,mos,... (no-reference) "
                             "or ref_name,dist_name,mos|dmos,... (full-reference)")
    score_col = header[cols["score"]] if header else "2 (MOS)"
    direction, top = pyiqa_direction(path, opts)
    if published is None and "direction" not in opts and score_col.lower() == "dmos":
        warnings.warn(f"{path}: column 'dmos' in a file this reader does not know (known: "
                      f"meta_info_<Name>Dataset.csv for {', '.join(PYIQA_FILES)}): taken as "
                      "higher is better; pass direction=lower "
                      "(CLI: pyiqa=ROOT,FILE,direction=lower) if lower is better", stacklevel=4)
    meta = published[2] if published and full else None
    attrs = {a: next((i for i, c in enumerate(header) if c.lower() == col.lower()), None)
             for a, col in SPAQ_ATTRIBUTES.items()} if name == "SPAQ" else {}
    split_col = next((i for i, c in enumerate(header) if c.lower() == "split"), None)
    dataset, out, skip = opts.get("dataset") or name, [], set(cols.values()) | set(attrs.values())
    # SPAQ repeats Brightness: a repeated column is named column.1, column.2, ...
    names = [c if c not in header[:i] else f"{c}.{header[:i].count(c)}"
             for i, c in enumerate(header)]
    for r, row in rows:
        if len(row) <= max(i for i in cols.values() if i is not None):
            raise ValueError(f"{path}: row {r}, column '{score_col}': missing")
        image, score = row[cols["image"]], _number(path, r, score_col, row[cols["score"]])
        if name == "LIVEChallenge" and not _livec_keep(image):
            continue
        extra = {names[i]: row[i] for i in range(min(len(header), len(row))) if i not in skip}
        split = "all"
        if split_col is not None:
            split = PYIQA_SPLITS.get(row[split_col].lower())
            if split is None:
                raise ValueError(f"{path}: row {r}, column '{header[split_col]}': unknown split "
                                 f"{row[split_col]!r} (known: {', '.join(PYIQA_SPLITS)})")
            extra.pop(header[split_col])
        family, level = meta(path, r, header[cols["image"]], image) if meta else (None, None)
        domain = opts.get("domain") or ("synthetic" if full else "authentic")
        labels = {a: _number(path, r, header[i], row[i]) for a, i in attrs.items() if i is not None}
        out.append(Record(image, dataset, domain, split,
                          score if direction == "higher" else top - score, labels,
                          row[cols["ref"]] if full else None, family, level,
                          extra | ({score_col: score} if direction == "lower" else {})))
    return out


# ----------------------------------------------------------------------------- manifest files
# This project's CSV (manifest.csv in root, or the CSV as root; images relative to it): image, mos,
# optional sharpness/color/noise/composition, split, ref, family, level, dataset, domain. synth.py
# writes one.

def _manifest(fs, opts):
    path, out = opts["csv"], []
    for r, v, extra in _table(path, {"image": ("image",), "mos": ("mos",)}):

        def get(column):
            """The row's value of an optional column, "" when absent (taken out of extra)."""
            return str(extra.pop(column, None) or "").strip()
        attrs = {a: _number(path, r, a, s) for a in LABELLED if (s := get(a))}
        ref, family, level = get("ref") or None, get("family") or None, get("level")
        dataset = get("dataset") or os.path.basename(os.path.abspath(fs.root))
        domain = get("domain") or ("synthetic" if ref else "authentic")
        out.append(Record(str(v["image"]), dataset, domain, get("split") or "all",
                          _number(path, r, "mos", v["mos"]), attrs, ref, family,
                          int(_number(path, r, "level", level)) if level else None, extra))
    return out


# ----------------------------------------------------------------------------- the table of readers
# name: (reader(files, options) -> records, image folders tried first, the options it takes)

READERS = {
    "koniq": (_koniq, ("1024x768", "512x384", ""), ()),
    "spaq": (_spaq, ("TestImage", ""), ()),
    "livec": (_livec, ("Images", ""), ()),
    "kadid": (_kadid, ("images", ""), ()),
    "csiq": (_csiq, ("dst_imgs", ""), ()),
    "tid2013": (_tid2013, ("distorted_images", ""), ()),
    "bid": (_bid, ("ImageDatabase", ""), ()),
    "agiqa3k": (_agiqa3k, ("AGIQA-3K", ""), ()),
    "agiqa1k": (_agiqa1k, ("file", ""), ()),
    "pipal": (_pipal, ("Train_Distort", ""), ()),
    "live": (_live, ("", "databaserelease2"), ()),
    "pyiqa": (_pyiqa, ("",), ("file", "direction", "domain", "dataset")),
    "manifest": (_manifest, ("",), ("file",)),
}
DIRECTION = {"csiq": "higher is better (mos = 1 - DMOS)",
             "live": "higher is better (mos = 100 - DMOS)"}


def parse_spec(spec: str) -> tuple[str, str, dict]:
    """The command-line form NAME=ROOT[,FILE][,KEY=VALUE ...] -> (name, root, options for
    load_dataset)."""
    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"expected NAME=ROOT[,FILE][,KEY=VALUE ...], got {spec!r}")
    root, *parts = rest.split(",")
    opts = {}
    for part in parts:
        key, eq, value = part.partition("=")
        if not eq and "file" in opts:
            raise ValueError(f"{spec!r}: a second FILE {part!r}; options are KEY=VALUE")
        opts[key.strip() if eq else "file"] = value.strip() if eq else part.strip()
    return name, root, opts


def _load(name: str, root: str, **opts) -> tuple[list[Record], list[Record]]:
    """(records whose image is on disk, with its path; records whose image is not)."""
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(READERS)}")
    read, folders, options = READERS[name]
    unknown = sorted(set(opts) - set(options))
    if unknown:
        raise ValueError(f"{name}: unknown option {unknown[0]!r} "
                         f"(this reader takes: {', '.join(options) or 'none'})")
    if name in ("pyiqa", "manifest"):  # root: the CSV itself, or a folder with file= naming the CSV
        if os.path.isfile(root):
            opts["csv"], root = root, os.path.dirname(root) or "."
        elif opts.get("file") or name == "manifest":
            # file= may be absolute
            opts["csv"] = os.path.join(root, opts.get("file") or "manifest.csv")
        else:
            raise ValueError(f"pyiqa: {root!r} is a folder; pass the meta-info CSV as root, "
                             "or file=")
        if not os.path.isfile(opts["csv"]):
            raise FileNotFoundError(f"{name}: no CSV at {opts['csv']!r}")
        if name == "manifest":
            root = os.path.dirname(opts["csv"]) or "."  # manifest images are relative to the CSV
    elif not os.path.isdir(root):
        raise FileNotFoundError(f"{name}: root {root!r} is not a folder")
    fs = _Files(root)
    found, missing = [], []
    for rec in read(fs, opts):
        path = fs.find(rec.image, folders)
        (found if path else missing).append(replace(rec, image=path) if path else rec)
    return found, missing


def load_dataset(name: str, root: str, strict: bool = False, **opts) -> list[Record]:
    """Records of one dataset (the comments above each reader list its files). Listed images missing
    on disk are skipped with a warning naming the first few, or raise FileNotFoundError with
    strict=True."""
    found, missing = _load(name, root, **opts)
    if missing:
        msg = (f"{name}: {len(missing)} of {len(found) + len(missing)} listed images missing "
               f"under {root}: " + ", ".join(r.image for r in missing[:5])
               + (" ..." if len(missing) > 5 else ""))
        if strict:
            raise FileNotFoundError(msg)
        warnings.warn(msg + " (skipped)", stacklevel=2)
    return found


# ----------------------------------------------------------------------------- splits

def split_records(records: list[Record], seed: int = 0, synthetic_fractions=(0.6, 0.2, 0.2),
                  test_fraction: float = 0.2) -> list[Record]:
    """Per dataset: keep an official split; else a seeded reference-disjoint train/val/test split
    for synthetic datasets with references (as VisualQuality-R1 for KADID-10k); else seeded
    train/test."""
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
        split_of = {u: names[next(k for k, b in enumerate(bounds) if j < b)]
                    for j, u in enumerate(units)}
        for i in idx:
            unit = records[i].ref if grouped else records[i].image
            out[i] = replace(records[i], split=split_of[unit])
    return out


def save_split(records: list[Record], path: str, hashes: list[str] | None = None) -> None:
    """A CSV image,dataset,split[,sha256], written into a run so a resumed run keeps its images;
    with hashes it is also the run's image list (save_image_list's layout) that evaluation reads."""
    rows = [{"image": r.image, "dataset": r.dataset, "split": r.split} for r in records]
    if hashes is not None:
        rows = [{**row, "sha256": h} for row, h in zip(rows, hashes, strict=True)]
    columns = IMAGE_LIST_COLUMNS if hashes is not None else IMAGE_LIST_COLUMNS[:3]
    save_image_list(rows, path, columns=columns)


def load_split(path: str) -> dict[str, str]:
    """{image: split} from save_split's CSV."""
    rows = _table(path, {"image": ("image",), "split": ("split",)})
    return {str(v["image"]): str(v["split"]) for _, v, _ in rows}


def apply_split(records: list[Record], split: dict[str, str]) -> list[Record]:
    """Records with the saved split; an image the split does not list is an error (never
    guessed)."""
    absent = [r.image for r in records if r.image not in split]
    if absent:
        raise ValueError(f"{len(absent)} images are not in the saved split, e.g. {absent[:3]}")
    return [replace(r, split=split[r.image]) for r in records]


# ----------------------------------------------------------------------------- image lists
# One CSV layout for every list of images this project writes: image, dataset, split, sha256 (of
# the file's bytes). A run's split-<name>.csv files, the training_data.csv in every model folder
# grpo.py writes (what the model trained on: split "train"; the held-out rest: "val" / "test") and
# the frozen test lists of `data.py freeze` (image relative to the dataset's root) all use it, so
# evaluation can recognise a training image by its bytes under any name.

IMAGE_LIST_COLUMNS = ("image", "dataset", "split", "sha256")
TRAINING_DATA = "training_data.csv"  # in every model folder grpo.py writes
HASH_PROGRESS_EVERY = 1000  # files between two progress lines of sha256_files


def sha256_file(path: str) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: list[str], what: str = "images",
                 every: int = HASH_PROGRESS_EVERY) -> list[str]:
    """sha256_file of each path; on a large set (every files or more) a progress line on stderr
    every `every` files."""
    out = []
    for i, path in enumerate(paths, start=1):
        out.append(sha256_file(path))
        if len(paths) >= every and (i % every == 0 or i == len(paths)):
            print(f"hashing {what}: {i:,} / {len(paths):,} files", file=sys.stderr, flush=True)
    return out


def save_image_list(rows: list[dict], path: str, columns=IMAGE_LIST_COLUMNS) -> None:
    """rows ({column: value}) as a CSV, written to path.tmp and renamed (a crash leaves no half
    file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows([row[c] for c in columns] for row in rows)
    os.replace(f"{path}.tmp", path)


def load_image_list(path: str) -> list[dict]:
    """save_image_list's rows ({image, dataset, split, sha256}); a missing column or a malformed
    hash raises, naming the file and row."""
    wanted = {c: (c,) for c in IMAGE_LIST_COLUMNS}
    rows = []
    for r, v, _ in _table(path, wanted):
        row = {c: str(v[c] or "").strip() for c in IMAGE_LIST_COLUMNS}
        if not re.fullmatch(r"[0-9a-f]{64}", row["sha256"]):
            raise ValueError(f"{path}: row {r}, column 'sha256': {row['sha256']!r} is not a "
                             "SHA-256 hex digest")
        rows.append(row)
    return rows


def has_hashes(path: str) -> bool:
    """Whether path is an image list with a sha256 column (a run written before hashes had none)."""
    if not os.path.isfile(path):
        return False
    with open(path, newline="", encoding="utf-8") as f:
        return "sha256" in next(csv.reader(f), [])


def image_root(root: str) -> str:
    """The folder a dataset's image names are relative to: root, or the folder of a CSV given as
    root."""
    return root if os.path.isdir(root) else os.path.dirname(root) or "."


def select_test(records: list[Record], seed: int = 0) -> list[Record]:
    """The test split: the dataset's official one, else split_records' seeded one
    (reference-disjoint for a synthetic dataset with references), as grpo.py splits a dataset."""
    if not any(r.split == "test" for r in records):
        records = split_records(records, seed=seed)
    return [r for r in records if r.split == "test"]


def freeze(name: str, root: str, out_dir: str, seed: int = 0, **opts) -> tuple[str, int]:
    """Write one dataset's test split with the SHA-256 of each image to OUT_DIR/<dataset>.csv
    (image relative to the dataset's root); returns (path, images). evaluate.py --data
    NAME=ROOT,frozen=PATH scores exactly these images and refuses any whose bytes differ."""
    records = select_test(load_dataset(name, root, **opts), seed)
    if not records:
        raise ValueError(f"{name}: no test images under {root}")
    base = image_root(root)
    hashes = sha256_files([r.image for r in records], what=name)
    rows = [{"image": os.path.relpath(r.image, base).replace(os.sep, "/"), "dataset": r.dataset,
             "split": r.split, "sha256": h} for r, h in zip(records, hashes)]
    path = os.path.join(out_dir, f"{records[0].dataset}.csv")
    save_image_list(rows, path)
    return path, len(rows)


def frozen_records(records: list[Record], root: str, path: str) -> tuple[list[Record], list[str]]:
    """The records a frozen list names (image relative to root), in its order, each carrying the
    expected hash as extra["sha256"] for the caller to check; and the listed names not found."""
    base = image_root(root)
    by_name = {os.path.relpath(r.image, base).replace(os.sep, "/").lower(): r for r in records}
    kept, missing = [], []
    for row in load_image_list(path):
        rec = by_name.get(row["image"].replace("\\", "/").lower())
        if rec is None or not os.path.isfile(rec.image):
            missing.append(row["image"])
        else:
            expected = {**rec.extra, "sha256": row["sha256"]}
            kept.append(replace(rec, split=row["split"], extra=expected))
    return kept, missing


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
    def largest_first(name):
        return -len(by_set[name])
    names = sorted(by_set, key=largest_first)  # stable: ties keep first appearance
    if n < len(names):
        quota = {k: int(i < n) for i, k in enumerate(names)}
    else:
        exact = {k: (n - len(names)) * (len(by_set[k]) - 1) / (len(records) - len(names))
                 for k in names}
        quota = {k: 1 + math.floor(exact[k]) for k in names}

        def largest_remainder(name):
            return -(exact[name] - math.floor(exact[name]))
        for k in sorted(names, key=largest_remainder)[:n - sum(quota.values())]:
            quota[k] += 1
    keep = []
    for name, idx in by_set.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        keep += [idx[j] for j in rng.choice(len(idx), size=quota[name], replace=False)]
    return [records[i] for i in sorted(keep)]


# ----------------------------------------------------------------------------- the sampler

class Sampler:
    """Domain-pure batches: a dataset drawn with probability proportional to n^alpha, then B of its
    images; a dataset with references is drawn as a few references with several images each,
    those of one family (and the clean ones) first, so metadata pairs exist.

    Each batch: {"dataset", "domain", "records" (B), and reward.preferences of them:
    "labels" (B, A), ground truth "P" (A, B, B) and its mask "M" (A, B, B)}."""

    def __init__(self, datasets: dict[str, list[Record]], batch_size: int, alpha: float = 0.5,
                 seed: int = 0, refs_per_batch: int | None = None):
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
            # a family drawn in proportion to its images; its images and the clean ones first
            family = next((recs[i].family for i in members if recs[i].family), None)
            first = [i for i in members if recs[i].family == family
                     or recs[i].clean]
            chosen += (first + [i for i in members if i not in first])[:take]
        rest = np.setdiff1d(np.arange(len(recs)), chosen)
        size = min(self.batch_size - len(chosen), len(rest))
        return chosen + list(rng.choice(rest, size=size, replace=False))

    def sample(self) -> dict:
        name = self.names[self.rng.choice(len(self.names), p=self.probs)]
        recs = self.datasets[name]
        idx = self._from_refs(name) if name in self.by_ref else \
            self.rng.choice(len(recs), size=min(self.batch_size, len(recs)), replace=False)
        batch = [recs[int(i)] for i in idx]
        labels, P, M = reward.preferences(batch)
        return {"dataset": name, "domain": batch[0].domain, "records": batch, "labels": labels,
                "P": P, "M": M}

    __next__ = sample

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        return {"names": self.names, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise ValueError(f"sampler state is for datasets {state['names']}, this sampler has "
                             f"{self.names}")
        self.rng.bit_generator.state = state["rng"]


# ----------------------------------------------------------------------------- command line

def summary(name: str, root: str, **opts) -> str:
    """A few lines on one dataset: images found and missing, splits, MOS range and direction,
    labels."""
    found, missing = _load(name, root, **opts)
    mos = [r.mos for r in found]
    splits = {s: sum(r.split == s for r in found) for s in ("train", "val", "test", "all")}
    attrs = sorted({a for r in found for a in r.attributes}, key=LABELLED.index)
    meta = {FAMILY_TO_ATTRIBUTE.get(r.family) for r in found if r.level is not None}
    by_ref = bool(found) and found[0].domain == "synthetic" and all(r.ref for r in found)
    made = "a reference-disjoint 60/20/20" if by_ref else "a seeded 80/20"
    direction = DIRECTION.get(name, "higher is better")
    if name == "pyiqa":  # the file's own direction
        csv_path = root if os.path.isfile(root) else os.path.join(root, opts.get("file", ""))
        lower, top = pyiqa_direction(csv_path, opts)
        if lower == "lower":
            direction = f"lower-is-better score flipped: mos = {top:g} - score"
        else:
            direction = "higher is better, as given"
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
    sub = parser.add_subparsers(dest="command", required=True,
                                help="summary: check datasets; freeze: write hashed test lists")
    m = sub.add_parser("summary",
                       help="images, splits, MOS range, labels and missing files per dataset")
    m.add_argument("datasets", nargs="+",
                   help=f"NAME=ROOT[,FILE][,KEY=VALUE ...], NAME in {', '.join(READERS)}")
    f = sub.add_parser("freeze", help="each dataset's test split with the SHA-256 of every image, "
                                      "for evaluate.py --data NAME=ROOT,frozen=OUT/<dataset>.csv")
    f.add_argument("datasets", nargs="+", help="NAME=ROOT[,FILE][,KEY=VALUE ...], as for summary")
    f.add_argument("--out", required=True, help="folder for the lists, one <dataset>.csv each")
    f.add_argument("--seed", type=int, default=0,
                   help="seed of the split where a dataset has no official one (grpo.py --seed)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    failed = 0
    for spec in args.datasets:
        name = spec.partition("=")[0]
        try:
            name, root, opts = parse_spec(spec)
            if args.command == "freeze":
                path, n = freeze(name, root, args.out, seed=args.seed, **opts)
                print(f"{name}: {n:,} test images frozen in {path} (SHA-256 of each)")
            else:
                print(summary(name, root, **opts))
        except (OSError, ValueError) as err:  # report every dataset, then fail
            print(f"{name}: error: {err}")
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
