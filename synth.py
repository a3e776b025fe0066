"""Procedural images with graded distortions, for the CPU demo and the tests: no download needed.

    images, records = synth.synthesize(n, size)        # in memory: uint8 (N, S, S, 3) and records
    records = synth.make_synthetic(out, n, size)       # PNG files + manifest.csv + contact_sheet.png

A scene is a background (a gradient, a grating, three soft discs) with a striped subject (an ellipse
or a rounded square) in the middle. "family" mode (KADID-10k-shaped): each scene has a clean version
and versions that each carry ONE family (blur, desaturation, noise, the subject pushed off-centre)
at a level 1-5; the distorted attribute is 5 - 0.8 * level, the others 5, overall the minimum.
"mixed" mode: independent levels of all four, overall (min + mean) / 2. Held-out scenes are
disjoint from training scenes. Colour distortion is desaturation only (no cast): the recipe the
demo was measured with (docs/METHOD.md, docs/DEMO_NOTES.md).
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import replace

import numpy as np

from records import LABELLED, Record

SYNTH_FAMILIES = ("blur", "color", "noise", "composition")  # -> sharpness, color, noise, composition
LEVELS = {  # index = level 0-5; level 1 as the measured recipe (noise sigma 8, offset 0.1, saturation 0.8)
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

