"""Work planned to a deadline (`--budget 2h`): the rules, as pure functions of measured costs and the time left.

- **The clock.** A budget counts the time cnnlab ran, not the time it was stopped: each process that works on a
  budgeted job records its session as [start, last seen] (wall-clock seconds, touched at each trial and epoch), and
  the time spent is the length of the union of the sessions, so workers running side by side count their common
  time once, and a rerun after a crash goes on with what remains (a process killed counts to its last touch).
- **The cost model.** A trial costs its set-up plus its epochs; an epoch of the small CNN costs alpha + beta x its
  forward GFLOPs per image, fitted by least squares to what was measured on this device (a short calibration of
  the real training step first, then every trial's own epochs, which soon outweigh it).
- **The plan.** The time left, less the reserve for what follows the search, divided among trials: as many epochs
  per trial as the sweep asks while at least `MIN_TRIALS` trials fit, fewer (not below the first pruning rung)
  when they do not. Before each trial the plan is made again from the measured times; a trial that cannot end
  before the deadline is started shorter, or not at all; a running one stops at an epoch boundary (a rung) when
  the next epoch would end past the deadline.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

from .errors import ConfigError

MIN_TRIALS = 3  # fewer trials than this is not a search: epochs are cut first
MEASURED_SIZES = 3  # trials of this many model sizes measured: their own line replaces the calibration's
SAFETY = 1.10  # predicted times are stretched by this before a trial or an epoch is started
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str | float | int, key: str = "budget") -> float:
    """Seconds in `90s`, `20m`, `2h`, `1h30m` or a plain number of seconds; refused in one line naming `key`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        parts = re.fullmatch(r"\s*((?:\d+(?:\.\d+)?\s*[smhd]\s*)+|\d+(?:\.\d+)?)\s*", str(text))
        if parts is None:
            raise ConfigError(f"{key} {text!r}: expected a duration such as 90s, 20m, 2h or 1h30m")
        body = parts.group(1)
        seconds = float(body) if re.fullmatch(r"\d+(?:\.\d+)?", body) else sum(
            float(n) * UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", body))
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key} {text!r}: expected a positive duration such as 90s, 20m or 2h")
    return seconds


def say_duration(seconds: float) -> str:
    """`4 min 10 s`, `1 h 05 min`, `12 s`: how a plan and a record show a duration."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def time_spent(sessions: Sequence[Sequence[float]]) -> float:
    """The length of the union of [start, end] sessions: the time at least one process worked."""
    total, reach = 0.0, -math.inf
    for start, end in sorted((float(s), float(e)) for s, e in sessions if e > s):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def fitted_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(alpha, beta) of seconds = alpha + beta x GFLOPs by least squares, both non-negative (more FLOPs never cost
    less); one point, or one size measured: through the origin and it."""
    xs = [g for g, _ in points]
    ys = [s for _, s in points]
    n, mx, my = len(xs), sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mx) ** 2 for x in xs)
    if n < 2 or spread <= 1e-12 * max(1.0, mx * mx):
        return (0.0, my / mx) if mx > 0 else (my, 0.0)
    beta = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / spread)
    alpha = my - beta * mx
    if alpha < 0:  # through the origin instead
        alpha, beta = 0.0, sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs)
    return alpha, beta


