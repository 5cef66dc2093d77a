"""The one training path: `fit(cfg) -> FitResult`. Scratch training, fine-tuning, distillation and sweep trials all
call it. `prepare` checks the config, builds the model, opens the run folder, loads and splits the data and returns
the run as one `trainer.Trainer`; `fit` trains it with the standard callbacks (schedule, moving average, progress
bar, checkpoints, metrics, console, trackers, early stopping) plus the caller's (a sweep's pruning), then writes
its summary.

A run folder (`run_folder`) holds the resolved config, the split, per-epoch metrics (JSON lines), `best.pt`,
`last.pt` and `summary.json`, all written atomically. `fit(cfg, resume=True)` continues from `last.pt`; every
epoch's randomness is seeded from (seed, epoch), so a resumed run ends with exactly the numbers of an uninterrupted
one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .callbacks import (
    Checkpoints,
    ConsoleLog,
    EarlyStopping,
    MetricsFile,
    MovingAverage,
    ProgressBar,
    ScheduleStep,
    TensorBoardTracker,
    WandbTracker,
)
from .checkpoint import load_checkpoint
from .config import Config
from .data import (
    CachedImages,
    DeviceCache,
    ImageTransform,
    list_classes,
    load_images,
    save_split,
    saved_split,
    strongly_unbalanced,
    write_bad_file_report,
)
from .data.training_set import check_training_images, training_split
from .distill import (
    DistillationLoss,
    OnlineTeacher,
    ViewBank,
    check_teacher,
    default_epochs,
    resumed_teacher,
    teacher_logits,
    teacher_record,
    teacher_split,
)
from .environment import environment
from .errors import CnnlabError, DataError
from .features import FeatureSource, prepare_store
from .hardware import (
    Precision,
    compile_model,
    configure_backends,
    decode_device,
    failed_allocation,
    grad_scaler,
    is_out_of_memory,
    largest_fitting_batch,
    precision_for,
    release_memory,
    resolve_device,
)
from .io import atomic_write_text
from .models import (
    ModelParts,
    SmallCNN,
    TrainablePlan,
    check_config,
    check_input_size,
    create_model,
    measured_cost,
    whiten_first_conv,
)
from .preprocess import Preprocess
from .run_folder import (
    BAD_FILES,
    CONFIG,
    LAST,
    METRICS,
    SPLIT,
    check_outside_the_data,
    open_run_dir,
    save_config,
    write_summary,
)
from .sources import ImageSource
from .trainer import Callback, StopTraining, Trainer, TrainingDiverged

__all__ = ["fit", "prepare", "FitResult", "SweepShare", "StopTraining", "TrainingDiverged", "OutOfMemory", "Callback"]


class OutOfMemory(CnnlabError):
    """A batch did not fit the device's memory (CUDA's, or the CPU's under a memory limit)."""


@dataclass
class FitResult:
    run_dir: Path
    best_val_acc: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "completed"  # completed | early_stopped | stopped


@dataclass(frozen=True)
class SweepShare:
    """What a sweep process gives each of its trials: the W&B group their runs log into, and the image cache
    already on the device (uploaded to the GPU once for every trial)."""

    group: str | None = None
    device_cache: DeviceCache | None = None


# ---- optimiser and schedule ----------------------------------------------------------------------------

def make_optimizer(cfg: Config, groups: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                               weight_decay=cfg.weight_decay, **fused)
    betas = (cfg.momentum, 0.999)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, **fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay, **fused)
    return torch.optim.NAdam(groups, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, round(cfg.warmup_epochs * steps_per_epoch)))
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total, cycle_momentum=False)
    return None


