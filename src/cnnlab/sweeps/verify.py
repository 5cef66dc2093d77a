"""Is a sweep's winner real, or the luckiest of single noisy runs? `--verify K`: after the search, the top K
configurations by the sweep's metric are each trained again with `seeds` new seeds (the trial's seed + 1, + 2, ...;
each seed also draws its own train/validation split, so split noise counts too). The search's own run is left out
of the mean: it was chosen for scoring high, so its score is biased upward (the winner's curse).

The winner is the best mean. Against each runner-up it is tested by a paired t-test over the seeds (both
configurations trained with the same seeds, so on the same splits): a p-value under 0.05 says the difference is
distinguishable from seed noise; above it, the two are tied as far as these runs can tell. The model that goes on to
the test folder is the winner's run with the best validation score among its verification runs and its search trial:
chosen by validation only, never by the test folder.

Written to the sweep folder: `verify/<trial>-seed<k>/` (run folders, resumed when cut), `verify.json`, `verify.md`.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from ..config import make_config
from ..errors import CnnlabError
from ..io import atomic_write_json, atomic_write_text
from ..run_folder import RunFolder, inside, recorded_path
from ..training import fit
from .engine import value_of
from .report import finished_trials, load_sweep_folder

VERIFY = "verify.json"
SIGNIFICANCE = 0.05


def top_trials(study: Any, k: int, goal: str) -> list[Any]:
    """The k complete trials with the best values, best first (ties: the earlier trial)."""
    complete = [t for t in finished_trials(study) if t.value is not None and t.state.name == "COMPLETE"]
    ordered = sorted(complete, key=lambda t: (-t.value if goal == "maximize" else t.value, t.number))
    return ordered[:k]


def train_again(cfg: Any, folder: Path, name: str, progress: bool) -> tuple[RunFolder, bool]:
    """A run folder of `cfg` named `name` in `folder`: left as it is when finished, resumed when cut, else trained;
    and whether it was trained (or resumed) now."""
    run = RunFolder(folder / name)
    cfg = replace(cfg, out=str(folder), name=name)
    if run.finished:
        return run, False
    fit(cfg, resume=run.resumable, progress=progress, log=lambda s: None)
    return RunFolder(folder / name), True


def paired_test(a: list[float], b: list[float]) -> float:
    """The two-sided p-value of a paired t-test of a against b (1.0 where every difference is the same: no spread
    to judge by, as when both are identical)."""
    from scipy import stats

    differences = [x - y for x, y in zip(a, b)]
    if len(differences) < 2 or statistics.pstdev(differences) <= 1e-9:  # the same difference on every seed
        return 1.0 if all(abs(d) <= 1e-9 for d in differences) else 0.0
    return float(stats.ttest_rel(a, b).pvalue)


def verify_sweep(folder: str | Path, k: int, seeds: int = 3, storage: str | None = None,
                 machine: dict[str, Any] | None = None, progress: bool = False,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the top `k` configurations of the sweep in `folder` again with `seeds` seeds each, pick the best mean,
    test it against each runner-up; writes verify.json and verify.md and returns what verify.json holds.
    `machine`: where this process trains (device, cache_dir, decode_workers), over each trial's own."""
    folder = Path(folder)
    study, sweep, _ = load_sweep_folder(folder, storage)
    metric, goal = sweep.metric, sweep.goal
    top = top_trials(study, k, goal)
    if not top:
        raise CnnlabError(f"{folder}: no complete trial to verify yet")
    if len(top) < k:
        log(f"verify: only {len(top)} complete trial(s) to verify of the {k} asked for")
    candidates, trained = [], 0
    for rank, trial in enumerate(top, 1):
        trial_run = RunFolder(inside(folder, trial.user_attrs["run_dir"]))
        cfg = make_config(trial_run.config.to_dict(), machine or {})
        values, runs = [], []
        for s in range(1, seeds + 1):
            name = f"{trial_run.path.name}-seed{cfg.seed + s}"
            run, now = train_again(replace(cfg, seed=cfg.seed + s), folder / "verify", name, progress)
            trained += now
            if now:
                log(f"verify: trial {trial.number} (#{rank} of the search, {metric} {trial.value:.4f}) trained with "
                    f"seed {cfg.seed + s}: {metric} {value_of(run.history, metric):.4f}")
            values.append(value_of(run.history, metric))
            runs.append(recorded_path(folder, run.path))  # of the sweep folder: it may move
        candidates.append({"trial": trial.number, "search_value": trial.value, "config": trial.user_attrs["config"],
                           "trial_run": recorded_path(folder, trial_run.path),
                           "seeds": [cfg.seed + s for s in range(1, seeds + 1)],
                           "values": values, "runs": runs, "mean": statistics.mean(values),
                           "std": statistics.stdev(values) if len(values) > 1 else 0.0})
    sign = 1 if goal == "maximize" else -1
    candidates.sort(key=lambda c: (-sign * c["mean"], c["trial"]))
    winner = candidates[0]
    for c in candidates[1:]:
        p = paired_test(winner["values"], c["values"])
        c["versus_winner"] = {"difference": winner["mean"] - c["mean"], "p_value": p,
                              "distinguishable": p < SIGNIFICANCE}
    # the model for the test folder: the winner's best run by validation (its verification runs and its search trial)
    chosen = max([(v, r) for v, r in zip(winner["values"], winner["runs"])] + [(winner["search_value"], winner["trial_run"])],
                 key=lambda vr: sign * vr[0])
    result = {"metric": metric, "goal": goal, "k": k, "seeds": seeds, "candidates": candidates,
              "winner": winner["trial"], "model": chosen[1], "search_best": top[0].number,
              "changed": winner["trial"] != top[0].number, "trained_now": trained}
    atomic_write_json(folder / VERIFY, result)
    atomic_write_text(folder / "verify.md", verify_markdown(result))
    log(verify_summary(result))
    return result


def verify_summary(result: dict[str, Any]) -> str:
    winner = result["candidates"][0]
    ties = [c for c in result["candidates"][1:] if not c["versus_winner"]["distinguishable"]]
    line = (f"verified: trial {winner['trial']} wins with {result['metric']} {winner['mean']:.4f} +- {winner['std']:.4f} "
            f"over {result['seeds']} new seeds")
    if result["changed"]:
        line += f" (the search's best single run was trial {result['search_best']})"
    if ties:
        line += ("; not distinguishable from seed noise against trial(s) " + ", ".join(str(c["trial"]) for c in ties))
    return line + f"; the model for the test folder: {result['model']}"


def verify_markdown(result: dict[str, Any]) -> str:
    metric = result["metric"]
    lines = [f"# The sweep's top {len(result['candidates'])} trained again, {result['seeds']} seeds each", "",
             f"| rank | trial | search {metric} | {metric} per new seed | mean +- std | against the winner |",
             "|---|---|---|---|---|---|"]
    for rank, c in enumerate(result["candidates"], 1):
        against = "the winner" if rank == 1 else (
            f"{c['versus_winner']['difference']:+.4f}, paired t-test p = {c['versus_winner']['p_value']:.3f} ("
            + ("distinguishable" if c["versus_winner"]["distinguishable"] else "within seed noise") + ")")
        lines.append(f"| {rank} | {c['trial']} | {c['search_value']:.4f} | {', '.join(f'{v:.4f}' for v in c['values'])} | "
                     f"{c['mean']:.4f} +- {c['std']:.4f} | {against} |")
    lines += ["", verify_summary(result)]
    return "\n".join(lines) + "\n"
