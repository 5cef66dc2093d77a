"""Shared by the benchmarks: where the photos come from, and the reference pipeline users write today."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def photo_folder(tmp: Path, name: str = "hymenoptera") -> tuple[Path, str]:
    """A train/val folder of real photos from ../shared/data, or synthetic 800x600 JPEGs when it is absent."""
    if (SHARED / name).is_dir():
        return SHARED / name, f"real photos: ../shared/data/{name}"
    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("val", 40)):
        for c in range(2):
            d = tmp / "synthetic" / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 255, (600, 800, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.jpg", quality=90)
    return tmp / "synthetic", "synthetic 800x600 JPEGs (../shared/data is absent)"


def reference_loader(folder: Path, image_size: int, batch_size: int, workers: int = 2):
    """ImageFolder + per-image Resize/ToTensor/Normalize + DataLoader: how the assignment is usually written."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.Resize((image_size, image_size)), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    return torch.utils.data.DataLoader(ImageFolder(str(folder), tf), batch_size=batch_size, shuffle=True,
                                       num_workers=workers, persistent_workers=False)


def cpu_flags() -> str:
    """The CPU features that decide fp32 vs bf16 speed, as named in /proc/cpuinfo (empty where it is absent)."""
    info = Path("/proc/cpuinfo")
    flags = info.read_text() if info.exists() else ""
    return " ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f" {f}" in flags)


def say(*args) -> None:
    print(*args, flush=True, file=sys.stdout)
