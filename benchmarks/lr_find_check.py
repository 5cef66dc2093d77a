"""Is training at lr-find's suggestion as good as the default recipe's learning rate? For each data set: the range
test on the default config, then the default recipe trained at its own lr (2e-3) and at the suggestion (steepest
descent) and at min/10, each over seeds 0-2, scored with `cnnlab evaluate` on the test folder: mean +- std.

    python benchmarks/lr_find_check.py [--sets flowers,grocery] [--image_size 128] [--epochs 8]
Last line: `ratio: N.NNN` (mean test accuracy at the suggestion over the default lr's, first data set)."""

from __future__ import annotations

import argparse
import statistics
import tempfile

from common import SHARED, cpu_flags, say

import cnnlab


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sets", default="flowers,grocery")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    import torch

    say(f"cores {torch.get_num_threads()}, CPU flags: {cpu_flags() or 'unknown'}, torch {torch.__version__}")
    say("| data | lr | test accuracy | per seed |")
    say("|---|---|---|---|")
    first = None
    for name in args.sets.split(","):
        data = str(SHARED / name)
        with tempfile.TemporaryDirectory() as tmp:
            common = dict(data=data, image_size=args.image_size, epochs=args.epochs, out=f"{tmp}/runs", progress=False)
            probe = cnnlab.lr_find(**common, name="probe", log=None)
            means = {}
            for label, lr in (("default 2e-3", 2e-3), (f"suggestion {probe.steepest:.1e}", probe.steepest),
                              (f"min/10 {probe.min_over_10:.1e}", probe.min_over_10)):
                accs = [cnnlab.train(**common, lr=lr, seed=s, name=f"{label.split()[0]}-{s}", log=None)
                        .evaluate(log=None, progress=False).accuracy for s in range(args.seeds)]
                means[label.split()[0]] = statistics.mean(accs)
                say(f"| {name} | {label} | {statistics.mean(accs):.3f} +- {statistics.stdev(accs):.3f} | "
                    + ", ".join(f"{a:.3f}" for a in accs) + " |")
        ratio = means["suggestion"] / means["default"]
        first = ratio if first is None else first
    say(f"ratio: {first:.3f}")


if __name__ == "__main__":
    main()
