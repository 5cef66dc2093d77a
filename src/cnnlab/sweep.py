"""Hyperparameter sweeps: a Weights & Biases sweep file run by Optuna, with no account and no server.

- `parse_sweep` reads the W&B sweep schema (method, metric, parameters with value / values / distribution,
  nested parameter blocks, early_terminate hyperband, run_cap; program/command are kept for wandb and ignored).
- `run_sweep` runs trials in this process through `train.fit` (the one training path), reporting each epoch's
  metric to Optuna, which prunes (hyperband) through the fit callback.
- Storage: a journal file in the sweep folder by default (safe for many local processes), or any Optuna RDB URL
  (`--storage postgresql://...`) so processes on many machines share one study.
- A process killed mid-trial leaves a RUNNING trial: the next sweep process on that machine marks it failed and
  re-queues its parameters once (RDB storages also do this across machines through Optuna's heartbeat).
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from .config import FIELDS, check_value, coerce, make_config, read_yaml
from .errors import CnnlabError, ConfigError
from .io import atomic_write_json, atomic_write_text

METRICS = ("val_acc", "val_loss", "train_acc", "train_loss")
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
                 "inv_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal",
                 "categorical_w_probabilities")
IGNORED_KEYS = ("program", "command", "name", "description", "project", "entity", "controller")


class SweepError(ConfigError):
    """A malformed sweep file: the message names the parameter, like wandb's own validation."""


@dataclass
class Param:
    name: str
    distribution: str
    values: list[Any] = field(default_factory=list)
    probabilities: list[float] | None = None
    min: float = 0.0
    max: float = 0.0
    q: float | None = None
    mu: float = 0.0
    sigma: float = 1.0


@dataclass
class Sweep:
    name: str
    method: str
    metric: str
    goal: str
    params: dict[str, Param]
    hyperband: dict[str, int] | None
    run_cap: int | None
    raw: dict[str, Any]

    @property
    def direction(self) -> str:
        return "maximize" if self.goal == "maximize" else "minimize"


def _bad(name: str, why: str) -> SweepError:
    return SweepError(f"invalid sweep config: parameter '{name}': {why}")


