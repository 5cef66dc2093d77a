"""Reliability, round two: no silent wrong result, no orphaned process, no traceback. Each test reproduces a defect
seen on the main branch (real files, real processes, real signals)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image, ImageOps

from cnnlab.cli import main
from cnnlab.data.demo import make_demo_data


def cnnlab(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnlab.cli", *args], capture_output=True, text=True, timeout=300,
                          **kw)


def one_line_exit_2(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---- 1. EXIF orientation ---------------------------------------------------------------------------------------

def asymmetric_photo() -> Image.Image:
    """48 x 32, a different colour in each corner region, so every turn and mirror of it is told apart."""
    a = np.zeros((32, 48, 3), dtype=np.uint8)
    a[:16, :24] = (250, 10, 10)
    a[:16, 24:] = (10, 250, 10)
    a[16:, :24] = (10, 10, 250)
    a[16:, 24:] = (250, 250, 10)
    a[:4, :8] = (255, 255, 255)
    return Image.fromarray(a)


def write_oriented(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for value in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = value
        path = folder / f"orientation{value}.jpg"
        asymmetric_photo().save(path, "JPEG", quality=95, exif=exif)
        paths.append(path)
    return paths


def upright_reference(path: Path, size: int) -> np.ndarray:
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        return np.asarray(im.resize((size, size), Image.BILINEAR, reducing_gap=3.0))


def test_every_decoder_turns_photos_upright_as_exif_transpose_does(tmp_path):
    from cnnlab.data.decode import load_rgb
    from cnnlab.data.decode_gpu import decode_into

    paths = write_oriented(tmp_path / "photos")
    size = 32
    batched = np.zeros((len(paths), size, size, 3), dtype=np.uint8)
    assert decode_into(paths, (size, 0.0, "bilinear"), batched, torch.device("cpu"), batch=4) == {}
    stored = np.asarray(Image.open(paths[0]).convert("RGB").resize((size, size), Image.BILINEAR)).astype(int)
    for i, path in enumerate(paths):
        want = upright_reference(path, size).astype(int)
        assert np.abs(load_rgb(str(path), size).astype(int) - want).max() <= 1, path.name  # the PIL path
        assert np.abs(batched[i].astype(int) - want).mean() < 3, path.name  # torchvision's decoder (nvJPEG's code)
        if i:  # before: every file decoded as stored
            assert np.abs(want - stored).mean() > 40, path.name


def test_a_cache_of_the_old_decoder_is_not_reused(tmp_path):
    from cnnlab.data import cache_key
    from cnnlab.data.decode import DECODE_VERSION

    assert DECODE_VERSION >= 2  # version 1 cached photos as stored, not upright
    files = write_oriented(tmp_path / "p")
    assert cache_key(files, 32) != cache_key(files, 32, "nvjpeg")


# ---- 17. 16-bit and float images -------------------------------------------------------------------------------

def test_16_bit_and_float_images_are_scaled_by_their_type_not_their_brightest_pixel(tmp_path):
    from cnnlab.data.decode import load_rgb

    dark = np.full((8, 8), 1000, dtype=np.uint16)
    dark[0, 0] = 0
    Image.fromarray(dark).save(tmp_path / "dark16.png")
    with Image.open(tmp_path / "dark16.png") as im:
        assert im.mode.startswith("I")  # really a 16-bit file
    got = load_rgb(str(tmp_path / "dark16.png"), 8)
    assert got[4, 4].tolist() == [4, 4, 4]  # 1000/65535 of white; before: 251, stretched to the image's maximum
    floats = np.array([[-50.0, 0.0, 100.0, 300.0]] * 4, dtype=np.float32)
    Image.fromarray(floats, "F").save(tmp_path / "float.tif")
    got = load_rgb(str(tmp_path / "float.tif"), 4, interpolation="bilinear")
    row = np.asarray(Image.open(tmp_path / "float.tif"))  # the stored floats, read back
    assert row.min() < 0 and got[:, 0, 0].max() == 0  # a negative value is black; before: it wrapped around
    assert got[:, 3, 0].min() == 255  # above 255 clips to white


# ---- 2. --resume keeps its split -------------------------------------------------------------------------------

def test_resume_keeps_the_split_it_started_with_when_photos_were_added(tiny_data, tiny_cfg, tmp_path):
    import shutil

    from cnnlab.train import fit

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    first = fit(tiny_cfg(data=str(data), epochs=1), progress=False, log=lambda s: None)
    before = json.loads((first.run_dir / "split.json").read_text())
    for k, src in enumerate(sorted((data / "train" / "circle").iterdir())[:15]):  # 15 new photos
        shutil.copy(src, data / "train" / "circle" / f"new-{k}.jpg")
    lines = []
    resumed = fit(tiny_cfg(data=str(data), epochs=2), resume=True, progress=False, log=lines.append)
    assert json.loads((resumed.run_dir / "split.json").read_text()) == before
    summary = json.loads((resumed.run_dir / "summary.json").read_text())
    assert (summary["train_images"], summary["val_images"]) == (len(before["train"]), len(before["val"]))
    assert any("15 file(s) added" in line and "left out" in line for line in lines), lines


def test_training_without_validation_rows_is_refused_before_any_work(tmp_path, capsys):
    for name in ("a", "b"):
        (tmp_path / "d" / "train" / name).mkdir(parents=True)
        Image.new("RGB", (40, 40), (9, 9, 9) if name == "a" else (200, 0, 0)).save(tmp_path / "d" / "train" / name / "x.jpg")
    code = main(["train", "--data", str(tmp_path / "d"), "--image_size=32", "--out", str(tmp_path / "runs"),
                 "--cache_dir", str(tmp_path / "c"), "--name=one"])
    err = capsys.readouterr().err
    assert code == 2 and "left for validation" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs" / "one" / "metrics.jsonl").exists()


def test_evaluate_on_a_test_folder_without_one_readable_image_is_one_line(tiny_cfg, tmp_path):
    import shutil

    from cnnlab.train import fit

    run = fit(tiny_cfg(epochs=1), progress=False, log=lambda s: None)
    data = tmp_path / "broken"
    shutil.copytree(Path(tiny_cfg().data) / "train", data / "train")
    for folder in (data / "train").iterdir():
        (data / "val" / folder.name).mkdir(parents=True)
        (data / "val" / folder.name / "x.jpg").write_bytes(b"not a jpeg")
    result = cnnlab("evaluate", str(run.run_dir), "--data", str(data), "--cache_dir", str(tmp_path / "c"))
    one_line_exit_2(result, "nothing to test on")
