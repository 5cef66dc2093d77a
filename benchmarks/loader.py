"""Images per second delivered to the model: cnnlab's cached pipeline (with augmentation) against the
reference pipeline (ImageFolder + per-image transforms + DataLoader(num_workers=2)), same JPEGs, same run.

    python benchmarks/loader.py [--image_size 224] [--epochs 3]
Last line: `ratio: N.N` (ours over reference; higher is better)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import photo_folder, reference_loader, say

from cnnlab.data import Batches, ImageTransform, load_images
from cnnlab.preprocess import Preprocess


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root, what = photo_folder(Path(tmp))
        folder = root / "train"
        say(f"data: {what}, {folder}; {args.image_size}px, batch {args.batch_size}, {args.epochs} epochs each")

        t = time.perf_counter()
        images = load_images(folder, args.image_size, Path(tmp) / "cache", progress=False)
        build = time.perf_counter() - t
        n = len(images.valid)
        say(f"cnnlab cache build (once, reused by every later run): {n} images in {build:.1f}s = {n / build:.0f} img/s")

        prep, gen = ImageTransform(Preprocess(args.image_size)), torch.Generator().manual_seed(0)
        batches = Batches(images, images.valid, args.batch_size, torch.device("cpu"), shuffle=True)
        t, seen = time.perf_counter(), 0
        for epoch in range(args.epochs):
            for x, y in batches.epoch(epoch):
                x = prep(x, gen)  # augmentation included: ours does more work per image
                seen += len(y)
        ours = seen / (time.perf_counter() - t)
        say(f"cnnlab cached pipeline + batched augmentation: {ours:,.0f} img/s")

        loader = reference_loader(folder, args.image_size, args.batch_size)
        t, seen = time.perf_counter(), 0
        for _ in range(args.epochs):
            for _, y in loader:
                seen += len(y)
        ref = seen / (time.perf_counter() - t)
        say(f"reference ImageFolder + transforms + DataLoader(num_workers=2): {ref:,.0f} img/s")
    say(f"ratio: {ours / ref:.1f}")


if __name__ == "__main__":
    main()