def _parse_param(name: str, spec: Any) -> Param:
    if name not in FIELDS:
        raise _bad(name, f"not a cnnlab config key (known: {', '.join(FIELDS)})")
    if not isinstance(spec, dict):
        raise _bad(name, "expected a mapping with value, values or distribution")
    unknown = set(spec) - {"value", "values", "distribution", "min", "max", "q", "mu", "sigma", "probabilities"}
    if unknown:
        raise _bad(name, f"unknown field(s) {', '.join(sorted(unknown))}")

    def checked(v: Any) -> Any:  # a value the config refuses is refused now, not in trial 17
        try:
            check_value(name, v)
        except ConfigError as e:
            raise _bad(name, str(e)) from None
        return v

    dist = spec.get("distribution")
    if dist is not None and dist not in DISTRIBUTIONS:
        raise _bad(name, f"unknown distribution '{dist}' (expected one of {', '.join(DISTRIBUTIONS)})")
    if "value" in spec:
        return Param(name, "constant", [checked(spec["value"])])
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise _bad(name, "values must be a non-empty list")
        values = [checked(v) for v in values]
        probs = spec.get("probabilities")
        if probs is not None:
            if len(probs) != len(values) or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
                raise _bad(name, "probabilities must be one non-negative number per value, summing to 1")
            return Param(name, "categorical_w_probabilities", values, list(map(float, probs)))
        return Param(name, "categorical", values)
    if dist in ("normal", "q_normal", "log_normal", "q_log_normal"):
        sigma = float(spec.get("sigma", 1.0))
        if sigma <= 0:
            raise _bad(name, "sigma must be positive")
        return Param(name, dist, mu=float(spec.get("mu", 0.0)), sigma=sigma, q=spec.get("q"))
    if "min" not in spec or "max" not in spec:
        raise _bad(name, "needs value, values, or min and max")
    lo, hi = spec["min"], spec["max"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise _bad(name, "min and max must be numbers")
    if lo >= hi:
        raise _bad(name, f"min ({lo}) must be less than max ({hi})")
    if dist is None:
        dist = "int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform"
    if dist in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values") and lo <= 0:
        raise _bad(name, f"{dist} needs min > 0")
    q = spec.get("q")
    if q is not None and q <= 0:
        raise _bad(name, "q must be positive")
    if dist == "int_uniform" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise _bad(name, "int_uniform needs integer min and max")
    for edge in (lo, hi):
        if dist in ("int_uniform", "uniform", "q_uniform"):
            checked(edge)
    return Param(name, dist, min=float(lo), max=float(hi), q=None if q is None else float(q))


def _flatten(params: dict[str, Any], into: dict[str, Param]) -> None:
    """W&B nested `parameters` blocks group keys; their leaves are config keys themselves."""
    for name, spec in params.items():
        if isinstance(spec, dict) and "parameters" in spec:
            if not isinstance(spec["parameters"], dict):
                raise _bad(name, "nested parameters must be a mapping")
            _flatten(spec["parameters"], into)
        else:
            if name in into:
                raise _bad(name, "given twice")
            into[name] = _parse_param(name, spec)


def parse_sweep(raw: Any, name: str = "sweep") -> Sweep:
    if not isinstance(raw, dict):
        raise SweepError("invalid sweep config: expected a mapping at the top level")
    unknown = set(raw) - {"method", "metric", "parameters", "early_terminate", "run_cap", *IGNORED_KEYS}
    if unknown:
        raise SweepError(f"invalid sweep config: unknown top-level key(s) {', '.join(sorted(unknown))}")
    method = raw.get("method")
    if method not in METHODS:
        raise SweepError(f"invalid sweep config: method '{method}' is not one of {', '.join(METHODS)}")
    metric = raw.get("metric") or {"name": "val_acc", "goal": "maximize"}
    if metric.get("name") not in METRICS:
        raise SweepError(f"invalid sweep config: metric name '{metric.get('name')}': cnnlab logs {', '.join(METRICS)}")
    goal = metric.get("goal", "minimize")
    if goal not in ("maximize", "minimize"):
        raise SweepError(f"invalid sweep config: metric goal '{goal}' is not maximize or minimize")
    if not isinstance(raw.get("parameters"), dict) or not raw["parameters"]:
        raise SweepError("invalid sweep config: 'parameters' must be a non-empty mapping")
    params: dict[str, Param] = {}
    _flatten(raw["parameters"], params)
    if method == "grid":
        for p in params.values():
            if p.distribution not in ("constant", "categorical"):
                raise _bad(p.name, "grid search needs value or values, not a distribution")
    hyperband = None
    et = raw.get("early_terminate")
    if et is not None:
        if not isinstance(et, dict) or et.get("type") != "hyperband":
            raise SweepError("invalid sweep config: early_terminate type must be hyperband")
        eta = int(et.get("eta", 3))
        if eta < 2:
            raise SweepError("invalid sweep config: early_terminate eta must be at least 2")
        if "min_iter" in et:
            hyperband = {"min_iter": int(et["min_iter"]), "eta": eta}
            if "max_iter" in et:
                hyperband["max_iter"] = int(et["max_iter"])
        elif "max_iter" in et:
            s = int(et.get("s", 0))
            if s < 1:
                raise SweepError("invalid sweep config: early_terminate with max_iter needs s (the number of brackets)")
            hyperband = {"min_iter": max(1, int(et["max_iter"] / eta ** (s - 1))), "max_iter": int(et["max_iter"]),
                         "eta": eta}
        else:
            raise SweepError("invalid sweep config: early_terminate needs min_iter or max_iter")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (not isinstance(run_cap, int) or run_cap < 1):
        raise SweepError("invalid sweep config: run_cap must be a positive integer")
    return Sweep(str(raw.get("name") or name), method, metric["name"], goal, params, hyperband, run_cap, raw)


def load_sweep(path: str | Path) -> Sweep:
    return parse_sweep(read_yaml(path, "sweep", SweepError), Path(path).stem)


# ---- Optuna ---------------------------------------------------------------------------------------------------

def suggest(trial: Any, sweep: Sweep) -> dict[str, Any]:
    """The trial's config values. Distributions Optuna lacks (normal, weighted categorical, quantised log)
    are drawn as a uniform `NAME__u` that Optuna models, then transformed; the real value is what is logged."""
    out: dict[str, Any] = {}
    for p in sweep.params.values():
        d = p.distribution
        if d == "constant":
            out[p.name] = p.values[0]
        elif d == "categorical":
            out[p.name] = trial.suggest_categorical(p.name, p.values)
        elif d == "categorical_w_probabilities":
            u = trial.suggest_float(p.name + "__u", 0.0, 1.0)
            cum = list(itertools.accumulate(p.probabilities))
            out[p.name] = p.values[next((i for i, c in enumerate(cum) if u <= c), len(cum) - 1)]
        elif d == "int_uniform":
            out[p.name] = trial.suggest_int(p.name, int(p.min), int(p.max))
        elif d == "uniform":
            out[p.name] = trial.suggest_float(p.name, p.min, p.max)
        elif d == "q_uniform":
            out[p.name] = _quantise(trial.suggest_float(p.name + "__u", p.min, p.max), p.q or 1.0)
        elif d in ("log_uniform", "q_log_uniform"):  # min/max are natural logs of the bounds
            v = trial.suggest_float(p.name, math.exp(p.min), math.exp(p.max), log=True)
            out[p.name] = _quantise(v, p.q) if d.startswith("q_") else v
        elif d in ("log_uniform_values", "inv_log_uniform_values"):
            out[p.name] = trial.suggest_float(p.name, p.min, p.max, log=True)  # 1/x of log-uniform is log-uniform
        elif d == "inv_log_uniform":
            out[p.name] = 1.0 / trial.suggest_float(p.name + "__inv", math.exp(p.min), math.exp(p.max), log=True)
        elif d == "q_log_uniform_values":
            out[p.name] = _quantise(trial.suggest_float(p.name + "__u", p.min, p.max, log=True), p.q or 1.0)
        else:  # normal family via the inverse CDF of a uniform draw
            u = trial.suggest_float(p.name + "__u", 1e-6, 1 - 1e-6)
            v = statistics.NormalDist(p.mu, p.sigma).inv_cdf(u)
            v = math.exp(v) if "log" in d else v
            out[p.name] = _quantise(v, p.q or 1.0) if d.startswith("q_") else v
        out[p.name] = _native(p.name, out[p.name])
    return out


def _quantise(v: float, q: float | None) -> float:
    return v if not q else round(round(v / q) * q, 10)


def _native(name: str, v: Any) -> Any:
    """Integers for integer fields (a quantised float 64.0 becomes 64)."""
    return coerce(name, v) if FIELDS[name].type in ("int", int) else v


def make_sampler(sweep: Sweep, seed: int):
    import optuna

    if sweep.method == "bayes":
        # TPE: handles categorical and conditional spaces, is cheap per trial, and with constant_liar several
        # workers do not all propose the same point; the GP sampler models continuous spaces better but the
        # assignment's space is mostly categorical.
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True, n_startup_trials=8)
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(sweep: Sweep, epochs: int | None):
    import optuna

    if sweep.hyperband is None:
        return optuna.pruners.NopPruner()
    hb = sweep.hyperband
    return optuna.pruners.HyperbandPruner(min_resource=hb["min_iter"], max_resource=hb.get("max_iter", epochs or "auto"),
                                          reduction_factor=hb["eta"])


