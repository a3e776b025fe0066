"""Benchmark datasets as their publishers ship them: one reader per dataset, and load_dataset.

    records = readers.load_dataset("kadid", "/data/kadid10k")            # also data.load_dataset
    records = readers.load_dataset("pyiqa", "/data/csiq", file="meta_info_CSIQDataset.csv")
    name, root, opts = readers.parse_spec("pyiqa=/data/x,meta.csv,direction=lower")   # the CLI form

Annotation files are found anywhere under root; image names are matched first under the listed
folders, then anywhere, case-insensitively (TID2013 ships I01_01_1.bmp as i01_01_1.bmp).
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
  pyiqa    a pyiqa meta-info CSV (root: the CSV, or the image folder with file=). No-reference layout:
           the image first (img_name, "Image name"), then mos, std, ...; full-reference, recognised
           by dist_name beside ref_name (PIPAL: hq_name): the distorted image, its score (mos, dmos
           or elo_score), the reference as ref, domain synthetic (reference-disjoint splits). The
           direction comes from the published file's name (PYIQA_FILES: CSIQ's dmos and LIVE's mos
           hold DMOS and are flipped as their readers flip them; KADID-10k's dmos is a MOS), else
           from direction=higher|lower; an unknown file is taken as higher is better (the
           documented default), with a warning if its column is called dmos. Family and level of
           KADID-10k, TID2013/2008 and CSIQ names (LIVE: family from the folder), SPAQ's attributes,
           a KonIQ `split` column, LIVEChallenge without t1-t7: as their own readers take them.
           Options: direction, domain, dataset (default <Name> of meta_info_<Name>Dataset.csv).
           A headerless file is read as image, score.
  manifest this project's CSV (manifest.csv in root, or the CSV as root): image, mos, optional
           sharpness/color/noise/composition, split, ref, family, level, dataset, domain.
"""
from __future__ import annotations

import os
import re
import warnings
from dataclasses import replace

from annotation_files import Files, loadmat, mat_floats, mat_strings, number, table
from annotation_files import rows as sheet_rows
from records import LABELLED, Record

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
SPAQ_ATTRIBUTES = {"sharpness": "Sharpness", "color": "Colorfulness", "noise": "Noisiness"}
KONIQ_SETS = {"training": "train", "train": "train", "validation": "val", "val": "val", "test": "test"}


# ----------------------------------------------------------------------------- names that carry metadata

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
        raise ValueError(f"{path}: row {row}, column '{col}': {name!r} is not named <image>.<TYPE>.<level>.png")
    return csiq_kind(path, row, col, m.group(2))[1], int(m.group(3))


def live_meta(path, row, col, name) -> tuple[str | None, None]:
    """(family, no level) of a LIVE name <folder>/imgN: LIVE has no discrete levels."""
    return {d: fam for d, _, fam in LIVE_FOLDERS}.get(str(name).replace("\\", "/").split("/")[0].lower()), None


def _livec_keep(name: str) -> bool:
    return not re.fullmatch(r"t[1-7]\.\w+", os.path.basename(name))  # LIVE Challenge's training images


# ----------------------------------------------------------------------------- readers
# Each returns (records with listed names as image, image subfolders to try first).

def _koniq(fs, opts):
    try:
        path, sets = fs.annotation("koniq", "koniq10k_distributions_sets.csv"), True
    except FileNotFoundError:
        path, sets = fs.annotation("koniq", "koniq10k_scores_and_distributions.csv"), False
    cols = {"image": ("image_name",), "mos": ("MOS", "MOS_zscore")} | ({"set": ("set",)} if sets else {})
    out = []
    for r, v, extra in table(path, cols):
        split = KONIQ_SETS.get(str(v["set"]).strip().lower()) if sets else "all"
        if split is None:
            raise ValueError(f"{path}: row {r}, column 'set': unknown set {v['set']!r}")
        out.append(Record(str(v["image"]), "koniq", "authentic", split, number(path, r, "MOS", v["mos"]), extra=extra))
    return out, ("1024x768", "512x384", "")


