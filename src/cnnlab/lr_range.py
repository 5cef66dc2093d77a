"""The learning-rate range test (Smith 2015; fastai's lr_find, Lightning's Tuner.lr_find): a few hundred training
steps of the given config with the learning rate raised exponentially from `start` to `end`, the loss recorded at
each, and a suggestion read off the curve. The model's weights and the optimiser's state are put back as they were
before the first step, so a training started from them is the one the test probed.

Suggestion (printed with its rule): half the learning rate of the lowest smoothed loss. Measured with
benchmarks/lr_find_check.py: the classic steepest-descent point sits about ten times below the default recipe's
tuned lr and trains worse with its warm-up and cosine decay (flowers, 3 seeds: 0.652 against 0.698), while half the
minimum's lr lands next to the tuned 2e-3 (flowers 2.3e-3, grocery 1.7e-3). The steepest descent and min/10 are
reported too."""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .config import Config
from .io import atomic_write_json
from .trainer import Callback, StopTraining, Trainer
from .training import prepare

RULE = "half the learning rate of the lowest smoothed loss"


@dataclass
class RangeTest:
    lrs: list[float]
    losses: list[float]  # raw, per step
    smoothed: list[float]
    suggestion: float  # RULE
    steepest: float  # the steepest descent of the smoothed loss against log10(lr), before its minimum
    min_over_10: float
    folder: Path
    figure: Path

    def to_dict(self) -> dict[str, Any]:
        return {"suggestion": self.suggestion, "rule": RULE, "steepest_descent": self.steepest,
                "min_over_10": self.min_over_10, "lrs": self.lrs, "losses": self.losses, "smoothed": self.smoothed}


def smooth(losses: list[float], beta: float = 0.9) -> list[float]:
    """The debiased exponential moving average fastai smooths the curve with."""
    out, avg = [], 0.0
    for i, loss in enumerate(losses, start=1):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** i))
    return out


def diverged(losses: list[float]) -> bool:
    """The loss is no longer finite, or its smoothed curve is past four times its lowest: the test is over."""
    smoothed = smooth(losses)
    return not math.isfinite(losses[-1]) or (len(losses) > 10 and smoothed[-1] > 4 * min(smoothed))


def suggestions(lrs: list[float], smoothed: list[float]) -> tuple[float, float, float]:
    """(half the lr at the minimum: the suggestion, steepest descent before the minimum, lr at the minimum / 10)."""
    lowest = int(np.argmin(smoothed))
    half, min_over_10 = lrs[lowest] / 2, lrs[lowest] / 10
    if lowest < 2:
        return float(half), float(min_over_10), float(min_over_10)
    slope = np.gradient(np.asarray(smoothed[:lowest + 1]), np.log10(np.asarray(lrs[:lowest + 1])))
    return float(half), float(lrs[int(np.argmin(slope))]), float(min_over_10)


class RaisedRates(Callback):
    """The test's hooks into the trainer's own loop: before each step the rate `lr` (each parameter group in its
    proportion to the config's lr, so lr_backbone keeps its ratio), raised by `factor` per step; after it the loss,
    recorded; the test ends after `steps` or when the loss diverges."""

    def __init__(self, run: Trainer, start: float, factor: float, steps: int):
        self.ratios = [g["lr"] / run.cfg.lr for g in run.optimizer.param_groups]
        self.lr, self.factor, self.steps = start, factor, steps
        self.lrs: list[float] = []
        self.losses: list[float] = []

    def on_step_start(self, run: Trainer) -> None:
        for group, ratio in zip(run.optimizer.param_groups, self.ratios):
            group["lr"] = self.lr * ratio

    def on_step_end(self, run: Trainer, loss: torch.Tensor, images: int) -> None:
        self.lrs.append(self.lr)
        self.losses.append(float(loss.detach()))
        self.lr *= self.factor
        if len(self.lrs) >= self.steps or diverged(self.losses):
            raise StopTraining("completed")


def range_test(cfg: Config, start: float = 1e-6, end: float = 1.0, steps: int = 200, progress: bool = True,
               log: Callable[[str], None] = print, run: Trainer | None = None) -> RangeTest:
    """Run the test on `cfg` (its data, model, optimiser, augmentation) in a run folder of its own (`cfg.name`,
    default lr-find-<time>), which receives lr_find.json and lr_find.png. Given `run` (what training.prepare made),
    the test probes that model and optimiser, and hands them back as they were."""
    from .visualise import plot_lr_find

    if not 0 < start < end:
        from .errors import ConfigError

        raise ConfigError(f"--start {start:g} --end {end:g}: expected 0 < start < end")
    cfg = replace(cfg, name=cfg.name or time.strftime("lr-find-%Y%m%d-%H%M%S"))
    if run is None:
        run = prepare(cfg, progress=progress, log=log)
        try:
            return range_test(cfg, start, end, steps, progress, log, run)
        finally:
            run.claim.release()
    saved_model = copy.deepcopy(run.model.state_dict())
    saved_optimizer = copy.deepcopy(run.optimizer.state_dict())
    rates = RaisedRates(run, start, (end / start) ** (1 / max(1, steps - 1)), steps)
    said, run.log = run.log, lambda s: None  # a gradual plan's unfreezing is training's news, not the test's
    try:
        for epoch in itertools.count(1):  # training's own epochs and steps, with no schedule, average or validation
            run.train_epoch(epoch, [rates])
    except StopTraining:
        pass
    finally:
        run.log = said
        run.model.load_state_dict(saved_model)  # as before the first step, bit for bit
        run.optimizer.load_state_dict(saved_optimizer)
    finite = [i for i, v in enumerate(rates.losses) if math.isfinite(v)]
    lrs, losses = [rates.lrs[i] for i in finite], [rates.losses[i] for i in finite]
    smoothed = smooth(losses)
    suggestion, steepest, min_over_10 = suggestions(lrs, smoothed)
    folder = run.run_dir
    figure = plot_lr_find(lrs, losses, smoothed, {"suggestion (min / 2)": suggestion, "steepest descent": steepest,
                                                  "min / 10": min_over_10, "the config's lr": cfg.lr},
                          folder / "lr_find.png")
    result = RangeTest(lrs, losses, smoothed, suggestion, steepest, min_over_10, folder, figure)
    atomic_write_json(folder / "lr_find.json", result.to_dict())
    log(f"lr-find: {len(lrs)} steps from {start:g} to {lrs[-1]:.3g}; suggested lr {suggestion:.2e} ({RULE}); "
        f"steepest descent {steepest:.2e}, min/10 {min_over_10:.2e}, the config's lr {cfg.lr:g}; wrote {figure}")
    return result
