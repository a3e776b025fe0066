"""Images with graded distortions for the CPU demo and the tests, from procedural scenes or from real
photographs (assets/photos): no download needed.

    images, records = synth.synthesize(n, size)          # procedural scenes: uint8 (N, S, S, 3) and records
    images, records = synth.synthesize_photos(n, size)   # crops of the seven photos, same shapes
    records = synth.make_synthetic(out, n, size, source="photos")  # PNGs, manifest.csv, contact_sheet.png
    python synth.py runs/synth --n 15000 --size 96 --seed 0 [--mode family|mixed] [--per-ref 5]
        [--heldout-frac 0.2] [--source procedural|photos] [--heldout-photos astronaut,coffee]

Procedural scenes: a background (a gradient, a grating, three soft discs) with a striped subject (an
ellipse or a rounded square) in the middle. "family" mode (KADID-10k-shaped): each scene has a clean
version and versions that each carry ONE family (blur, desaturation, noise, the subject pushed
off-centre) at a level 1-5 (LEVELS); the distorted attribute is 5 - 0.8 * level, the others 5,
overall the minimum. "mixed" mode: independent levels of all four, overall (min + mean) / 2.
Held-out scenes are disjoint from training scenes. Colour distortion is desaturation only (no
cast): the recipe the demo was measured with (docs/METHOD.md, docs/DEMO_NOTES.md).

Photos (synthesize_photos; assets/photos/SOURCES.md: seven public-domain / CC0 photos from
scikit-image, downsized to 512 px): a scene is a square crop of one photo, its side and position drawn
per scene, resized to S; the same families, levels, labels and modes as above, with these departures:
- Blur and noise as LEVELS. Colour: desaturation as LEVELS plus a colour cast of random hue,
  channel gains 1 + PHOTO_CAST[level] * cos(hue - k 2 pi / 3) (0.05 at level 1 to 0.25 at level 5),
  so that the family shows on nearly grey content too (level 5: a tinted monochrome).
- Composition: five photos have a subject (PHOTOS: a box per photo, chosen by eye; retina's fundus
  disc sits on a black canvas, the photo's own background). A clean crop holds the subject near its
  centre (within +-4% of the side, 6% where a photo edge holds the crop back); level L moves the
  crop so that the subject moves LEVELS["composition"][L] of the side (0.1 ... 0.55) along an axis
  direction drawn among those that keep the crop on the photo: the subject is cut off or pushed to
  the border. Crop sides are bounded so that clean crops hold the subject and level 5 fits.
  hubble_deep_field and ihc have no subject (galaxies, tissue everywhere): their crops are drawn
  anywhere on the photo, they take part in blur, colour and noise only, their composition is always 5.
- Held out by photo: the test split's scenes are crops of HELDOUT_PHOTOS (astronaut, coffee: both
  have subjects, so all four families are scored) and training scenes never come from them, so the
  held-out score measures generalisation to new content. Records carry extra["photo"]; ref is
  "PHOTO_SCENE", one per scene. Each family's levels are balanced over each photo's scenes.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, replace

import numpy as np

from data import Record
from mgiqa import FAMILY_TO_ATTRIBUTE

# One entry per family: SYNTH_FAMILIES, the columns of every levels matrix and the attributes
# labelled follow from it (a new family also needs its distortion in _PIXEL_DISTORTIONS and an
# attribute in mgiqa.FAMILY_TO_ATTRIBUTE; checked at import)
LEVELS = {  # index = level 0-5; level 1 as the measured recipe (noise sigma 8, offset 0.1, saturation 0.8)
    "blur": (0.0, 0.8, 1.3, 1.9, 2.6, 3.5),          # gaussian sigma, pixels
    "color": (1.0, 0.8, 0.6, 0.4, 0.2, 0.0),         # saturation kept
    "noise": (0.0, 8.0, 16.0, 25.0, 36.0, 50.0),     # gaussian sigma, 0-255 scale
    "composition": (0.0, 0.1, 0.2, 0.3, 0.42, 0.55),  # subject offset from the centre, fraction of the side
}
SYNTH_FAMILIES = tuple(LEVELS)  # blur, color, noise, composition: the levels matrices' columns
COLUMN = {family: j for j, family in enumerate(SYNTH_FAMILIES)}  # its column in levels (N, F)
SYNTH_ATTRIBUTES = tuple(FAMILY_TO_ATTRIBUTE.get(f) for f in SYNTH_FAMILIES)  # each family's label
PIXEL_FAMILIES = tuple(f for f in SYNTH_FAMILIES if f != "composition")  # composition: a move


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


def _blur_family(img: np.ndarray, level: np.ndarray, rng, cast: np.ndarray | None) -> None:
    for lv in range(1, len(LEVELS["blur"])):
        sel = level == lv
        if sel.any():
            img[sel] = _blur(img[sel], LEVELS["blur"][lv])


def _color_family(img: np.ndarray, level: np.ndarray, rng, cast: np.ndarray | None) -> None:
    """Desaturation; cast (N, 3), photos only: channel gains minus 1 applied after it."""
    sel = level > 0
    x = img[sel]
    gray = 0.299 * x[:, :1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:]
    kept = np.take(np.float32(LEVELS["color"]), level[sel])[:, None, None, None]
    img[sel] = gray + kept * (x - gray)
    if cast is not None:
        img[sel] *= 1 + cast[sel][:, :, None, None].astype(np.float32)


def _noise_family(img: np.ndarray, level: np.ndarray, rng, cast: np.ndarray | None) -> None:
    sel = level > 0
    sigma = np.take(np.float32(LEVELS["noise"]), level[sel])[:, None, None, None] / 255
    img[sel] += rng.standard_normal(img[sel].shape, dtype=np.float32) * sigma


# family -> its distortion of float images (N, 3, S, S) in place, at levels (N,); _distort applies
# them in PIXEL_FAMILIES order (LEVELS' order)
_PIXEL_DISTORTIONS = {"blur": _blur_family, "color": _color_family, "noise": _noise_family}


def _check_families() -> None:
    """Fail at import, naming the family, where LEVELS, the distortions and the labels disagree."""
    for family, attribute in zip(SYNTH_FAMILIES, SYNTH_ATTRIBUTES, strict=True):
        if attribute is None:
            raise ValueError(f"synth family {family!r} has no attribute in "
                             f"mgiqa.FAMILY_TO_ATTRIBUTE")
        if family in PIXEL_FAMILIES and family not in _PIXEL_DISTORTIONS:
            raise ValueError(f"synth family {family!r} has LEVELS but no distortion in "
                             f"synth._PIXEL_DISTORTIONS")
    if len(set(SYNTH_ATTRIBUTES)) != len(SYNTH_ATTRIBUTES):
        raise ValueError(f"two synth families label one attribute: {SYNTH_ATTRIBUTES}")
    unknown = set(_PIXEL_DISTORTIONS) - set(PIXEL_FAMILIES)
    if unknown:
        raise ValueError(f"synth._PIXEL_DISTORTIONS has {sorted(unknown)}, not in LEVELS")


_check_families()


def _distort(img: np.ndarray, levels: np.ndarray, rng,
             cast: np.ndarray | None = None) -> np.ndarray:
    """Each of PIXEL_FAMILIES (blur, desaturate, add noise) in that order at levels (N, F), columns
    COLUMN -> uint8. cast (N, 3), photos only: the colour family's channel gains minus 1."""
    for family in PIXEL_FAMILIES:
        _PIXEL_DISTORTIONS[family](img, levels[:, COLUMN[family]], rng, cast)
    img = np.minimum(np.maximum(img * 255 + 0.5, 0, out=img), 255, out=img)  # np.clip is slower
    return img.transpose(0, 2, 3, 1).astype(np.uint8)  # (N, S, S, 3)


