"""Re-decide one default on every reference set: each value of a config key, on grocery (10 unbalanced classes of
phone photos), flowers (5 classes, blurry 128 px), hymenoptera (2 classes, full-size) and the synthetic demo set,
over seeds 0-2, each run trained by `cnnlab.train` with that set's reference settings and scored with `evaluate` on
its test folder: accuracy and balanced accuracy, mean +- std. A value "loses" on a set when its mean is below the
best value's by more than twice the standard error of the difference (seed noise); a default must lose nowhere.

    python benchmarks/defaults.py --key class_weights --values none,balanced [--sets grocery,flowers] [--seeds 3]
Last line: `ratio: N.NNN`: the first value's worst set, its mean test accuracy over the best value's there."""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

from common import SHARED, cpu_flags, say

import cnnlab
from cnnlab.data.demo import make_demo_data

# Each set's reference settings: the ones its figures elsewhere in docs/ were measured with
SETS = {"grocery": {"image_size": 128, "epochs": 10}, "flowers": {"image_size": 128, "epochs": 20},
        "hymenoptera": {"image_size": 128, "epochs": 15}, "demo": {"image_size": 64, "epochs": 15}}


def imbalance(root: Path) -> float:
    counts = [sum(1 for f in c.iterdir() if f.is_file()) for c in (root / "train").iterdir() if c.is_dir()]
    return max(counts) / min(counts)


def stderr_of_difference(a: list[float], b: list[float]) -> float:
    return math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) if len(a) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--key", required=True, help="the config key to decide, e.g. class_weights")
    parser.add_argument("--values", required=True, help="its candidate values, comma-separated (the first: today's)")
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    import torch

    values = args.values.split(",")
    say(f"cores {torch.get_num_threads()}, CPU flags: {cpu_flags() or 'unknown'}, torch {torch.__version__}")
    say(f"deciding {args.key} among {values}, seeds 0-{args.seeds - 1}")
    worst = math.inf
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for name in args.sets.split(","):
            root = make_demo_data(Path(tmp) / "demo", seed=0) if name == "demo" else SHARED / name
            if not root.is_dir():
                say(f"{name}: {root} is absent, skipped")
                continue
            found: dict[str, tuple[list[float], list[float], float]] = {}
            for value in values:
                acc, balanced, started = [], [], time.perf_counter()
                for seed in range(args.seeds):
                    run = cnnlab.train(data=str(root), seed=seed, out=f"{tmp}/runs", name=f"{name}-{value}-{seed}",
                                       log=None, progress=False, **SETS[name], **{args.key: value})
                    e = run.evaluate(log=None, progress=False)
                    acc.append(e.accuracy)
                    balanced.append(e["balanced_accuracy"])
                    say(f"  {name} {args.key}={value} seed {seed}: test {e.accuracy:.3f}, balanced {e['balanced_accuracy']:.3f}")
                found[value] = (acc, balanced, (time.perf_counter() - started) / args.seeds)
            best = max(values, key=lambda v: statistics.mean(found[v][0]))
            for value in values:
                acc, balanced, seconds = found[value]
                gap = statistics.mean(found[best][0]) - statistics.mean(acc)
                loses = gap > 2 * stderr_of_difference(found[best][0], acc)
                rows.append(f"| {name} ({imbalance(root):.1f}) | {value} | {statistics.mean(acc):.3f} +- "
                            f"{statistics.stdev(acc):.3f} | {statistics.mean(balanced):.3f} +- {statistics.stdev(balanced):.3f}"
                            f" | {', '.join(f'{a:.3f}' for a in acc)} | {seconds:.0f} s | {'loses' if loses else '-'} |")
            worst = min(worst, statistics.mean(found[values[0]][0]) / statistics.mean(found[best][0]))
        say(f"| set (largest / smallest class) | {args.key} | test accuracy | balanced test accuracy | per seed | "
            "time per run | beyond noise |")
        say("|---|---|---|---|---|---|---|")
        for row in rows:
            say(row)
    say(f"ratio: {worst:.3f}")


if __name__ == "__main__":
    main()
