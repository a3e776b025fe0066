"""Rank and linear correlation metrics of predicted scores against labels, in numpy.

Per dataset and per attribute: SRCC, KRCC (tau-b), PLCC raw and PLCC after the 4-parameter
logistic yhat = (b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2 (start b1 = max(y), b2 = min(y),
b3 = mean(x), b4 = std(x) / 4, as pyiqa and DeQA-Score; docs/METHOD.md). Ties are handled as
scipy.stats does; the fit is Levenberg-Marquardt (tests check it is as good as scipy's curve_fit).
A NaN prediction (an unparsed answer) is left out of a metric and counted, never replaced.

Within-family attribute SRCC: with one distortion family per image, an attribute's SRCC over all
images mostly measures which family an image has, so it is also reported over that family's
images plus the clean ones (attribute_srcc_within_family).
"""
from __future__ import annotations

import math

import numpy as np

from records import FAMILY_TO_ATTRIBUTE, LABELLED

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
        concordance += float((np.sign(x[i:i + chunk, None] - x) * np.sign(y[i:i + chunk, None] - y)).sum())
    untied = [n * (n - 1) - float(((c := np.unique(v, return_counts=True)[1]) * (c - 1)).sum()) for v in (x, y)]
    return float(concordance / math.sqrt(untied[0] * untied[1])) if min(untied) > 0 else math.nan


def logistic4(x, b) -> np.ndarray:
    """The logistic above; the sigmoid written with tanh so no exp() overflows."""
    b1, b2, b3, b4 = b
    return (b1 - b2) * 0.5 * (1.0 + np.tanh((np.asarray(x) - b3) / max(abs(b4), 1e-300) / 2.0)) + b2


def fit_logistic4(x, y, max_iter: int = 1000) -> np.ndarray:
    """Least-squares b for logistic4 from the start above: Levenberg-Marquardt with MINPACK's scaling
    (the largest diag(J^T J) seen so far, as scipy's curve_fit) and Nielsen's damping update."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    b = np.array([y.max(), y.min(), x.mean(), x.std() / 4.0])
    r = y - logistic4(x, b)
    sse, lam, nu, scale = float(r @ r), 1e-3, 2.0, np.zeros(4)
    for _ in range(max_iter):
        a = max(abs(b[3]), 1e-300)
        z = (x - b[2]) / a
        s = 0.5 * (1.0 + np.tanh(z / 2.0))
        ds = (b[0] - b[1]) * s * (1.0 - s)
        jac = np.stack([s, 1.0 - s, -ds / a, -ds * z / a * (1.0 if b[3] >= 0 else -1.0)], axis=1)  # (N, 4)
        jtj, jtr = jac.T @ jac, jac.T @ r
        scale = np.maximum(scale, np.diag(jtj))
        damping = scale + 1e-12 * (1.0 + scale.max())
        while lam < 1e16:
            step = np.linalg.solve(jtj + lam * np.diag(damping), jtr)  # positive definite: damping > 0
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


METRICS = {"srcc": srcc, "krcc": krcc, "plcc": lambda p, g: plcc(p, g, fit="logistic4"), "plcc_raw": plcc}


def bootstrap_ci(pred, gt, metric=srcc, n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float, float]:
    """(point estimate, low, high): percentile interval over n resamples of the finite pairs."""
    metric = METRICS[metric] if isinstance(metric, str) else metric
    x, y, _ = finite_pairs(pred, gt)
    rng = np.random.default_rng(seed)
    values = np.array([metric(x[idx], y[idx]) for idx in (rng.integers(0, x.size, x.size) for _ in range(n))])
    if not np.isfinite(values).any():
        return metric(x, y), math.nan, math.nan
    low, high = np.nanpercentile(values, [50 * (1 - level), 50 * (1 + level)])
    return metric(x, y), float(low), float(high)


def label(row_or_record, attribute: str) -> float:
    """The ground truth of one attribute (overall: the MOS) of a result row or a Record; NaN if absent."""
    if isinstance(row_or_record, dict):
        value = row_or_record["mos"] if attribute == "overall" else row_or_record["labels"].get(attribute)
    else:
        value = row_or_record.mos if attribute == "overall" else row_or_record.attributes.get(attribute)
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
                 if FAMILY_TO_ATTRIBUTE.get(rec.family) == a or (rec.family is None and rec.level == 0)]
        x, y, _ = finite_pairs([p for p, _ in pairs], [g for _, g in pairs])
        out[a] = srcc(x, y) if x.size >= 3 else math.nan
    return out
