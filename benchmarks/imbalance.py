"""Does weighting the loss or balancing the sampler help on unbalanced classes? The default recipe on real
photos (../shared/data/grocery: 10 classes, 70 to 278 training photos each), with class_weights none/balanced and
sampler none/balanced, each over seeds 0-2, scored with `cnnlab evaluate` on the test folder: accuracy and
balanced accuracy (mean per-class recall), mean +- std. The baseline is the default (none, none), in the same run.

    python benchmarks/imbalance.py [--data ../shared/data/grocery] [--image_size 128] [--epochs 10]
Last line: `ratio: N.NNN` (best option's balanced test accuracy over the default's)."""

from __future__ import annotations

import argparse
import statistics
import tempfile

from common import SHARED, cpu_flags, say

import cnnlab

OPTIONS = {"default (none, none)": {}, "class_weights balanced": {"class_weights": "balanced"},
           "sampler balanced": {"sampler": "balanced"}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(SHARED / "grocery"))
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    import torch

    say(f"cores {torch.get_num_threads()}, CPU flags: {cpu_flags() or 'unknown'}, torch {torch.__version__}")
    say(f"{args.data} at {args.image_size} px, {args.epochs} epochs, seeds 0-{args.seeds - 1}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, option in OPTIONS.items():
            acc, balanced = [], []
            for seed in range(args.seeds):
                run = cnnlab.train(data=args.data, image_size=args.image_size, epochs=args.epochs, seed=seed,
                                   out=f"{tmp}/runs", name=f"{label.split()[0]}-{seed}", log=None, progress=False,
                                   **option)
                e = run.evaluate(log=None, progress=False)
                acc.append(e.accuracy)
                balanced.append(e["balanced_accuracy"])
                say(f"  {label:<24} seed {seed}: test {e.accuracy:.3f}, balanced {e['balanced_accuracy']:.3f}")
            results[label] = (acc, balanced)
    say("| option | test accuracy | balanced test accuracy | per seed (balanced) |")
    say("|---|---|---|---|")
    for label, (acc, balanced) in results.items():
        say(f"| {label} | {statistics.mean(acc):.3f} +- {statistics.stdev(acc):.3f} | "
            f"{statistics.mean(balanced):.3f} +- {statistics.stdev(balanced):.3f} | "
            + ", ".join(f"{b:.3f}" for b in balanced) + " |")
    base = statistics.mean(results["default (none, none)"][1])
    best = max(statistics.mean(b) for _, b in results.values())
    say(f"ratio: {best / base:.3f}")


if __name__ == "__main__":
    main()
