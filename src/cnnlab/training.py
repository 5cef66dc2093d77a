"""The one training path: `fit(cfg) -> FitResult`. Scratch training, fine-tuning and sweep trials all
call it; checkpoints, logging, tracking, early stopping and a sweep's pruning hook in as callbacks.

A run folder holds the resolved config, the split, per-epoch metrics (JSON lines), `best.pt`, `last.pt`
and `summary.json`, all written atomically. `fit(cfg, resume=True)` continues from `last.pt`; every
epoch's randomness (shuffle, augmentation, dropout) is seeded from (seed, epoch), so a resumed run
ends with exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .callbacks import (
    Callback,
    Checkpoints,
    ConsoleLog,
    EarlyStopping,
    MetricsFile,
    StopTraining,
    TensorBoardTracker,
    TrainingState,
    WandbTracker,
)
from .checkpoint import load_checkpoint
from .config import Config, save_yaml
from .data import (
    CachedImages,
    DeviceCache,
    ImageTransform,
    classes_without_images,
    list_classes,
    load_images,
    save_split,
    saved_split,
    stratified_split,
    strongly_unbalanced,
    write_bad_file_report,
)
from .distill import (
    DistillationLoss,
    OnlineTeacher,
    check_teacher,
    resumed_teacher,
    teacher_logits,
    teacher_record,
    teacher_split,
)
from .errors import CnnlabError, ConfigError, DataError
from .evaluate import evaluate
from .features import FeatureSource, prepare_store
from .hardware import (
    Precision,
    autocast,
    compile_model,
    configure_backends,
    decode_device,
    grad_scaler,
    is_out_of_memory,
    precision_for,
    release_memory,
    resolve_device,
)
from .io import FolderClaim, atomic_write_json, atomic_write_text, read_jsonl
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
from .run_folder import CONFIG, LAST, METRICS, SUMMARY, again_command, is_better
from .sources import EpochData, ImageSource

__all__ = ["fit", "FitResult", "StopTraining", "TrainingDiverged", "OutOfMemory", "Callback", "train_one_epoch"]


class TrainingDiverged(CnnlabError):
    """The loss became NaN or infinite."""


class OutOfMemory(CnnlabError):
    """A batch did not fit the device's memory (CUDA's, or the CPU's under a memory limit)."""


@dataclass
class FitResult:
    run_dir: Path
    best_val_acc: float
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    status: str = "completed"  # completed | early_stopped | stopped


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


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


# ---- one epoch -----------------------------------------------------------------------------------------

def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, transform: Callable, aug: torch.Generator | None,
               optimizer: torch.optim.Optimizer, loss_fn: nn.Module, device: torch.device, amp: torch.dtype | None,
               grad_clip: float = 0.0, scaler: torch.amp.GradScaler | None = None,
               targets: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """The one training step (augment, forward under autocast, backward, clip, optimiser step), which every epoch
    and the learning-rate range test run; returns the batch's loss and logits, detached from nothing. With fp16's
    `scaler` the loss is scaled before backward and the gradients unscaled before clipping; a step whose gradients
    overflowed is skipped and the scale lowered (torch.amp.GradScaler's rule). `targets`: the batch's further
    targets the loss takes after the labels (a teacher's logits)."""
    x = transform(x, aug)
    with autocast(device, amp):
        logits = model(x)
        loss = loss_fn(logits, y, *targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return loss, logits
    scaler.scale(loss).backward()
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], transform: Callable,
                    optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: nn.Module, device: torch.device,
                    amp: torch.dtype | None, aug: torch.Generator | None, grad_clip: float = 0.0,
                    bar: Any = None, after_step: Callable[[], None] | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One pass over `batches`. Loss and accuracy are summed on the device and read once at the end,
    so the GPU never waits for the host inside an epoch. `after_step` runs after every optimiser step."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y, *targets in batches:  # a third element: a teacher's logits (distillation)
        loss, logits = train_step(model, x, y, transform, aug, optimizer, loss_fn, device, amp, grad_clip, scaler,
                                  targets)
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if bar is not None:
            bar.update(len(y))
            if device.type == "cpu":  # reading the loss costs nothing on CPU; on GPU it would sync
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return {"train_loss": (loss_sum / max(seen, 1)).item(), "train_acc": correct.item() / max(seen, 1), "seen": seen}


