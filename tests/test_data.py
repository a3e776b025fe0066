"""data.py: splits, the stratified subset, preferences and the sampler; synth.py's distortions; the
command line. (The readers are tested in test_readers.py.)"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import data
import synth
from data import Record

# ----------------------------------------------------------------------------- splits

def fake(dataset, n, refs=0, domain=None, **kw):
    return [Record(f"{dataset}/{i}.png", dataset, domain or ("synthetic" if refs else "authentic"), mos=float(i % 7),
                   ref=f"r{i % refs}" if refs else None, **kw) for i in range(n)]


def test_split_records_kinds_and_files(tmp_path):
    synth, auth = fake("kadid", 300, refs=30), fake("koniq", 100)
    official = [Record(f"o{i}", "o", "authentic", split="test" if i else "train") for i in range(3)]
    out = data.split_records(synth + auth + official, seed=1)
    by = lambda name, s: [r for r in out if r.dataset == name and r.split == s]  # noqa: E731
    assert [len(by("kadid", s)) for s in ("train", "val", "test")] == [180, 60, 60]
    refs = [{r.ref for r in by("kadid", s)} for s in ("train", "val", "test")]
    assert not (refs[0] & refs[1] or refs[0] & refs[2] or refs[1] & refs[2])
    assert (len(by("koniq", "train")), len(by("koniq", "test"))) == (80, 20)
    assert [r.split for r in out if r.dataset == "o"] == ["train", "test", "test"]
    assert out == data.split_records(synth + auth + official, seed=1)
    assert out != data.split_records(synth + auth + official, seed=2)
    data.save_split(out, f"{tmp_path}/run/split.csv")
    split = data.load_split(f"{tmp_path}/run/split.csv")
    assert data.apply_split(synth + auth + official, split) == out
    with pytest.raises(ValueError, match="not in the saved split"):
        data.apply_split(fake("other", 2), split)


def test_stratified_subset_every_dataset_seeded_stable():
    recs = fake("kadid", 300, refs=30) + fake("koniq", 100) + fake("tiny", 2)
    sub = data.stratified_subset(recs, 40, seed=3)
    counts = {name: sum(r.dataset == name for r in sub) for name in ("kadid", "koniq", "tiny")}
    assert len(sub) == 40 and counts["tiny"] >= 1 and counts["kadid"] > counts["koniq"] > counts["tiny"]
    assert counts == {"kadid": 29, "koniq": 10, "tiny": 1}  # 1 each + the other 37 in proportion
    assert sub == data.stratified_subset(recs, 40, seed=3) and sub != data.stratified_subset(recs, 40, seed=4)
    assert [recs.index(r) for r in sub] == sorted(recs.index(r) for r in sub)  # in the order of records
    assert len({r.image for r in sub}) == 40
    assert data.stratified_subset(recs, 1000, seed=0) == recs and data.stratified_subset(recs, len(recs)) == recs
    assert [r.dataset for r in data.stratified_subset(recs, 2, seed=0)] == ["kadid", "koniq"]  # the largest first
    two = data.stratified_subset(fake("a", 5) + fake("b", 500), 10, seed=0)
    assert {r.dataset for r in two} == {"a", "b"}


# ----------------------------------------------------------------------------- sampler

def test_preferences_labels_and_metadata():
    recs = [Record("0", "d", "synthetic", mos=3.0, attributes={"color": 2.0}, ref="A", family=None, level=0),
            Record("1", "d", "synthetic", mos=2.0, attributes={"color": 2.0}, ref="A", family="blur", level=1),
            Record("2", "d", "synthetic", mos=1.0, attributes={}, ref="A", family="blur", level=4),
            Record("3", "d", "synthetic", mos=2.0, attributes={"color": 1.0}, ref="A", family="noise", level=2),
            Record("4", "d", "synthetic", mos=5.0, attributes={}, ref="B", family="blur", level=2)]
    labels, P, M = data.preferences(recs)
    a = {name: k for k, name in enumerate(data.ATTRIBUTES)}
    assert labels.shape == (5, 5) and P.shape == M.shape == (5, 5, 5) and M.dtype == torch.bool
    assert torch.equal(M[a["overall"]], ~torch.eye(5, dtype=torch.bool))  # overall: every pair from MOS
    assert P[a["overall"], 0, 1] == 1 and P[a["overall"], 1, 3] == 0.5 and P[a["overall"], 2, 4] == 0
    sharp = {(i, j) for i, j in M[a["sharpness"]].nonzero().tolist()}
    assert sharp == {(0, 1), (1, 0), (0, 2), (2, 0), (1, 2), (2, 1)}  # same ref, blur or clean; 4 has another ref
    assert P[a["sharpness"], 0, 2] == 1 and P[a["sharpness"], 2, 1] == 0 and P[a["sharpness"], 1, 2] == 1
    assert {(i, j) for i, j in M[a["noise"]].nonzero().tolist()} == {(0, 3), (3, 0)}
    assert P[a["noise"], 0, 3] == 1
    color = {(i, j) for i, j in M[a["color"]].nonzero().tolist()}  # labels 0,1,3; clean 0 with itself only
    assert color == {(0, 1), (1, 0), (0, 3), (3, 0), (1, 3), (3, 1)}
    assert P[a["color"], 0, 1] == 0.5 and P[a["color"], 1, 3] == 1 and P[a["color"], 3, 0] == 0
    assert not M[:, range(5), range(5)].any() and M[a["composition"]].sum() == 0


def test_sampler_one_dataset_and_frequencies():
    sets = {"small": fake("small", 100), "mid": fake("mid", 400), "big": fake("big", 1600)}
    sampler = data.Sampler(sets, batch_size=4, alpha=0.5, seed=0)
    counts = {k: 0 for k in sets}
    for _ in range(2000):
        batch = next(sampler)
        assert {r.dataset for r in batch["records"]} == {batch["dataset"]} and len(batch["records"]) == 4
        assert len({r.image for r in batch["records"]}) == 4
        counts[batch["dataset"]] += 1
    for name, expected in (("small", 1 / 7), ("mid", 2 / 7), ("big", 4 / 7)):
        assert abs(counts[name] / 2000 - expected) < 0.035, counts
    uniform = data.Sampler(sets, batch_size=4, alpha=0.0, seed=0)
    assert np.allclose(uniform.probs, 1 / 3)


def kadid_like(n_refs=20):
    fams = [None] + list(data.KADID_FAMILIES.values())
    return [Record(f"{r}_{t}_{lv}", "kadid", "synthetic", mos=5 - lv * 0.5, ref=f"ref{r}", family=fams[t],
                   level=0 if t == 0 else lv) for r in range(n_refs) for t in range(26) for lv in range(1, 6)
            if t > 0 or lv == 1]


def test_sampler_synthetic_batches_have_metadata_pairs():
    sampler = data.Sampler({"kadid": kadid_like(), "koniq": fake("koniq", 50)}, batch_size=16, seed=3)
    assert sampler.refs_per_batch == 4
    seen = 0
    for _ in range(60):
        batch = sampler.sample()
        if batch["dataset"] != "kadid":
            continue
        seen += 1
        recs, M = batch["records"], batch["M"]
        assert len({r.ref for r in recs}) <= 4
        pairs = [(i, j) for i in range(16) for j in range(16) if i != j and recs[i].ref == recs[j].ref
                 and recs[i].family == recs[j].family and recs[i].family is not None]
        assert pairs  # several distortions of one family from one reference
        meta = M[:4].any(0)
        for i, j in pairs:
            attr = data.FAMILY_TO_ATTRIBUTE.get(recs[i].family)
            if attr:
                assert M[data.ATTRIBUTES.index(attr), i, j]
        assert meta.any() or all(data.FAMILY_TO_ATTRIBUTE.get(r.family) is None for r in recs)
    assert seen > 30


def test_sampler_determinism_and_state(tmp_path):
    sets = {"kadid": kadid_like(5), "koniq": fake("koniq", 50)}
    images = lambda s, n: [[r.image for r in s.sample()["records"]] for _ in range(n)]  # noqa: E731
    assert images(data.Sampler(sets, 8, seed=7), 10) == images(data.Sampler(sets, 8, seed=7), 10)
    assert images(data.Sampler(sets, 8, seed=7), 10) != images(data.Sampler(sets, 8, seed=8), 10)
    first = data.Sampler(sets, 8, seed=7)
    images(first, 5)
    path = f"{tmp_path}/state.json"
    with open(path, "w") as f:
        json.dump(first.state_dict(), f)
    expected = images(first, 5)
    second = data.Sampler(sets, 8, seed=123)
    with open(path) as f:
        second.load_state_dict(json.load(f))
    assert images(second, 5) == expected
    with pytest.raises(ValueError, match="datasets"):
        data.Sampler({"koniq": sets["koniq"]}, 8).load_state_dict(first.state_dict())


# ----------------------------------------------------------------------------- synthetic data

def gray(x):
    return x.astype(np.float64) @ [0.299, 0.587, 0.114]


def box3(x):
    p = np.pad(x, 1, mode="edge")
    return sum(p[i:i + x.shape[0], j:j + x.shape[1]] for i in range(3) for j in range(3)) / 9


def strictly_increasing(values):
    return all(b > a for a, b in zip(values, values[1:]))


def test_each_distortion_monotone_in_its_statistic():
    rows = data.ladder(size=64, seed=5)  # (4 families, 6 levels, S, S, 3)
    blur, color, noise = rows[data.SYNTH_FAMILIES.index("blur")], rows[1], rows[2]
    hf = [np.mean((gray(im) - box3(gray(im))) ** 2) for im in blur]
    assert strictly_increasing(hf[::-1]), hf
    residual = [np.var(gray(im) - box3(gray(im))) for im in noise]
    assert strictly_increasing(residual), residual
    saturation = [np.asarray(Image.fromarray(im).convert("HSV"))[..., 1].mean() for im in color]
    assert strictly_increasing(saturation[::-1]), saturation
    assert saturation[-1] < 2  # level 5: gray


def test_cut_off_moves_subject_towards_border():
    rng = np.random.default_rng(0)
    sc = synth._scenes(rng, 1, 64)
    bg = np.clip(sc["bg"][0].transpose(1, 2, 0) * 255 + 0.5, 0, 255)
    offsets = synth._offsets(np.arange(6), rng)  # levels 0-5, each in a random axis direction
    images = synth._distort(synth._render(sc, np.zeros(6, int), offsets), np.zeros((6, 4), int), rng)
    distance, area = [], []
    for im in images:
        ys, xs = np.nonzero(np.abs(im.astype(float) - bg).sum(-1) > 30)  # the subject, measured from pixels
        distance.append(math.hypot(ys.mean() - 31.5, xs.mean() - 31.5))
        area.append(len(ys))
    assert strictly_increasing(distance), distance
    assert area[-1] < 0.7 * area[0]  # level 5 cuts it off


def test_synth_family_mode_labels_and_determinism(tmp_path):
    recs = data.make_synthetic(f"{tmp_path}/a", n=60, size=32, seed=4, per_ref=6, heldout_frac=0.3)
    again = data.make_synthetic(f"{tmp_path}/b", n=60, size=32, seed=4, per_ref=6, heldout_frac=0.3, threads=1)
    for r, s in zip(recs, again):
        with open(r.image, "rb") as f, open(s.image, "rb") as g:
            assert f.read() == g.read()
    images, mem = data.synthesize(60, 32, seed=4, per_ref=6, heldout_frac=0.3)
    assert images.shape == (60, 32, 32, 3) and np.array_equal(images[7], np.asarray(Image.open(recs[7].image)))
    for r in recs:
        distorted = [a for a, v in r.attributes.items() if v < 5]
        if r.family is None:
            assert r.level == 0 and not distorted and r.mos == 5
        else:
            assert distorted == [data.FAMILY_TO_ATTRIBUTE[r.family]] and 1 <= r.level <= 5
            assert r.attributes[distorted[0]] == pytest.approx(5 - 0.8 * r.level) == r.mos
    assert {r.ref for r in recs if r.split == "train"}.isdisjoint({r.ref for r in recs if r.split == "test"})
    assert sum(r.split == "test" for r in recs) == 18  # 10 scenes, 3 held out
    loaded = data.load_dataset("manifest", f"{tmp_path}/a")
    assert [(r.image, r.mos, r.attributes, r.split, r.ref, r.family, r.level) for r in loaded] == \
        [(r.image, r.mos, r.attributes, r.split, r.ref, r.family, r.level) for r in recs]
    assert os.path.exists(f"{tmp_path}/a/contact_sheet.png")
    assert not np.array_equal(images, data.synthesize(60, 32, seed=5, per_ref=6)[0])
    mixed = data.synthesize(30, 32, seed=4, mode="mixed")[1]
    assert sum(sum(v < 5 for v in r.attributes.values()) > 1 for r in mixed) > 10


def test_command_line_synth_then_summary(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "data.py")
    run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True, check=True)  # noqa: E731
    out = run("synth", str(tmp_path / "syn"), "--n", "20", "--size", "24", "--seed", "1", "--heldout-frac", "0.5").stdout
    assert "wrote 20 images (10 test)" in out
    text = run("summary", f"manifest={tmp_path / 'syn'}").stdout
    assert "20 images (0 listed but missing on disk)" in text and "train 10, test 10" in text
    assert "attributes ['sharpness', 'color', 'noise', 'composition']" in text


def test_every_command_line_option_has_help():
    parser = data.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert subparsers.help
    for name, sub in subparsers.choices.items():
        assert all(a.help for a in sub._actions if a.dest != "help"), name
