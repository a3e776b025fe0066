"""synth.py: the KADID-style data from real photographs (synthesize_photos), its files and its command line."""
import collections
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import data
import synth

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "synth.py")
SUBJECTLESS = {p for p, v in synth.PHOTOS.items() if v is None}


def scenes(records):
    out = collections.defaultdict(list)
    for r in records:
        out[r.ref].append(r)
    return out


def test_photos_shapes_labels_and_determinism():
    images, recs = synth.synthesize_photos(120, 32, seed=3, per_ref=6, heldout_frac=0.25)
    assert images.shape == (120, 32, 32, 3) and images.dtype == np.uint8 and len(recs) == 120
    again, recs_again = synth.synthesize_photos(120, 32, seed=3, per_ref=6, heldout_frac=0.25, threads=1)
    assert np.array_equal(images, again) and recs == recs_again
    assert not np.array_equal(images, synth.synthesize_photos(120, 32, seed=4, per_ref=6, heldout_frac=0.25)[0])
    for r in recs:
        assert r.dataset == "photos" and r.domain == "synthetic" and r.extra["photo"] in synth.PHOTOS
        assert r.ref.startswith(r.extra["photo"] + "_") and r.image.startswith(r.ref + "_")
        distorted = [a for a, v in r.attributes.items() if v < 5]
        if r.family is None:
            assert r.level == 0 and not distorted and r.mos == 5
        else:
            assert distorted == [data.FAMILY_TO_ATTRIBUTE[r.family]] and 1 <= r.level <= 5
            assert r.attributes[distorted[0]] == pytest.approx(5 - 0.8 * r.level) == r.mos
    by_scene = scenes(recs)
    assert len(by_scene) == 20 and all(len(v) == 6 for v in by_scene.values())
    for versions in by_scene.values():  # one photo, one clean version, each family at distinct levels
        assert len({r.extra["photo"] for r in versions}) == 1 and len({r.split for r in versions}) == 1
        assert [r.level for r in versions].count(0) == 1
        pairs = [(r.family, r.level) for r in versions if r.family]
        assert len(set(pairs)) == len(pairs)
    clean = [i for i, r in enumerate(recs) if r.level == 0]
    assert all(np.abs(images[i].astype(int) - images[j].astype(int)).mean() > 1 for i, j in zip(clean, clean[1:]))
    mixed = synth.synthesize_photos(60, 16, seed=1, mode="mixed", heldout_frac=0.2)[1]
    assert sum(sum(v < 5 for v in r.attributes.values()) > 1 for r in mixed) > 10
    assert all(r.attributes["composition"] == 5 for r in mixed if r.extra["photo"] in SUBJECTLESS)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_heldout_photos_never_in_training_and_every_family_level_in_both_splits(seed):
    recs = synth.synthesize_photos(400, 16, seed=seed, heldout_frac=0.25)[1]
    train = {r.extra["photo"] for r in recs if r.split == "train"}
    test = {r.extra["photo"] for r in recs if r.split == "test"}
    assert test == set(synth.HELDOUT_PHOTOS) and train == set(synth.PHOTOS) - test
    assert sum(r.split == "test" for r in recs) == 100  # 80 scenes, 20 held out
    for split in ("train", "test"):
        seen = {(r.family, r.level) for r in recs if r.split == split}
        assert seen == {(None, 0)} | {(f, lv) for f in synth.SYNTH_FAMILIES for lv in range(1, 6)}, split
    assert not any(r.family == "composition" for r in recs if r.extra["photo"] in SUBJECTLESS)
    assert all(r.attributes["composition"] == 5 for r in recs if r.extra["photo"] in SUBJECTLESS)
    other = synth.synthesize_photos(60, 16, seed=seed, heldout_frac=0.5, heldout_photos=("chelsea",))[1]
    assert {r.extra["photo"] for r in other if r.split == "test"} == {"chelsea"}
    assert "chelsea" not in {r.extra["photo"] for r in other if r.split == "train"}


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="dog"):
        synth.synthesize_photos(20, 16, heldout_photos=("dog",))
    with pytest.raises(ValueError, match="held-out"):
        synth.synthesize_photos(20, 16, heldout_frac=0.5, heldout_photos=())
    with pytest.raises(ValueError, match="mode"):
        synth.synthesize_photos(20, 16, mode="family", per_ref=1)