# ---- the run ---------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """Everything a run needs before its first step: what `fit` trains and `lr_find.range_test` probes."""

    cfg: Config
    run_dir: Path
    device: torch.device
    precision: Precision
    parts: ModelParts
    plan: TrainablePlan
    images: CachedImages
    train_rows: np.ndarray
    val_rows: np.ndarray
    source: ImageSource | FeatureSource
    optimizer: torch.optim.Optimizer
    trackers: list[Callback]  # W&B and TensorBoard: each does nothing when it is off
    claim: FolderClaim  # this process's hold on run_dir: released when the run ends
    teacher: OnlineTeacher | None = None  # distill_mode online: the teacher run on each training view

    @property
    def amp(self) -> torch.dtype | None:
        return self.precision.dtype


def prepare(cfg: Config, resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
            device_cache: DeviceCache | None = None, group: str | None = None) -> Prepared:
    """Check the config, build the model, open the run folder, decode and split the data (checking it), place the
    model on its device, and make the batch source and the optimiser."""
    cfg = check_config(cfg)  # the family's own rules and values (image_size=0: the model's own)
    device = resolve_device(cfg.device)
    decoder = decode_device(cfg.decoder, device)
    trackers = [WandbTracker(cfg, group), TensorBoardTracker(cfg)]  # a missing package refused before any work
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
        return _prepare_in(cfg, run_dir, claim, parts, device, precision, decoder, trackers, resume, progress, log,
                           device_cache)
    except BaseException:
        claim.release()
        raise


def _prepare_in(cfg: Config, run_dir: Path, claim: FolderClaim, parts: ModelParts, device: torch.device,
                precision: Precision, decoder: torch.device | None, trackers: list[Callback], resume: bool, progress: bool,
                log: Callable[[str], None], device_cache: DeviceCache | None) -> Prepared:
    configure_backends(device, cfg.deterministic)
    images, train_rows, val_rows = load_data(cfg, parts.preprocess, run_dir, decoder, progress, log, resume)
    if isinstance(parts.module, SmallCNN) and cfg.conv1_init == "whiten" and not resume:
        init_first_conv(parts.module, images, train_rows, parts.preprocess, cfg.seed)
    parts.module.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    plan = TrainablePlan(parts, cfg)
    source = make_source(cfg, parts, plan, images, train_rows, val_rows, device, precision.dtype, device_cache, progress,
                         log)
    teacher = None
    if cfg.teacher and cfg.distill_mode == "stored":  # its logits drawn with each training batch, by the labels' rows
        source.train.attach_targets(teacher_logits(cfg, images, run_dir, device, progress, log))
    elif cfg.teacher:  # on images: prepare_store keeps an online student off stored features
        teacher = OnlineTeacher(cfg, images, train_rows, source.transform, run_dir, device, progress, log)
    optimizer = make_optimizer(cfg, plan.param_groups(), device)
    return Prepared(cfg, run_dir, device, precision, parts, plan, images, train_rows, val_rows, source, optimizer, trackers,
                    claim, teacher)


def fit(cfg: Config, callbacks: Sequence[Callback] = (), resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, group: str | None = None,
        device_cache: DeviceCache | None = None) -> FitResult:
    """Train the model `cfg` describes on `cfg.data`/train (split into train and validation), writing a
    run folder. Never reads `cfg.data`/val: that is the test set, for `cnnlab evaluate` alone. A sweep process
    passes one `device_cache` to every trial, so the image cache is uploaded to the GPU once."""
    started = time.perf_counter()
    ready = prepare(cfg, resume, progress, log, device_cache, group)
    try:
        return train_prepared(ready, callbacks, resume, progress, log, started)
    finally:
        ready.claim.release()


