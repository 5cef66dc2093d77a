"""Which from-scratch recipe should be cnnlab's default: every candidate in RECIPES, several seeds each, on real
photos (../shared/data/flowers; the synthetic demo set with --data demo), each run trained by `cnnlab train` and
scored by `cnnlab evaluate` on the test folder (val/). Prints mean ± std of test accuracy and the wall time per
run (cache build included; the cache is shared, so only the first run of all pays for it).

    python benchmarks/recipe.py [--data flowers|demo] [--image_size 128] [--epochs 8] [--seeds 3] [--only NAME]
Last line: `ratio: N.N` (the best recipe's mean test accuracy over the old default's)."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED, cpu_flags, say

from cnnlab.cli import main as cnnlab

# Every candidate, as flags on top of --data/--image_size/--epochs/--seed. "old default" is cnnlab's recipe
# before this benchmark existed (Adam 1e-3, constant, no weight decay, no label smoothing). Knobs added later
# are pinned to their old values in the earlier steps' candidates, so each line still runs what it measured.
FLIPS = ["--crop_min", "1", "--jitter", "0"]  # augmentation: horizontal flips (and aspect jitter) only
# steps 1-3 ran before the stride and whitening knobs, with Inception-style augmentation (crop 25-100%, jitter 0.2)
STEPS_1_TO_3 = ["--conv1_stride", "1", "--conv1_init", "kaiming", "--conv_init", "kaiming", "--crop_min", "0.25",
                "--jitter", "0.2"]
OLD_WIDTH = ["--filters", "32", "--filter_org", "same"]  # step 1's lines before 16 filters doubling won
STEP_4 = ["--conv1_stride", "2", "--conv1_init", "kaiming", "--conv_init", "kaiming"]  # before the whitening knob
STEP_5 = ["--conv1_init", "whiten", "--conv_init", "kaiming"]  # before the dirac knob
STEP_6 = ["--conv_init", "dirac"]
CANDIDATES: dict[str, list[str]] = {
    # step 1
    "old default (adam 1e-3 constant)": [
        *OLD_WIDTH, "--optimizer", "adam", "--lr", "1e-3", "--scheduler", "none", "--weight_decay", "0",
        "--label_smoothing", "0", "--tta", "false"],
    "adamw 2e-3 cosine warm-up 1, wd 0.05, ls 0.1": [
        *OLD_WIDTH, "--optimizer", "adamw", "--lr", "2e-3", "--scheduler", "cosine", "--warmup_epochs", "1",
        "--weight_decay", "0.05", "--label_smoothing", "0.1", "--tta", "false"],
    "... + flip TTA": [
        *OLD_WIDTH, "--optimizer", "adamw", "--lr", "2e-3", "--scheduler", "cosine", "--warmup_epochs", "1",
        "--weight_decay", "0.05", "--label_smoothing", "0.1", "--tta", "true"],
    "sgd nesterov 0.05 cosine warm-up 1, wd 5e-4, ls 0.1, TTA": [
        *OLD_WIDTH, "--optimizer", "sgd", "--lr", "0.05", "--scheduler", "cosine", "--warmup_epochs", "1",
        "--weight_decay", "5e-4", "--label_smoothing", "0.1", "--tta", "true"],
    # step 1's winner (the adamw recipe + TTA with 16 doubling filters: "default" then), then step 2: one change each
    "default (as is)": [],
    "default, crop_min 0.5": ["--crop_min", "0.5"],
    "default, crop_min 0.35, jitter 0.1": ["--crop_min", "0.35", "--jitter", "0.1"],
    "default, flips only (crop_min 1, jitter 0)": ["--crop_min", "1", "--jitter", "0"],
    "default, ema 0.99": ["--ema", "0.99"],
    "default, batch 32": ["--batch_size", "32"],
    "default, lr 4e-3": ["--lr", "4e-3"],
    # step 3: flips only won the lines above at 64 px; one more change each on top of it
    "flips, dropout 0.5": [*FLIPS, "--dropout", "0.5"],
    "flips, lr 1e-3": [*FLIPS, "--lr", "1e-3"],
    "flips, no label smoothing": [*FLIPS, "--label_smoothing", "0"],
    "flips, crop_min 0.8, jitter 0.1": ["--crop_min", "0.8", "--jitter", "0.1"],
    "flips, sgd nesterov 0.05, wd 5e-4": [*FLIPS, "--optimizer", "sgd", "--lr", "0.05", "--weight_decay", "5e-4"],
    "flips, global average pool": [*FLIPS, "--global_pool", "true"],
}
RECIPES: dict[str, list[str]] = {name: [*STEPS_1_TO_3, *flags] for name, flags in CANDIDATES.items()}
RECIPES.update({
    # step 4: a stride-2 first convolution: blocks 2-5 on maps half as wide, a quarter of the FLOPs
    "default, conv1_stride 2": [*STEP_4],
    "default, conv1_stride 2, global average pool": [*STEP_4, "--global_pool", "true"],
    "stride 2, batch 32": [*STEP_4, "--batch_size", "32"],
    "stride 2, kernel 5 in the first block": [*STEP_4, "--kernel_size", "5,3,3,3,3"],
    "stride 2, 24 filters doubling": [*STEP_4, "--filters", "24"],
    "stride 2, 32 filters doubling": [*STEP_4, "--filters", "32"],
    "stride 2, val_fraction 0.1 (10% more training images)": [*STEP_4, "--val_fraction", "0.1"],
    "stride 2, dropout 0.5": [*STEP_4, "--dropout", "0.5"],
    # step 5: the first convolution initialised by patch whitening (conv1_init whiten)
    "whitened first conv (the default then)": [*STEP_5],
    "whitened, weight decay 0.2": [*STEP_5, "--weight_decay", "0.2"],
    "whitened, lr 3e-3": [*STEP_5, "--lr", "3e-3"],
    "whitened, warm-up 0.5 epoch": [*STEP_5, "--warmup_epochs", "0.5"],
    "whitened, batch 32": [*STEP_5, "--batch_size", "32"],
    "whitened, kernel 5 in the first block": [*STEP_5, "--kernel_size", "5,3,3,3,3"],
    "whitened, weight decay 0.2, warm-up 0.5 epoch": [*STEP_5, "--weight_decay", "0.2", "--warmup_epochs", "0.5"],
    # step 6: blocks 2-5 start as identities (conv_init dirac, the default now)
    "whitened, dirac convs (the default)": [*STEP_6],
    "dirac, weight decay 0.2": [*STEP_6, "--weight_decay", "0.2"],
    "dirac, crop_min 0.5": [*STEP_6, "--crop_min", "0.5"],
})


def run(data: Path, flags: list[str], seed: int, args: argparse.Namespace, work: Path, name: str) -> tuple[float, float]:
    out = work / "runs"
    start = time.perf_counter()
    code = cnnlab(["train", "--data", str(data), "--image_size", str(args.image_size), "--epochs", str(args.epochs),
                   "--seed", str(seed), *flags, "--out", str(out), "--name", name, "--cache_dir", str(work / "cache"),
                   "--quiet"])
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{name} failed (exit {code})")
    cnnlab(["evaluate", str(out / name), "--data", str(data), "--cache_dir", str(work / "cache"), "--quiet"])
    return json.loads((out / name / "eval" / "metrics.json").read_text())["accuracy"], seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="flowers", help="flowers (../shared/data) or demo (written here)")
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--only", help="run only the recipes whose name contains one of these |-separated words")
    args = ap.parse_args()
    cpu = cpu_flags()
    say(f"{os.cpu_count()} cores, CPU flags {cpu}, torch {torch.__version__}; {args.data} at {args.image_size} px, "
        f"{args.epochs} epochs, {args.seeds} seeds")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.data == "demo":
            from cnnlab.data.demo import make_demo_data

            data = make_demo_data(work / "demo")
        else:
            data = SHARED / args.data
            if not data.is_dir():
                say(f"skipped: {data} is absent (use --data demo)")
                return
        table = {}
        for i, (name, recipe) in enumerate(RECIPES.items()):
            if args.only and not any(word in name for word in args.only.split("|")):
                continue
            results = [run(data, recipe, seed, args, work, f"r{i}-s{seed}") for seed in range(args.seeds)]
            accs, secs = [a for a, _ in results], [s for _, s in results]
            table[name] = accs
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            say(f"| {name} | {statistics.mean(accs):.3f} ± {std:.3f} | {', '.join(f'{a:.3f}' for a in accs)} | "
                f"{statistics.mean(secs):.0f} s |")
    old = next((v for k, v in table.items() if k.startswith("old default")), None)
    if old and len(table) > 1:
        best = max(table, key=lambda k: statistics.mean(table[k]))
        say(f"best: {best}")
        say(f"ratio: {statistics.mean(table[best]) / statistics.mean(old):.2f}")


if __name__ == "__main__":
    main()