def warmup_cosine(total: int, warmup: int) -> Callable[[int], float]:
    """The learning rate's factor at step t: linear from 1/warmup to 1 over `warmup` steps, then half a cosine
    from 1 down to 0 at step `total` (with warmup 0: CosineAnnealingLR's curve)."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


# ---- the run ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Setting:
    """What each step of `prepare` reads once the run folder is open: the run's config and folder, where it computes
    and in which precision, and how it reports."""

    cfg: Config
    run_dir: Path
    device: torch.device
    precision: Precision
    progress: bool
    log: Callable[[str], None]


def prepare(cfg: Config, resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
            share: SweepShare = SweepShare()) -> Trainer:
    """The run `cfg` describes, ready for its first step: the config checked, the model built, the run folder opened
    and claimed (every refusal that can come first comes before it), the data decoded, checked and split, the model
    on its device, the batch source, the losses and the optimiser made. The caller releases `trainer.claim`."""
    cfg = check_config(cfg)  # the family's own rules and values (image_size=0: the model's own)
    device = resolve_device(cfg.device)
    decoder = decode_device(cfg.decoder, device)
    trackers = [WandbTracker(cfg, share.group), TensorBoardTracker(cfg)]  # a missing package refused before any work
    classes = list_classes(Path(cfg.data) / "train")
    if len(classes) < 2:
        raise DataError(f"{Path(cfg.data) / 'train'} has one class folder ({classes[0]}): a classifier needs at "
                        "least two, each holding its images")
    torch.manual_seed(cfg.seed)
    parts = create_model(cfg, len(classes))  # first: its preprocessing decides how images are decoded
    if not isinstance(parts.module, SmallCNN):  # the config's own rules cover the small CNN's sizes
        check_input_size(parts, cfg.model)
    if cfg.teacher:
        if resume:  # the teacher it began with, by its SHA-256, wherever the pair is now
            cfg = replace(cfg, teacher=str(resumed_teacher(cfg.teacher, Path(cfg.out) / cfg.name)))
        check_teacher(cfg.teacher, classes)  # a wrong --teacher refused before any work
    precision = precision_for(cfg.precision, device)  # refused before the run folder is made, when the device cannot
    check_outside_the_data(cfg)
    cfg, run_dir, claim = open_run_dir(cfg, resume)
    try:
        configure_backends(device, cfg.deterministic)
        at = Setting(cfg, run_dir, device, precision, progress, log)
        images, train_rows, val_rows = load_data(at, parts.preprocess, decoder, resume)
        if cfg.epochs == 0:  # chosen on the data: the patient schedule of a student (`distill.default_epochs`)
            cfg = replace(cfg, epochs=default_epochs(cfg.teacher, len(train_rows)))
            save_config(run_dir, cfg)  # as it trains: a resumed run reads the same epochs back
            at = replace(at, cfg=cfg)
            log(f"epochs {cfg.epochs}" + (f": the patient schedule of a student, {cfg.epochs * len(train_rows):,} image "
                                          f"passes over its {len(train_rows):,} training images (--epochs N to choose)"
                                          if cfg.teacher else ""))
        if isinstance(parts.module, SmallCNN) and cfg.conv1_init == "whiten" and not resume:
            init_first_conv(parts.module, images, train_rows, parts.preprocess, cfg.seed)
        parts.module.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        plan = TrainablePlan(parts, cfg)
        source = make_source(at, parts, plan, images, (train_rows, val_rows), share.device_cache)
        online = None
        if cfg.teacher and cfg.distill_mode == "stored":  # its logits drawn with each training batch, by their rows
            source.train.attach_targets(teacher_logits(cfg, images, run_dir, device, progress, log))
        elif cfg.teacher:  # on images: prepare_store keeps an online student off stored features
            online = OnlineTeacher(cfg, images, train_rows, source.transform, run_dir, device, progress, log)
            if cfg.distill_mode == "views":  # K rounds of views computed now; the teacher is not needed after
                online = ViewBank(cfg, online, source, len(classes), run_dir, progress, log)
        loss_fn, val_loss_fn = make_losses(cfg, images.labels[train_rows], len(classes), device)
        return Trainer(cfg, run_dir, claim, device, precision, parts, plan, images, train_rows, val_rows, source,
                       make_optimizer(cfg, plan.param_groups(), device), loss_fn, val_loss_fn,
                       grad_scaler(precision, device), log, trackers=trackers, online_teacher=online,
                       teacher=teacher_record(run_dir) if cfg.teacher else None)
    except BaseException:
        claim.release()
        raise


def fit(cfg: Config, callbacks: Sequence[Callback] = (), resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, share: SweepShare = SweepShare()) -> FitResult:
    """Train the model `cfg` describes on `cfg.data`/train (split into train and validation), writing a
    run folder. Never reads `cfg.data`/val: that is the test set, for `cnnlab evaluate` alone."""
    started = time.perf_counter()
    run = prepare(cfg, resume, progress, log, share)
    try:
        cfg = run.cfg
        run.scheduler = make_scheduler(cfg, run.optimizer, run.source.steps_per_epoch)
        if cfg.ema:
            run.ema = AveragedModel(run.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
        start_epoch = restore(run) + 1 if resume else 1
        if not resume:
            (run.run_dir / METRICS).unlink(missing_ok=True)
        log(f"{run.run_dir.name}: {cfg.model}, {sum(p.numel() for p in run.model.parameters()):,} parameters "
            f"({run.plan.trainable_count():,} trainable), {len(run.train_rows)} train / {len(run.val_rows)} val images, "
            f"{len(run.classes)} classes, {run.device}{', channels_last' if cfg.channels_last else ''}; "
            f"input {run.preprocess.describe()}; {run.precision.describe()}")
        if cfg.training_side(1) != cfg.image_size:
            full = next(e for e in range(1, cfg.epochs + 1) if cfg.training_side(e) == cfg.image_size)
            log(f"progressive resizing: training images {cfg.training_side(1)} px in epoch 1, growing to "
                f"{cfg.image_size} px by epoch {full}")
        setup_seconds = time.perf_counter() - started  # decoding, feature store, model build: once per run
        everyone = [ScheduleStep(), MovingAverage(), *([ProgressBar()] if progress else []), Checkpoints(),
                    MetricsFile(), ConsoleLog(), *run.trackers, *callbacks, EarlyStopping(cfg.early_stop)]
        failed = None
        try:
            status = run.train(range(start_epoch, cfg.epochs + 1), everyone)
        except Exception as error:  # noqa: BLE001 - out of memory is told in one line; anything else is raised as is
            if not is_out_of_memory(error):
                raise
            failed = failed_allocation(error)
        if failed is not None:  # out of the except block: its traceback no longer holds the failed batch's tensors
            raise OutOfMemory(out_of_memory_message(run, failed)) from None
        summary = write_summary(run.run_dir, cfg, summary_facts(run, status, setup_seconds),
                                environment(run.device, cfg.precision, cfg.decoder, cfg.resolved_cache_dir()))
        return FitResult(run.run_dir, run.best_val_acc, run.best_epoch, summary["history"], status)
    finally:
        run.claim.release()


def summary_facts(run: Trainer, status: str, setup_seconds: float) -> dict[str, Any]:
    """What summary.json says of a run that ended with `status`, beside its metrics and provenance."""
    return {"status": status, "best_val_acc": run.best_val_acc, "best_epoch": run.best_epoch,
            "params": sum(p.numel() for p in run.model.parameters()), "trainable_params": run.plan.trainable_count(),
            "model": run.cfg.model, "finetune": run.cfg.finetune, "teacher": run.teacher,
            "train_images": len(run.train_rows), "val_images": len(run.val_rows), "bad_files": len(run.images.errors),
            "preprocess": run.preprocess.to_dict(),
            "flops_per_image": measured_cost(run.model, run.preprocess.image_size).flops,
            "classes": run.classes, "device": str(run.device), "precision": run.precision.name,
            "precision_policy": run.precision.to_dict(), "setup_seconds": setup_seconds, "torch": torch.__version__}


def load_data(at: Setting, pre: Preprocess, decoder: torch.device | None,
              resume: bool = False) -> tuple[CachedImages, np.ndarray, np.ndarray]:
    """ROOT/train decoded with the model's geometry (once, into the cache), unreadable files reported, and the
    seeded stratified split; a resumed run keeps the split it was started with."""
    cfg, run_dir, progress, log = at.cfg, at.run_dir, at.progress, at.log
    images = load_images(Path(cfg.data) / "train", pre.image_size, cfg.resolved_cache_dir(), cfg.decode_workers,
                         progress, decoder, pre.crop, pre.interpolation, log)
    write_bad_file_report(run_dir / BAD_FILES, images)
    check_training_images(images, run_dir / BAD_FILES, log)
    if resume and (run_dir / SPLIT).exists():
        return images, *saved_split(run_dir / SPLIT, images, log)
    train_rows, val_rows = training_split(cfg, images, teacher_split(cfg.teacher) if cfg.teacher else None, log)
    save_split(run_dir / SPLIT, images, train_rows, val_rows)
    return images, train_rows, val_rows


def make_source(at: Setting, parts: ModelParts, plan: TrainablePlan, images: CachedImages,
                rows: tuple[np.ndarray, np.ndarray], device_cache: DeviceCache | None) -> ImageSource | FeatureSource:
    """Images from the cache, or stored features of the frozen backbone where the strategy allows one. `rows`: the
    training and the validation rows."""
    cfg, device = at.cfg, at.device
    train_rows, val_rows = rows
    transform = ImageTransform(parts.preprocess, cfg.channels_last, scale=(cfg.crop_min, 1.0), jitter=cfg.jitter,
                               mixup=bool(cfg.teacher) and cfg.distill_mode == "views" and cfg.distill_mixup)
    source = ImageSource(compile_model(parts.module, cfg.compile), images, train_rows, val_rows, cfg, device,
                         transform, device_cache)
    store = prepare_store(cfg, parts, images, transform, device, at.precision.dtype, at.progress, at.log)
    if store is None:
        return source
    return FeatureSource(source, *store, images.labels, train_rows, val_rows, cfg, device, plan)


def init_first_conv(model: SmallCNN, images: CachedImages, train_rows: np.ndarray, pre: Preprocess, seed: int,
                    sample: int = 256) -> None:
    """Patch-whitening init of the first convolution from a seeded sample of training images (never val/),
    normalised by the training's own transform."""
    rows = np.sort(np.random.default_rng(seed).choice(train_rows, size=min(sample, len(train_rows)), replace=False))
    transform = ImageTransform(pre, channels_last=False)  # reuses its output buffer: each chunk is used at once
    whiten_first_conv(model, (transform(torch.from_numpy(np.asarray(images.pixels[rows[i:i + 64]])).permute(0, 3, 1, 2))
                              for i in range(0, len(rows), 64)))


