"""Reading annotation files as their publishers ship them: CSV, .xlsx (any sheet, header below a
title), .mat, and finding the listed images under a dataset folder.

Every error names the file, the row and the column (`ValueError: dmos.csv: row 3, column 'dmos':
'n/a' is not a number`). openpyxl and scipy are imported only when an .xlsx or .mat is read.
"""
from __future__ import annotations

import csv
import math
import os

import numpy as np


def lazy_import(package: str, what: str):
    try:
        return __import__(package)
    except ImportError:
        raise ImportError(f"reading {what} needs {package}: pip install {package}") from None


def number(path, row, col, value) -> float:
    """value as a finite float, else ValueError naming file, row and column."""
    try:
        out = float(str(value).strip())
    except ValueError:
        out = math.nan
    if not math.isfinite(out):
        raise ValueError(f"{path}: row {row}, column '{col}': {value!r} is not a number")
    return out


def rows(path: str) -> list[list]:
    """All rows of a CSV or .xlsx (every sheet, concatenated with a None separator) as lists."""
    if path.lower().endswith(".xlsx"):
        openpyxl = lazy_import("openpyxl", f".xlsx files ({path})")
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
    return {k: next((names.index(c.lower()) for c in cands if c.lower() in names), None) for k, cands in columns.items()}


def table(path: str, columns: dict[str, tuple[str, ...]]):
    """Yield (row number, {key: value}, {other column: value}) below the first header row (of any
    sheet, within its first 50 rows) that holds every wanted column; candidates tried in order."""
    all_rows = rows(path)
    filled = [i for i, r in enumerate(all_rows) if r and any(c not in (None, "") for c in r)]
    if not filled:
        raise ValueError(f"{path}: row 1: empty file, expected columns {[c[0] for c in columns.values()]}")
    h = next((i for i in filled[:50] if None not in _pick(all_rows[i], columns).values()), None)
    if h is None:
        pick = _pick(all_rows[filled[0]], columns)
        missing = next(columns[k][0] for k, i in pick.items() if i is None)
        raise ValueError(f"{path}: row {filled[0] + 1}: missing column '{missing}' (header: {all_rows[filled[0]]})")
    header, pick = all_rows[h], _pick(all_rows[h], columns)
    n_data = 0
    for r, row in enumerate(all_rows[h + 1:], start=h + 2):
        if row is None:
            break  # end of this sheet
        if not any(c not in (None, "") for c in row):
            continue
        row, n_data = list(row) + [None] * (len(header) - len(row)), n_data + 1
        yield r, {k: row[i] for k, i in pick.items()}, {str(header[i]): row[i] for i in range(len(header))
                                                        if i not in pick.values() and header[i] not in (None, "")}
    if n_data == 0:
        raise ValueError(f"{path}: row {h + 2}: no data rows below the header")


def loadmat(path: str, var: str) -> np.ndarray:
    scipy = lazy_import("scipy", f".mat files ({path})")
    import scipy.io  # noqa: F401
    mat = scipy.io.loadmat(path)
    if var not in mat:
        raise ValueError(f"{path}: no variable '{var}' (has {[k for k in mat if not k.startswith('__')]})")
    return mat[var]


def mat_strings(x) -> list[str]:
    return [str(np.asarray(v).ravel()[0]) if isinstance(v, np.ndarray) else str(v) for v in np.asarray(x, dtype=object).ravel()]


def mat_floats(path, var, x) -> list[float]:
    return [number(path, i + 1, var, v) for i, v in enumerate(np.asarray(x, dtype=object).ravel())]


class Files:
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
