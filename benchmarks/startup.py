"""What a command costs before it does any work: `cnnlab --help`, a refused flag, and a training run's fixed start-up
(process start, imports, config and data checks, cache opening, model build: everything but its epochs, measured as
the run's wall time less the epoch times its metrics record, so it includes writing the summary at the end).
Baseline, in the same run: a bare `python -c "import torch"`, the floor of any process that trains.

    python benchmarks/startup.py [--repeats 5]
Last line: `ratio: N.N` (the training run's fixed start-up over the bare torch import; lower is better)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import say


def wall(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    py = sys.executable
    with tempfile.TemporaryDirectory() as tmp:
        data, cache = Path(tmp) / "demo", Path(tmp) / "cache"
        subprocess.run([py, "-m", "cnnlab.cli", "demo-data", str(data)], check=True, stdout=subprocess.DEVNULL)
        train = [py, "-m", "cnnlab.cli", "train", "--data", str(data), "--image_size", "64", "--epochs", "1", "--quiet",
                 "--cache_dir", str(cache), "--out", str(Path(tmp) / "runs")]
        subprocess.run([*train, "--name", "warm"], check=True, stdout=subprocess.DEVNULL)  # the cache, built once
        times: dict[str, list[float]] = {"import torch": [], "cnnlab --help": [], "a refused flag": [],
                                         "training run, fixed start-up": []}
        for k in range(args.repeats):  # interleaved: a machine's load changes all of them alike
            times["import torch"].append(wall([py, "-c", "import torch"]))
            times["cnnlab --help"].append(wall([py, "-m", "cnnlab.cli", "--help"]))
            times["a refused flag"].append(wall([py, "-m", "cnnlab.cli", "train", "--activation", "swish"]))
            name = f"r{k}"
            seconds = wall([*train, "--name", name])
            summary = json.loads((Path(tmp) / "runs" / name / "summary.json").read_text())
            times["training run, fixed start-up"].append(seconds - summary["train_seconds"])
    for what, values in times.items():
        say(f"{what}: median {statistics.median(values):.2f}s (min {min(values):.2f}s, {len(values)} runs)")
    say(f"ratio: {statistics.median(times['training run, fixed start-up']) / statistics.median(times['import torch']):.1f}")


if __name__ == "__main__":
    main()