def restore(run: Trainer) -> int:
    """Continue from last.pt: weights, optimiser, schedule, history and best so far. Returns its epoch."""
    path = run.run_dir / LAST
    state = load_checkpoint(path, next(run.model.parameters()).device)
    if "optimizer" not in state:  # best.pt copied over last.pt: weights alone, no optimiser or schedule to go on with
        raise CnnlabError(f"{path} holds weights only (a best.pt checkpoint), but --resume needs the last.pt that "
                          "training writes after every epoch, with the optimiser and schedule; to train on from these "
                          "weights, start a new run")
    trained_on = state.get("preprocess")
    if trained_on is not None and trained_on != run.preprocess.to_dict():  # e.g. a folder from before image_size 0
        before = Preprocess.from_dict(trained_on)  # meant the model's own size, where 224 stood for it
        raise CnnlabError(f"{path} trained on {before.describe()} input, but {run.run_dir / CONFIG} now gives "
                          f"{run.preprocess.describe()}: set image_size: {before.image_size} there to resume it")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    if run.scheduler is not None:
        run.scheduler.load_state_dict(state["scheduler"])
    if run.scaler is not None and state.get("scaler"):  # fp16's loss scale goes on where it was
        run.scaler.load_state_dict(state["scaler"])
    run.history, run.best_epoch = state["history"], state["best_epoch"]  # its values: from the epoch's record
    atomic_write_text(run.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in run.history))
    if state["epoch"] >= run.cfg.epochs:
        run.log(f"{run.run_dir} has finished all {state['epoch']} epochs; to train it further: "
                f"cnnlab train --resume {run.run_dir} --epochs {state['epoch'] + 10}")
    else:
        run.log(f"resuming {run.run_dir} after epoch {state['epoch']}")
    return int(state["epoch"])