def _offsets(levels: np.ndarray, rng) -> np.ndarray:
    """Composition: the subject moves along a random axis direction by the level's offset."""
    direction = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]])[rng.integers(0, 4, len(levels))]
    return direction * np.take(LEVELS["composition"], levels)[:, None]


def _plan(n, seed, mode, per_ref, heldout_frac, dataset) -> tuple[np.ndarray, list[Record]]:
    """Levels (N, F), columns COLUMN, and the records; scene s has images s_0 .. s_{per_ref-1}."""
    if mode not in ("family", "mixed") or (mode == "family" and per_ref < 2):
        raise ValueError(f"mode must be family (per_ref >= 2) or mixed, got {mode!r}, per_ref={per_ref}")
    rng = np.random.default_rng([seed, 0])
    n_scenes = math.ceil(n / per_ref)
    test = np.zeros(n_scenes, bool)
    test[rng.permutation(n_scenes)[:round(heldout_frac * n_scenes)]] = True
    F = len(SYNTH_FAMILIES)
    levels = np.zeros((n_scenes, per_ref, F), int)  # version 0 of a scene: clean (family mode)
    if mode == "family":  # versions cycle through a shuffled family order, each family at distinct levels
        rows, fams = np.arange(n_scenes), rng.random((n_scenes, F)).argsort(1)
        lv = rng.random((n_scenes, F, 5)).argsort(2) + 1
        for v in range(1, per_ref):
            levels[rows, v, fams[:, (v - 1) % F]] = lv[rows, fams[:, (v - 1) % F], (v - 1) // F % 5]
    else:
        levels = rng.integers(0, 6, (n_scenes, per_ref, F))
    levels = levels.reshape(-1, F)[:n]
    scenes = [f"s{s:05d}" for s in range(n_scenes)]
    return levels, _records(levels, mode, per_ref, test, scenes, dataset)


def _records(levels, mode, per_ref, test, scenes, dataset, photo=None) -> list[Record]:
    """One Record per image from its levels (N, F): the distorted attribute 5 - 0.8 level, others 5;
    overall the minimum (family mode) or (min + mean) / 2 (mixed); scene s's images are s_0 .. s_{per_ref-1}."""
    attrs = np.round(5 - 0.8 * levels, 2)
    mos = attrs.min(1) if mode == "family" else np.round((attrs.min(1) + attrs.mean(1)) / 2, 2)
    records = []
    for i, (lv, at, y) in enumerate(zip(levels.tolist(), attrs.tolist(), mos.tolist())):
        s, hit = i // per_ref, [f for f, l in zip(SYNTH_FAMILIES, lv) if l > 0]
        family, level = (hit[0], max(lv)) if mode == "family" and hit else (None, None if hit else 0)
        extra = {} if photo is None else {"photo": photo[i]}
        records.append(Record(f"{scenes[s]}_{i % per_ref}.png", dataset, "synthetic", "test" if test[s] else "train",
                              y, dict(zip(SYNTH_ATTRIBUTES, at, strict=True)), scenes[s], family,
                              level, extra))
    return records


def _chunk(k: int, levels: np.ndarray, size: int, seed: int, per_ref: int, chunk: int, cast: bool = False) -> np.ndarray:
    """uint8 images of scenes k*chunk ... (k+1)*chunk - 1, from their own generator: any order, same pixels.
    cast: the colour family also carries the photos' colour cast (_casts), not desaturation alone."""
    rng = np.random.default_rng([seed, 1, k])
    ids = np.arange(k * chunk * per_ref, min((k + 1) * chunk * per_ref, len(levels)))
    sc = _scenes(rng, math.ceil(len(ids) / per_ref), size)
    img = _render(sc, np.arange(len(sc["rx"])), np.zeros((1, 2)))[ids // per_ref - k * chunk]
    composition, color = levels[ids, COLUMN["composition"]], levels[ids, COLUMN["color"]]
    moved = composition > 0  # only these need the subject drawn again
    img[moved] = _render(sc, ids[moved] // per_ref - k * chunk, _offsets(composition[moved], rng))
    return _distort(img, levels[ids], rng, _casts(rng, color) if cast else None)


def _synth(n, size, seed, mode, per_ref, heldout_frac, dataset, work, chunk=32, threads=2, cast=False):
    """Records and, chunk by chunk (numpy and PNG encoding release the GIL, so threads run in parallel),
    work(images, records) for each chunk's images."""
    from concurrent.futures import ThreadPoolExecutor
    levels, records = _plan(n, seed, mode, per_ref, heldout_frac, dataset)
    per = chunk * per_ref

    def job(k):
        return work(_chunk(k, levels, size, seed, per_ref, chunk, cast), records[k * per:(k + 1) * per])
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(job, range(math.ceil(n / per))))
    return records, results


def synthesize(n: int, size: int, seed: int = 0, mode: str = "family", per_ref: int = 5, heldout_frac: float = 0.2,
               dataset: str = "synthetic", threads: int = 2, cast: bool = False) -> tuple[np.ndarray, list[Record]]:
    """In memory: uint8 images (N, S, S, 3) and their records (image = the file name make_synthetic uses);
    cast: colour distortion as on the photos (desaturation and a colour cast), else desaturation only."""
    records, chunks = _synth(n, size, seed, mode, per_ref, heldout_frac, dataset, lambda a, r: a, threads=threads, cast=cast)
    return np.concatenate(chunks), records


# ----------------------------------------------------------------------------- real photographs

PHOTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "photos")  # NAME.jpg, SOURCES.md
# name: (subject box (x0, y0, x1, y1) as fractions of the photo's width and height, chosen by eye; the
# smallest crop side as a multiple of the box's longest side), or None: no subject
PHOTOS = {
    "astronaut": ((0.29, 0.02, 0.59, 0.36), 1.1),  # her head
    "chelsea": ((0.29, 0.26, 0.77, 0.86), 0.95),   # the cat's eyes and nose (its face fills the photo: close-ups)
    "coffee": ((0.29, 0.04, 0.69, 0.62), 1.1),     # the cup, the saucer around it
    "rocket": ((0.47, 0.30, 0.54, 0.86), 1.1),     # the rocket on its pad
    "retina": ((0.01, 0.01, 0.99, 0.99), 1.0),     # the fundus disc, on a black canvas (PHOTO_PAD)
    "hubble_deep_field": None,                     # galaxies everywhere
    "ihc": None,                                   # tissue everywhere
}
PHOTO_PAD = {"retina": 0.8}  # black margin (the photo's own background) around it, fraction of its longest side
HELDOUT_PHOTOS = ("astronaut", "coffee")  # never in training: a person and an object, both with subjects
PHOTO_CAST = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25)  # colour family: cast amplitude (channel gain 1 +- this) per level
PHOTO_JITTER = 0.04       # clean crops: the subject centre drawn within +-4% of the side from the frame's centre,
PHOTO_EDGE = 0.06         # or up to 6% when a photo edge holds the crop back (crops never leave the photo)
PHOTO_SCALE_MAX = 2.0     # largest crop side / the subject box's longest side (lower where the photo ends)
PHOTO_SCALE_FREE = (0.25, 0.7)  # subject-less photos: crop side / the photo's shorter side
_DIRECTIONS = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]])  # where the subject moves in the frame
_LOADED: dict = {}