def _spaq(fs, opts):
    path = fs.annotation("spaq", "MOS and Image attribute scores.xlsx")
    cols = {"image": ("Image name",), "mos": ("MOS",)} | {a: (c,) for a, c in SPAQ_ATTRIBUTES.items()}
    out = [Record(str(v["image"]), "spaq", "authentic", mos=number(path, r, "MOS", v["mos"]), extra=extra,
                  attributes={a: number(path, r, c, v[a]) for a, c in SPAQ_ATTRIBUTES.items()})
           for r, v, extra in table(path, cols)]
    return out, ("TestImage", "")


def _livec(fs, opts):
    ipath, mpath = fs.annotation("livec", "AllImages_release.mat"), fs.annotation("livec", "AllMOS_release.mat")
    names, mos = mat_strings(loadmat(ipath, "AllImages_release")), loadmat(mpath, "AllMOS_release")
    mos = mat_floats(mpath, "AllMOS_release", mos)
    if len(names) != len(mos):
        raise ValueError(f"{ipath} lists {len(names)} images but {mpath} has {len(mos)} scores")
    return [Record(n, "livec", "authentic", mos=m) for n, m in zip(names, mos) if _livec_keep(n)], ("Images", "")


def _kadid(fs, opts):
    path, out = fs.annotation("kadid", "dmos.csv"), []
    for r, v, extra in table(path, {"image": ("dist_img",), "ref": ("ref_img",), "mos": ("dmos",)}):
        family, level = kadid_meta(path, r, "dist_img", v["image"])
        out.append(Record(str(v["image"]), "kadid", "synthetic", mos=number(path, r, "dmos", v["mos"]),
                          ref=str(v["ref"]), family=family, level=level, extra=extra))
    return out, ("images", "")


def _csiq(fs, opts):
    path, out = fs.annotation("csiq", "csiq.DMOS.xlsx"), []
    cols = {"image": ("image",), "type": ("dst_type",), "level": ("dst_lev",), "dmos": ("dmos",)}
    for r, v, extra in table(path, cols):
        token, family = csiq_kind(path, r, "dst_type", v["type"])
        level, dmos = int(number(path, r, "dst_lev", v["level"])), number(path, r, "dmos", v["dmos"])
        image = str(v["image"]).strip().removesuffix(".0")
        out.append(Record(f"{image}.{token}.{level}.png", "csiq", "synthetic", mos=1.0 - dmos, ref=image,
                          family=family, level=level, extra=extra | {"dmos": dmos}))
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
        ref, (family, level) = _name_fields(path, r, "2 (name)", parts[1])[0], tid2013_meta(path, r, "2 (name)", parts[1])
        out.append(Record(parts[1], "tid2013", "synthetic", mos=number(path, r, "1 (MOS)", parts[0]),
                          ref=ref, family=family, level=level))
    return out, ("distorted_images", "")


def _bid(fs, opts):
    path, out = fs.annotation("bid", "DatabaseGrades.xlsx"), []
    cols = {"image": ("Image Number", "Image"), "mos": ("Average Subjective Grade", "MOS")}
    for r, v, extra in table(path, cols):
        image = v["image"]
        if not isinstance(image, str) or image.strip().isdigit():
            image = f"DatabaseImage{int(number(path, r, 'Image Number', image)):04d}"
        out.append(Record(image, "bid", "authentic", mos=number(path, r, cols["mos"][0], v["mos"]), extra=extra))
    return out, ("ImageDatabase", "")


def _agiqa3k(fs, opts):
    path = fs.annotation("agiqa3k", "data.csv")
    return [Record(str(v["image"]), "agiqa3k", "aigc", mos=number(path, r, "mos_quality", v["mos"]), extra=extra)
            for r, v, extra in table(path, {"image": ("name",), "mos": ("mos_quality",)})], ("AGIQA-3K", "")


def _agiqa1k(fs, opts):
    path = fs.annotation("agiqa1k", "AIGC_MOS_Zscore.xlsx", "AIGC_MOS_Zscore.csv")
    return [Record(str(v["image"]), "agiqa1k", "aigc", mos=number(path, r, "MOS", v["mos"]), extra=extra)
            for r, v, extra in table(path, {"image": ("Image", "name"), "mos": ("MOS", "mos")})], ("file", "")


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
                    out.append(Record(name, "pipal", "synthetic", mos=number(path, r, "2 (score)", score),
                                      ref=parts[0], extra={"type": parts[1], "subtype": parts[2]}))
    return out, ("Train_Distort", "")