def make_storage(url: str | None, folder: Path):
    import optuna

    if not url:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = folder / "journal.log"
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
    import warnings

    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat API is marked experimental in Optuna
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=30, grace_period=120,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        except Exception as e:  # noqa: BLE001 - bad URL, server down, missing driver
            # two processes creating the tables at once: one loses the race, and simply opens them after
            if attempt < 4 and type(e).__name__ in ("IntegrityError", "OperationalError", "ProgrammingError"):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise CnnlabError(f"cannot open storage {mask(url)}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def mask(url: str) -> str:
    import re

    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def open_study(sweep: Sweep, storage: Any, seed: int, epochs: int | None):
    """Create the study (queueing the grid) or join it. The creator samples with `seed`, so a one-process sweep
    is reproducible; a process that joins gets a seed of its own, or every process would propose the same
    points in the same order."""
    import optuna

    pruner = make_pruner(sweep, epochs)
    try:
        study = optuna.create_study(study_name=sweep.name, storage=storage, sampler=make_sampler(sweep, seed),
                                    pruner=pruner, direction=sweep.direction)
        study.set_user_attr("sweep", sweep.raw)
        if sweep.method == "grid":  # the creator queues every point once; workers pop them atomically
            names = list(sweep.params)
            for combo in itertools.product(*(sweep.params[n].values for n in names)):
                study.enqueue_trial({n: v for n, v in zip(names, combo) if sweep.params[n].distribution != "constant"},
                                    skip_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        own_seed = (seed * 1_000_003 + os.getpid() * 7919 + time.time_ns()) % 2**32
        study = optuna.load_study(study_name=sweep.name, storage=storage, sampler=make_sampler(sweep, own_seed),
                                  pruner=pruner)
    if study.direction.name.lower() != sweep.direction:
        raise CnnlabError(f"study '{sweep.name}' exists with direction {study.direction.name.lower()}; "
                          f"the sweep file asks {sweep.direction}")
    return study


def _alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except psutil.Error:
        return False


def recover_orphans(study: Any, log: Callable[[str], None]) -> int:
    """RUNNING trials of dead processes on this machine: marked failed, their parameters queued once."""
    import optuna
    from optuna.trial import TrialState

    host, recovered = socket.gethostname(), 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("owner")
        if not owner or owner["host"] != host or _alive(owner["pid"], owner["started"]):
            continue
        try:  # attributes first: a finished trial takes none
            study._storage.set_trial_user_attr(t._trial_id, "error", "orphaned: its sweep process died")
            study._storage.set_trial_user_attr(t._trial_id, "orphaned", True)
            if not study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process recovered it first
        if "retry_of" not in t.user_attrs:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            log(f"trial {t.number} was orphaned by a killed process: marked failed, parameters queued again")
        recovered += 1
    return recovered


def runs_counted(study: Any) -> int:
    """Trials that count towards run_cap: every started one, except orphans whose retry counts instead."""
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING
               and not t.user_attrs.get("orphaned") and not t.user_attrs.get("skipped"))


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


def run_sweep(sweep: Sweep, base: dict[str, Any], folder: str | Path, storage_url: str | None = None,
              count: int | None = None, seed: int = 0, progress: bool = True,
              log: Callable[[str], None] = print) -> SweepResult:
    """Run up to `count` trials (None: until run_cap or the grid is done) in this process."""
    import optuna
    from optuna.trial import TrialState

    from .train import StopTraining, fit

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_cfg = make_config(base, {k: p.values[0] for k, p in sweep.params.items() if p.distribution == "constant"})
    epochs = base_cfg.epochs if "epochs" not in sweep.params or sweep.params["epochs"].distribution == "constant" else None
    storage = make_storage(storage_url, folder)
    study = open_study(sweep, storage, seed, epochs)
    atomic_write_text(folder / "sweep.yaml", yaml.safe_dump(sweep.raw, sort_keys=False))
    atomic_write_json(folder / "sweep_info.json", {"name": sweep.name, "storage": mask(storage_url) if storage_url else None,
                                                    "base": base})
    recover_orphans(study, log)
    if count is None and sweep.run_cap is None and sweep.method != "grid":
        raise CnnlabError("random and bayes sweeps need --count or run_cap in the sweep file")
    result, start = SweepResult(folder), time.perf_counter()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start()}

    def run_trial(trial: Any) -> float:
        if sweep.method == "grid" and "fixed_params" not in study._storage.get_trial_system_attrs(trial._trial_id):
            trial.set_user_attr("skipped", "grid exhausted while this trial was being created")
            raise optuna.TrialPruned()
        trial.set_user_attr("owner", owner)
        values = suggest(trial, sweep)
        trial.set_user_attr("config", values)
        name, k = f"trial-{trial.number:04d}", 1
        while (folder / "trials" / name).exists():  # left by an earlier study in this folder: never overwritten
            k += 1
            name = f"trial-{trial.number:04d}-{k}"
        cfg = make_config(base, values, {"out": str(folder / "trials"), "name": name})
        trial.set_user_attr("run_dir", str(folder / "trials" / name))

        def report(record: dict[str, Any]) -> None:
            trial.report(record[sweep.metric], record["epoch"])
            if record["epoch"] < cfg.epochs and trial.should_prune():  # at the last epoch there is nothing to save
                raise StopTraining

        fitted = fit(cfg, callbacks=[report], progress=progress, log=lambda s: None, group=sweep.name)
        values_seen = [r[sweep.metric] for r in fitted.history]
        best = max(values_seen) if sweep.goal == "maximize" else min(values_seen)
        trial.set_user_attr("epochs_run", len(fitted.history))
        if fitted.status == "stopped":
            trial.set_user_attr("pruned_value", best)
            raise optuna.TrialPruned()
        return best

    def on_failure(trial: Any, e: BaseException) -> None:
        trial.set_user_attr("error", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        (folder / "errors").mkdir(exist_ok=True)
        atomic_write_text(folder / "errors" / f"trial-{trial.number:04d}.txt", traceback.format_exc())

    last: list[Any] = []  # the trial this process just ran (the study's newest may be another process's)

    def objective(trial: Any) -> float:
        last.append(trial)
        try:
            return run_trial(trial)
        except (optuna.TrialPruned, KeyboardInterrupt):
            raise
        except BaseException as e:  # noqa: BLE001 - one trial's failure (OOM, NaN, bad combination) is recorded
            on_failure(trial, e)
            raise

    n = 0
    while count is None or n < count:
        if sweep.run_cap is not None and runs_counted(study) >= sweep.run_cap:
            log(f"run_cap {sweep.run_cap} reached")
            break
        if sweep.method == "grid" and not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            log("grid done: every point has run")
            break
        last.clear()
        study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=True)
        n += 1
        if not last:
            continue
        frozen = study._storage.get_trial(last[0]._trial_id)
        if frozen.user_attrs.get("skipped"):
            continue
        result.ran += 1
        result.complete += frozen.state == TrialState.COMPLETE
        result.pruned += frozen.state == TrialState.PRUNED
        result.failed += frozen.state == TrialState.FAIL
        log(_trial_line(study, frozen, sweep))
    result.seconds = time.perf_counter() - start
    try:
        result.best_value, result.best_trial = study.best_value, study.best_trial.number
    except ValueError:
        pass
    return result


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
    what = f"{sweep.metric} {value:.4f}" if value is not None else t.user_attrs.get("error", "")
    return f"trial {t.number:>3} {state:<8} {what:<24} epochs {t.user_attrs.get('epochs_run', 0)}  {params}  | {best}"


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def spawn_workers(argv: list[str], workers: int) -> int:
    """Run `workers` copies of this sweep command as separate processes sharing the study; wait for them."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "CNNLAB_THREADS": str(max(1, cores // workers))}
    procs = [subprocess.Popen([sys.executable, "-m", "cnnlab.cli", *argv, "--workers", "1"], env=env)
             for _ in range(workers)]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    return max(codes)