def train_prepared(ready: Prepared, callbacks: Sequence[Callback], resume: bool, progress: bool,
                   log: Callable[[str], None], started: float) -> FitResult:
    """The epochs of a prepared run, its callbacks after each, then its summary."""
    cfg, run_dir, device, amp, parts, plan = ready.cfg, ready.run_dir, ready.device, ready.amp, ready.parts, ready.plan
    images, train_rows, val_rows, source = ready.images, ready.train_rows, ready.val_rows, ready.source
    optimizer, trackers = ready.optimizer, ready.trackers
    run = TrainingState(cfg, run_dir, parts.module, optimizer, make_scheduler(cfg, optimizer, source.steps_per_epoch),
                        images.classes, parts.preprocess, log, scaler=grad_scaler(ready.precision, device),
                        teacher=teacher_record(run_dir) if cfg.teacher else None)
    if cfg.ema:
        run.ema = AveragedModel(parts.module, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    start_epoch = restore(run) + 1 if resume else 1
    if not resume:
        (run_dir / METRICS).unlink(missing_ok=True)
    log(f"{run_dir.name}: {cfg.model}, {sum(p.numel() for p in run.model.parameters()):,} parameters "
        f"({plan.trainable_count():,} trainable), {len(train_rows)} train / {len(val_rows)} val images, "
        f"{len(run.classes)} classes, {device}{', channels_last' if cfg.channels_last else ''}; "
        f"input {parts.preprocess.describe()}; {ready.precision.describe()}")
    setup_seconds = time.perf_counter() - started  # decoding, feature store, model build: once per run
    everyone = [Checkpoints(), MetricsFile(), ConsoleLog(), *trackers, *callbacks, EarlyStopping(cfg.early_stop)]
    loss_fn, val_loss_fn = make_losses(cfg, images.labels[train_rows], len(run.classes), device)
    epoch_loop = EpochLoop(run, source, plan, loss_fn, device, amp, val_loss_fn, ready.teacher)
    failed = None
    try:
        status = epoch_loop.train(range(start_epoch, cfg.epochs + 1), everyone, progress)
    except Exception as error:  # noqa: BLE001 - out of memory is told in one line; anything else is raised as it is
        if not is_out_of_memory(error):
            raise
        failed = failed_allocation(error)
    if failed is not None:  # out of the except block: its traceback no longer holds the failed batch's tensors
        raise OutOfMemory(out_of_memory_message(ready, run, loss_fn, failed)) from None
    summary = write_summary(run, plan, status, setup_seconds, device, ready.precision,
                            {"train_images": len(train_rows), "val_images": len(val_rows), "bad_files": len(images.errors),
                             "preprocess": parts.preprocess.to_dict(),
                             "flops_per_image": measured_cost(parts.module, parts.preprocess.image_size).flops})
    return FitResult(run_dir, run.best_val_acc, run.best_epoch, summary["history"], status)


def out_of_memory_message(ready: Prepared, run: TrainingState, loss_fn: nn.Module, error: str) -> str:
    """One line: what did not fit (model, batch, image size, device), a batch size that does where a probe finds one,
    and what of the run is kept."""
    cfg, device = ready.cfg, ready.device
    run.optimizer.zero_grad(set_to_none=True)
    release_memory(device)
    size = ready.parts.preprocess.image_size
    fits = (largest_fitting_batch(ready.parts.module, (3, size, size), cfg.batch_size, loss_fn, device, ready.precision)
            if isinstance(ready.source, ImageSource) else None)
    advice = (f"batch_size {fits} fits (tried): give --batch_size {fits}" if fits
              else "lower --batch_size or --image_size" if isinstance(ready.source, ImageSource)
              else "lower --batch_size")
    kept = (f"; {ready.run_dir / LAST} after epoch {run.history[-1]['epoch']} is kept" if run.history else "")
    return (f"out of memory on {device}: {cfg.model} with batch_size {cfg.batch_size} on {size}x{size} images does not "
            f"fit ({error}); {advice}{kept}")


def failed_allocation(error: BaseException) -> str:
    """What the out-of-memory error says was asked for, briefly: the allocators' own messages run to a paragraph."""
    import re

    text = str(error)
    cpu = re.search(r"tried to allocate (\d+) bytes", text)
    if cpu:
        return f"an allocation of {int(cpu.group(1)) / 2**20:,.0f} MiB failed"
    cuda = re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text)
    if cuda:
        return f"an allocation of {cuda.group(1)} failed"
    return type(error).__name__