def make_losses(cfg: Config, train_labels: np.ndarray, n_classes: int, device: torch.device
                ) -> tuple[nn.Module, nn.Module]:
    """The training loss (on the device) and the same loss for validation (on the CPU, where its logits are):
    cross-entropy with label smoothing, and with class_weights balanced each class weighted by
    n / (classes x its training images), so every class weighs as much in total."""
    weight = None
    counts = np.bincount(train_labels, minlength=n_classes).astype(np.float64)
    weigh = cfg.class_weights == "balanced" or (cfg.class_weights == "auto" and strongly_unbalanced(counts))
    if weigh and counts.min() != counts.max():  # balanced classes: the plain loss
        weight = torch.tensor(np.where(counts > 0, len(train_labels) / (n_classes * np.maximum(counts, 1)), 0.0),
                              dtype=torch.float32)
    train_loss: nn.Module = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device),
                                                label_smoothing=cfg.label_smoothing)
    if cfg.teacher:  # the labels' loss and the teacher's term (validation: the labels' alone)
        train_loss = DistillationLoss(train_loss, cfg.distill_weight, cfg.distill_temperature)
    return train_loss, nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


def out_of_memory_message(run: Trainer, error: str) -> str:
    """One line: what did not fit (model, batch, image size, device), a batch size that does where a probe finds one,
    and what of the run is kept."""
    cfg, device = run.cfg, run.device
    run.optimizer.zero_grad(set_to_none=True)
    release_memory(device)
    size = run.parts.preprocess.image_size
    fits = (largest_fitting_batch(run.parts.module, (3, size, size), cfg.batch_size, run.loss_fn, device, run.precision)
            if isinstance(run.source, ImageSource) else None)
    advice = (f"batch_size {fits} fits (tried): give --batch_size {fits}" if fits
              else "lower --batch_size or --image_size" if isinstance(run.source, ImageSource)
              else "lower --batch_size")
    kept = (f"; {run.run_dir / LAST} after epoch {run.history[-1]['epoch']} is kept" if run.history else "")
    return (f"out of memory on {device}: {cfg.model} with batch_size {cfg.batch_size} on {size}x{size} images does not "
            f"fit ({error}); {advice}{kept}")