@dataclass(frozen=True)
class Photo:
    name: str
    pyramid: tuple            # the canvas (photo + PHOTO_PAD) as PIL images at 1, 1/2, 1/4 ... of its size
    width: int                # canvas size, pixels
    height: int
    centre: tuple | None      # the subject box's centre on the canvas, pixels; None: no subject
    sides: tuple              # (smallest, largest) crop side, canvas pixels


def _clean_centres(side: np.ndarray, subject: np.ndarray, jitter: np.ndarray, dims: np.ndarray) -> np.ndarray:
    """Crop centres (n, 2): the subject centre moved by the jitter, held back so that the crop stays on the canvas."""
    return np.clip(subject + jitter * side[:, None], side[:, None] / 2, dims - side[:, None] / 2)


def _room(side: np.ndarray, centre: np.ndarray, dims: np.ndarray, level: int) -> np.ndarray:
    """(n, 4): whether moving the subject by level's offset in each of _DIRECTIONS keeps the crop on the canvas."""
    moved = centre[:, None] - (LEVELS["composition"][level] * side)[:, None, None] * _DIRECTIONS
    half = side[:, None, None] / 2
    return ((moved >= half - 1e-6) & (moved <= np.broadcast_to(dims, centre.shape)[:, None] - half + 1e-6)).all(2)