def test_crops_stay_on_the_photo_and_composition_moves_the_subject_by_its_level():
    photos = synth.load_photos()
    plan, recs = synth._plan_photos(1000, 5, "family", 5, 0.2, synth.HELDOUT_PHOTOS, "photos", photos)
    dims = np.array([(photos[p].width, photos[p].height) for p in plan["photo"]])
    half = plan["side"][:, None] / 2
    assert (plan["centre"] >= half - 1e-6).all() and (plan["centre"] <= dims - half + 1e-6).all()
    by_scene = collections.defaultdict(list)
    for j, r in enumerate(recs):
        by_scene[r.ref].append(j)
    for i in by_scene.values():
        versions = [recs[j] for j in i]
        clean = plan["centre"][i[0]]
        subject = photos[versions[0].extra["photo"]].centre
        if subject is not None:  # clean crops hold the subject near their centre
            assert np.abs(np.array(subject) - clean).max() <= synth.PHOTO_EDGE * plan["side"][i[0]] + 1e-6
        for j, r in zip(i, versions):
            shift = np.abs(plan["centre"][j] - clean)
            if r.family == "composition":  # along one axis, by the level's fraction of the side
                assert sorted(shift)[0] == 0
                assert shift.max() == pytest.approx(synth.LEVELS["composition"][r.level] * plan["side"][j])
            else:
                assert shift.max() == 0


def hf(im):  # high-frequency energy of the gray image
    g = im.astype(float) @ [0.299, 0.587, 0.114]
    return np.mean(np.diff(g, axis=0) ** 2) + np.mean(np.diff(g, axis=1) ** 2)


@pytest.mark.parametrize("photo", ["astronaut", "ihc"])
def test_each_photo_family_grows_with_its_level(photo):
    rows = synth.photo_ladder(photo, size=64, seed=2)
    assert set(rows) == set(synth.SYNTH_FAMILIES if photo not in SUBJECTLESS else synth.PIXEL_FAMILIES)
    clean = rows["blur"][0].astype(float)
    for fam, ims in rows.items():
        assert np.array_equal(ims[0], rows["blur"][0])  # level 0 of every row: the same clean crop
        assert not np.array_equal(ims[1], ims[0]), fam  # level 1 of every family: distorted
    sharp = [hf(im) for im in rows["blur"]]
    assert all(b < a for a, b in zip(sharp, sharp[1:])), sharp
    noisy = [hf(im) for im in rows["noise"]]
    assert all(b > a for a, b in zip(noisy, noisy[1:])), noisy
    change = [np.abs(im.astype(float) - clean).mean() for im in rows["color"]]  # each level its own cast hue
    assert change[1] > 1.5 and min(change[2:]) > change[1], change  # level 1 visible, not only rounding
    levels = np.zeros((6, len(synth.SYNTH_FAMILIES)), int)
    levels[:, synth.COLUMN["color"]] = np.arange(6)
    x = np.repeat(clean.transpose(2, 0, 1)[None] / 255, 6, 0).astype(np.float32)
    for hue in np.linspace(0, 2 * np.pi, 5)[:-1]:  # with one hue, the change grows with the level
        cast = np.array(synth.PHOTO_CAST)[:, None] * np.cos(hue - np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]))
        out = synth._distort(x.copy(), levels, np.random.default_rng(0), cast)
        change = [np.abs(im.astype(float) - clean).mean() for im in out]
        assert all(b > a for a, b in zip(change, change[1:])), (hue, change)


