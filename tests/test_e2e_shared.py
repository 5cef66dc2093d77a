"""End to end on real photos from ../shared/data (skipped where that folder is absent; a failure under CI=true, whose
checkout has it beside the repository)."""

import json

import numpy as np
import pytest
from conftest import SHARED_DATA, missing_component

from cnnlab.cli import main


@pytest.fixture(autouse=True)
def shared_photos():
    if not (SHARED_DATA / "flowers").is_dir():
        missing_component(f"../shared/data ({SHARED_DATA})", "put the shared folder beside the checkout")


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
    assert images.errors == {} and len(images.valid) == 245  # every file decodes, the palette GIF too
    gif = images.files.index(SHARED_DATA / "hymenoptera" / "train" / "ants" / "imageNotFound.gif")
    from PIL import Image

    expected = np.asarray(Image.open(images.files[gif]).convert("RGB").resize((96, 96), Image.BILINEAR))
    assert np.abs(images.pixels[gif].astype(int) - expected.astype(int)).mean() < 2  # its pixels, as PIL shows it


SHARED_WEIGHTS = SHARED_DATA.parent / "weights" / "tf_efficientnet_lite0.safetensors"


@pytest.mark.slow
def test_real_imagenet_weights_fine_tuned_head_only_on_real_photos(tmp_path, capsys):
    """EfficientNet-Lite0 with its real ImageNet weights, head only, 2 epochs: ants vs bees on the test folder."""
    if not SHARED_WEIGHTS.is_file():
        missing_component(f"../shared/weights ({SHARED_WEIGHTS})", "put the shared folder beside the checkout")
    import timm  # noqa: F401 - declared in dev: an import error fails, never skips
    data = SHARED_DATA / "hymenoptera"
    run = tmp_path / "runs" / "lite0"
    assert main(["train", "--data", str(data), "--model", "timm/tf_efficientnet_lite0", "--weights", str(SHARED_WEIGHTS),
                 "--finetune", "head", "--augment", "false", "--epochs", "2", "--cache_dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "runs"), "--name", "lite0", "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["preprocess"]["mean"] == [0.5, 0.5, 0.5] and summary["preprocess"]["crop"] == 0.875
    assert main(["evaluate", str(run / "best.pt"), "--data", str(data), "--cache_dir", str(tmp_path / "cache"),
                 "--quiet"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["images"] == 153 and metrics["accuracy"] >= 0.9  # measured: 0.941
    bees = sorted((data / "val" / "bees").glob("*.jpg"))[:8]
    capsys.readouterr()
    assert main(["predict", str(run / "best.pt"), *map(str, bees), "--json"]) == 0
    answers = [r["top"][0]["class"] for r in json.loads(capsys.readouterr().out)]
    assert answers.count("bees") >= 6, answers