def load_photos(folder: str | None = None) -> dict[str, Photo]:
    """The seven photos (PHOTOS) from folder (default PHOTO_DIR = assets/photos beside this file), loaded
    once per folder, with each one's crop-side range: a clean crop holds the subject (side >= the
    photo's smallest scale times the box's longest side) near its centre (PHOTO_EDGE), and whatever
    the jitter, some direction leaves room to move the subject by level 5's offset."""
    folder = os.path.abspath(folder or PHOTO_DIR)
    if folder in _LOADED:
        return _LOADED[folder]
    from PIL import Image
    out = {}
    for name, subject in PHOTOS.items():
        path = os.path.join(folder, f"{name}.jpg")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"photo {name!r} missing: no file {path} "
                                    "(assets/photos/SOURCES.md says where the seven photos come from)")
        with Image.open(path) as im:
            im = im.convert("RGB")
        w, h = im.size
        pad = round(PHOTO_PAD.get(name, 0) * max(w, h))
        if pad:
            canvas = Image.new("RGB", (w + 2 * pad, h + 2 * pad))
            canvas.paste(im, (pad, pad))
            im = canvas
        W, H = im.size
        pyramid = [im]
        while len(pyramid) < 4 and min(pyramid[-1].size) >= 256:
            pyramid.append(pyramid[-1].reduce(2))
        if subject is None:
            centre, sides = None, tuple(f * min(W, H) for f in PHOTO_SCALE_FREE)
        else:
            (bx0, by0, bx1, by1), smallest = subject
            x0, y0, x1, y1 = pad + bx0 * w, pad + by0 * h, pad + bx1 * w, pad + by1 * h
            centre, longest = ((x0 + x1) / 2, (y0 + y1) / 2), max(x1 - x0, y1 - y0)
            near = min(centre[0], W - centre[0], centre[1], H - centre[1])
            lo, hi = smallest * longest, min(PHOTO_SCALE_MAX * longest, near / (0.5 - PHOTO_EDGE), W, H)
            grid = np.linspace(-PHOTO_JITTER, PHOTO_JITTER, 9)
            jitter = np.stack(np.meshgrid(grid, grid), -1).reshape(-1, 2)
            dims = np.array([W, H], float)
            for c in np.linspace(hi, lo, 200):  # the largest side with room for level 5 whatever the jitter
                side = np.full(len(jitter), c)
                if _room(side, _clean_centres(side, np.array(centre), jitter, dims), dims, 5).any(1).all():
                    break
            else:
                raise ValueError(f"{name}: subject box {subject[0]} leaves no room for level-5 composition")
            sides = (lo, float(c))
        out[name] = Photo(name, tuple(pyramid), W, H, centre, sides)
    _LOADED[folder] = out
    return out


