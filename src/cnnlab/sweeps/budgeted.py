"""A sweep run to a deadline (`--budget`): the clock, the calibration and the plan kept in the study itself, so
every process of the sweep (workers, other machines on one PostgreSQL study, a rerun after a crash) plans from one
shared record. The rules are `cnnlab.budget`'s pure functions; this module measures and records.

Study user attributes: `budget` (the seconds asked, the latest given), `budget:session:<id>` ([start, last seen] of
each process), `budget:calibration` (the measured points and set-up), `budget:plan` (the latest plan). Each trial
records its own `cost` (GFLOPs, seconds per epoch, set-up) and, when the deadline cut it, `cut`.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import statistics
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import optuna

from ..budget import Costs, SearchPlan, epochs_for_trial, next_epoch_fits, plan_search, say_duration, smallest_budget, time_spent
from ..config import Config, make_config
from ..errors import ConfigError
from ..io import atomic_write_json
from ..trainer import Callback, StopTraining, Trainer
from .schema import Sweep
from .space import known_problem, suggest

SESSION = "budget:session:"
CALIBRATION = "budget:calibration"
PLAN = "budget:plan"
RECORD = "budget.json"  # in the sweep folder: the budget, the plan, what was spent and what was cut
CALIBRATION_STEPS = 3  # timed steps per calibrated configuration, after one warm-up step
VALIDATION_SHARE = 2 / 3  # a validation image (two forwards with the flip) against a training image (forward, backward)
FINISHING = 2.0  # seconds after the last trial: the study's best read, budget.json written, the last line
DRAWS = 64  # configurations drawn to know the search space's typical and cheapest costs


class BudgetTooSmall(ConfigError):
    """The budget holds not one trial after what must be spent around it: refused, naming the smallest that does."""


def config_gflops(cfg: Config, num_classes: int, known: dict[tuple, float] | None = None) -> float:
    """Forward GFLOPs of one image of the model `cfg` describes: the small CNN's closed form, any other model
    measured once (per model and size) by torch's FLOP counter."""
    from ..models import check_config, create_model
    from ..models.smallcnn import measured_cost, smallcnn_cost

    cfg = check_config(cfg)
    if cfg.model == "smallcnn":
        return smallcnn_cost(cfg, num_classes).gflops
    key = (cfg.model, cfg.image_size)
    if known is None or key not in known:
        parts = create_model(make_config({**cfg.to_dict(), "weights": "none" if cfg.weights == "none" else "random"}),
                             num_classes)
        value = measured_cost(parts.module, parts.preprocess.image_size).gflops
        if known is None:
            return value
        known[key] = value
    return known[key]


@dataclass
class SweepClock:
    """This process's session of a budgeted sweep: the deadline it works to, in wall-clock seconds."""

    study: Any
    budget: float
    key: str
    started: float
    deadline: float = 0.0

    @classmethod
    def open(cls, study: Any, budget: float) -> SweepClock:
        study.set_user_attr("budget", budget)
        now = time.time()
        clock = cls(study, budget, f"{SESSION}{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", now)
        clock.touch()
        clock.deadline = now + budget - clock.spent()  # the union grows at wall speed from now on: fixed
        return clock

    def touch(self) -> None:
        self.study.set_user_attr(self.key, [self.started, time.time()])

    def sessions(self) -> list[list[float]]:
        return [v for k, v in self.study.user_attrs.items() if k.startswith(SESSION)]

    def spent(self) -> float:
        return time_spent(self.sessions())

    def left(self) -> float:
        return self.deadline - time.time()


def sweep_spent(study: Any) -> float:
    """The seconds the sweep's processes have worked under a budget so far (0 before its first)."""
    return time_spent([v for k, v in study.user_attrs.items() if k.startswith(SESSION)])


def trial_costs(study: Any) -> Costs:
    """The cost model from the shared record: the calibration's points, then each finished trial's measured ones."""
    calibration = study.user_attrs.get(CALIBRATION) or {}
    costs = Costs([tuple(p) for p in calibration.get("points", [])], list(calibration.get("setup", [])))
    measured = [t.user_attrs["cost"] for t in study.get_trials(deepcopy=False) if "cost" in t.user_attrs]
    if measured:  # a trial's own epochs say what this device does under the sweep's real load
        costs.measured = [(c["gflops"], c["epoch_s"]) for c in measured]
        costs.setup = [c["setup_s"] for c in measured]
    return costs


