"""Part B's default path: head-only fine-tuning of EfficientNet-Lite0 (real ImageNet weights, ../shared/weights)
with `--augment auto` (the default: off for a frozen backbone, so its output is computed once into the feature
store) against the old default, `--augment true` (the backbone runs every epoch on augmented images), same photos,
same seeds, same machine, in one run. Each run is scored with `cnnlab evaluate` on the test folder; wall time is
all of `cnnlab train` (decode, store, epochs).

    python benchmarks/partb_default.py [--sets hymenoptera,grocery] [--seeds 3] [--slow_seeds 3] [--epochs 15]
Last line: `ratio: N.N` (the old path's mean wall time over the default's, on the first data set)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from common import SHARED, cpu_flags, say

import cnnlab

WEIGHTS = SHARED.parent / "weights" / "tf_efficientnet_lite0.safetensors"


def one(data: str, augment: str, seed: int, epochs: int, out: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    run = cnnlab.train(data=data, model="timm/tf_efficientnet_lite0", weights=str(WEIGHTS), finetune="head",
                       augment=augment, epochs=epochs, seed=seed, out=out, name=f"{augment}-{seed}", log=None,
                       progress=False)
    seconds = time.perf_counter() - t0
    return run.evaluate(log=None, progress=False).accuracy, seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", default="hymenoptera,grocery")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--slow_seeds", type=int, default=3, help="seeds of the old, slow path")
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    import torch

    if not WEIGHTS.exists():
        say(f"skipped: {WEIGHTS} is absent")
        return
    say(f"cores {torch.get_num_threads()}, CPU flags: {cpu_flags() or 'unknown'}, torch {torch.__version__}")
    say("| data | path | test accuracy | per seed | wall time per run |")
    say("|---|---|---|---|---|")
    first_ratio = None
    for name in args.sets.split(","):
        times = {}
        with tempfile.TemporaryDirectory() as tmp:
            for augment, seeds in (("auto", args.seeds), ("true", args.slow_seeds)):
                accs, secs = zip(*(one(str(SHARED / name), augment, s, args.epochs, f"{tmp}/{name}")
                                   for s in range(seeds)))
                times[augment] = statistics.mean(secs)
                spread = f" +- {statistics.stdev(accs):.3f}" if len(accs) > 1 else ""
                say(f"| {name} | augment {augment}{' (default)' if augment == 'auto' else ' (old default)'} | "
                    f"{statistics.mean(accs):.3f}{spread} | {', '.join(f'{a:.3f}' for a in accs)} | "
                    f"{statistics.mean(secs):.0f} s |")
        ratio = times["true"] / times["auto"]
        say(f"{name}: old path / default: {ratio:.1f}x the time")
        first_ratio = ratio if first_ratio is None else first_ratio
    say(f"ratio: {first_ratio:.1f}")


if __name__ == "__main__":
    main()
