"""End to end on real photos from ../shared/data (skipped where that folder is absent)."""

import json

import pytest
from conftest import SHARED_DATA

from cnnlab.cli import main

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "flowers").is_dir(), reason="../shared/data is absent")


@pytest.mark.slow
def test_train_on_real_flower_photos(tmp_path, capsys):
    argv = ["train", "--data", str(SHARED_DATA / "flowers"), "--image_size=64", "--epochs=2", "--filters=16",
            "--filter_org=double", "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"),
            "--name=flowers", "--quiet"]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "runs" / "flowers" / "summary.json").read_text())
    assert summary["train_images"] + summary["val_images"] == 3457  # train/ only: val/ is the test set
    assert summary["best_val_acc"] > 0.4  # 5 classes, chance 0.2 (measured: 0.63 after 2 epochs)
    best = tmp_path / "runs" / "flowers" / "best.pt"
    assert main(["evaluate", str(best), "--data", str(SHARED_DATA / "flowers"), "--cache_dir", str(tmp_path / "cache"),
                 "--quiet"]) == 0
    metrics = json.loads((tmp_path / "runs" / "flowers" / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 860 and metrics["accuracy"] > 0.4


def test_full_size_jpegs_and_the_gif_placeholder_decode(tmp_path):
    from cnnlab.data import load_images

    images = load_images(SHARED_DATA / "hymenoptera" / "train", 96, tmp_path / "cache", progress=False)
    assert images.classes == ["ants", "bees"] and len(images.files) == 245
    assert len(images.valid) + len(images.errors) == 245
