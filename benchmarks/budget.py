"""Does `--budget` end on time, use the time, and find as good a model as the sweep a student runs today? On real
photos (../shared/data/grocery), 2 cores:

1. `cnnlab sweep sweeps/partA.yaml --budget B` (sampler seeds 0..S-1): its wall time against B (within +10%), the share
   of B used (at least 70%), complete trials (at least 3), and its best validation accuracy;
2. the baseline, in the same run: the same sweep without a budget (the default --count: the file's run_cap), stopped
   by Ctrl-C after the budgeted sweep's own wall time, as a student whose session ends would see it: its best
   validation accuracy among the trials that finished by then;
3. `cnnlab assignment --quick --budget A` with EfficientNet-Lite0 (../shared/weights) for Part B: wall time against A
   and the report written.

    python benchmarks/budget.py [--budget 4m] [--seeds 3] [--assignment 10m] [--skip_assignment]
Last line: `ratio: N.NN`: the budgeted sweep's mean best validation accuracy over the baseline's."""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import SHARED, cpu_flags, say

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = SHARED.parent / "weights" / "tf_efficientnet_lite0.safetensors"


def best_of(folder: Path, by: datetime.datetime | None = None) -> tuple[float | None, int]:
    """The best val_acc of the trials of a sweep folder that completed (by `by`), and how many did."""
    import optuna
    from optuna.trial import TrialState

    from cnnlab.sweeps import make_storage

    study = optuna.load_study(study_name=folder.name, storage=make_storage(None, folder))
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE
            and (by is None or t.datetime_complete <= by)]
    return (max(t.value for t in done) if done else None), len(done)


def cnnlab(*args: str) -> list[str]:
    return [sys.executable, "-m", "cnnlab.cli", *args]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="grocery")
    parser.add_argument("--budget", default="4m")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--assignment", default="10m")
    parser.add_argument("--skip_assignment", action="store_true")
    args = parser.parse_args()
    from cnnlab.budget import parse_duration

    data = SHARED / args.data
    budget = parse_duration(args.budget)
    say(f"CPU flags: {cpu_flags() or 'unknown'}; {data}; sweep budget {args.budget}, sampler seeds 0-{args.seeds - 1}")
    budgeted, baseline = [], []
    with tempfile.TemporaryDirectory() as tmp:
        cache = f"{tmp}/cache"
        # the image cache built once first, as a student's second sweep finds it: both sides start warm
        subprocess.run(cnnlab("train", "--data", str(data), "--epochs", "1", "--out", f"{tmp}/warm", "--cache_dir", cache,
                              "--quiet"), check=True, stdout=subprocess.DEVNULL)
        for seed in range(args.seeds):
            folder = Path(tmp) / f"budgeted-{seed}"
            started = time.monotonic()
            done = subprocess.run(cnnlab("sweep", str(ROOT / "sweeps" / "partA.yaml"), "--data", str(data), "--budget",
                                         args.budget, "--sampler_seed", str(seed), "--sweeps_dir", str(folder),
                                         "--cache_dir", cache, "--quiet"), capture_output=True, text=True)
            wall = time.monotonic() - started
            if done.returncode:
                raise SystemExit(done.stderr)
            record = json.loads((folder / "partA" / "budget.json").read_text())
            best, complete = best_of(folder / "partA")
            plan = next(line for line in done.stdout.splitlines() if line.startswith("budget ") and "left" in line)
            budgeted.append(best)
            say(f"seed {seed} budgeted: {wall:.0f} s wall of {budget:.0f} s ({wall / budget:.0%}), "
                f"spent {record['spent_s']:.0f} s, {complete} complete trials ({len(record['trials']['shortened'])} "
                f"started shorter, {len(record['trials']['cut'])} stopped at the deadline), best val_acc {best:.4f}; "
                f"calibration {record['spent']['calibration_s']:.0f} s; first plan: {plan}")
            folder = Path(tmp) / f"baseline-{seed}"
            began = datetime.datetime.now()
            proc = subprocess.Popen(cnnlab("sweep", str(ROOT / "sweeps" / "partA.yaml"), "--data", str(data),
                                           "--sampler_seed", str(seed), "--sweeps_dir", str(folder), "--cache_dir", cache,
                                           "--quiet"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=wall)
            except subprocess.TimeoutExpired:
                # the session ends: what finished by then is what the student has (SIGTERM, which cnnlab ends on as on
                # Ctrl-C: a background process of a script ignores SIGINT)
                proc.send_signal(signal.SIGTERM)
                proc.wait()
            best, complete = best_of(folder / "partA", began + datetime.timedelta(seconds=wall))
            baseline.append(best if best is not None else 0.0)
            say(f"seed {seed} baseline (run_cap 40, stopped after {wall:.0f} s): {complete} complete trials, best val_acc "
                f"{best if best is not None else float('nan'):.4f}")
        if not args.skip_assignment and WEIGHTS.is_file():
            limit = parse_duration(args.assignment)
            started = time.monotonic()
            done = subprocess.run(cnnlab("assignment", "--data", str(data), "--out", f"{tmp}/job", "--quick", "--budget",
                                         args.assignment, "--model", "timm/tf_efficientnet_lite0", "--weights",
                                         str(WEIGHTS), "--cache_dir", cache, "--quiet"), capture_output=True, text=True)
            wall = time.monotonic() - started
            if done.returncode:
                raise SystemExit(done.stderr[-3000:])
            record = json.loads((Path(tmp) / "job" / "budget.json").read_text())
            say(f"assignment --quick --budget {args.assignment}: {wall:.0f} s wall of {limit:.0f} s ({wall / limit:.0%}), "
                f"report {'written' if (Path(tmp) / 'job' / 'report' / 'index.html').is_file() else 'MISSING'}")
            say("| phase | planned | spent | state |")
            say("|---|---|---|---|")
            for name, phase in record["phases"].items():
                planned = phase.get("planned_s")
                say(f"| {name} | {f'{planned:.0f} s' if planned is not None else '-'} | {phase['spent_s']:.0f} s | "
                    f"{phase['state']} |")
            for what in record["cut"]:
                say(f"cut: {what}")
            say("the plan as printed:")
            say("\n".join(line for line in done.stdout.splitlines() if line.startswith("  ") or "budget" in line))
    mean_b, mean_0 = statistics.mean(budgeted), statistics.mean(baseline)

    def spread(values: list[float]) -> float:
        return statistics.stdev(values) if len(values) > 1 else 0.0

    say(f"best val_acc: budgeted {mean_b:.4f} +- {spread(budgeted):.4f}, baseline {mean_0:.4f} +- {spread(baseline):.4f}")
    say(f"ratio: {mean_b / mean_0:.3f}")


if __name__ == "__main__":
    main()