def _frames(rng, photos: dict, scene_photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per scene: crop side (n,) and clean crop centre (n, 2), canvas pixels. Subject photos: the subject
    near the centre (_clean_centres); subject-less ones: anywhere on the photo."""
    n = len(scene_photo)
    lo, hi = np.array([photos[p].sides for p in scene_photo]).T
    side = lo + (hi - lo) * rng.random(n)
    dims = np.array([(photos[p].width, photos[p].height) for p in scene_photo], float)
    subj = np.array([photos[p].centre or (np.nan, np.nan) for p in scene_photo], float)
    free = side[:, None] / 2 + rng.random((n, 2)) * (dims - side[:, None])
    clean = _clean_centres(side, subj, rng.uniform(-PHOTO_JITTER, PHOTO_JITTER, (n, 2)), dims)
    return side, np.where(np.isnan(subj), free, clean)


def _moved(rng, photos: dict, photo: np.ndarray, side: np.ndarray, centre: np.ndarray,
           level: np.ndarray) -> np.ndarray:
    """Crop centres (N, 2) with the subject moved LEVELS["composition"][level] * side from its clean place in
    the frame, along one axis direction drawn among those that keep the crop on the canvas (level 0: unchanged)."""
    dims = np.array([(photos[p].width, photos[p].height) for p in photo], float)
    ok = np.zeros((len(level), 4), bool)
    for lv in range(6):
        sel = level == lv
        ok[sel] = _room(side[sel], centre[sel], dims[sel], lv)
    if not ok.any(1).all():
        raise AssertionError("no direction keeps the crop on the photo")  # load_photos' sides leave room
    pick = np.where(ok, rng.random(ok.shape), -1).argmax(1)
    shift = (np.take(LEVELS["composition"], level) * side)[:, None] * _DIRECTIONS[pick]
    return centre - shift  # the crop moves against the subject's move in the frame


def _casts(rng, level: np.ndarray) -> np.ndarray:
    """Colour cast (N, 3): channel gains minus 1, PHOTO_CAST[level] times a random hue direction (zero mean)."""
    hue = rng.uniform(0, 2 * np.pi, len(level))[:, None] - np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
    return np.take(PHOTO_CAST, level)[:, None] * np.cos(hue)


def _plan_photos(n, seed, mode, per_ref, heldout_frac, heldout_photos, dataset, photos):
    """Per image: photo name, crop side, crop centre, levels (N, F), columns COLUMN, cast; and the
    records. Scene s (images s_0 .. s_{per_ref-1}) is a crop of one photo; held-out scenes (a heldout_frac
    share) only from heldout_photos, training scenes only from the others."""
    if mode not in ("family", "mixed") or (mode == "family" and per_ref < 2):
        raise ValueError(f"mode must be family (per_ref >= 2) or mixed, got {mode!r}, per_ref={per_ref}")
    unknown = sorted(set(heldout_photos) - set(PHOTOS))
    if unknown:
        raise ValueError(f"unknown held-out photo {unknown[0]!r}; the photos: {', '.join(PHOTOS)}")
    rng = np.random.default_rng([seed, 3])
    n_scenes, F = math.ceil(n / per_ref), len(SYNTH_FAMILIES)
    test = np.zeros(n_scenes, bool)
    test[rng.permutation(n_scenes)[:round(heldout_frac * n_scenes)]] = True
    scene_photo = np.empty(n_scenes, object)
    for sel, pool in ((test, [p for p in PHOTOS if p in heldout_photos]),
                      (~test, [p for p in PHOTOS if p not in heldout_photos])):
        if sel.any() and not pool:
            raise ValueError(f"no photos left for the {'held-out' if sel is test else 'training'} scenes "
                             f"(heldout_photos={tuple(heldout_photos)}, heldout_frac={heldout_frac})")
        scene_photo[sel] = np.array(pool, dtype=object)[rng.permutation(np.arange(sel.sum()) % max(len(pool), 1))]
    subject = np.array([photos[p].centre is not None for p in scene_photo], bool)
    if mode == "family":  # versions cycle through a shuffled order of the photo's families, each at distinct levels
        levels = np.zeros((n_scenes, per_ref, F), int)
        order = rng.random((n_scenes, F))
        order[~subject, COLUMN["composition"]] = 2  # sorts last: unreached on subject-less photos
        rows, fams, nf = np.arange(n_scenes), order.argsort(1), np.where(subject, F, F - 1)
        keys = rng.random((n_scenes, F, 5))
        for p in PHOTOS:  # each family's first level cycles through 1-5 over a photo's scenes: every level shows up
            sel = np.flatnonzero(scene_photo == p)
            cycle = np.arange(len(sel) * F).reshape(F, -1) % 5
            first = rng.permuted(cycle, axis=1).T  # (scenes, families)
            keys[sel[:, None], np.arange(F), first] = -1
        lv = keys.argsort(2) + 1
        for v in range(1, per_ref):
            f = fams[rows, (v - 1) % nf]
            levels[rows, v, f] = lv[rows, f, (v - 1) // nf % 5]
    else:
        levels = rng.integers(0, 6, (n_scenes, per_ref, F))
        levels[~subject, :, COLUMN["composition"]] = 0
    side, centre = _frames(rng, photos, scene_photo)
    scene = np.arange(n) // per_ref
    levels = levels.reshape(-1, F)[:n]
    photo, side = scene_photo[scene], side[scene]
    centre = _moved(rng, photos, photo, side, centre[scene], levels[:, COLUMN["composition"]])
    cast = _casts(rng, levels[:, COLUMN["color"]])
    records = _records(levels, mode, per_ref, test, [f"{p}_{s:05d}" for s, p in enumerate(scene_photo)], dataset, photo)
    return {"photo": photo, "side": side, "centre": centre, "levels": levels, "cast": cast}, records


def _render_photos(photos: dict, photo, side, centre, levels, cast, size: int, rng) -> np.ndarray:
    """The crops (each distinct one resized once, bicubic from the pyramid level that keeps >= 2x of
    downscaling) with their distortions: uint8 (N, S, S, 3)."""
    from PIL import Image
    keys, crops = {}, []
    index = np.empty(len(photo), int)
    for i, (p, c, (x, y)) in enumerate(zip(photo, side.tolist(), centre.tolist())):
        key = (p, c, x, y)
        if key not in keys:
            pyramid, k = photos[p].pyramid, 0
            while k + 1 < len(pyramid) and c / 2 ** (k + 1) >= 2 * size:
                k += 1
            f = 2 ** k
            box = ((x - c / 2) / f, (y - c / 2) / f, (x + c / 2) / f, (y + c / 2) / f)
            keys[key] = len(crops)
            crops.append(np.asarray(pyramid[k].resize((size, size), Image.Resampling.BICUBIC, box=box)))
        index[i] = keys[key]
    out = np.stack(crops)[index]
    pixel = [COLUMN[f] for f in PIXEL_FAMILIES]
    todo = (levels[:, pixel] > 0).any(1)  # clean and composition-only images: the crops themselves
    if not todo.any():
        return out
    img = out[todo].transpose(0, 3, 1, 2).astype(np.float32, order="C")
    img *= np.float32(1 / 255)
    out[todo] = _distort(img, levels[todo], rng, cast[todo])
    return out


def _synth_photos(n, size, seed, mode, per_ref, heldout_frac, heldout_photos, dataset, work, chunk=160, threads=2):
    """As _synth, for crops of the photos: chunks of images, each with its own noise generator."""
    from concurrent.futures import ThreadPoolExecutor
    photos = load_photos()
    plan, records = _plan_photos(n, seed, mode, per_ref, heldout_frac, heldout_photos, dataset, photos)

    def job(k):
        sl = slice(k * chunk, (k + 1) * chunk)
        img = _render_photos(photos, *(plan[key][sl] for key in ("photo", "side", "centre", "levels", "cast")),
                             size, np.random.default_rng([seed, 4, k]))
        return work(img, records[sl])
    with ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(job, range(math.ceil(n / chunk))))
    return records, results


def synthesize_photos(n: int, size: int, seed: int = 0, mode: str = "family", per_ref: int = 5,
                      heldout_frac: float = 0.2, heldout_photos: tuple = HELDOUT_PHOTOS, dataset: str = "photos",
                      threads: int = 2) -> tuple[np.ndarray, list[Record]]:
    """KADID-style data from real photographs, in memory: uint8 images (N, S, S, 3) and their records,
    as synthesize(); records carry extra["photo"], ref = "PHOTO_SCENE". Held-out scenes (split "test",
    round(heldout_frac * scenes) of them) are crops of heldout_photos only, training scenes of the
    other photos only. Composition appears only on photos with a subject (PHOTOS): hubble_deep_field
    and ihc scenes cycle through blur, color and noise, their composition always 5."""
    records, chunks = _synth_photos(n, size, seed, mode, per_ref, heldout_frac, tuple(heldout_photos), dataset,
                                    lambda a, r: a, threads=threads)
    return np.concatenate(chunks), records


def _ladder_levels(families) -> np.ndarray:
    """Levels (6 len(families), F): each family's levels 0-5 in turn, the others clean."""
    rows = np.arange(6 * len(families))
    levels = np.zeros((len(rows), len(SYNTH_FAMILIES)), int)
    levels[rows, [COLUMN[f] for f in families for _ in range(6)]] = rows % 6
    return levels


def photo_ladder(photo: str, size: int = 96, seed: int = 0) -> dict[str, np.ndarray]:
    """One scene of photo at every level of each of its families: {family: uint8 (6, S, S, 3)}
    (no composition row for a photo without a subject)."""
    photos = load_photos()
    rng = np.random.default_rng([seed, 5, list(PHOTOS).index(photo)])
    fams = SYNTH_FAMILIES if photos[photo].centre is not None else PIXEL_FAMILIES
    levels = _ladder_levels(fams)
    name = np.full(len(levels), photo, dtype=object)
    side, centre = _frames(rng, photos, name[:1])
    side = np.repeat(side, len(levels))
    composition, color = levels[:, COLUMN["composition"]], levels[:, COLUMN["color"]]
    centre = _moved(rng, photos, name, side, np.repeat(centre, len(levels), 0), composition)
    img = _render_photos(photos, name, side, centre, levels, _casts(rng, color), size, rng)
    return dict(zip(fams, img.reshape(len(fams), 6, size, size, 3)))


# ----------------------------------------------------------------------------- files and contact sheets

def make_synthetic(out: str, n: int, size: int, seed: int = 0, mode: str = "family", per_ref: int = 5,
                   heldout_frac: float = 0.2, dataset: str | None = None, threads: int = 2,
                   source: str = "procedural", heldout_photos: tuple = HELDOUT_PHOTOS) -> list[Record]:
    """PNG files, manifest.csv (the manifest format; photos add a photo column) and contact_sheet.png
    under out; deterministic. source: procedural (synthesize) or photos (synthesize_photos);
    dataset defaults to "synthetic" or "photos"."""
    from PIL import Image
    if source not in ("procedural", "photos"):
        raise ValueError(f"source must be procedural or photos, got {source!r}")
    os.makedirs(out, exist_ok=True)

    def write(images, recs):
        for a, r in zip(images, recs):
            Image.fromarray(a).save(os.path.join(out, r.image), compress_level=1)
    if source == "photos":
        records, _ = _synth_photos(n, size, seed, mode, per_ref, heldout_frac, tuple(heldout_photos),
                                   dataset or "photos", write, threads=threads)
    else:
        records, _ = _synth(n, size, seed, mode, per_ref, heldout_frac, dataset or "synthetic", write, threads=threads)
    extra = ["photo"] if source == "photos" else []
    with open(os.path.join(out, "manifest.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "mos", *SYNTH_ATTRIBUTES, "split", "ref", "family", "level", "dataset",
                    *extra])
        w.writerows([r.image, r.mos, *(r.attributes[a] for a in SYNTH_ATTRIBUTES), r.split, r.ref,
                     r.family or "",
                     "" if r.level is None else r.level, r.dataset, *(r.extra[k] for k in extra)] for r in records)
    contact_sheet(os.path.join(out, "contact_sheet.png"), max(size, 96), seed, source)
    return [replace(r, image=os.path.join(out, r.image)) for r in records]


def ladder(size: int = 96, seed: int = 0) -> np.ndarray:
    """One scene at every level of every family: uint8 (F, 6, S, S, 3), rows: SYNTH_FAMILIES."""
    rng = np.random.default_rng([seed, 2])
    levels = _ladder_levels(SYNTH_FAMILIES)
    scene = _scenes(rng, 1, size)  # before the offsets: one generator, this order
    offsets = _offsets(levels[:, COLUMN["composition"]], rng)
    img = _render(scene, np.zeros(len(levels), int), offsets)
    return _distort(img, levels, rng).reshape(len(SYNTH_FAMILIES), 6, size, size, 3)


def _sheet(path: str, rows: list, size: int, left: int = 90, columns=range(6)) -> None:
    """rows: (label, uint8 (6, S, S, 3)) -> a PNG, one row each, the given levels left to right."""
    from PIL import Image, ImageDraw
    pad, top = 4, 18
    sheet = Image.new("RGB", (left + len(columns) * (size + pad), top + len(rows) * (size + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, images) in enumerate(rows):
        draw.text((4, top + row * (size + pad) + size // 2 - 6 * label.count("\n")), label, fill="black")
        for col, lv in enumerate(columns):
            sheet.paste(Image.fromarray(images[lv]), (left + col * (size + pad), top + row * (size + pad)))
            draw.text((left + col * (size + pad) + size // 3, 3), f"level {lv}", fill="black")
    sheet.save(path)


def contact_sheet(path: str, size: int = 96, seed: int = 0, source: str = "procedural",
                  photos: tuple | None = None, columns=range(6)) -> None:
    """ladder() as a PNG: a row per attribute, its levels (columns) left to right. source="photos":
    photo_ladder() of each of photos (default all) stacked, a row per photo and attribute."""
    if source == "procedural":
        images = ladder(size, seed)
        rows = list(zip(SYNTH_ATTRIBUTES, images, strict=True))
        return _sheet(path, rows, size, columns=columns)
    rows = [(f"{p}\n{FAMILY_TO_ATTRIBUTE[f]}", im)
            for p in (photos or PHOTOS) for f, im in photo_ladder(p, size, seed).items()]
    _sheet(path, rows, size, left=110, columns=columns)


# ----------------------------------------------------------------------------- command line

def build_parser():
    import argparse
    parser = argparse.ArgumentParser(description="Write a synthetic dataset: PNGs, manifest.csv, contact_sheet.png.")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--n", type=int, default=2000, help="number of images")
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed (same seed, same files)")
    parser.add_argument("--mode", choices=("family", "mixed"), default="family",
                        help="family: each image clean or one family at level 1-5 (KADID-like); "
                             "mixed: independent levels")
    parser.add_argument("--per-ref", type=int, default=5, help="images per scene (family mode: 1 clean + distorted)")
    parser.add_argument("--heldout-frac", type=float, default=0.2, help="fraction of scenes in the test split")
    parser.add_argument("--source", choices=("procedural", "photos"), default="procedural",
                        help="procedural: generated scenes; photos: crops of the photos in assets/photos")
    parser.add_argument("--heldout-photos", default=",".join(HELDOUT_PHOTOS),
                        help=f"--source photos: comma-separated photos whose crops form the test split, never "
                             f"seen in training (default {','.join(HELDOUT_PHOTOS)}; photos: {', '.join(PHOTOS)})")
    return parser


def main(argv=None) -> int:
    import sys
    import time
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.time()
    try:
        recs = make_synthetic(args.out, args.n, args.size, args.seed, args.mode, args.per_ref, args.heldout_frac,
                              source=args.source, heldout_photos=tuple(p for p in args.heldout_photos.split(",") if p))
    except (OSError, ValueError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 1
    n_test = sum(r.split == "test" for r in recs)
    print(f"wrote {len(recs)} images ({n_test} test) to {args.out} in {time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
