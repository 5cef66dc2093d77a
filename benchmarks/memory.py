"""Peak memory (RSS) of a real `cnnlab train` run at 224 px, batch 64, on a 10,000-image set.

The decoded cache (10,000 x 224 x 224 x 3 uint8 = 1.5 GB) is memory-mapped: its pages are file-backed and
reclaimable, so the process's private (anonymous) memory stays near the model's needs however big the set.
Samples the training process's RSS (split into anonymous and file-backed) every 0.2 s.

    python benchmarks/memory.py [--images 10000] [--epochs 1]
Last line: `ratio: N.N` = the 3 GB target over the measured peak RSS (higher is better; > 1 meets it)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from common import say
from PIL import Image

TARGET = 3 * 1024**3


def make_set(root: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (10, 240, 320, 3), dtype=np.uint8)
    for i in range(n):
        d = root / "train" / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        img = np.roll(base[i % 10], int(rng.integers(0, 320)), axis=1)
        Image.fromarray(img).save(d / f"{i:05d}.jpg", quality=85)
    for c in range(10):
        (root / "val" / f"class{c}").mkdir(parents=True, exist_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        make_set(tmp / "data", args.images)
        say(f"wrote {args.images} JPEGs (320x240) in {time.perf_counter() - t:.0f}s")
        cmd = [sys.executable, "-m", "cnnlab.cli", "train", "--data", str(tmp / "data"), "--image_size=224",
               "--conv1_stride=1", "--batch_size=64", f"--epochs={args.epochs}", "--cache_dir", str(tmp / "cache"),
               "--out", str(tmp / "runs"), "--name=mem", "--quiet"]  # the network the README's figure was measured with
        proc = subprocess.Popen(cmd)
        p = psutil.Process(proc.pid)
        peak = peak_anon = peak_file = 0
        while proc.poll() is None:
            try:
                procs = [p, *p.children(recursive=True)]
                mems = [q.memory_full_info() for q in procs]
            except psutil.Error:
                time.sleep(0.2)
                continue
            main_mem = mems[0]
            peak = max(peak, main_mem.rss)
            peak_anon = max(peak_anon, main_mem.rss - main_mem.shared)
            peak_file = max(peak_file, main_mem.shared)
            time.sleep(0.2)
        cache = sum(f.stat().st_size for f in (tmp / "cache").glob("*.npy"))
        say(f"cache on disk: {cache / 1024**3:.2f} GiB; training process peak RSS {peak / 1024**3:.2f} GiB "
            f"(private {peak_anon / 1024**3:.2f} GiB, file-backed/shared {peak_file / 1024**3:.2f} GiB); exit {proc.returncode}")
    say(f"ratio: {TARGET / peak:.1f}")


if __name__ == "__main__":
    main()