def largest_fitting_batch(model: nn.Module, shape: tuple[int, ...], batch_size: int, loss_fn: nn.Module,
                          device: torch.device, precision: Precision) -> int | None:
    """The largest of batch_size/2, /4, ... for which one forward and backward pass of `model` on zeros of `shape`
    fits the device's memory now (None: not even one image). Its gradients are cleared again."""
    b = batch_size // 2
    while b >= 1:
        try:
            x = torch.zeros((b, *shape), device=device).contiguous(memory_format=torch.channels_last)
            with autocast(device, precision.dtype):
                loss = loss_fn(model(x), torch.zeros(b, dtype=torch.long, device=device))
            loss.backward()
            return b
        except Exception as error:  # noqa: BLE001 - only out of memory means "try a smaller batch"
            if not is_out_of_memory(error):
                raise
        finally:
            model.zero_grad(set_to_none=True)
            x = loss = None
            release_memory(device)
        b //= 2
    return None


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


def default_run_name(cfg: Config) -> str:
    knobs = f"{cfg.filters}{cfg.filter_org}-{cfg.activation}" if cfg.model == "smallcnn" else cfg.finetune
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{knobs}".replace(",", "_").replace("/", "-")


def claim_folder(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ...: the first that this process creates itself (mkdir is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        candidate = path if k == 1 else path.with_name(f"{path.name}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise CnnlabError(f"{path.parent} holds 10,000 runs named {path.name}: choose a --name")


def check_outside_the_data(cfg: Config) -> None:
    """Refuse, before anything is written, a run folder or cache inside ROOT/train or ROOT/val: there it would be
    read as a class folder (of no image) by this run and every later one."""
    for key in ("out", "cache_dir"):
        where = Path(str(cfg.resolved_cache_dir()) if key == "cache_dir" else cfg.out).resolve()
        for side in ("train", "val"):
            inside = (Path(cfg.data) / side).resolve()
            if where == inside or where.is_relative_to(inside):
                raise ConfigError(f"{key}={getattr(cfg, key) or str(where)!r} is inside the data folder's {side}/ "
                                  f"({inside}), where it would become a class: give --{key} outside {inside}")


def open_run_dir(cfg: Config, resume: bool) -> tuple[Config, Path, FolderClaim]:
    """The run folder (made and claimed by this process until the run ends), with the config it holds saved; the
    config gets the folder's name. Two processes given one --name at once: the second is refused in one line."""
    run_dir = Path(cfg.out) / (cfg.name or default_run_name(cfg))
    if resume and not (run_dir / LAST).exists():
        raise CnnlabError(f"{run_dir} has no last.pt to resume from; start it without --resume")
    if not resume and not cfg.name:  # a made-up name is claimed atomically: two runs started in the same second
        run_dir = claim_folder(run_dir)  # (a shell loop, a sweep launcher) get two folders
    claim = FolderClaim(run_dir, "a training run", "choose another --name")
    try:  # every look at what the folder holds happens under the claim
        if not resume and ((run_dir / LAST).exists() or read_jsonl(run_dir / METRICS)):  # (not a run stopped before
            # its first epoch was written, by a full disk say: that one starts again in its folder)
            raise CnnlabError(f"{run_dir} already holds a run: resume it with `cnnlab train --resume {run_dir}` "
                              f"or choose another --name")
        cfg = replace(cfg, name=run_dir.name, data=str(Path(cfg.data).resolve()),  # --resume works from anywhere
                      teacher=str(Path(cfg.teacher).resolve()) if cfg.teacher else cfg.teacher)
        if cfg.model == "smallcnn":  # the stride it trains with, not "auto": a later auto rule cannot change the model
            cfg = replace(cfg, conv1_stride=cfg.first_stride())
        save_yaml(cfg, run_dir / CONFIG)
    except BaseException:
        claim.release()
        raise
    return cfg, run_dir, claim


def load_data(cfg: Config, pre: Preprocess, run_dir: Path, decoder: torch.device | None, progress: bool,
              log: Callable[[str], None], resume: bool = False) -> tuple[CachedImages, np.ndarray, np.ndarray]:
    """ROOT/train decoded with the model's geometry (once, into the cache), unreadable files reported, and the
    seeded stratified split; a resumed run keeps the split it was started with (split.json)."""
    images = load_images(Path(cfg.data) / "train", pre.image_size, cfg.resolved_cache_dir(), cfg.decode_workers,
                         progress, decoder, pre.crop, pre.interpolation, log)
    n_bad = write_bad_file_report(run_dir / "bad_files.txt", images)
    if n_bad == len(images.files):
        raise DataError(f"none of the {n_bad} files in {Path(cfg.data) / 'train'} is a readable image: see "
                        f"{run_dir / 'bad_files.txt'} for why, file by file")
    empty = classes_without_images(images.root, images.classes, images.files, images.labels, images.errors)
    if empty:  # a class the model would learn never to predict: refused, never trained on silently
        name, why = next(iter(empty.items()))
        more = f" (and {len(empty) - 1} more class(es): {', '.join(list(empty)[1:4])})" if len(empty) > 1 else ""
        raise DataError(f"class {name!r} in {images.root} has no usable image: {why}{more}; add images to it, or move "
                        "the folder out of train/")
    if n_bad:
        log(f"skipped {n_bad} unreadable file(s) of {len(images.files)}: listed in {run_dir / 'bad_files.txt'}")
    if resume and (run_dir / "split.json").exists():
        train_rows, val_rows = saved_split(run_dir / "split.json", images, log)
    else:
        groups = look_at_the_data(cfg, images, log)
        train_rows, val_rows = stratified_split(images.labels, images.valid, cfg.val_fraction, cfg.seed, groups)
        teacher = teacher_split(cfg.teacher) if cfg.teacher else None
        if teacher is not None:
            train_rows, val_rows = teacher_sides(teacher, images, train_rows, val_rows, log)
        if not len(val_rows):
            raise DataError(f"no image of {Path(cfg.data) / 'train'} is left for validation (val_fraction "
                            f"{cfg.val_fraction:g}): a class needs at least two readable images to give one to "
                            "validation; add images")
        save_split(run_dir / "split.json", images, train_rows, val_rows)
    return images, train_rows, val_rows


def teacher_sides(split: Path, images: CachedImages, train_rows: np.ndarray, val_rows: np.ndarray,
                  log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """A student's split: each image its teacher's split names stays on the teacher's side (the teacher's validation
    images are never the student's training images, so validation judges the student fairly, and the teacher's
    training images never judge it); every other image keeps the student's own seeded split. A teacher trained on
    the same folder gives its split whole; one trained on other photos leaves the student's data whole."""
    teacher = json.loads(split.read_text())
    rel = [str(p.relative_to(images.root.parent)) for p in images.files]
    sides = {name: "train" for name in teacher["train"]} | {name: "val" for name in teacher["val"]}
    on_val = np.zeros(len(rel), bool)
    on_val[val_rows] = True
    for i in np.concatenate([train_rows, val_rows]):
        if rel[i] in sides:
            on_val[i] = sides[rel[i]] == "val"
    rows = np.sort(np.concatenate([train_rows, val_rows]))
    shared = sum(1 for i in rows if rel[i] in sides)
    if shared < len(rows):
        log(f"{shared} of the {len(rows)} training images are in the teacher's split ({split}) and keep its sides; the "
            f"other {len(rows) - shared} are split by this run's seed")
    return rows[~on_val[rows]], rows[on_val[rows]]


def look_at_the_data(cfg: Config, images: CachedImages, log: Callable[[str], None]) -> np.ndarray | None:
    """The cheap part of `cnnlab check`, before training: one line each for strong imbalance, near-duplicate
    clusters in train/ (returned, to keep each on one side of the split) and test images that are byte-identical
    copies of training images (val/ is listed and such files' bytes compared; nothing of it is decoded or used)."""
    from .data.check import copies_in_test, near_duplicate_clusters

    counts = np.bincount(images.labels[images.valid], minlength=len(images.classes))
    if counts.min() > 0 and strongly_unbalanced(counts):
        log(f"warning: the classes of train/ are unbalanced ({images.classes[int(counts.argmax())]} {counts.max()} "
            f"images, {images.classes[int(counts.argmin())]} {counts.min()})"
            + ("; the loss weighs each class by its rarity (--class_weights " + cfg.class_weights + ")"
               if cfg.class_weights in ("auto", "balanced") else ": consider --class_weights balanced or --sampler balanced")
            + "; read evaluate's balanced accuracy")
    leaked = copies_in_test(images.files, Path(cfg.data) / "val")
    if leaked:
        log(f"warning: {len(leaked)} test image(s) in val/ are byte-identical copies of training images (leakage: "
            f"test accuracy on them is inflated), e.g. {leaked[0]}; see cnnlab check {cfg.data}")
    if not cfg.group_duplicates:
        return None
    groups = near_duplicate_clusters(images)
    sizes = np.bincount(groups[images.valid])
    clustered = sizes[sizes > 1]
    if len(clustered):
        log(f"{len(clustered)} cluster(s) of near-duplicate training images ({int(clustered.sum())} images) are each "
            "kept on one side of the train/validation split (--group_duplicates false to split them freely)")
    return groups


def make_source(cfg: Config, parts: ModelParts, plan: TrainablePlan, images: CachedImages, train_rows: np.ndarray,
                val_rows: np.ndarray, device: torch.device, amp: torch.dtype | None, device_cache: DeviceCache | None,
                progress: bool, log: Callable[[str], None]) -> ImageSource | FeatureSource:
    """Images from the cache, or stored features of the frozen backbone where the strategy allows one."""
    transform = ImageTransform(parts.preprocess, cfg.channels_last, scale=(cfg.crop_min, 1.0), jitter=cfg.jitter)
    source = ImageSource(compile_model(parts.module, cfg.compile), images, train_rows, val_rows, cfg, device,
                         transform, device_cache)
    store = prepare_store(cfg, parts, images, transform, device, amp, progress, log)
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


def restore(run: TrainingState) -> int:
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
    run.history, run.best_val_acc, run.best_epoch = state["history"], state["best_val_acc"], state["best_epoch"]
    run.best_val_loss = state.get("best_val_loss", math.inf)
    atomic_write_text(run.run_dir / METRICS, "".join(json.dumps(r) + "\n" for r in run.history))
    if state["epoch"] >= run.cfg.epochs:
        run.log(f"{run.run_dir} has finished all {state['epoch']} epochs; to train it further: "
                f"cnnlab train --resume {run.run_dir} --epochs {state['epoch'] + 10}")
    else:
        run.log(f"resuming {run.run_dir} after epoch {state['epoch']}")
    return int(state["epoch"])


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


@dataclass
class EpochLoop:
    run: TrainingState
    source: ImageSource | FeatureSource
    plan: TrainablePlan
    loss_fn: nn.Module
    device: torch.device
    amp: torch.dtype | None
    val_loss_fn: nn.Module | None = None  # the same loss, on the CPU where validation's logits are
    teacher: OnlineTeacher | None = None  # distill_mode online: its logits of each batch's views, beside the batch

    def train(self, epochs: Iterable[int], callbacks: Sequence[Callback], progress: bool) -> str:
        """Train `epochs`, calling every callback; returns the status: completed, early_stopped or stopped."""
        for callback in callbacks:
            callback.on_fit_start(self.run)
        try:
            for epoch in epochs:
                record = self.epoch(epoch, progress)
                self.run.history.append(record)
                self.run.improved = is_better(record, self.run.best_val_acc, self.run.best_val_loss)
                if self.run.improved:
                    self.run.best_val_acc, self.run.best_val_loss = record["val_acc"], record["val_loss"]
                    self.run.best_epoch = epoch
                for callback in callbacks:
                    callback.on_epoch_end(self.run, record)
            self.run.status = "completed"
        except StopTraining as stop:
            self.run.status = stop.status
        except KeyboardInterrupt:  # Ctrl-C, and SIGTERM or SIGHUP as the CLI raises them (cli.Terminated)
            self.run.status = "interrupted"
            raise
        except BaseException:
            self.run.status = "failed"
            raise
        finally:
            for callback in callbacks:
                callback.on_fit_end(self.run)
        return self.run.status

    def epoch(self, epoch: int, progress: bool) -> dict[str, Any]:
        """One epoch of training and validation. Every epoch's randomness (shuffle, augmentation, dropout) is
        seeded from (seed, epoch), so a resumed run ends with exactly the numbers of an uninterrupted one."""
        run, cfg = self.run, self.run.cfg
        self.plan.on_epoch_start(epoch, run.optimizer, run.log)
        seed = epoch_seed(cfg.seed, epoch)
        torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
        data = self.source.epoch(epoch, seed)
        aug = torch.Generator(device=self.device).manual_seed(seed) if data.augment else None
        train = data.train if self.teacher is None else self.teacher.alongside(data.train, seed, aug)
        t0 = time.perf_counter()
        with tqdm(total=self.source.steps_per_epoch * cfg.batch_size, desc=f"epoch {epoch}/{cfg.epochs}", unit="img",
                  disable=not progress, leave=False, dynamic_ncols=True) as bar:
            update_ema = (lambda: run.ema.update_parameters(run.model)) if run.ema is not None else None
            stats = train_one_epoch(data.net, train, data.transform, run.optimizer, run.scheduler, self.loss_fn,
                                    self.device, self.amp, aug, cfg.grad_clip, bar, update_ema, run.scaler)
        train_time = time.perf_counter() - t0
        if not math.isfinite(stats["train_loss"]):
            if not inputs_are_finite(data):  # the inputs, not the steps: a lower lr would change nothing
                raise TrainingDiverged(f"epoch {epoch}: the training loss is {stats['train_loss']} because the inputs "
                                       "hold inf or nan values (check the images, --mean/--std and --weights)")
            raise TrainingDiverged(f"epoch {epoch}: the training loss is {stats['train_loss']}; "
                                   f"try a lower --lr (now {cfg.lr:g}) or --grad_clip 1")
        with weights_of(run.model, run.result_model):  # data.net shares its parameters with run.model
            val = evaluate(data.net, data.val, data.transform, self.device, self.amp, self.val_loss_fn or self.loss_fn,
                           data.tta)
        return {"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                "val_loss": val["loss"], "val_acc": val["acc"], "val_balanced_acc": val["balanced_acc"],
                "lr": run.optimizer.param_groups[0]["lr"],
                "epoch_time": time.perf_counter() - t0, "images_per_s": stats["seen"] / train_time}


def provenance(run: TrainingState, device: torch.device) -> dict[str, Any]:
    """Where the run's numbers came from: what `cnnlab env` shows (versions, the machine, the device, its precision
    and decoder, the cache), the seed, the command that started this process and the one that trains the run again."""
    import shlex
    import sys

    from .environment import environment

    cfg = run.cfg
    return {**environment(device, cfg.precision, cfg.decoder, cfg.resolved_cache_dir()), "seed": cfg.seed,
            "argv": " ".join(shlex.quote(a) for a in sys.argv),
            "reproduce": again_command(run.run_dir)}


def write_summary(run: TrainingState, plan: TrainablePlan, status: str, setup_seconds: float, device: torch.device,
                  precision: Precision, counts: dict[str, Any]) -> dict[str, Any]:
    """summary.json, from the metrics file (every epoch, resumed ones included); returned with the history."""
    history = read_jsonl(run.run_dir / METRICS)
    summary = {"status": status, "best_val_acc": run.best_val_acc, "best_epoch": run.best_epoch,
               "epochs_run": len(history), "params": sum(p.numel() for p in run.model.parameters()),
               "trainable_params": plan.trainable_count(), "model": run.cfg.model, "finetune": run.cfg.finetune,
               "teacher": run.teacher,
               **counts, "classes": run.classes, "device": str(device), "precision": precision.name,
               "precision_policy": precision.to_dict(),
               "train_seconds": sum(r["epoch_time"] for r in history), "setup_seconds": setup_seconds,
               "images_per_s": (sum(r["images_per_s"] for r in history) / len(history)) if history else 0.0,
               "torch": torch.__version__, "provenance": provenance(run, device)}
    atomic_write_json(run.run_dir / SUMMARY, summary)
    return {**summary, "history": history}