def _live(fs, opts):
    npath = fs.annotation("live", "refnames_all.mat")
    try:
        dpath, var = fs.annotation("live", "dmos_realigned.mat"), "dmos_new"
    except FileNotFoundError:
        dpath, var = fs.annotation("live", "dmos.mat"), "dmos"
    refs, dmos = mat_strings(loadmat(npath, "refnames_all")), mat_floats(dpath, var, loadmat(dpath, var))
    orgs = mat_floats(dpath, "orgs", loadmat(dpath, "orgs"))
    names = [(f"{d}/img{k}.bmp", fam) for d, n, fam in LIVE_FOLDERS for k in range(1, n + 1)]
    if not len(refs) == len(dmos) == len(orgs) == len(names):
        raise ValueError(f"{dpath}: {len(dmos)} scores, {len(orgs)} orgs; {npath}: {len(refs)} names; "
                         f"LIVE release 2 has {len(names)}")
    return [Record(n, "live", "synthetic", mos=100.0 - d, ref=ref, family=fam, extra={"dmos": d})
            for (n, fam), ref, d, o in zip(names, refs, dmos, orgs) if o == 0], ("", "databaserelease2")


# pyiqa's published meta_info_<Name>Dataset.csv: (score direction, TOP of mos = TOP - score when
# lower is better, the (family, level) of a distorted image's name)
PYIQA_FILES = {"KADID10k": ("higher", None, kadid_meta), "TID2013": ("higher", None, tid2013_meta),
               "TID2008": ("higher", None, tid2013_meta), "CSIQ": ("lower", 1.0, csiq_meta),
               "LIVEIQA": ("lower", 100.0, live_meta), "PIPAL": ("higher", None, None),
               "KonIQ10k": ("higher", None, None), "SPAQ": ("higher", None, None),
               "LIVEChallenge": ("higher", None, None)}
PYIQA_COLUMNS = {"image": ("img_name", "image name", "image_name", "image", "name", "dist_name"),
                 "ref": ("ref_name", "hq_name"), "score": ("mos", "dmos", "elo_score", "mos_zscore", "score")}


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
    rows = [(r, [str(c).strip() for c in row]) for r, row in enumerate(sheet_rows(path), start=1) if row and any(row)]
    if not rows:
        raise ValueError(f"{path}: row 1: empty file, expected img_name,mos,... or ref_name,dist_name,mos,...")
    name, published = _pyiqa_name(path), PYIQA_FILES.get(_pyiqa_name(path))
    r0, header = rows[0]
    try:
        float(header[1] if len(header) > 1 else "")
        cols, header, full = {"image": 0, "ref": None, "score": 1}, [], False  # headerless: image, score
    except ValueError:
        rows, low = rows[1:], [c.lower() for c in header]
        cols = {k: next((low.index(c) for c in cands if c in low), None) for k, cands in PYIQA_COLUMNS.items()}
        full = cols["ref"] is not None and "dist_name" in low
        if full:
            cols["image"] = low.index("dist_name")
        if cols["image"] is None or cols["score"] is None:
            missing = "image" if cols["image"] is None else "score"
            raise ValueError(f"{path}: row {r0}: unknown pyiqa layout {','.join(header)!r}: no {missing} column "
                             f"(one of {', '.join(PYIQA_COLUMNS[missing])}); expected img_name,mos,... (no-reference) "
                             f"or ref_name,dist_name,mos|dmos,... (full-reference)")
    score_col = header[cols["score"]] if header else "2 (MOS)"
    direction, top = pyiqa_direction(path, opts)
    if published is None and "direction" not in opts and score_col.lower() == "dmos":
        warnings.warn(f"{path}: column 'dmos' in a file this reader does not know (known: meta_info_<Name>Dataset.csv "
                      f"for {', '.join(PYIQA_FILES)}): taken as higher is better; pass direction=lower "
                      "(CLI: pyiqa=ROOT,FILE,direction=lower) if lower is better", stacklevel=4)
    meta = published[2] if published and full else None
    attrs = {a: next((i for i, c in enumerate(header) if c.lower() == col.lower()), None)
             for a, col in SPAQ_ATTRIBUTES.items()} if name == "SPAQ" else {}
    split_col = next((i for i, c in enumerate(header) if c.lower() == "split"), None)
    dataset, out, skip = opts.get("dataset") or name, [], set(cols.values()) | set(attrs.values())
    names = [c if c not in header[:i] else f"{c}.{header[:i].count(c)}" for i, c in enumerate(header)]  # SPAQ repeats Brightness
    for r, row in rows:
        if len(row) <= max(i for i in cols.values() if i is not None):
            raise ValueError(f"{path}: row {r}, column '{score_col}': missing")
        image, score = row[cols["image"]], number(path, r, score_col, row[cols["score"]])
        if name == "LIVEChallenge" and not _livec_keep(image):
            continue
        extra = {names[i]: row[i] for i in range(min(len(header), len(row))) if i not in skip}
        split = "all"
        if split_col is not None:
            split = KONIQ_SETS.get(row[split_col].lower())
            if split is None:
                raise ValueError(f"{path}: row {r}, column '{header[split_col]}': unknown split {row[split_col]!r}")
            extra.pop(header[split_col])
        family, level = meta(path, r, header[cols["image"]], image) if meta else (None, None)
        out.append(Record(image, dataset, opts.get("domain") or ("synthetic" if full else "authentic"), split,
                          score if direction == "higher" else top - score,
                          {a: number(path, r, header[i], row[i]) for a, i in attrs.items() if i is not None},
                          row[cols["ref"]] if full else None, family, level,
                          extra | ({score_col: score} if direction == "lower" else {})))
    return out, ("",)