class Deadline(Callback):
    """Stops a trial at an epoch boundary (a rung: its checkpoint and metrics are written) when the next epoch, as
    long as the last one took, would end after the search's share of the budget, or after the trial's own share
    (`allotted` seconds: a trial far slower than predicted cannot eat the time of the trials after it)."""

    def __init__(self, clock: SweepClock, reserve: float, trial: Any, allotted: float = math.inf):
        self.clock, self.reserve, self.trial, self.allotted = clock, reserve, trial, allotted
        self.started = time.time()

    def on_fit_start(self, run: Trainer) -> None:
        self.started = time.time()

    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        self.clock.touch()
        if record["epoch"] >= run.cfg.epochs:
            return
        own = self.allotted - (time.time() - self.started)
        for left, why in ((self.clock.left() - self.reserve, "the budget's deadline"), (own, "its share of the budget")):
            if not next_epoch_fits(left, 0.0, record["epoch_time"]):
                self.trial.set_user_attr("cut", f"stopped after epoch {record['epoch']} of {run.cfg.epochs}: {why}")
                raise StopTraining("stopped")


@dataclass(frozen=True)
class Space:
    """What a budget plans with, of a sweep's search space on this data: its classes, the median and the cheapest
    drawn configuration's GFLOPs, and the epochs a trial asks (at most) and its first pruning rung."""

    classes: int
    typical: float
    cheapest: float
    max_epochs: int
    min_epochs: int
    rows: tuple[int, int]  # training and validation images of the split


def measure_space(study: Any, sweep: Sweep, base: dict[str, Any], folder: Path, progress: bool,
                  log: Callable[[str], None], known: dict[tuple, float] | None = None) -> Space:
    """The search space's costs, the device calibrated first where the study holds no calibration yet (one process
    of this machine at a time: the caller holds the sweep folder's queue lock)."""
    from ..data import list_classes

    classes = len(list_classes(Path(make_config(base).data) / "train"))
    drawn = draws(sweep, base, classes, {} if known is None else known)
    flops = sorted(g for g, _ in drawn)
    max_epochs = max(make_config(base, values).epochs for _, values in drawn)
    min_epochs = sweep.hyperband["min_iter"] if sweep.hyperband else 1
    if CALIBRATION not in study.user_attrs:
        calibrate(study, drawn, base, folder, progress, log)
    rows = study.user_attrs[CALIBRATION]["rows"]
    return Space(classes, statistics.median(flops), flops[0], max_epochs, min_epochs, (rows[0], rows[1]))


def draws(sweep: Sweep, base: dict[str, Any], classes: int, known: dict[tuple, float]) -> list[tuple[float, dict[str, Any]]]:
    """(GFLOPs, values) of runnable configurations drawn as a random search draws them."""

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    out = []
    for _ in range(DRAWS * 4):
        values = suggest(study.ask(), sweep)
        if known_problem(base, values) is None:
            out.append((config_gflops(make_config(base, values), classes, known), values))
        if len(out) >= DRAWS:
            break
    return out


