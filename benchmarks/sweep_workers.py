"""A sweep's total wall time with one process against N processes sharing the machine (one GPU, or the CPU's
cores), through the real CLI (`cnnlab sweep ... --workers N`) on a synthetic iNaturalist-shaped JPEG set.
The cache is built once before timing (reported); every process then maps it and uploads it to the device
once for all its trials.

1. The same trials both ways: a grid (activation x batch norm x lr on CUDA; the rest the issue's config: 5x32 filters,
   augmentation, 7 epochs) runs every point exactly once, in 1 process and then in N. Their wall-time ratio is
   the last line. (A bayes sweep would draw other, differently costly, trials in each run.)
2. On CUDA, also the shipped space itself: sweeps/partA.yaml (bayes + hyperband), run_cap 40, N processes.

On CPU everything runs at a smaller size (48 px, 2 epochs, few images, a 6-point grid) and says so.

    python benchmarks/sweep_workers.py [--workers 8] [--shipped 40]
Last line: `ratio: N.N` (the grid's wall time in one process over N processes; higher is better)."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import say
from gpu_trial import GpuSampler, make_set

REPO = Path(__file__).resolve().parents[1]


def run(sweep_file: Path, folder: Path, base: list[str], workers: int) -> tuple[float, dict[str, int], str]:
    cmd = [sys.executable, "-m", "cnnlab.cli", "sweep", str(sweep_file), "--sweeps_dir", str(folder), "--quiet",
           "--workers", str(workers), *base]
    with GpuSampler() as gpu:
        t = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        seconds = time.perf_counter() - t
    import optuna

    from cnnlab.sweeps import make_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = yaml.safe_load(sweep_file.read_text())["name"]
    study = optuna.load_study(study_name=None, storage=make_storage(None, folder / name))
    states: dict[str, int] = {}
    for t in study.trials:
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
    return seconds, states, str(gpu)


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--shipped", type=int, default=40 if cuda else 0, help="trials of sweeps/partA.yaml (0: skip)")
    ap.add_argument("--workers", type=int, default=8 if cuda else 2)
    ap.add_argument("--per_class", type=int, default=1000 if cuda else 30)
    ap.add_argument("--image_size", type=int, default=224 if cuda else 48)
    ap.add_argument("--epochs", type=int, default=7 if cuda else 2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_set(tmp / "data", args.per_class, max(2, args.per_class // 5), (800, 600))
        base = ["--data", str(tmp / "data"), "--image_size", str(args.image_size), "--cache_dir", str(tmp / "cache"),
                "--out", str(tmp / "runs")]
        from cnnlab.data import load_images
        from cnnlab.hardware import decode_device

        device = torch.device("cuda" if cuda else "cpu")
        t = time.perf_counter()
        load_images(tmp / "data" / "train", args.image_size, tmp / "cache", progress=False,
                    decode_device=decode_device("auto", device))
        say(f"device: {torch.cuda.get_device_name() if cuda else 'CPU (no GPU: smaller size)'}; "
            f"{10 * args.per_class} JPEGs, {args.image_size}px, {args.epochs} epochs; cache built in "
            f"{time.perf_counter() - t:.1f}s (not timed below)")
        shipped = yaml.safe_load((REPO / "sweeps" / "partA.yaml").read_text())
        if cuda:  # 40 points
            axes = {"activation": ["relu", "gelu", "silu", "mish"], "batch_norm": [True, False],
                    "lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]}
        else:  # 6 points of different cost
            axes = {"batch_norm": [True, False], "batch_size": [32, 64, 128]}
        grid = {"name": "grid", "method": "grid", "metric": shipped["metric"],
                "parameters": {**{k: {"values": v} for k, v in axes.items()}, "epochs": {"value": args.epochs}}}
        seconds = {}
        for workers in (1, args.workers):
            sweep_file = tmp / f"grid-{workers}.yaml"
            sweep_file.write_text(yaml.safe_dump({**grid, "name": f"grid-{workers}"}))
            seconds[workers], states, gpu = run(sweep_file, tmp / "sweeps", base, workers)
            say(f"grid, {workers} process(es): {sum(states.values())} trials {states} in {seconds[workers]:.0f}s; {gpu}")
        if args.shipped:
            shipped.update(name="partA-shipped", run_cap=args.shipped)
            shipped["parameters"]["epochs"] = {"value": args.epochs}
            sweep_file = tmp / "partA.yaml"
            sweep_file.write_text(yaml.safe_dump(shipped))
            wall, states, gpu = run(sweep_file, tmp / "sweeps", base, args.workers)
            say(f"sweeps/partA.yaml, {args.workers} processes: {sum(states.values())} trials {states} in {wall:.0f}s "
                f"({wall / 60:.1f} min); {gpu}")
    say(f"ratio: {seconds[1] / seconds[args.workers]:.1f}")


if __name__ == "__main__":
    main()