def _manifest(fs, opts):
    path, out = opts["csv"], []
    for r, v, extra in table(path, {"image": ("image",), "mos": ("mos",)}):
        get = lambda k: str(extra.pop(k, None) or "").strip()  # noqa: E731
        attrs = {a: number(path, r, a, s) for a in LABELLED if (s := get(a))}
        ref, family, level = get("ref") or None, get("family") or None, get("level")
        out.append(Record(str(v["image"]), get("dataset") or os.path.basename(os.path.abspath(fs.root)),
                          get("domain") or ("synthetic" if ref else "authentic"), get("split") or "all",
                          number(path, r, "mos", v["mos"]), attrs, ref, family,
                          int(number(path, r, "level", level)) if level else None, extra))
    return out, ("",)


READERS = {"koniq": _koniq, "spaq": _spaq, "livec": _livec, "kadid": _kadid, "csiq": _csiq, "tid2013": _tid2013,
           "bid": _bid, "agiqa3k": _agiqa3k, "agiqa1k": _agiqa1k, "pipal": _pipal, "live": _live,
           "pyiqa": _pyiqa, "manifest": _manifest}
OPTIONS = {"pyiqa": ("file", "direction", "domain", "dataset"), "manifest": ("file",)}
DIRECTION = {"csiq": "higher is better (mos = 1 - DMOS)", "live": "higher is better (mos = 100 - DMOS)"}


# ----------------------------------------------------------------------------- loading

def parse_spec(spec: str) -> tuple[str, str, dict]:
    """The command-line form NAME=ROOT[,FILE][,KEY=VALUE ...] -> (name, root, options for load_dataset)."""
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
    if name not in READERS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(READERS)}")
    unknown = sorted(set(opts) - set(OPTIONS.get(name, ())))
    if unknown:
        raise ValueError(f"{name}: unknown option {unknown[0]!r} (this reader takes: {', '.join(OPTIONS.get(name, ())) or 'none'})")
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
    fs = Files(root)
    records, subdirs = READERS[name](fs, opts)
    found, missing = [], []
    for rec in records:
        path = fs.find(rec.image, subdirs)
        (found if path else missing).append(replace(rec, image=path) if path else rec)
    return found, missing


def load_dataset(name: str, root: str, strict: bool = False, **opts) -> list[Record]:
    """Records of one dataset (the module docstring lists the files). Listed images missing on disk
    are skipped with a warning naming the first few, or raise FileNotFoundError with strict=True."""
    found, missing = _load(name, root, **opts)
    if missing:
        msg = f"{name}: {len(missing)} of {len(found) + len(missing)} listed images missing under {root}: " + \
              ", ".join(r.image for r in missing[:5]) + (" ..." if len(missing) > 5 else "")
        if strict:
            raise FileNotFoundError(msg)
        warnings.warn(msg + " (skipped)", stacklevel=2)
    return found
