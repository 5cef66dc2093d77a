"""Progressive resizing at the plain run's compute: grocery at 128 px, the plain default for 10 epochs against
progressive 0.5 for 12 epochs (about the same pixels trained: 9.5 against 10 full-size epochs), seeds 0..S-1, in one
process, alternating the two, each scored by `evaluate` on the test folder; time is the training epochs' own.

    python benchmarks/progressive_same_compute.py [--data grocery] [--seeds 3]
Last line: `ratio: N.NNN`: progressive's mean test accuracy over the plain run's."""

from __future__ import annotations

import argparse
import statistics
import tempfile

from common import SHARED, cpu_flags, say

import cnnlab

KINDS = {"plain, 10 epochs": {"epochs": 10}, "progressive 0.5, 12 epochs": {"epochs": 12, "progressive": 0.5}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="grocery")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    import torch

    say(f"cores {torch.get_num_threads()}, CPU flags: {cpu_flags() or 'unknown'}, torch {torch.__version__}; {args.data}")
    found: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for i, (kind, values) in enumerate(KINDS.items()):
                run = cnnlab.train(data=str(SHARED / args.data), image_size=128, seed=seed, out=tmp,
                                   name=f"k{i}-{seed}", log=None, progress=False, **values)
                seconds = sum(r["epoch_time"] for r in run.history)
                accuracy = run.evaluate(log=None, progress=False).accuracy
                found[kind].append((accuracy, seconds))
                say(f"  {kind} seed {seed}: test {accuracy:.3f}, training epochs {seconds:.1f} s")
    for kind, rows in found.items():
        acc = [a for a, _ in rows]
        say(f"{kind}: {statistics.mean(acc):.3f} ± {statistics.stdev(acc) if len(acc) > 1 else 0:.3f} "
            f"({', '.join(f'{a:.3f}' for a in acc)}); training epochs {statistics.mean(s for _, s in rows):.1f} s")
    plain, progressive = (statistics.mean(a for a, _ in rows) for rows in found.values())
    say(f"ratio: {progressive / plain:.3f}")


if __name__ == "__main__":
    main()