def calibrate(study: Any, drawn: list[tuple[float, dict[str, Any]]], base: dict[str, Any], folder: Path,
              progress: bool, log: Callable[[str], None]) -> None:
    """The real training step timed on this device for the median and the upper quartile of the drawn
    configurations' GFLOPs (the costliest can cost a thousand times the cheapest: a few of its steps could take a
    short budget's minute), each turned into seconds per epoch of the training set with its validation; the first
    also builds the image cache, and the set-up a trial pays is the second's. The line between them is the model
    until trials measure their own epochs."""
    started = time.perf_counter()
    chosen = sorted(drawn, key=lambda d: d[0])
    points, setup = [], []
    for i, (gflops, values) in enumerate([chosen[len(chosen) // 2], chosen[(3 * len(chosen)) // 4]]):
        timed = time_steps(make_config(base, values), folder / "calibration", f"calibrate-{i}", progress)
        points.append((gflops, timed.train * (timed.rows[0] + VALIDATION_SHARE * timed.rows[1])))
        setup.append(timed.setup)
    record = {"points": points, "setup": setup[1:], "seconds": time.perf_counter() - started,
              "cache_build_s": max(0.0, setup[0] - setup[-1]), "rows": list(timed.rows)}
    study.set_user_attr(CALIBRATION, record)
    log(f"budget: calibrated in {say_duration(record['seconds'])}: an epoch costs "
        + ", ".join(f"{s:.1f} s at {g:.2f} GFLOPs" for g, s in points))


@dataclass(frozen=True)
class Timed:
    """A configuration's real step on this device: seconds per training image (forward, backward, step) and per
    image seen in inference (forward only), its (training, validation) images, and the seconds its set-up took."""

    train: float
    forward: float
    rows: tuple[int, int]
    setup: float


def time_steps(cfg: Config, folder: Path, name: str, progress: bool, steps: int = CALIBRATION_STEPS) -> Timed:
    """`cfg` prepared as a run in folder/name (removed after), a warm-up step and `steps` training steps timed, then
    forward passes of one batch."""
    import torch

    from ..hardware import autocast
    from ..training import prepare

    cfg = make_config(cfg.to_dict(), {"out": str(folder), "name": name, "wandb": "off", "tensorboard": False})
    started = time.perf_counter()
    run = prepare(cfg, progress=progress, log=lambda s: None)
    setup = time.perf_counter() - started
    try:
        timer = StepTimer(steps)
        try:
            run.train_epoch(1, [timer])
        except StopTraining:
            pass
        data = run.source.epoch(1, 0)
        x = data.transform(next(iter(data.train))[0], None)
        data.net.eval()
        times = []
        with torch.inference_mode(), autocast(run.device, run.amp):
            for _ in range(2):
                began = time.perf_counter()
                float(data.net(x).float().sum())
                times.append(time.perf_counter() - began)
        return Timed(timer.per_image(), times[-1] / len(x), (len(run.train_rows), len(run.val_rows)), setup)
    finally:
        run.claim.release()
        shutil.rmtree(folder / cfg.name, ignore_errors=True)


@dataclass
class BudgetPlanner:
    """What a budgeted sweep process asks before and after each trial."""

    clock: SweepClock
    sweep: Sweep
    base: dict[str, Any]
    folder: Path
    log: Callable[[str], None]
    workers: int = 1
    reserve_runs: int = 0  # trial-sized runs after the search (a verification's), whose time is kept aside
    reserve: float = 0.0  # seconds kept after the search: those runs, and the sweep's last records
    classes: int = 10
    typical: float = 0.0  # GFLOPs of the search space's median and cheapest configurations
    cheapest: float = 0.0
    max_epochs: int = 1
    min_epochs: int = 1
    plan: SearchPlan | None = None
    known: dict[tuple, float] = field(default_factory=dict)  # GFLOPs of models measured (not the small CNN's)

    def start(self, progress: bool) -> None:
        """Measure the space and the device (once per study), make the first plan and print it; refuse a budget
        that holds no trial."""
        space = measure_space(self.clock.study, self.sweep, self.base, self.folder, progress, self.log, self.known)
        self.classes, self.typical, self.cheapest = space.classes, space.typical, space.cheapest
        self.max_epochs, self.min_epochs = space.max_epochs, space.min_epochs
        costs = trial_costs(self.clock.study)
        self.reserve = FINISHING + self.reserve_runs * costs.trial_seconds(self.typical, self.max_epochs)
        self.replan(first=True)

    def replan(self, first: bool = False) -> SearchPlan | None:
        self.clock.touch()  # what was spent so far (a calibration) is counted, and said, from here
        costs = trial_costs(self.clock.study)
        left = self.clock.left()
        self.plan = (plan_search(left, self.reserve, costs, self.typical, self.max_epochs, self.min_epochs, self.workers)
                     # too little left for a typical trial: the cheaper ones may still fit
                     or plan_search(left, self.reserve, costs, self.cheapest, self.max_epochs, self.min_epochs,
                                    self.workers))
        if self.plan is not None and self.sweep.run_cap is not None:  # no more trials than the file's cap
            from dataclasses import replace

            self.plan = replace(self.plan, trials=min(self.plan.trials, self.sweep.run_cap))
        if self.plan is None:
            ran = any("cost" in t.user_attrs for t in self.clock.study.get_trials(deepcopy=False))
            if first and ran:  # a rerun of a sweep whose budget is spent: nothing more to do, said
                self.log(f"budget {say_duration(self.clock.budget)}: {say_duration(self.clock.spent())} spent, no further "
                         "trial fits; give a larger --budget to go on")
            elif first:
                need = smallest_budget(self.clock.spent(), self.reserve, costs, self.cheapest, self.min_epochs)
                raise BudgetTooSmall(f"budget {say_duration(self.clock.budget)}: not one trial fits after "
                                     f"{say_duration(self.clock.spent())} spent; the smallest budget that holds one "
                                     f"trial of the cheapest configuration ({self.min_epochs} epoch(s)) is {need:.0f}s")
            return None
        self.clock.study.set_user_attr(PLAN, {"at": time.time(), "left_s": left, **vars(self.plan)})
        if first:
            self.log(f"budget {say_duration(self.clock.budget)}, {say_duration(left)} left: {self.plan.describe()}; "
                     f"ends by {time.strftime('%H:%M:%S', time.localtime(self.clock.deadline))}")
        return self.plan

    def epochs_for(self, values: dict[str, Any]) -> tuple[int, float]:
        """The epochs a sampled trial is given now (0: it does not fit the time left), and its GFLOPs."""
        gflops = config_gflops(make_config(self.base, values), self.classes, self.known)
        if self.plan is None:
            return 0, gflops
        max_epochs = make_config(self.base, values).epochs
        return epochs_for_trial(self.plan, self.clock.left(), self.reserve, trial_costs(self.clock.study), gflops,
                                max_epochs, self.min_epochs), gflops

    def room_for_a_trial(self) -> bool:
        """Whether the cheapest configuration still fits, at the first rung, before the deadline."""
        if self.replan() is None:
            return False
        costs = trial_costs(self.clock.study)
        return self.clock.left() - self.reserve >= costs.trial_seconds(self.cheapest, self.min_epochs)

    def deadline(self, trial: Any) -> Deadline:
        return Deadline(self.clock, self.reserve, trial, self.plan.trial_cap if self.plan is not None else math.inf)

    def write_record(self) -> dict[str, Any]:
        """budget.json: the budget, the latest plan, the time spent on calibration, trials and the rest, and each
        trial cut short or never started for want of time."""
        study = self.clock.study
        trials = study.get_trials(deepcopy=False)
        calibration = study.user_attrs.get(CALIBRATION, {})
        trained = sum(sum(t.user_attrs["cost"]["epoch_s_all"]) + t.user_attrs["cost"]["setup_s"]
                      for t in trials if "cost" in t.user_attrs)
        spent = self.clock.spent()
        record = {"budget_s": self.clock.budget, "spent_s": spent, "left_s": max(0.0, self.clock.budget - spent),
                  "sessions": len(self.clock.sessions()),
                  "spent": {"calibration_s": calibration.get("seconds", 0.0), "trials_s": trained,
                            "other_s": max(0.0, spent - calibration.get("seconds", 0.0) - trained)},
                  "calibration": calibration, "plan": study.user_attrs.get(PLAN),
                  "trials": {"complete": sum(t.state.name == "COMPLETE" for t in trials),
                             "cut": {t.number: t.user_attrs["cut"] for t in trials if "cut" in t.user_attrs},
                             "shortened": {t.number: t.user_attrs["shortened"] for t in trials
                                           if "shortened" in t.user_attrs},
                             "not_started": sum(1 for t in trials if t.user_attrs.get("over_budget"))},
                  "rule": "the budget counts the time cnnlab's processes ran (the union of their sessions), not the "
                          "time between runs"}
        atomic_write_json(self.folder / RECORD, record)
        return record


class StepTimer(Callback):
    """Times the training steps after the first (which pays for kernel selection and the first upload), then stops:
    after `steps` of them, or once they have taken `seconds`."""

    def __init__(self, steps: int, seconds: float = 5.0):
        self.steps, self.seconds, self.times, self.images, self.began = steps, seconds, [], [], 0.0

    def on_step_start(self, run: Trainer) -> None:
        self.began = time.perf_counter()

    def on_step_end(self, run: Trainer, loss: Any, images: int) -> None:
        float(loss.detach())  # the step's work is done when its loss can be read (a GPU runs ahead of the host)
        self.times.append(time.perf_counter() - self.began)
        self.images.append(images)
        if len(self.times) > self.steps or (len(self.times) > 1 and sum(self.times[1:]) > self.seconds):
            raise StopTraining("completed")

    def per_image(self) -> float:
        timed = list(zip(self.times, self.images))[1:] or list(zip(self.times, self.images))
        return sum(t for t, _ in timed) / max(1, sum(n for _, n in timed))
