"""data.py, in its order: the readers (each publisher's annotation files, written by the tests; pyiqa
meta-info files in both layouts and each published direction, pyiqa's published KonIQ-10k file with
its 0 / 1 / 2 splits; malformed files named by file, row and column), splits, the stratified subset,
the sampler and its preferences, the command line; and synth.py's scenes, which the manifest
reader and the sampler are fed with."""
import csv
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
import reward
import synth
from data import Record
from mgiqa import ATTRIBUTES, FAMILY_TO_ATTRIBUTE, LABELLED


def touch_image(path, value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (4, 4), (value, value, value)).save(path)


def write_csv(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def write_xlsx(path, rows):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    for row in rows:
        book.active.append(row)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    book.save(path)


def savemat(path, **arrays):
    scipy_io = pytest.importorskip("scipy.io")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    scipy_io.savemat(path, arrays)


def cell(strings):
    out = np.empty((1, len(strings)), dtype=object)
    out[0, :] = strings
    return out


# ----------------------------------------------------------------------------- readers

def test_koniq_official_split_and_missing(tmp_path):
    root = str(tmp_path)
    write_csv(f"{root}/koniq10k_distributions_sets.csv", [
        ["image_name", "c1", "MOS", "SD", "set"], ["a.jpg", 1, 70.5, 1, "training"], ["b.jpg", 1, 40, 1, "validation"],
        ["c.jpg", 1, 55, 1, "test"], ["gone.jpg", 1, 50, 1, "training"]])
    for name in "abc":
        touch_image(f"{root}/1024x768/{name}.jpg")
    touch_image(f"{root}/512x384/a.jpg")
    with pytest.warns(UserWarning, match=r"1 of 4 .*gone\.jpg"):
        recs = data.load_dataset("koniq", root)
    assert [(os.path.basename(r.image), r.split, r.mos) for r in recs] == \
        [("a.jpg", "train", 70.5), ("b.jpg", "val", 40.0), ("c.jpg", "test", 55.0)]
    assert all("1024x768" in r.image for r in recs) and recs[0].domain == "authentic" and recs[0].extra["c1"] == "1"
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        data.load_dataset("koniq", root, strict=True)
    text = data.summary("koniq", root)
    assert "3 images (1 listed but missing on disk)" in text and "train 1, val 1, test 1" in text


def test_spaq_attribute_mapping(tmp_path):
    root = str(tmp_path)
    write_xlsx(f"{root}/Annotations/MOS and Image attribute scores.xlsx", [
        ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness"],
        ["00001.jpg", 42.0, 10, 20, 30, 40, 50], ["00002.jpg", 80.0, 11, 21, 31, 41, 51]])
    touch_image(f"{root}/TestImage/00001.jpg")
    touch_image(f"{root}/TestImage/00002.jpg")
    recs = data.load_dataset("spaq", root)
    assert len(recs) == 2 and recs[0].mos == 42.0 and recs[0].split == "all"
    assert recs[0].attributes == {"sharpness": 50.0, "color": 20.0, "noise": 40.0}
    assert recs[1].extra["Brightness"] == 11 and recs[1].extra["Contrast"] == 31


def test_livec_mat_drops_training_images(tmp_path):
    root = str(tmp_path)
    names = ["t1.bmp", "t7.bmp", "3.bmp", "10.bmp"]
    savemat(f"{root}/Data/AllImages_release.mat", AllImages_release=cell(names).T)
    savemat(f"{root}/Data/AllMOS_release.mat", AllMOS_release=np.array([[50.0, 60.0, 70.5, 20.0]]))
    for n in names:
        touch_image(f"{root}/Images/{n}")
    recs = data.load_dataset("livec", root)
    assert [(os.path.basename(r.image), r.mos) for r in recs] == [("3.bmp", 70.5), ("10.bmp", 20.0)]


def test_kadid_families_levels_refs(tmp_path):
    root = str(tmp_path)
    rows = [["dist_img", "ref_img", "dmos", "var"], ["I01_01_01.png", "I01.png", 4.5, 0.1],
            ["I01_03_05.png", "I01.png", 2.0, 0.1], ["I01_11_03.png", "I01.png", 3.0, 0.1],
            ["I02_06_02.png", "I02.png", 3.9, 0.1], ["I02_25_04.png", "I02.png", 3.1, 0.1],
            ["I02_10_01.png", "I02.png", 4.0, 0.1]]
    write_csv(f"{root}/dmos.csv", rows)
    for r in rows[1:]:
        touch_image(f"{root}/images/{r[0]}")
    recs = data.load_dataset("kadid", root)
    assert [(r.family, r.level, r.ref) for r in recs] == [
        ("blur", 1, "I01.png"), ("blur", 5, "I01.png"), ("noise", 3, "I01.png"), ("color", 2, "I02.png"),
        ("contrast", 4, "I02.png"), ("compression", 1, "I02.png")]
    assert recs[0].mos == 4.5 and recs[0].domain == "synthetic" and recs[0].extra == {"var": "0.1"}


def test_csiq_dmos_flipped_header_below_title(tmp_path):
    root = str(tmp_path)
    write_xlsx(f"{root}/csiq.DMOS.xlsx", [["CSIQ DMOS"], [], ["image", "dst_idx", "dst_type", "dst_lev", "dmos_std", "dmos"],
                                          [1600, 1, "noise", 1, 0.01, 0.1], [1600, 1, "noise", 4, 0.01, 0.6],
                                          ["bridge", 5, "blur", 2, 0.01, 0.3], ["bridge", 2, "jpeg 2000", 3, 0.01, 0.4]])
    touch_image(f"{root}/dst_imgs/awgn/1600.AWGN.1.png")
    touch_image(f"{root}/dst_imgs/awgn/1600.AWGN.4.png")
    touch_image(f"{root}/dst_imgs/blur/bridge.BLUR.2.png")
    touch_image(f"{root}/dst_imgs/jpeg2000/bridge.jpeg2000.3.png")
    recs = data.load_dataset("csiq", root)
    assert [r.mos for r in recs] == pytest.approx([0.9, 0.4, 0.7, 0.6])  # lower DMOS = better = higher mos
    assert recs[0].mos > recs[1].mos and recs[0].extra["dmos"] == 0.1
    assert [(r.ref, r.family, r.level) for r in recs] == [("1600", "noise", 1), ("1600", "noise", 4),
                                                          ("bridge", "blur", 2), ("bridge", "compression", 3)]
    text = data.summary("csiq", root)
    assert "mos = 1 - DMOS" in text and "reference-disjoint" in text and "from metadata ['sharpness', 'noise']" in text


def test_tid2013_names_case_insensitive(tmp_path):
    root = str(tmp_path)
    with open(f"{root}/mos_with_names.txt", "w") as f:
        f.write("5.51429 I01_01_1.bmp\n4.5 I01_08_5.bmp\n3.1 I25_18_2.BMP\n")
    touch_image(f"{root}/distorted_images/i01_01_1.bmp")
    touch_image(f"{root}/distorted_images/i01_08_5.bmp")
    touch_image(f"{root}/distorted_images/I25_18_2.bmp")
    recs = data.load_dataset("tid2013", root)
    assert [(r.mos, r.ref, r.family, r.level) for r in recs] == [
        (5.51429, "I01", "noise", 1), (4.5, "I01", "blur", 5), (3.1, "I25", "color", 2)]


def test_bid_agiqa_pipal_pyiqa(tmp_path):
    root = str(tmp_path)
    write_xlsx(f"{root}/bid/DatabaseGrades.xlsx", [["Image Number", "Average Subjective Grade"], [1, 3.5], [2, 1.25]])
    touch_image(f"{root}/bid/ImageDatabase/DatabaseImage0001.JPG")
    touch_image(f"{root}/bid/ImageDatabase/DatabaseImage0002.JPG")
    assert [r.mos for r in data.load_dataset("bid", f"{root}/bid")] == [3.5, 1.25]

    write_csv(f"{root}/a3/data.csv", [["name", "prompt", "mos_quality", "std_quality", "mos_align"],
                                      ["x.jpg", "a cat", 2.5, 0.1, 3.9]])
    touch_image(f"{root}/a3/AGIQA-3K/x.jpg")
    rec, = data.load_dataset("agiqa3k", f"{root}/a3")
    assert rec.mos == 2.5 and rec.domain == "aigc" and rec.extra["mos_align"] == "3.9" and rec.extra["prompt"] == "a cat"

    write_xlsx(f"{root}/a1/file/AIGC_MOS_Zscore.xlsx", [["Image", "MOS"], ["y.png", 0.7]])
    touch_image(f"{root}/a1/file/y.png")
    assert data.load_dataset("agiqa1k", f"{root}/a1")[0].mos == 0.7

    os.makedirs(f"{root}/pipal/Train_Label")
    with open(f"{root}/pipal/Train_Label/A0001.txt", "w") as f:
        f.write("A0001_00_00.bmp,1500.5\nA0001_10_03.bmp,1200.25\n")
    touch_image(f"{root}/pipal/Train_Distort/A0001_00_00.bmp")
    touch_image(f"{root}/pipal/Train_Distort/A0001_10_03.bmp")
    recs = data.load_dataset("pipal", f"{root}/pipal")
    assert [(r.mos, r.ref, r.extra["type"]) for r in recs] == [(1500.5, "A0001", "00"), (1200.25, "A0001", "10")]

    write_csv(f"{root}/meta/meta_info_FooDataset.csv", [["img_name", "mos"], ["sub/z.png", 61.0]])
    touch_image(f"{root}/imgs/sub/z.png")
    rec, = data.load_dataset("pyiqa", f"{root}/imgs", file=f"{root}/meta/meta_info_FooDataset.csv")
    assert rec.mos == 61.0 and rec.dataset == "Foo" and rec.image.endswith("z.png")


# ----------------------------------------------------------------------------- pyiqa meta-info files

def pyiqa_file(root, name, rows, images=True, where="imgs"):
    """meta_info_<name>Dataset.csv under root/meta, its images under root/<where> (names as listed;
    a LIVE-style name without extension gets .bmp on disk)."""
    write_csv(f"{root}/meta/meta_info_{name}Dataset.csv", rows)
    col = rows[0].index("dist_name") if "dist_name" in rows[0] else 0
    for row in rows[1:] if images else []:
        touch_image(f"{root}/{where}/{row[col]}" + ("" if os.path.splitext(row[col])[1] else ".bmp"))
    return f"{root}/meta/meta_info_{name}Dataset.csv"


def test_pyiqa_full_reference_layout_each_published_direction(tmp_path):
    root = str(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a published file is read without a direction warning
        kadid = data.load_dataset("pyiqa", f"{root}/imgs", file=pyiqa_file(root, "KADID10k", [
            ["ref_name", "dist_name", "dmos", "std"], ["I01.png", "I01_01_01.png", 4.57, 0.5],
            ["I01.png", "I01_01_03.png", 2.67, 0.8], ["I01.png", "I01_11_02.png", 3.27, 0.8]]))
        tid = data.load_dataset("pyiqa", f"{root}/imgs", file=pyiqa_file(root, "TID2013", [
            ["ref_name", "dist_name", "mos", "std"], ["I01.BMP", "I01_01_1.bmp", 5.51, 0.1], ["I01.BMP", "i01_08_5.bmp", 2.11, 0.1]]))
        csiq = data.load_dataset("pyiqa", f"{root}/imgs", file=pyiqa_file(root, "CSIQ", [
            ["ref_name", "dist_name", "dmos"], ["1600.png", "1600.AWGN.1.png", 0.06], ["1600.png", "1600.BLUR.4.png", 0.5]]))
        live = data.load_dataset("pyiqa", f"{root}/imgs", file=pyiqa_file(root, "LIVEIQA", [
            ["ref_name", "dist_name", "mos"], ["bikes.bmp", "jp2k/img2", 28.0], ["bikes.bmp", "gblur/img7", 61.5]]))
        pipal = data.load_dataset("pyiqa", f"{root}/imgs", file=pyiqa_file(root, "PIPAL", [
            ["hq_name", "dist_name", "elo_score"], ["A0001.bmp", "A0001_00_00.bmp", 1520.06]]))
    # KADID-10k's dmos column is a MOS (higher is better): taken as is, family and level from the name
    assert [(r.mos, r.ref, r.family, r.level) for r in kadid] == [
        (4.57, "I01.png", "blur", 1), (2.67, "I01.png", "blur", 3), (3.27, "I01.png", "noise", 2)]
    assert kadid[0].dataset == "KADID10k" and kadid[0].domain == "synthetic" and kadid[0].extra == {"std": "0.5"}
    assert kadid[0].image.endswith(os.path.join("imgs", "I01_01_01.png"))
    assert [(r.mos, r.ref, r.family, r.level) for r in tid] == [(5.51, "I01.BMP", "noise", 1), (2.11, "I01.BMP", "blur", 5)]
    # CSIQ's dmos and LIVE's mos column hold DMOS (lower is better): flipped as the csiq / live readers flip them
    assert [r.mos for r in csiq] == pytest.approx([0.94, 0.5]) and csiq[0].extra == {"dmos": 0.06}
    assert [(r.family, r.level) for r in csiq] == [("noise", 1), ("blur", 4)]
    assert [r.mos for r in live] == pytest.approx([72.0, 38.5]) and [(r.family, r.level) for r in live] == [("compression", None), ("blur", None)]
    assert live[0].image.endswith(os.path.join("jp2k", "img2.bmp"))  # listed without its extension
    assert (pipal[0].mos, pipal[0].ref) == (1520.06, "A0001.bmp")


def test_pyiqa_no_reference_layouts(tmp_path):
    root = str(tmp_path)
    koniq = data.load_dataset("pyiqa", pyiqa_file(root, "KonIQ10k", [
        ["img_name", "mos", "std", "split", "c1"], ["a.jpg", 77.4, 0.5, "training", 0], ["b.jpg", 68.7, 0.6, "test", 0]], where="meta"))
    assert [(r.mos, r.split, r.ref, r.domain) for r in koniq] == [(77.4, "train", None, "authentic"), (68.7, "test", None, "authentic")]
    assert koniq[0].extra == {"std": "0.5", "c1": "0"}
    spaq = data.load_dataset("pyiqa", pyiqa_file(root, "SPAQ", [
        ["Image name", "MOS", "Brightness", "Colorfulness", "Contrast", "Noisiness", "Sharpness", "ISO", "Brightness"],
        ["00001.jpg", 48.86, 47.43, 55.57, 55.71, 37.86, 42.57, 200, -1.21]], where="meta"))
    assert spaq[0].attributes == {"sharpness": 42.57, "color": 55.57, "noise": 37.86}  # as the spaq reader maps them
    assert spaq[0].mos == 48.86 and spaq[0].extra["Brightness"] == "47.43" and "Sharpness" not in spaq[0].extra
    assert spaq[0].extra["Brightness.1"] == "-1.21"  # the published file repeats Brightness (the EXIF one)
    livec = data.load_dataset("pyiqa", pyiqa_file(root, "LIVEChallenge", [
        ["img_name", "mos", "std"], ["t1.bmp", 63.9, 18], ["100.bmp", 32.5, 19]], where="meta"))
    assert [os.path.basename(r.image) for r in livec] == ["100.bmp"]  # t1-t7 dropped, as the livec reader does


def test_pyiqa_koniq_published_file_numeric_splits(tmp_path):
    """pyiqa's meta_info_KonIQ10kDataset.csv as published: its split column holds 0 / 1 / 2 (7,058 /
    1,000 / 2,015 rows: training / validation / test, the official split)."""
    root = str(tmp_path)
    path = pyiqa_file(root, "KonIQ10k", [
        ["img_name", "mos", "std", "split", "c1", "c2", "c3", "c4", "c5", "c_total"],
        ["10004473376.jpg", "77.3836206897", "0.527277894494", "0", "0.0", "0.0", "0.238095238095", "0.695238095238",
         "0.0666666666667", "105"],
        ["10007357496.jpg", "68.7285714286", "0.580003024795", "2", "0.0", "0.03125", "0.46875", "0.489583333333",
         "0.0104166666667", "96"],
        ["10043785683.jpg", "71.2043269231", "0.497974333332", "1", "0.0", "0.0", "0.433962264151", "0.566037735849",
         "0.0", "106"],
        ["10007903636.jpg", "78.6285714286", "0.527219618675", "0", "0.0104166666667", "0.0", "0.208333333333",
         "0.760416666667", "0.0208333333333", "96"]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = data.load_dataset("pyiqa", f"{root}/imgs", file=path)
    assert [(os.path.basename(r.image), r.split) for r in recs] == [
        ("10004473376.jpg", "train"), ("10007357496.jpg", "test"), ("10043785683.jpg", "val"), ("10007903636.jpg", "train")]
    assert [r.mos for r in recs] == pytest.approx([77.3836206897, 68.7285714286, 71.2043269231, 78.6285714286])
    assert all(r.dataset == "KonIQ10k" and r.domain == "authentic" and r.ref is None for r in recs)
    assert set(recs[0].extra) == {"std", "c1", "c2", "c3", "c4", "c5", "c_total"}  # the split is not kept twice
    assert data.split_records(recs) == recs  # the official split is kept, never redrawn
    assert "train 2, val 1, test 1" in data.summary("pyiqa", f"{root}/imgs", file=path)
    write_csv(path, [["img_name", "mos", "std", "split"], ["10004473376.jpg", 77.4, 0.5, 3]])
    with pytest.raises(ValueError, match=r"meta_info_KonIQ10kDataset\.csv: row 2, column 'split': unknown split '3'"):
        data.load_dataset("pyiqa", f"{root}/imgs", file=path)


def test_pyiqa_direction_option_and_unknown_dmos_file(tmp_path):
    root = str(tmp_path)
    path = pyiqa_file(root, "Mine", [["ref_name", "dist_name", "dmos"], ["r.png", "x.png", 0.2], ["r.png", "y.png", 0.7]], where="meta")
    with pytest.warns(UserWarning, match=r"meta_info_MineDataset\.csv: column 'dmos'.*higher is better.*direction=lower"):
        recs = data.load_dataset("pyiqa", path)
    assert [r.mos for r in recs] == [0.2, 0.7]  # the documented default
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [r.mos for r in data.load_dataset("pyiqa", path, direction="lower")] == pytest.approx([-0.2, -0.7])
        csiq = pyiqa_file(root, "CSIQ", [["ref_name", "dist_name", "dmos"], ["1600.png", "1600.AWGN.1.png", 0.06]], where="meta")
        assert data.load_dataset("pyiqa", csiq, direction="higher")[0].mos == 0.06  # the option wins
        assert "pyiqa CSIQ: 1 images" in data.summary("pyiqa", csiq) and "mos = 1 - score" in data.summary("pyiqa", csiq)
        assert "mos = 0 - score" in data.summary("pyiqa", path, direction="lower")
    with pytest.raises(ValueError, match="direction must be higher or lower"):
        data.load_dataset("pyiqa", path, direction="up")
    with pytest.raises(ValueError, match=r"pyiqa: unknown option 'directoin'"):
        data.load_dataset("pyiqa", path, directoin="lower")
    assert data.parse_spec(f"pyiqa={root}/imgs,meta.csv,direction=lower") == (
        "pyiqa", f"{root}/imgs", {"file": "meta.csv", "direction": "lower"})
    assert data.parse_spec("koniq=/d") == ("koniq", "/d", {})
    with pytest.raises(ValueError, match="NAME=ROOT"):
        data.parse_spec("koniq")


def test_pyiqa_reference_disjoint_split_and_metadata_pairs(tmp_path):
    root = str(tmp_path)
    rows = [["ref_name", "dist_name", "dmos", "std"]] + [
        [f"I{r:02d}.png", f"I{r:02d}_{t:02d}_{lv:02d}.png", 5 - lv * 0.7, 0.5]
        for r in range(1, 11) for t in (1, 11) for lv in (1, 3, 5)]
    recs = data.load_dataset("pyiqa", pyiqa_file(root, "KADID10k", rows, where="meta"))
    out = data.split_records(recs, seed=0)
    refs = {s: {r.ref for r in out if r.split == s} for s in ("train", "val", "test")}
    assert [len(v) for v in refs.values()] == [6, 2, 2]
    assert not (refs["train"] & refs["val"] or refs["train"] & refs["test"] or refs["val"] & refs["test"])
    one_ref = [r for r in recs if r.ref == "I01.png"]
    _, P, M = reward.preferences(one_ref)  # blur 1, 3, 5 then noise 1, 3, 5 of one reference: metadata pairs
    sharp, noise = ATTRIBUTES.index("sharpness"), ATTRIBUTES.index("noise")
    assert M[sharp, 0, 2] and P[sharp, 0, 2] == 1 and not M[sharp, 0, 3]
    assert M[noise, 3, 5] and P[noise, 3, 5] == 1


@pytest.mark.parametrize("rows, match", [
    ([["foo", "bar", "baz"], ["a.png", 1, 2]], r"meta_info_FooDataset\.csv: row 1: unknown pyiqa layout 'foo,bar,baz': no image column"),
    ([["ref_name", "dist_name", "quality"], ["r.png", "a.png", 1]], r"row 1: unknown pyiqa layout 'ref_name,dist_name,quality': no score column"),
    ([["ref_name", "dist_name", "mos"], ["r.png", "a.png", "good"]], r"row 2, column 'mos': 'good' is not a number"),
    ([["img_name", "mos", "split"], ["a.png", 3, "holdout"]], r"row 2, column 'split': unknown split 'holdout'"),
    ([["ref_name", "dist_name", "dmos"], ["I01.png", "I01.png", 4]], r"row 2, column 'dist_name': 'I01.png' is not named Irr_TT_LL"),
])
def test_pyiqa_unknown_layout_names_file_row_column(tmp_path, rows, match):
    name = "KADID10k" if "Irr" in match else "Foo"
    with pytest.raises(ValueError, match=match):
        data.load_dataset("pyiqa", pyiqa_file(str(tmp_path), name, rows, images=False))


def test_live_release2_order_and_flip(tmp_path):
    root = str(tmp_path)
    n = 982
    dmos, orgs = np.linspace(10, 90, n), np.zeros(n)
    orgs[1] = 1  # jp2k/img2.bmp is a reference copy
    savemat(f"{root}/dmos_realigned.mat", dmos_new=dmos[None], orgs=orgs[None])
    savemat(f"{root}/refnames_all.mat", refnames_all=cell([f"ref{i % 29}.bmp" for i in range(n)]))
    for name in ("jp2k/img1.bmp", "jp2k/img2.bmp", "wn/img1.bmp", "gblur/img174.bmp"):
        touch_image(f"{root}/{name}")
    with pytest.warns(UserWarning, match="978 of 981"):
        recs = data.load_dataset("live", root)
    got = [(os.path.relpath(r.image, root), r.family, r.ref) for r in recs]
    assert got == [("jp2k/img1.bmp", "compression", "ref0.bmp"), (os.path.join("wn", "img1.bmp"), "noise", f"ref{460 % 29}.bmp"),
                   (os.path.join("gblur", "img174.bmp"), "blur", f"ref{807 % 29}.bmp")]
    assert recs[0].mos == pytest.approx(100 - dmos[0]) and recs[0].level is None


def test_manifest_reader(tmp_path):
    root = str(tmp_path)
    write_csv(f"{root}/set/manifest.csv", [
        ["image", "mos", "sharpness", "noise", "split", "ref", "family", "level", "note"],
        ["a.png", 4.2, 4.2, "", "train", "s1", "blur", 1, "x"], ["b.png", 5, 5, 5, "test", "s1", "", 0, ""]])
    touch_image(f"{root}/set/a.png")
    touch_image(f"{root}/set/b.png")
    a, b = data.load_dataset("manifest", f"{root}/set")
    assert (a.attributes, a.split, a.ref, a.family, a.level) == ({"sharpness": 4.2}, "train", "s1", "blur", 1)
    assert a.extra == {"note": "x"}
    assert (b.family, b.level, b.domain, b.dataset) == (None, 0, "synthetic", "set")
    assert data.load_dataset("manifest", f"{root}/set/manifest.csv")[0].image == a.image


@pytest.mark.parametrize("rows, match", [
    ([["dist_img", "ref_img", "var"], ["I01_01_01.png", "I01.png", 1]], r"dmos\.csv: row 1: missing column 'dmos'"),
    ([["dist_img", "ref_img", "dmos"], ["I01_01_01.png", "I01.png", 4], ["I01_01_02.png", "I01.png", "n/a"]],
     r"dmos\.csv: row 3, column 'dmos': 'n/a' is not a number"),
    ([], r"dmos\.csv: row 1: empty file"),
    ([["dist_img", "ref_img", "dmos"], ["bad_name.png", "I01.png", 4]], r"dmos\.csv: row 2, column 'dist_img'"),
])
def test_malformed_csv_names_file_row_column(tmp_path, rows, match):
    write_csv(f"{tmp_path}/dmos.csv", rows)
    with pytest.raises(ValueError, match=match):
        data.load_dataset("kadid", str(tmp_path))


def test_malformed_xlsx_txt_mat(tmp_path):
    root = str(tmp_path)
    write_xlsx(f"{root}/s/MOS and Image attribute scores.xlsx", [
        ["Image name", "MOS", "Colorfulness", "Noisiness", "Sharpness"], ["1.jpg", 40, 1, 2, 3], ["2.jpg", 50, 1, 2, "sharp"]])
    with pytest.raises(ValueError, match=r"attribute scores\.xlsx: row 3, column 'Sharpness': 'sharp'"):
        data.load_dataset("spaq", f"{root}/s")
    os.makedirs(f"{root}/t")
    with open(f"{root}/t/mos_with_names.txt", "w") as f:
        f.write("5.0 I01_01_1.bmp\nfive I01_01_2.bmp\n")
    with pytest.raises(ValueError, match=r"mos_with_names\.txt: row 2, column '1 \(MOS\)'"):
        data.load_dataset("tid2013", f"{root}/t")
    savemat(f"{root}/l/Data/AllImages_release.mat", AllImages_release=cell(["1.bmp", "2.bmp"]))
    savemat(f"{root}/l/Data/AllMOS_release.mat", wrong=np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"AllMOS_release\.mat: no variable 'AllMOS_release'"):
        data.load_dataset("livec", f"{root}/l")


def test_unknown_dataset_lists_known(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'koniq10k'.*koniq, spaq, livec, kadid"):
        data.load_dataset("koniq10k", str(tmp_path))


# ----------------------------------------------------------------------------- splits

def fake(dataset, n, refs=0, domain=None, **kw):
    return [Record(f"{dataset}/{i}.png", dataset, domain or ("synthetic" if refs else "authentic"), mos=float(i % 7),
                   ref=f"r{i % refs}" if refs else None, **kw) for i in range(n)]


def test_split_records_kinds_and_files(tmp_path):
    synthetic, auth = fake("kadid", 300, refs=30), fake("koniq", 100)
    official = [Record(f"o{i}", "o", "authentic", split="test" if i else "train") for i in range(3)]
    out = data.split_records(synthetic + auth + official, seed=1)
    by = lambda name, s: [r for r in out if r.dataset == name and r.split == s]  # noqa: E731
    assert [len(by("kadid", s)) for s in ("train", "val", "test")] == [180, 60, 60]
    refs = [{r.ref for r in by("kadid", s)} for s in ("train", "val", "test")]
    assert not (refs[0] & refs[1] or refs[0] & refs[2] or refs[1] & refs[2])
    assert (len(by("koniq", "train")), len(by("koniq", "test"))) == (80, 20)
    assert [r.split for r in out if r.dataset == "o"] == ["train", "test", "test"]
    assert out == data.split_records(synthetic + auth + official, seed=1)
    assert out != data.split_records(synthetic + auth + official, seed=2)
    data.save_split(out, f"{tmp_path}/run/split.csv")
    split = data.load_split(f"{tmp_path}/run/split.csv")
    assert data.apply_split(synthetic + auth + official, split) == out
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
    """reward.preferences, the rule the sampler gives each batch: label pairs, then metadata pairs."""
    recs = [Record("0", "d", "synthetic", mos=3.0, attributes={"color": 2.0}, ref="A", family=None, level=0),
            Record("1", "d", "synthetic", mos=2.0, attributes={"color": 2.0}, ref="A", family="blur", level=1),
            Record("2", "d", "synthetic", mos=1.0, attributes={}, ref="A", family="blur", level=4),
            Record("3", "d", "synthetic", mos=2.0, attributes={"color": 1.0}, ref="A", family="noise", level=2),
            Record("4", "d", "synthetic", mos=5.0, attributes={}, ref="B", family="blur", level=2)]
    labels, P, M = reward.preferences(recs)
    a = {name: k for k, name in enumerate(ATTRIBUTES)}
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
            attr = FAMILY_TO_ATTRIBUTE.get(recs[i].family)
            if attr:
                assert M[ATTRIBUTES.index(attr), i, j]
        assert meta.any() or all(FAMILY_TO_ATTRIBUTE.get(r.family) is None for r in recs)
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


# ----------------------------------------------------------------------------- synthetic data (synth.py)

def gray(x):
    return x.astype(np.float64) @ [0.299, 0.587, 0.114]


def box3(x):
    p = np.pad(x, 1, mode="edge")
    return sum(p[i:i + x.shape[0], j:j + x.shape[1]] for i in range(3) for j in range(3)) / 9


def strictly_increasing(values):
    return all(b > a for a, b in zip(values, values[1:]))


def test_each_distortion_monotone_in_its_statistic():
    rows = synth.ladder(size=64, seed=5)  # (4 families, 6 levels, S, S, 3)
    blur, color, noise = rows[synth.SYNTH_FAMILIES.index("blur")], rows[1], rows[2]
    hf = [np.mean((gray(im) - box3(gray(im))) ** 2) for im in blur]
    assert strictly_increasing(hf[::-1]), hf
    residual = [np.var(gray(im) - box3(gray(im))) for im in noise]
    assert strictly_increasing(residual), residual
    saturation = [np.asarray(Image.fromarray(im).convert("HSV"))[..., 1].mean() for im in color]
    assert strictly_increasing(saturation[::-1]), saturation
    assert saturation[-1] < 2  # level 5: gray


def test_synth_family_mode_labels_and_determinism(tmp_path):
    recs = synth.make_synthetic(f"{tmp_path}/a", n=60, size=32, seed=4, per_ref=6, heldout_frac=0.3)
    again = synth.make_synthetic(f"{tmp_path}/b", n=60, size=32, seed=4, per_ref=6, heldout_frac=0.3, threads=1)
    for r, s in zip(recs, again):
        with open(r.image, "rb") as f, open(s.image, "rb") as g:
            assert f.read() == g.read()
    images, mem = synth.synthesize(60, 32, seed=4, per_ref=6, heldout_frac=0.3)
    assert images.shape == (60, 32, 32, 3) and np.array_equal(images[7], np.asarray(Image.open(recs[7].image)))
    for r in recs:
        distorted = [a for a, v in r.attributes.items() if v < 5]
        if r.family is None:
            assert r.level == 0 and not distorted and r.mos == 5
        else:
            assert distorted == [FAMILY_TO_ATTRIBUTE[r.family]] and 1 <= r.level <= 5
            assert r.attributes[distorted[0]] == pytest.approx(5 - 0.8 * r.level) == r.mos
    assert {r.ref for r in recs if r.split == "train"}.isdisjoint({r.ref for r in recs if r.split == "test"})
    assert sum(r.split == "test" for r in recs) == 18  # 10 scenes, 3 held out
    loaded = data.load_dataset("manifest", f"{tmp_path}/a")
    assert [(r.image, r.mos, r.attributes, r.split, r.ref, r.family, r.level) for r in loaded] == \
        [(r.image, r.mos, r.attributes, r.split, r.ref, r.family, r.level) for r in recs]
    assert os.path.exists(f"{tmp_path}/a/contact_sheet.png")
    assert not np.array_equal(images, synth.synthesize(60, 32, seed=5, per_ref=6)[0])
    mixed = synth.synthesize(30, 32, seed=4, mode="mixed")[1]
    assert sum(sum(v < 5 for v in r.attributes.values()) > 1 for r in mixed) > 10


# ----------------------------------------------------------------------------- command line

def test_command_line_summary(tmp_path):
    synth.make_synthetic(str(tmp_path / "syn"), 20, 24, seed=1, heldout_frac=0.5)
    script = os.path.join(os.path.dirname(__file__), "..", "data.py")
    run = lambda *a: subprocess.run([sys.executable, script, *a], capture_output=True, text=True)  # noqa: E731
    done = run("summary", f"manifest={tmp_path / 'syn'}")
    assert done.returncode == 0, done.stderr
    assert "20 images (0 listed but missing on disk)" in done.stdout and "train 10, test 10" in done.stdout
    assert f"attributes {list(LABELLED)}" in done.stdout
    failed = run("summary", f"manifest={tmp_path / 'syn'}", f"koniq={tmp_path / 'none'}")
    assert failed.returncode == 1 and "koniq: error:" in failed.stdout and "manifest: 20 images" in failed.stdout


def test_every_command_line_option_has_help():
    parser = data.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert subparsers.help and set(subparsers.choices) == {"summary", "freeze"}
    for name, sub in subparsers.choices.items():
        assert all(a.help for a in sub._actions if a.dest != "help"), name


def test_record_clean_is_the_undistorted_image_of_a_reference():
    def record(**kw):
        return data.Record(image="x.png", dataset="d", domain="synthetic", **kw)
    assert record(family=None, level=0).clean
    assert not record(family="blur", level=1).clean
    assert not record(family=None, level=None).clean  # an authentic photo: no reference, no level
