"""One run in training, as one object. A `Trainer` holds everything the run needs (its config and folder, the model
and the plan of what trains, the data source, the optimiser, schedule, gradient scaler and moving average, the losses,
the history and the best epoch) and runs its epochs and its one step. Whatever else happens at a step or an epoch
(the schedule's step, the moving average, the progress bar, checkpoints, the metrics file, trackers, early stopping,
a sweep's pruning, the learning-rate range test's rates) is a `Callback` at one of the hooks below, as minGPT's and
Lightning's trainers do it: a new per-step idea is a callback, not a parameter threaded through the loop.

Every epoch's randomness (shuffle, augmentation, dropout) is seeded from (seed, epoch), so a resumed run ends with
exactly the numbers of an uninterrupted one."""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .config import Config
from .data import CachedImages
from .distill import OnlineTeacher, ViewBank
from .errors import CnnlabError
from .evaluate import evaluate
from .features import FeatureSource
from .hardware import Precision, autocast
from .io import FolderClaim
from .models import ModelParts, TrainablePlan
from .preprocess import Preprocess
from .run_folder import is_better
from .sources import EpochData, ImageSource, epoch_seed


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch (or, from a step hook, at once); `status` says
    why (a pruned sweep trial is 'stopped', early stopping 'early_stopped')."""

    def __init__(self, status: str = "stopped"):
        super().__init__(status)
        self.status = status


class TrainingDiverged(CnnlabError):
    """The loss became NaN or infinite."""


class Callback:
    """The hooks a run calls, in this order: on_fit_start; per epoch on_epoch_start, per step on_step_start and
    on_step_end (after the optimiser's step, with the batch's loss, not yet read from the device, and its size), then
    on_epoch_end with the epoch's record (after validation); on_fit_end however training ends. Each does nothing
    unless a subclass says otherwise."""

    def on_fit_start(self, run: Trainer) -> None:
        pass

    def on_epoch_start(self, run: Trainer, epoch: int) -> None:
        pass

    def on_step_start(self, run: Trainer) -> None:
        pass

    def on_step_end(self, run: Trainer, loss: torch.Tensor, images: int) -> None:
        pass

    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        pass

    def on_fit_end(self, run: Trainer) -> None:
        pass


@dataclass
class Trainer:
    """One training run in this process: what `training.prepare` builds, `fit` trains, the range test probes and
    every callback sees (its folder's files: `run_folder`)."""

    cfg: Config
    run_dir: Path
    claim: FolderClaim  # this process's hold on run_dir: released when the run ends
    device: torch.device
    precision: Precision
    parts: ModelParts
    plan: TrainablePlan
    images: CachedImages
    train_rows: np.ndarray
    val_rows: np.ndarray
    source: ImageSource | FeatureSource
    optimizer: torch.optim.Optimizer
    loss_fn: nn.Module
    val_loss_fn: nn.Module  # the same loss, on the CPU where validation's logits are (a teacher's term left out)
    scaler: torch.amp.GradScaler  # fp16's loss scaling; for every other precision disabled, and then a no-op
    log: Callable[[str], None] = print
    scheduler: Any = None  # made by fit (the range test sets its own rates)
    ema: AveragedModel | None = None  # with --ema: the average that is validated and kept as best.pt
    trackers: list[Callback] = field(default_factory=list)  # W&B and TensorBoard: each does nothing when it is off
    online_teacher: OnlineTeacher | ViewBank | None = None  # distill_mode online or views: the teacher of each view
    teacher: dict[str, Any] | None = None  # with --teacher: its checkpoint and SHA-256, kept in every checkpoint
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0  # the epoch best.pt holds (0: none yet); its values are read from its record
    improved: bool = False  # whether the latest epoch is the best so far
    status: str = "running"  # when training ends: completed, early_stopped, stopped (pruned), interrupted, failed

    @property
    def model(self) -> nn.Module:
        return self.parts.module

    @property
    def classes(self) -> list[str]:
        return self.images.classes

    @property
    def preprocess(self) -> Preprocess:
        return self.parts.preprocess

    @property
    def amp(self) -> torch.dtype | None:
        return self.precision.dtype

    @property
    def result_model(self) -> nn.Module:
        """The weights this run validates and keeps: the moving average when there is one."""
        return self.ema.module if self.ema is not None else self.model

    @property
    def best_record(self) -> dict[str, Any] | None:
        """The history's record of the epoch best.pt holds (None before the first epoch)."""
        return next((r for r in self.history if r["epoch"] == self.best_epoch), None)

    @property
    def best_val_acc(self) -> float:
        best = self.best_record
        return best["val_acc"] if best is not None else -1.0

    @property
    def best_val_loss(self) -> float:
        best = self.best_record
        return best["val_loss"] if best is not None else math.inf

    def train(self, epochs: Iterable[int], callbacks: Sequence[Callback]) -> str:
        """Train `epochs`, calling every callback; returns the status: completed, early_stopped or stopped."""
        call(callbacks, "on_fit_start", self)
        try:
            for epoch in epochs:
                record = self.epoch(epoch, callbacks)
                self.history.append(record)
                self.improved = is_better(record, self.best_record, self.cfg.keep_best)
                if self.improved:
                    self.best_epoch = epoch
                call(callbacks, "on_epoch_end", self, record)
            self.status = "completed"
        except StopTraining as stop:
            self.status = stop.status
        except KeyboardInterrupt:  # Ctrl-C, and SIGTERM or SIGHUP as the CLI raises them (cli.Terminated)
            self.status = "interrupted"
            raise
        except BaseException:
            self.status = "failed"
            raise
        finally:
            call(callbacks, "on_fit_end", self)
        return self.status

    def epoch(self, epoch: int, callbacks: Sequence[Callback]) -> dict[str, Any]:
        """One epoch of training, then validation of the weights the run keeps; returns its record."""
        t0 = time.perf_counter()
        data, stats = self.train_epoch(epoch, callbacks)
        if not math.isfinite(stats["train_loss"]):
            if not inputs_are_finite(data):  # the inputs, not the steps: a lower lr would change nothing
                raise TrainingDiverged(f"epoch {epoch}: the training loss is {stats['train_loss']} because the inputs "
                                       "hold inf or nan values (check the images, --mean/--std and --weights)")
            raise TrainingDiverged(f"epoch {epoch}: the training loss is {stats['train_loss']}; "
                                   f"try a lower --lr (now {self.cfg.lr:g}) or --grad_clip 1")
        with weights_of(self.model, self.result_model):  # data.net shares its parameters with the model
            val = evaluate(data.net, data.val, data.transform, self.device, self.amp, self.val_loss_fn, data.tta)
        return {"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                "val_loss": val["loss"], "val_acc": val["acc"], "val_balanced_acc": val["balanced_acc"],
                "lr": self.optimizer.param_groups[0]["lr"],
                "epoch_time": time.perf_counter() - t0, "images_per_s": stats["seen"] / stats["seconds"]}

    def train_epoch(self, epoch: int, callbacks: Sequence[Callback]) -> tuple[EpochData, dict[str, float]]:
        """The training half of `epoch`: each batch one step between the step hooks. Loss and accuracy are summed on
        the device and read once at the end, so a GPU never waits for the host inside an epoch."""
        self.plan.on_epoch_start(epoch, self.optimizer, self.log)
        # an online teacher or its bank of views decides which draws an epoch makes (a bank replays its rounds)
        seed = epoch_seed(self.cfg.seed, epoch) if self.online_teacher is None else \
            self.online_teacher.epoch_seed(self.cfg.seed, epoch)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
        data = self.source.epoch(epoch, seed)
        aug = torch.Generator(device=self.device).manual_seed(seed) if data.augment else None
        batches = data.train if self.online_teacher is None else self.online_teacher.alongside(data.train, seed, aug)
        call(callbacks, "on_epoch_start", self, epoch)
        started = time.perf_counter()
        data.net.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        for x, y, *targets in batches:  # a third element: a teacher's logits (distillation)
            call(callbacks, "on_step_start", self)
            loss, logits = self.step(data, x, y, targets, aug)
            call(callbacks, "on_step_end", self, loss, len(y))
            loss_sum += loss.detach().float() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        return data, {"train_loss": (loss_sum / max(seen, 1)).item(), "train_acc": correct.item() / max(seen, 1),
                      "seen": seen, "seconds": time.perf_counter() - started}

    def step(self, data: EpochData, x: torch.Tensor, y: torch.Tensor, targets: Sequence[torch.Tensor],
             aug: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The one training step: augment, forward under autocast, backward, clip, optimiser step. One path for every
        precision, nanoGPT's: fp16's scaler scales the loss, unscales the gradients before clipping and skips a step
        whose gradients overflowed (torch.amp.GradScaler's rule); disabled, each of its calls does nothing more.
        `targets`: the batch's further targets the loss takes after the labels (a teacher's logits)."""
        x = data.transform(x, aug, side=data.side)
        with autocast(self.device, self.amp):
            logits = data.net(x)
            loss = self.loss_fn(logits, y, *targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(data.net.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss, logits


def call(callbacks: Sequence[Any], hook: str, *args: Any) -> None:
    """Each callback's `hook`, where it has one: a callback need not derive from `Callback` (one written for the
    epoch hooks alone, before the step hooks came, still works)."""
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is not None:
            method(*args)


@contextmanager
def weights_of(model: nn.Module, source: nn.Module) -> Iterator[None]:
    """`model` holds `source`'s parameters and buffers inside the block, its own again after it. Copied in
    place, so a compiled wrapper of `model`, or a part of it (a head on stored features), sees them too."""
    if source is model:
        yield
        return
    own = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(source.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(own)


@torch.inference_mode()  # as validation reads these batches
def inputs_are_finite(data: EpochData, batches: int = 4) -> bool:
    """Whether the first few batches, as the network sees them, are finite (validation's: the same images or stored
    features, unaugmented, and re-readable where the epoch's training batches are spent)."""
    for k, (x, _) in enumerate(data.val):
        if not torch.isfinite(data.transform(x, None)).all():
            return False
        if k + 1 >= batches:
            break
    return True
