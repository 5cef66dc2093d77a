"""`cnnlab assignment --budget`: the whole job planned to a deadline. Part A's sweep gets what the phases after it
leave, those phases predicted from the real training step of each model measured on this device; the plan is
printed first (one line per phase, its share and its expected end), made again after each phase from the time
really spent, and a phase that no longer fits is cut (named in the record), the report never.

out/budget.json holds the budget, the sessions of the processes that worked on it (the time spent is their
union: a rerun after a crash goes on with what remains), the calibration, each plan, and what each phase spent.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .budget import MIN_TRIALS, SAFETY, say_duration, time_spent
from .errors import ConfigError
from .io import atomic_write_json

RECORD = "budget.json"
HEARTBEAT_S = 5.0  # how often the job's session is written: a process killed loses at most this much of its count
EXPLAIN_S = 10.0  # the phases without a model-sized cost of their own: measured once here (docs/budget.md), kept
COMPARE_S = 3.0
REPORT_S = 15.0
MARGIN = 0.05  # of the budget, kept aside for what the predictions miss
# the job's steps, by the names assignment.json and budget.json give them (a phase planned is a step recorded)
SWEEP = "Part A: sweep"
EVALUATE = "Part A: evaluate the best trial on the test folder"
EXPLAIN = "Part A: explain it"
DISTIL = "distil Part B's best run into Part A's small CNN"
COMPARE = "compare"
REPORT = "report"


def verify_step(k: int) -> str:
    return f"Part A: verify the top {k}"


def strategy_step(strategy: str) -> str:
    return f"Part B: {strategy}"


@dataclass
class JobClock:
    """This process's session of a budgeted job, written to out/budget.json every HEARTBEAT_S seconds by a daemon
    thread (it ends with the process, however it ends), and the record the plan and the phases add to."""

    path: Path
    seconds: float
    record: dict[str, Any]
    started: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def open(cls, out: Path, seconds: float) -> JobClock:
        import json

        path = out / RECORD
        record = json.loads(path.read_text()) if path.is_file() else {}
        record.setdefault("sessions", [])
        record.setdefault("plans", [])
        record.setdefault("phases", {})
        record.setdefault("cut", [])
        record["budget_s"] = seconds  # the latest asked: a rerun may give more
        clock = cls(path, seconds, record)
        record["sessions"].append([clock.started, clock.started])
        clock.write()
        threading.Thread(target=clock.beat, daemon=True, name="cnnlab-budget").start()
        return clock

    def beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            self.write()

    def write(self) -> None:
        with self.lock:
            self.record["sessions"][-1][1] = time.time()
            self.record["spent_s"] = time_spent(self.record["sessions"])
            atomic_write_json(self.path, self.record)

    def spent(self) -> float:
        with self.lock:
            self.record["sessions"][-1][1] = time.time()
            return time_spent(self.record["sessions"])

    def left(self) -> float:
        return self.seconds - self.spent()

    def note(self, key: str, value: Any) -> None:
        with self.lock:
            if isinstance(self.record.get(key), list):
                if key != "cut" or value not in self.record[key]:  # a rerun's plan cuts what the first cut: once
                    self.record[key].append(value)
            else:
                self.record[key] = value
        self.write()

    def phase(self, name: str, seconds: float, state: str) -> None:
        with self.lock:
            self.record["phases"][name] = {"spent_s": round(seconds, 1), "state": state,
                                           "planned_s": self.record.get("planned", {}).get(name)}
        self.write()

    def close(self) -> None:
        self.stop.set()
        self.write()


@dataclass(frozen=True)
class Measured:
    """What the phases after the search cost, from the real steps on this device: the small CNN's epoch (the
    sweep's typical configuration) and forward per image; the pretrained model's training step and forward per
    image and its set-up; the image counts."""

    small_epoch: float
    small_forward: float
    big_step: float
    big_forward: float
    big_setup: float
    train: int
    val: int
    test: int


def small_evaluation(m: Measured) -> float:
    """Seconds of the small CNN's evaluation: two forwards per test image (the flip TTA) and 2 s of setup."""
    return 2 + 2 * m.test * m.small_forward


def distil_fixed(m: Measured) -> float:
    """A distillation's seconds apart from the student's epochs: the teacher's pass over the training images (two
    forwards each, with its flip) and the student's evaluation."""
    return 2 * m.train * m.big_forward + small_evaluation(m)


def planned_after(planned: dict[str, float], phase: str) -> float:
    """Seconds of the phases planned after `phase` (in the order they run; 0 for one not planned)."""
    names = list(planned)
    return sum(planned[n] for n in names[names.index(phase) + 1:]) if phase in names else 0.0


