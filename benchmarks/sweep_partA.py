"""The shipped Part A search space on real photos: `cnnlab train` with its defaults first (the baseline), then
`cnnlab sweep sweeps/partA.yaml` (bayes + hyperband, embedded Optuna) for --count trials, `cnnlab sweep-report`,
and `cnnlab evaluate` of the best trial on the test folder (val/). Everything goes through the real CLI, on
../shared/data/flowers. Selection uses validation accuracy only; the test score is read once, at the end.

    python benchmarks/sweep_partA.py [--image_size 128] [--count 20] [--max_filters 32]
--max_filters drops the larger `filters` choices from the space (64 filters doubling at stride 1 trains for hours
on 2 CPU cores); the line that says which space ran is printed first.
Last line: `ratio: N.NN` (the best trial's validation accuracy over the default recipe's, same epochs)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import optuna
import torch
import yaml
from common import SHARED, cpu_flags, say

from cnnlab.cli import main as cnnlab
from cnnlab.sweeps import make_storage

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="flowers")
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--count", type=int, default=20)
    ap.add_argument("--max_filters", type=int, default=0, help="drop larger `filters` choices (0: keep all)")
    args = ap.parse_args()
    data = SHARED / args.data
    if not data.is_dir():
        say(f"skipped: {data} is absent")
        return
    cpu = cpu_flags()
    space = yaml.safe_load((REPO / "sweeps" / "partA.yaml").read_text())
    if args.max_filters:
        space["parameters"]["filters"]["values"] = [f for f in space["parameters"]["filters"]["values"]
                                                    if f <= args.max_filters]
    epochs = space["parameters"]["epochs"]["value"]
    say(f"{os.cpu_count()} cores, CPU flags {cpu}, torch {torch.__version__}; {args.data} at {args.image_size} px, "
        f"{args.count} trials of {epochs} epochs; filters {space['parameters']['filters']['values']}")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "partA.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
        common = ["--data", str(data), "--image_size", str(args.image_size), "--cache_dir", str(work / "cache"),
                  "--quiet"]
        start = time.perf_counter()
        assert cnnlab(["train", *common, "--epochs", str(epochs), "--out", str(work / "runs"), "--name", "default"]) == 0
        default_val = json.loads((work / "runs" / "default" / "summary.json").read_text())["best_val_acc"]
        say(f"default recipe: best val_acc {default_val:.4f} in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        assert cnnlab(["sweep", str(work / "partA.yaml"), *common, "--count", str(args.count),
                       "--sweeps_dir", str(work / "sweeps")]) == 0
        say(f"sweep: {args.count} trials in {(time.perf_counter() - start) / 60:.1f} min")
        folder = work / "sweeps" / "partA"
        assert cnnlab(["sweep-report", str(folder)]) == 0
        say((folder / "report" / "best_trials.md").read_text())
        storage = make_storage(None, folder)
        study = optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)
        best = study.best_trial
        say(f"best trial {best.number}: val_acc {best.value:.4f}, its sweep parameters:\n"
            + yaml.safe_dump(best.user_attrs["config"], sort_keys=False))
        run_dir = best.user_attrs["run_dir"]
        assert cnnlab(["evaluate", run_dir, "--data", str(data), "--cache_dir", str(work / "cache"), "--quiet"]) == 0
        test = json.loads((Path(run_dir) / "eval" / "metrics.json").read_text())["accuracy"]
        say(f"best trial's test accuracy: {test:.4f}")
    say(f"ratio: {best.value / default_val:.2f}")


if __name__ == "__main__":
    main()
