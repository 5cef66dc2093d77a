"""Is training at lr-find's suggestion as good as the default recipe's learning rate? For each data set: the range
test on the default config, then the default recipe trained at its own lr (2e-3), at the suggestion (half the lr
of the lowest smoothed loss) and at the classic steepest-descent point, each over seeds 0-2, scored with
`cnnlab evaluate` on the test folder: mean +- std. `--rules` runs some of them only.

    python benchmarks/lr_find_check.py [--sets flowers,grocery] [--image_size 128] [--epochs 8]
                                       [--rules default,suggestion,steepest]
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
    parser.add_argument("--rules", default="default,suggestion,steepest")
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
            lrs = {"default": 2e-3, "suggestion": probe.suggestion, "steepest": probe.steepest}
            for rule in args.rules.split(","):
                accs = [cnnlab.train(**common, lr=lrs[rule], seed=s, name=f"{rule}-{s}", log=None)
                        .evaluate(log=None, progress=False).accuracy for s in range(args.seeds)]
                means[rule] = statistics.mean(accs)
                say(f"| {name} | {rule} {lrs[rule]:.1e} | {statistics.mean(accs):.3f} +- {statistics.stdev(accs):.3f} | "
                    + ", ".join(f"{a:.3f}" for a in accs) + " |")
        if "suggestion" in means and "default" in means:
            ratio = means["suggestion"] / means["default"]
            first = ratio if first is None else first
    say(f"ratio: {first:.3f}" if first is not None else "ratio: n/a (run the default and the suggestion)")


if __name__ == "__main__":
    main()