@dataclass
class Costs:
    """What a trial costs on this device: the calibration's (forward GFLOPs per image, seconds per epoch) points,
    the trials' measured ones, and the set-up seconds of a trial (model, data upload, folder)."""

    points: list[tuple[float, float]] = field(default_factory=list)  # the calibration's
    setup: list[float] = field(default_factory=list)
    measured: list[tuple[float, float]] = field(default_factory=list)  # trials' own epochs

    def epoch_seconds(self, gflops: float) -> float:
        """Seconds of one epoch (training and validation) of a model of `gflops`. Until trials of MEASURED_SIZES
        different sizes have run: the calibration's line, scaled by the median ratio of what trials measured to
        what it predicted for them (a real epoch also validates, transforms and waits on the machine's other
        work); then the line fitted to the trials alone."""
        if len({round(g, 6) for g, _ in self.measured}) >= MEASURED_SIZES:
            alpha, beta = fitted_line(self.measured)
            return alpha + beta * gflops
        if not self.points:
            if not self.measured:
                raise ValueError("no measured cost: calibrate first")
            alpha, beta = fitted_line(self.measured)
            return alpha + beta * gflops
        alpha, beta = fitted_line(self.points)
        ratios = sorted(s / (alpha + beta * g) for g, s in self.measured if alpha + beta * g > 0)
        scale = ratios[len(ratios) // 2] if ratios else 1.0
        return scale * (alpha + beta * gflops)

    def setup_seconds(self) -> float:
        return sum(self.setup) / len(self.setup) if self.setup else 0.0

    def trial_seconds(self, gflops: float, epochs: int) -> float:
        return self.setup_seconds() + epochs * self.epoch_seconds(gflops)


@dataclass(frozen=True)
class SearchPlan:
    """The search's share of the time cut into trials: `trials` of `epochs` epochs each (the typical one), every
    trial at most `trial_cap` seconds, `search` seconds in all, then `reserve` seconds for what follows."""

    trials: int
    epochs: int
    trial_seconds: float
    trial_cap: float
    search: float
    reserve: float

    def describe(self) -> str:
        return (f"{self.trials} trial(s) of {self.epochs} epoch(s), about {say_duration(self.trial_seconds)} each, in "
                f"{say_duration(self.search)}; {say_duration(self.reserve)} kept for what follows")


def plan_search(left: float, reserve: float, costs: Costs, typical_gflops: float, max_epochs: int, min_epochs: int,
                workers: int = 1) -> SearchPlan | None:
    """How the time `left` (less `reserve`) is spent on trials by `workers` processes side by side: the most epochs
    (up to `max_epochs`) with which MIN_TRIALS typical trials fit, never fewer than `min_epochs`; None when not even
    one trial of `min_epochs` fits."""
    search = left - reserve
    min_epochs = max(1, min(min_epochs, max_epochs))
    for epochs in range(max_epochs, min_epochs - 1, -1):
        each = costs.trial_seconds(typical_gflops, epochs) * SAFETY
        trials = int(search // each) * workers if each > 0 else 0
        if trials >= MIN_TRIALS or epochs == min_epochs:
            if trials < 1:
                return None
            cap = max(each, search * workers / MIN_TRIALS)  # no trial may take the time of the MIN_TRIALS
            return SearchPlan(trials, epochs, each / SAFETY, cap, search, reserve)
    return None


def epochs_for_trial(plan: SearchPlan, left: float, reserve: float, costs: Costs, gflops: float, max_epochs: int,
                     min_epochs: int) -> int:
    """The epochs a trial of `gflops` is given now: the most (up to `max_epochs`) that end before the search's
    share does and within the plan's cap per trial; 0: it cannot, and is not started."""
    room = min(left - reserve, plan.trial_cap)
    setup, epoch = costs.setup_seconds(), costs.epoch_seconds(gflops)
    fits = int((room / SAFETY - setup) // epoch) if epoch > 0 else max_epochs
    epochs = min(max_epochs, fits)
    return epochs if epochs >= max(1, min(min_epochs, max_epochs)) else 0


def next_epoch_fits(left: float, reserve: float, epoch_seconds: float) -> bool:
    """Whether one more epoch of `epoch_seconds` (as measured) ends before the search's share of the time does."""
    return left - reserve >= epoch_seconds * SAFETY


def smallest_budget(spent: float, reserve: float, costs: Costs, gflops: float, min_epochs: int) -> float:
    """The least budget that holds what was spent (calibration), one trial of the cheapest kind and the reserve,
    rounded up to a whole 10 s."""
    need = spent + reserve + costs.trial_seconds(gflops, max(1, min_epochs)) * SAFETY
    return math.ceil(need / 10) * 10