def later_phases(m: Measured, strategies: list[str], epochs_head: int, epochs_other: int, student_epochs: int,
                 verify: int = 0, trial_seconds: float = 0.0) -> dict[str, float]:
    """Predicted seconds of each phase after the search, in the order they run (`verify` K: the top K trained
    again with 3 seeds each, at `trial_seconds` a run)."""
    evaluate_big = m.big_setup + 2 * m.test * m.big_forward  # the flip TTA: two forwards per test image
    evaluate_small = small_evaluation(m)
    phases = {}
    if verify:
        phases[verify_step(verify)] = 3 * verify * trial_seconds
    phases[EVALUATE] = evaluate_small
    phases[EXPLAIN] = EXPLAIN_S
    for strategy in strategies:
        if strategy == "head":  # the frozen backbone's features once (a store), then cheap epochs on them
            cost = m.big_setup + (m.train + m.val) * m.big_forward + epochs_head * 0.5
        else:
            cost = m.big_setup + epochs_other * (m.train * m.big_step + 2 * m.val * m.big_forward)
        phases[strategy_step(strategy)] = cost + evaluate_big
    if strategies:  # the teacher's logits of each training image (with its flip), then the student's epochs
        phases[DISTIL] = distil_fixed(m) + student_epochs * m.small_epoch
    phases[COMPARE] = COMPARE_S
    phases[REPORT] = REPORT_S
    return phases


@dataclass(frozen=True)
class JobPlan:
    search: float  # seconds for Part A's sweep (its calibration included)
    later: dict[str, float]  # each later phase's predicted seconds
    strategies: list[str]  # Part B's, after any cut
    cut: list[str]  # what the plan left out to fit

    def lines(self, now: float) -> list[str]:
        """One line per phase: its share and when it is expected to end."""
        out, end = [], now
        phases = [(SWEEP, self.search), *self.later.items()]
        width = max(len(name) for name, _ in phases)
        for name, seconds in phases:
            end += seconds
            out.append(f"  {name:<{width}} {say_duration(seconds):>12}   ends about "
                       f"{time.strftime('%H:%M:%S', time.localtime(end))}")
        return out


def plan_job(left: float, budget: float, m: Measured, strategies: list[str], epochs: tuple[int, int, int],
             smallest_search: float, verify: tuple[int, float] = (0, 0.0)) -> JobPlan:
    """(`verify`: the top K to train again, and the seconds of one such run.)"""
    """The time `left` divided: each later phase as predicted (stretched by SAFETY), a MARGIN of the budget, and
    the rest to the search, which must hold at least `smallest_search` (one trial at its first rung, per
    MIN_TRIALS share). Part B's strategies other than head are cut first, the costliest first, when it does not."""
    kept, cut = list(strategies), []
    while True:
        later = {k: v * SAFETY for k, v in later_phases(m, kept, *epochs, verify[0], verify[1]).items()}
        search = left - sum(later.values()) - MARGIN * budget
        if search >= smallest_search or not any(s != "head" for s in kept):
            break
        costliest = max((s for s in kept if s != "head"), key=lambda s: later[strategy_step(s)])
        kept.remove(costliest)
        cut.append(f"{strategy_step(costliest)} (its predicted {say_duration(later[strategy_step(costliest)])} left "
                   "too little for the search)")
    if search < smallest_search:
        need = budget - left + sum(later.values()) + MARGIN * budget + smallest_search
        raise ConfigError(f"budget {say_duration(budget)}: too small for this job on this machine (the phases after "
                          f"the search need {say_duration(sum(later.values()))}); the smallest budget that fits is "
                          f"{-(-need // 60):.0f}m")
    return JobPlan(search, later, kept, cut)


def smallest_search(costs: Any, space: Any) -> float:
    """The least time a search is worth: MIN_TRIALS trials of the cheapest configuration at the first rung."""
    return MIN_TRIALS * costs.trial_seconds(space.cheapest, space.min_epochs) * SAFETY


def fits(clock: JobClock, predicted: float, after: float) -> bool:
    """Whether a phase predicted to take `predicted` seconds still ends before the deadline, with `after` seconds of
    the phases that follow it kept."""
    return clock.left() - after >= predicted * SAFETY


def announce(plan: JobPlan, clock: JobClock, log: Callable[[str], None]) -> None:
    log(f"budget {say_duration(clock.seconds)}, {say_duration(clock.left())} left; the plan:")
    for line in plan.lines(time.time()):
        log(line)
    for what in plan.cut:
        log(f"  cut: {what}")
