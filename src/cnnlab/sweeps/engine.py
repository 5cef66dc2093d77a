"""Sweeps on Optuna, through its public API only: `run_sweep` runs trials in this process through `train.fit`
(the one training path); each epoch's metric reaches Optuna through a callback, which is where hyperband
pruning hooks in.

- grid: the study's creator queues every point once; workers pop them atomically (no point runs twice).
- random: RandomSampler; bayes: TPE (multivariate, constant liar).
- A process killed mid-trial leaves a RUNNING trial: the next sweep process on that machine marks it failed and
  re-queues its parameters once (RDB storages also do this across machines through Optuna's heartbeat).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import socket
import statistics
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
import yaml
from optuna.trial import TrialState

from ..config import make_config
from ..data import DeviceCache
from ..errors import CnnlabError, StorageError
from ..io import atomic_write_json, atomic_write_text
from ..run_folder import best_record, check_outside_the_data, claim_free_name
from ..trainer import Callback, StopTraining, Trainer
from ..training import SweepShare, fit
from .schema import Sweep, SweepError
from .space import known_problem, suggest, trial_values
from .storage import make_storage, mask

ORPHAN = "orphan:"  # study user attribute per orphaned trial number: why it failed
RETRY = "retry"  # trial user attribute: it was stopped by a cause outside it (a full disk, a signal), so it runs again
GRID_DROPPED = "grid_dropped"  # study user attribute: {why: how many} grid points that cannot run, never queued
MAX_SKIPS_IN_A_ROW = 100  # sampled combinations that cannot run, one after another: the space holds (almost) no other


def make_sampler(sweep: Sweep, seed: int):
    if sweep.method == "bayes":
        # TPE: handles categorical and conditional spaces, is cheap per trial, and with constant_liar several
        # workers do not all propose the same point; the GP sampler models continuous spaces better but the
        # assignment's space is mostly categorical.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=8)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(sweep: Sweep, epochs: int | None):
    if sweep.hyperband is None:
        return optuna.pruners.NopPruner()
    hb = sweep.hyperband
    return optuna.pruners.HyperbandPruner(min_resource=hb["min_iter"], max_resource=hb.get("max_iter", epochs or "auto"),
                                          reduction_factor=hb["eta"])


def open_study(sweep: Sweep, storage: Any, seed: int, epochs: int | None, folder: Path | None = None,
               progress: bool = False, log: Callable[[str], None] = print, base: dict[str, Any] | None = None):
    """Create the study (queueing the grid) or join it. The creator samples with `seed`, so a one-process sweep
    is reproducible; a process that joins gets a seed of its own, or every process would propose the same
    points in the same order. A grid whose queueing was interrupted (its creator killed) is completed by the
    next process that opens it, each point once."""
    pruner = make_pruner(sweep, epochs)
    try:
        study = optuna.create_study(study_name=sweep.name, storage=storage, sampler=make_sampler(sweep, seed),
                                    pruner=pruner, direction=sweep.direction)
        study.set_user_attr("sweep", sweep.validated)
    except optuna.exceptions.DuplicatedStudyError:
        own_seed = (seed * 1_000_003 + os.getpid() * 7919 + time.time_ns()) % 2**32
        study = optuna.load_study(study_name=sweep.name, storage=storage, sampler=make_sampler(sweep, own_seed),
                                  pruner=pruner)
        if "sweep" not in study.user_attrs:  # its creator was killed in the instant between the two calls
            study.set_user_attr("sweep", sweep.validated)
        refuse_changes("sweep file", study.user_attrs["sweep"], sweep.raw, SEARCH_KEYS, sweep.name)
    if study.direction.name.lower() != sweep.direction:
        raise CnnlabError(f"study '{sweep.name}' exists with direction {study.direction.name.lower()}; "
                          f"the sweep file asks {sweep.direction}")
    if sweep.method == "grid" and not study.user_attrs.get("grid_queued"):
        with queue_lock(folder):
            queue_grid(study, sweep, progress, log, base)
    return study


@contextmanager
def queue_lock(folder: Path | None) -> Iterator[None]:
    """One process at a time queues a grid, or the trials stopped from outside, on this machine (processes on other
    machines sharing an RDB study may queue a point twice; Objective runs such a point once)."""
    if folder is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "queue.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def runnable_points(sweep: Sweep, base: dict[str, Any]) -> tuple[list[tuple[int, dict[str, Any]]], dict[str, int]]:
    """The grid's points as (grid index, values), without those the config refuses (`known_problem`): those are
    counted by why, and never queued."""
    names = list(sweep.params)
    points, dropped = [], {}
    for index, combo in enumerate(itertools.product(*(sweep.params[n].values for n in names))):
        values = {n: v for n, v in zip(names, combo) if sweep.params[n].distribution != "constant"}
        problem = known_problem(base, dict(zip(names, combo)))
        if problem:
            dropped[problem] = dropped.get(problem, 0) + 1
        else:
            points.append((index, values))
    return points, dropped


def none_can_run(sweep: Sweep, base: dict[str, Any], samples: int = 200) -> str | None:
    """Why no combination of the sweep can run with these base flags (the most frequent reason), or None as soon as
    one can: the grid's points in order, or `samples` points drawn as a random search draws them (an in-memory
    study: nothing written). Asked before a sweep starts, so such a space is refused at once, not after minutes
    of sampling combinations that cannot run."""
    reasons: dict[str, int] = {}
    if sweep.method == "grid":
        names = list(sweep.params)
        draws: Iterator[dict[str, Any]] = (dict(zip(names, combo))
                                           for combo in itertools.product(*(sweep.params[n].values for n in names)))
    else:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        draws = (suggest(study.ask(), sweep) for _ in range(samples))
    for values in draws:
        problem = known_problem(base, values)
        if problem is None:
            return None
        reasons[problem] = reasons.get(problem, 0) + 1
    return max(reasons, key=reasons.get) if reasons else None


def queue_grid(study: Any, sweep: Sweep, progress: bool = False, log: Callable[[str], None] = print,
               base: dict[str, Any] | None = None) -> int:
    """Queue every runnable grid point the study does not hold yet (each carries its `grid_index`), then mark the
    grid queued; returns how many were queued now. Points are queued in the grid's order, so workers pop them in
    it. Points known to fail with the base flags (`runnable_points`) are dropped, and the log says how many and why."""
    from tqdm.auto import tqdm

    trials = study.get_trials(deepcopy=False)
    if study.user_attrs.get("grid_queued"):  # another process finished it while this one waited for the lock
        return 0
    if any(t.user_attrs.get("grid_point") for t in trials) and not any("grid_index" in t.user_attrs for t in trials):
        study.set_user_attr("grid_queued", True)  # made before grid indexes existed, by a creator that queued it all
        return 0
    held = {t.user_attrs["grid_index"] for t in trials if "grid_index" in t.user_attrs}
    points, dropped = runnable_points(sweep, base or {})
    if dropped:
        study.set_user_attr(GRID_DROPPED, dropped)
        for why, n in dropped.items():
            log(f"dropped {n:,} of the grid's {sweep.grid_points:,} points that cannot run, without training them: {why}")
    missing = [(index, values) for index, values in points if index not in held]
    if missing:
        log(f"queueing {len(missing):,} of the grid's {len(points):,} runnable points" + (
            f" ({len(held):,} were queued before)" if held else ""))
    with tqdm(total=len(missing), desc="queueing grid points", unit="pt", disable=not progress or len(missing) < 1000,
              dynamic_ncols=True) as bar:
        for index, values in missing:
            study.enqueue_trial(values, user_attrs={"grid_point": True, "grid_index": index}, skip_if_exists=False)
            bar.update(1)
    study.set_user_attr("grid_queued", True)
    return len(missing)


def grid_point_taken(study: Any, number: int, index: int) -> bool:
    """Whether grid point `index` is run by another trial than `number`: one finished (not an orphan, whose retry
    runs it), or one started before it. A point queued twice (two machines completing one grid) runs once."""
    lost = orphans(study)
    for t in study.get_trials(deepcopy=False):
        if t.number == number or t.user_attrs.get("grid_index") != index or t.number in lost or t.user_attrs.get("skipped"):
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) or (
                t.state == TrialState.RUNNING and t.number < number):
            return True
    return False


SEARCH_KEYS = ("method", "metric", "parameters", "early_terminate")  # what defines a study's search
# may differ from process to process of one sweep (the data folder: its path on each machine, or after a move;
# each trial's split.json names its files relative to it)
MACHINE_KEYS = ("cache_dir", "data", "decode_workers", "device")


def refuse_changes(what: str, before: dict[str, Any], now: dict[str, Any], keys: Any, name: str) -> None:
    """A sweep continued under the same name must be the same sweep: joining a study with another search space or
    other base settings would mix two experiments in one table."""
    changed = [k for k in keys if before.get(k) != now.get(k)]
    if changed:
        k = changed[0]
        raise SweepError(f"sweep '{name}' exists with another {what}: {k} was {before.get(k)!r}, now {now.get(k)!r}; "
                         f"to start a new sweep give it another name (name: {name}-2 in the sweep file), or "
                         f"run it as it was")


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def recover_orphans(study: Any, log: Callable[[str], None]) -> int:
    """RUNNING trials of dead processes on this machine: marked failed, their parameters queued once."""
    host, recovered = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        if not owner or owner["host"] != host or _alive(owner["pid"], owner["started"]):
            continue
        try:
            study.tell(t.number, state=TrialState.FAIL)
        except (ValueError, RuntimeError, optuna.exceptions.UpdateFinishedTrialError):
            continue  # finished meanwhile, or another process recovered it first
        study.set_user_attr(f"{ORPHAN}{t.number}", "orphaned: its sweep process died")
        if "retry_of" not in t.user_attrs:
            study.enqueue_trial(t.params, user_attrs={k: v for k, v in t.user_attrs.items() if k == "grid_point"}
                                | {"retry_of": t.number})
            log(f"trial {t.number} was orphaned by a killed process: marked failed, parameters queued again")
        recovered += 1
    return recovered


def _mark_for_retry(trial: Any, why: str) -> None:
    with contextlib.suppress(Exception):  # a full disk may refuse this too: the trial is then an orphan, retried as one
        trial.set_user_attr(RETRY, why)


def requeue_stopped(study: Any, log: Callable[[str], None]) -> int:
    """Failed trials that a cause outside them stopped (a full disk, Ctrl-C: `RETRY`): their parameters queued again,
    each once, and the failed trial set aside like an orphan (never a grid point's result, never counted)."""
    lost, requeued = orphans(study), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if RETRY not in t.user_attrs or t.number in lost:
            continue
        study.enqueue_trial(t.params, user_attrs={k: v for k, v in t.user_attrs.items() if k in ("grid_point", "grid_index")}
                            | {"retry_of": t.number})
        study.set_user_attr(f"{ORPHAN}{t.number}", f"stopped from outside ({t.user_attrs[RETRY]})")
        log(f"trial {t.number} was stopped from outside ({t.user_attrs[RETRY][:80]}): its parameters are queued again")
        requeued += 1
    return requeued


def orphans(study: Any) -> dict[int, str]:
    return {int(k[len(ORPHAN):]): v for k, v in study.user_attrs.items() if k.startswith(ORPHAN)}


def runs_counted(study: Any) -> int:
    """Trials that count towards run_cap: every started one, except orphans whose retry counts instead."""
    lost = orphans(study)
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING
               and t.number not in lost and not t.user_attrs.get("skipped"))