def test_a_missing_photo_is_named(tmp_path, monkeypatch):
    for name in synth.PHOTOS:
        if name != "rocket":
            shutil.copy(os.path.join(synth.PHOTO_DIR, f"{name}.jpg"), tmp_path)
    monkeypatch.setattr(synth, "PHOTO_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"rocket.*rocket\.jpg"):
        synth.synthesize_photos(10, 16)


def test_make_synthetic_photos_files_match_memory_and_read_back(tmp_path):
    recs = synth.make_synthetic(str(tmp_path / "p"), 30, 24, seed=2, heldout_frac=0.34, source="photos")
    images, mem = synth.synthesize_photos(30, 24, seed=2, heldout_frac=0.34)
    assert [os.path.basename(r.image) for r in recs] == [r.image for r in mem]
    assert all(np.array_equal(np.asarray(Image.open(r.image)), im) for r, im in zip(recs, images))
    loaded = data.load_dataset("manifest", str(tmp_path / "p"))
    fields = ("image", "dataset", "domain", "mos", "attributes", "split", "ref", "family", "level", "extra")
    assert [[getattr(r, f) for f in fields] for r in loaded] == [[getattr(r, f) for f in fields] for r in recs]
    assert os.path.exists(tmp_path / "p" / "contact_sheet.png")


def test_command_line_writes_a_manifest_load_dataset_reads(tmp_path):
    args = [str(tmp_path / "syn"), "--n", "40", "--size", "24", "--seed", "1", "--source", "photos",
            "--heldout-frac", "0.25"]
    out = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, check=True).stdout
    assert "wrote 40 images (10 test)" in out
    recs = data.load_dataset("manifest", str(tmp_path / "syn"), strict=True)
    mem = synth.synthesize_photos(40, 24, seed=1, heldout_frac=0.25)[1]
    assert [(os.path.basename(r.image), r.mos, r.attributes, r.split, r.ref, r.family, r.level, r.extra["photo"])
            for r in recs] == [(r.image, r.mos, r.attributes, r.split, r.ref, r.family, r.level, r.extra["photo"])
                               for r in mem]
    assert Image.open(tmp_path / "syn" / recs[0].image).size == (24, 24)
    assert synth.main([str(tmp_path / "proc"), "--n", "12", "--size", "16", "--per-ref", "3",
                       "--heldout-frac", "0.5"]) == 0
    proc = data.load_dataset("manifest", str(tmp_path / "proc"), strict=True)
    assert len(proc) == 12 and sum(r.split == "test" for r in proc) == 6 and proc[0].dataset == "synthetic"
    assert synth.main([str(tmp_path / "bad"), "--source", "photos", "--heldout-photos", "dog"]) == 1


def test_every_command_line_option_has_help():
    assert all(a.help for a in synth.build_parser()._actions if a.dest != "help")


def test_cut_off_moves_subject_towards_border():
    rng = np.random.default_rng(0)
    sc = synth._scenes(rng, 1, 64)
    bg = np.clip(sc["bg"][0].transpose(1, 2, 0) * 255 + 0.5, 0, 255)
    offsets = synth._offsets(np.arange(6), rng)  # levels 0-5, each in a random axis direction
    images = synth._distort(synth._render(sc, np.zeros(6, int), offsets), np.zeros((6, len(synth.SYNTH_FAMILIES)), int),
                             rng)
    distance, area = [], []
    for im in images:
        ys, xs = np.nonzero(np.abs(im.astype(float) - bg).sum(-1) > 30)  # the subject, measured from pixels
        distance.append(math.hypot(ys.mean() - 31.5, xs.mean() - 31.5))
        area.append(len(ys))
    assert all(b > a for a, b in zip(distance, distance[1:])), distance
    assert area[-1] < 0.7 * area[0]  # level 5 cuts it off


def test_procedural_cast_changes_only_the_colour_family():
    """cast=True gives procedural colour images the photos' colour cast (their channel balance moves
    away from the desaturated version's); clean, blurred and moved images keep their pixels."""
    plain, recs = synth.synthesize(200, 28, seed=2)
    cast, recs2 = synth.synthesize(200, 28, seed=2, cast=True)
    assert [r.image for r in recs] == [r.image for r in recs2]
    fam = np.array([r.family for r in recs], dtype=object)
    same = np.isin(fam, [None, "blur", "composition"])
    assert np.array_equal(plain[same], cast[same])
    strong = np.array([r.family == "color" and r.level >= 4 for r in recs])
    balance = lambda x: np.abs(x.astype(float).mean((1, 2)) - x.astype(float).mean((1, 2, 3))[:, None]).mean()  # noqa: E731
    assert strong.sum() >= 5 and balance(cast[strong]) > 3 * balance(plain[strong])


def test_a_family_without_a_distortion_or_an_attribute_is_named(monkeypatch):
    monkeypatch.setattr(synth, "SYNTH_FAMILIES", (*synth.SYNTH_FAMILIES, "exposure"))
    monkeypatch.setattr(synth, "PIXEL_FAMILIES", (*synth.PIXEL_FAMILIES, "exposure"))
    monkeypatch.setattr(synth, "SYNTH_ATTRIBUTES", (*synth.SYNTH_ATTRIBUTES, "exposure"))
    with pytest.raises(ValueError, match="'exposure' has LEVELS but no distortion"):
        synth._check_families()
    monkeypatch.setattr(synth, "SYNTH_ATTRIBUTES", (*synth.SYNTH_ATTRIBUTES[:-1], None))
    with pytest.raises(ValueError, match="'exposure' has no attribute"):
        synth._check_families()
