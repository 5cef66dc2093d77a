"""cnnlab check: counts, imbalance, unreadable files, EXIF rotations, exact and near-duplicates, leakage."""

from __future__ import annotations

import json
import shutil

import numpy as np
from PIL import Image

import cnnlab
from cnnlab.cli import main


def test_check_finds_copies_re_encodings_leakage_and_imbalance(tiny_data, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    circle = sorted((data / "train" / "circle").iterdir())
    shutil.copy(circle[0], data / "train" / "circle" / "copy.jpg")  # an exact copy within train
    # re-encoded at another quality (the demo saves at 90); a real photo re-encoded even at 40 keeps its hash (0
    # bits apart, measured on grocery), these tiny noisy shapes move more (18 bits at quality 75)
    Image.open(circle[1]).save(data / "train" / "square" / "requality.jpg", quality=85)
    Image.open(circle[2]).save(data / "val" / "circle" / "leak.jpg", quality=85)  # a training photo in the test set
    for extra in sorted((data / "train" / "star").iterdir())[3:]:
        extra.unlink()  # 3 stars against 17 circles
    (data / "val" / "star" / "broken.jpg").write_bytes(b"not a jpeg")
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(circle[3]).save(data / "train" / "ring" / "portrait.jpg", exif=exif)
    checked = cnnlab.check(data, out=tmp_path / "report", cache_dir=tmp_path / "c", log=None)
    r = checked.report
    assert r.counts["train"]["circle"] == 17 and r.counts["train"]["star"] == 3
    assert r.imbalance == 17 / 3 and r.rotated == 1 and len(r.unreadable["val"]) == 1
    assert [sorted(p.rsplit("/", 1)[1] for p in g) for g in r.exact["within_train"]] == [sorted([circle[0].name, "copy.jpg"])]
    near = {frozenset(p.rsplit("/", 2)[1] + "/" + p.rsplit("/", 1)[1] for p in g) for g in r.near["within_train"]}
    assert frozenset({f"circle/{circle[1].name}", "square/requality.jpg"}) in near  # re-encoded: found
    across = [sorted(p.rsplit("/", 1)[1] for p in g) for g in r.near["across"]]
    assert sorted([circle[2].name, "leak.jpg"]) in across and r.leaked == 1
    stored = json.loads((tmp_path / "report" / "check.json").read_text())
    assert stored["leaked_test_images"] == 1 and stored["imbalance_ratio"] == round(17 / 3, 3)
    assert "strong, over 3: training weighs the classes by default, --class_weights auto" in (
        tmp_path / "report" / "check.md").read_text()
    assert all((tmp_path / "report" / f).stat().st_size > 1000 for f in ("counts.png", "sizes.png"))
    assert main(["check", str(data), "--out", str(tmp_path / "cli"), "--cache_dir", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "warning: 1 test image(s) in val/ copy a training image" in out


def test_distinct_demo_images_are_not_near_duplicates(tiny_data, tmp_path):
    r = cnnlab.check(tiny_data, out=tmp_path / "r", cache_dir=tmp_path / "c", log=None).report
    assert r.exact == {"within_train": [], "within_val": [], "across": []}
    assert sum(len(v) for v in r.near.values()) == 0 and r.leaked == 0
    assert np.isclose(r.imbalance, 1.0)


def test_the_split_keeps_near_duplicate_clusters_on_one_side_and_is_unchanged_without_them():
    from cnnlab.data import stratified_split

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    rows = np.arange(60)
    plain = stratified_split(labels, rows, 0.25, seed=4)
    singletons = stratified_split(labels, rows, 0.25, seed=4, groups=np.arange(60))
    assert all(np.array_equal(a, b) for a, b in zip(plain, singletons))  # no cluster: the split it always was
    groups = np.arange(60)
    for members in (rng.choice(20, 5, replace=False), 20 + rng.choice(20, 3, replace=False), np.array([7, 33])):
        groups[members] = members[0]  # two clusters within a class, one across classes 0 and 1
    for seed in range(20):
        train, val = stratified_split(labels, rows, 0.25, seed, groups)
        assert not set(groups[train]) & set(groups[val]), seed  # no cluster on both sides
        assert len(train) + len(val) == 60 and len(val) >= 9


def test_train_warns_of_leakage_and_imbalance_and_groups_copies(tiny_data, tiny_cfg, tmp_path):
    from cnnlab.training import fit

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    circle = sorted((data / "train" / "circle").iterdir())
    for k in range(6):
        shutil.copy(circle[0], data / "train" / "circle" / f"copy{k}.jpg")
    shutil.copy(circle[1], data / "val" / "circle" / "leak.jpg")
    for extra in sorted((data / "train" / "star").iterdir())[4:]:
        extra.unlink()
    lines = []
    run = fit(tiny_cfg(data=str(data), epochs=1), progress=False, log=lines.append)
    assert any("1 test image(s) in val/ are byte-identical copies" in line for line in lines), lines
    assert any("unbalanced (circle 22 images, star 4); the loss weighs each class" in line for line in lines), lines
    assert any("1 cluster(s) of near-duplicate training images (7 images)" in line for line in lines), lines
    split = json.loads((run.run_dir / "split.json").read_text())
    copies = {f"train/circle/copy{k}.jpg" for k in range(6)} | {f"train/circle/{circle[0].name}"}
    assert copies <= set(split["train"]) or copies <= set(split["val"])