@dataclass
class SweepResult:
    folder: Path
    ran: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    best_value: float | None = None
    best_trial: int | None = None
    seconds: float = 0.0
    metric: str = "val_acc"
    skipped: dict[str, int] = field(default_factory=dict)  # sampled combinations that cannot run, by why


class Pruning(Callback):
    """Reports each epoch's metric to the trial; hyperband decides whether the trial stops there."""

    def __init__(self, trial: Any, metric: str, epochs: int):
        self.trial, self.metric, self.epochs = trial, metric, epochs

    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        self.trial.report(record[self.metric], record["epoch"])
        if record["epoch"] < self.epochs and self.trial.should_prune():  # at the last epoch there is nothing to save
            raise StopTraining("stopped")


@dataclass
class Objective:
    """One trial: the sweep's values on top of the base config, trained by `fit` into its own run folder. A
    failure (bad combination, out of memory, NaN loss) is recorded with its traceback and the sweep goes on."""

    sweep: Sweep
    base: dict[str, Any]
    folder: Path
    progress: bool
    owner: dict[str, Any]
    log: Callable[[str], None] = print
    device_cache: DeviceCache = field(default_factory=DeviceCache)  # one upload of the image cache per process
    last: int | None = None  # the number of the trial this process ran last
    planner: Any = None  # with a budget: budgeted.BudgetPlanner, asked how many epochs a trial may have
    stopped_by: StorageError | None = None  # what stopped that trial from outside (a full disk): it ends the sweep

    def __call__(self, trial: Any) -> float:
        self.last, self.stopped_by = trial.number, None
        try:
            return self.train(trial)
        except optuna.TrialPruned:
            raise
        except KeyboardInterrupt:
            _mark_for_retry(trial, "interrupted")
            raise
        except BaseException as e:  # noqa: BLE001 - recorded, then raised for Optuna to mark the trial failed
            if isinstance(e, (StorageError, OSError)):  # the disk, not the trial: it runs again, and the sweep stops
                self.stopped_by = e if isinstance(e, StorageError) else StorageError(
                    f"trial {trial.number} could not write its files in {self.folder / 'trials'} ({e.strerror or e}): "
                    "free some disk space, then run the same command again to continue")
                _mark_for_retry(trial, str(self.stopped_by))
                raise
            trial.set_user_attr("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            (self.folder / "errors").mkdir(exist_ok=True)
            atomic_write_text(self.folder / "errors" / f"trial-{trial.number:04d}.txt", traceback.format_exc())
            raise

    def train(self, trial: Any) -> float:
        if self.sweep.method == "grid" and not trial.user_attrs.get("grid_point"):
            trial.set_user_attr("skipped", "grid exhausted while this trial was being created")
            raise optuna.TrialPruned()
        index = trial.user_attrs.get("grid_index")
        if index is not None and grid_point_taken(trial.study, trial.number, index):
            trial.set_user_attr("skipped", f"grid point {index} was queued twice and runs in another trial")
            raise optuna.TrialPruned()
        values = suggest(trial, self.sweep)
        problem = known_problem(self.base, values)
        if problem:  # pruned without training: TPE ranks it below every trained trial and samples elsewhere
            trial.set_user_attr("skipped", problem)
            trial.set_user_attr("infeasible", values)
            raise optuna.TrialPruned()
        epochs, budgeted = self.budgeted_epochs(trial, values)
        trial.set_user_attr("owner", self.owner)
        values = trial_values(self.base, values)
        trial.set_user_attr("config", values)
        self.log(f"trial {trial.number:>3} started  " + " ".join(f"{k}={_short(v)}" for k, v in values.items()))
        # a folder left by an earlier study in this folder is never overwritten: trial-NNNN-2, made atomically
        name = claim_free_name(self.folder / "trials" / f"trial-{trial.number:04d}").name
        cfg = make_config(self.base, values, {"out": str(self.folder / "trials"), "name": name,
                                              "keep_best": self.sweep.metric, **epochs})
        trial.set_user_attr("run_dir", f"trials/{name}")  # of the sweep folder, wherever it is moved (`inside`)
        callbacks = [Pruning(trial, self.sweep.metric, cfg.epochs)]
        if self.planner is not None:
            callbacks.append(self.planner.deadline(trial))
        started = time.perf_counter()
        fitted = fit(cfg, callbacks=callbacks, progress=self.progress, log=lambda s: None,
                     share=SweepShare(self.sweep.name, self.device_cache))
        if budgeted is not None:  # what it cost, for the plans after it (of every process of the sweep)
            spent = [r["epoch_time"] for r in fitted.history]
            trial.set_user_attr("cost", {"gflops": budgeted, "epoch_s": statistics.median(spent), "epoch_s_all": spent,
                                         "setup_s": max(0.0, time.perf_counter() - started - sum(spent))})
        best = value_of(fitted.history, self.sweep.metric)
        trial.set_user_attr("epochs_run", len(fitted.history))
        if fitted.status == "stopped":
            trial.set_user_attr("pruned_value", best)
            raise optuna.TrialPruned()
        return best


    def budgeted_epochs(self, trial: Any, values: dict[str, Any]) -> tuple[dict[str, int], float | None]:
        """With a budget: the trial's epochs as the plan gives them now ({}: as the sweep asks), and its GFLOPs; a
        trial that cannot end before the deadline is not started (pruned, marked `over_budget`)."""
        if self.planner is None:
            return {}, None
        epochs, gflops = self.planner.epochs_for(values)
        asked = make_config(self.base, values).epochs
        if epochs == 0:
            trial.set_user_attr("skipped", "does not fit in the time left")
            trial.set_user_attr("over_budget", True)
            raise optuna.TrialPruned()
        if epochs < asked:
            trial.set_user_attr("shortened", f"{epochs} of {asked} epochs: the time left")
            return {"epochs": epochs}, gflops
        return {}, gflops


def value_of(history: list[dict[str, Any]], metric: str) -> float:
    """A trial's value for a sweep: its metric at the epoch its best.pt keeps, which that metric picks (a trial trains
    with keep_best set to it), so the value scored and the checkpoint kept are of one epoch."""
    return float(best_record(history, metric)[metric])


def prepare_sweep(sweep: Sweep, base: dict[str, Any], folder: Path, storage_url: str | None = None, seed: int = 0,
                  progress: bool = False, log: Callable[[str], None] = print) -> Any:
    """The sweep folder and its study, created (a grid queued, less the points the base flags cannot run) or
    joined, refusing base flags that differ from the ones it began with. What every sweep process does first,
    and what a launcher of worker processes does once before it starts them."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # a failed trial is our own one line, not Optuna's traceback
    check_outside_the_data(make_config(base, {"out": str(folder)}))  # refusals first: nothing is written before them
    why = none_can_run(sweep, base)
    if why is not None:
        kind = "grid point" if sweep.method == "grid" else "sampled combination"
        raise SweepError(f"sweep '{sweep.name}': no {kind} can run with these flags ({why}): change the sweep file's "
                         "values or the base flags")
    folder.mkdir(parents=True, exist_ok=True)
    base_cfg = make_config(base, {k: p.values[0] for k, p in sweep.params.items() if p.distribution == "constant"})
    epochs = base_cfg.epochs if "epochs" not in sweep.params or sweep.params["epochs"].distribution == "constant" else None
    info = folder / "sweep_info.json"
    if info.exists():
        before = json.loads(info.read_text()).get("base", {})
        refuse_changes("base config (flags)", before, base, sorted((set(before) | set(base)) - set(MACHINE_KEYS)),
                       sweep.name)
    study = open_study(sweep, make_storage(storage_url, folder), seed, epochs, folder, progress, log, base)
    atomic_write_text(folder / "sweep.yaml", yaml.safe_dump(sweep.validated, sort_keys=False))
    atomic_write_json(folder / "sweep_info.json", {"name": sweep.name, "storage": mask(storage_url) if storage_url else None,
                                                    "base": base})
    return study


@dataclass(frozen=True)
class Budget:
    """A sweep's time: `seconds` for the whole sweep (every process of it), shared by `workers` processes side by
    side, keeping room for `reserve_runs` trial-sized runs after the search (a verification's)."""

    seconds: float
    workers: int = 1
    reserve_runs: int = 0


def run_sweep(sweep: Sweep, base: dict[str, Any], folder: str | Path, storage_url: str | None = None,
              count: int | None = None, seed: int = 0, progress: bool = True,
              log: Callable[[str], None] = print, max_skips: int = MAX_SKIPS_IN_A_ROW,
              budget: Budget | None = None) -> SweepResult:
    """Run up to `count` trials (None: until run_cap or the grid is done) in this process; refuse the space after
    `max_skips` sampled combinations in a row that cannot run. With a `budget`: trials planned to end by its
    deadline (`budgeted`)."""
    folder = Path(folder)
    study = prepare_sweep(sweep, base, folder, storage_url, seed, progress, log)
    recover_orphans(study, log)
    with queue_lock(folder):  # two processes of this machine starting at once queue each stopped trial once
        requeue_stopped(study, log)
    if count is None and sweep.run_cap is None and sweep.method != "grid" and budget is None:
        raise CnnlabError("random and bayes sweeps need --count, --budget or run_cap in the sweep file")
    result, start = SweepResult(folder, metric=sweep.metric), time.perf_counter()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(),
             "worker": os.environ.get("CNNLAB_WORKER"), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")}
    objective = Objective(sweep, base, folder, progress, owner, log)
    if budget is not None:
        objective.planner = start_planner(study, sweep, base, folder, budget, progress, log)
    n = skips_in_a_row = over_budget = 0
    while (count is None or n < count) and not _finished(study, sweep, log):
        if objective.planner is not None and not objective.planner.room_for_a_trial():
            log("budget: no further trial ends before the deadline: the search stops here")
            break
        objective.last = None
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        if objective.stopped_by is not None:  # a full disk fails every trial after it too: stop, resumable
            raise objective.stopped_by
        if objective.planner is not None:
            objective.planner.clock.touch()
            objective.planner.write_record()
            over_budget = over_budget + 1 if _over_budget(study, objective.last) else 0
            if over_budget >= MAX_SKIPS_IN_A_ROW // 5:
                log(f"budget: the last {over_budget} sampled trials were all too long for the time left: the search "
                    "stops here")
                break
        why = _tally(result, study, sweep, objective.last, log) if objective.last is not None else None
        skips_in_a_row = skips_in_a_row + 1 if why else 0
        n += not why  # a combination that cannot run costs no trial of the count
        if skips_in_a_row >= max_skips:
            raise SweepError(f"sweep '{sweep.name}': the last {skips_in_a_row} sampled combinations all cannot run "
                             f"({why}): change the sweep file's values or the base flags")
    if objective.planner is not None:  # this run's session in it too, even when the budget was already spent
        objective.planner.clock.touch()
        objective.planner.write_record()
    for why, k in result.skipped.items():
        log(f"skipped {k} sampled combination(s) that cannot run, without training them: {why}")
    result.seconds = time.perf_counter() - start
    try:
        result.best_value, result.best_trial = study.best_value, study.best_trial.number
    except ValueError:
        pass
    return result


def start_planner(study: Any, sweep: Sweep, base: dict[str, Any], folder: Path, budget: Budget, progress: bool,
                  log: Callable[[str], None]) -> Any:
    """This process's planner of a budgeted sweep: its clock opened, the device calibrated (once per study, one
    process of this machine at a time), the first plan made and printed."""
    from .budgeted import BudgetPlanner, SweepClock

    planner = BudgetPlanner(SweepClock.open(study, budget.seconds), sweep, base, folder, log, budget.workers,
                            reserve_runs=budget.reserve_runs)
    with queue_lock(folder):
        planner.start(progress)
    return planner


def _over_budget(study: Any, number: int | None) -> bool:
    return number is not None and any(t.number == number and t.user_attrs.get("over_budget")
                                      for t in study.get_trials(deepcopy=False))


def _finished(study: Any, sweep: Sweep, log: Callable[[str], None]) -> bool:
    if sweep.run_cap is not None and runs_counted(study) >= sweep.run_cap:
        log(f"run_cap {sweep.run_cap} reached")
        return True
    if sweep.method == "grid" and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        log("grid done: every runnable point has run")
        return True
    return False


def _tally(result: SweepResult, study: Any, sweep: Sweep, number: int, log: Callable[[str], None]) -> str | None:
    """Count the trial this process just ran (the study's newest may be another process's) and print its line;
    returns why, when it was a sampled combination that cannot run (skipped without training)."""
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == number)
    if frozen.user_attrs.get("infeasible") is not None:
        why = frozen.user_attrs["skipped"]
        result.skipped[why] = result.skipped.get(why, 0) + 1
        return why
    if frozen.user_attrs.get("skipped"):
        return None
    result.ran += 1
    result.complete += frozen.state == TrialState.COMPLETE
    result.pruned += frozen.state == TrialState.PRUNED
    result.failed += frozen.state == TrialState.FAIL
    log(_trial_line(study, frozen, sweep))
    return None


def _process_start() -> float:
    import psutil

    return psutil.Process(os.getpid()).create_time()


def _trial_line(study: Any, t: Any, sweep: Sweep) -> str:
    params = " ".join(f"{k}={_short(v)}" for k, v in t.user_attrs.get("config", {}).items())
    state = t.state.name.lower()
    value = t.value if t.value is not None else t.user_attrs.get("pruned_value")
    try:
        best = f"best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:
        best = "no complete trial yet"
    line = f"trial {t.number:>3} {state:<8} "
    if value is not None:
        return line + f"{sweep.metric} {value:.4f}  epochs {t.user_attrs.get('epochs_run', 0)}  {params}  | {best}"
    error = t.user_attrs.get("error", "")
    error = error if len(error) <= 240 else error[:237] + "..."  # room for out of memory's batch size that fits
    return line + f"{params}  | {error} (traceback: errors/trial-{t.number:04d}.txt)"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)
