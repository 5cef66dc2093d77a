"""The one training path: `fit(cfg) -> FitResult`. Scratch training, fine-tuning and sweep trials all
call it; sweeps hook in through `callbacks` (called after every epoch with that epoch's metrics).

A run folder holds the resolved config, the split, per-epoch metrics (JSON lines), `best.pt`, `last.pt`
and `summary.json`, all written atomically. `fit(cfg, resume=True)` continues from `last.pt`; every
epoch's randomness (shuffle, augmentation, dropout) is seeded from (seed, epoch), so a resumed run
ends with exactly the numbers of an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn
from tqdm import tqdm

from . import __version__
from .config import Config, save_yaml
from .data import Batches, BatchPrep, Preprocess, load_images, save_split, stratified_split, write_bad_file_report
from .errors import CnnlabError
from .evaluate import evaluate
from .features import FeaturePrep, prepare_store
from .finetune import TrainablePlan
from .hardware import autocast, autocast_dtype, compile_model, configure_backends, decode_device, resolve_device
from .io import append_jsonl, atomic_torch_save, atomic_write_json, atomic_write_text, read_jsonl
from .models import create_model
from .tracking import Tracker

Callback = Callable[[dict[str, Any]], None]


class TrainingDiverged(CnnlabError):
    """The loss became NaN or infinite."""


class StopTraining(Exception):
    """Raised by a callback to end training after the current epoch (a pruned sweep trial)."""


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
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    if cfg.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in optimizer.param_groups],
                                                   total_steps=total, cycle_momentum=False)
    return None


# ---- one epoch -----------------------------------------------------------------------------------------

def train_one_epoch(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], prep: BatchPrep,
                    optimizer: torch.optim.Optimizer, scheduler: Any, loss_fn: nn.Module, device: torch.device,
                    amp: torch.dtype | None, aug: torch.Generator | None, grad_clip: float = 0.0,
                    bar: Any = None) -> dict[str, float]:
    """One pass over `batches`. Loss and accuracy are summed on the device and read once at the end,
    so the GPU never waits for the host inside an epoch."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for x, y in batches:
        x = prep(x, aug)
        with autocast(device, amp):
            logits = model(x)
            loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if bar is not None:
            bar.update(len(y))
            if device.type == "cpu":  # reading the loss costs nothing on CPU; on GPU it would sync
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return {"train_loss": (loss_sum / max(seen, 1)).item(), "train_acc": correct.item() / max(seen, 1), "seen": seen}


# ---- the run ---------------------------------------------------------------------------------------------

def default_run_name(cfg: Config) -> str:
    knobs = f"{cfg.filters}{cfg.filter_org}-{cfg.activation}" if cfg.model == "smallcnn" else cfg.finetune
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{knobs}".replace(",", "_")


def checkpoint(model: nn.Module, cfg: Config, classes: list[str], pre: Preprocess, epoch: int,
               history: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A checkpoint of plain tensors, numbers and strings, so `torch.load(weights_only=True)` reads it."""
    return {"model": model.state_dict(), "config": cfg.to_dict(), "classes": classes, "preprocess": pre.to_dict(),
            "epoch": epoch, "history": history, "cnnlab_version": __version__, **extra}


def fit(cfg: Config, callbacks: Sequence[Callback] = (), resume: bool = False, progress: bool = True,
        log: Callable[[str], None] = print, group: str | None = None) -> FitResult:
    """Train the model `cfg` describes on `cfg.data`/train (split into train and validation), writing a
    run folder. Never reads `cfg.data`/val: that is the test set, for `cnnlab evaluate` alone."""
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    decode_on = decode_device(cfg.decoder, device)
    run_dir = Path(cfg.out) / (cfg.name or default_run_name(cfg))
    if resume and not (run_dir / "last.pt").exists():
        raise CnnlabError(f"{run_dir} has no last.pt to resume from; start it without --resume")
    if not resume and (run_dir / "metrics.jsonl").exists():
        raise CnnlabError(f"{run_dir} already holds a run: resume it with `cnnlab train --resume {run_dir}` "
                          f"or choose another --name")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg = replace(cfg, name=run_dir.name)
    save_yaml(cfg, run_dir / "config.yaml")

    configure_backends(device, cfg.deterministic)
    images = load_images(Path(cfg.data) / "train", cfg.image_size, cfg.resolved_cache_dir(), cfg.decode_workers, progress,
                         decode_on)
    n_bad = write_bad_file_report(run_dir / "bad_files.txt", images)
    if n_bad:
        log(f"skipped {n_bad} unreadable file(s) of {len(images.files)}: listed in {run_dir / 'bad_files.txt'}")
    train_rows, val_rows = stratified_split(images.labels, images.valid, cfg.val_fraction, cfg.seed)
    save_split(run_dir / "split.json", images, train_rows, val_rows)
    classes = images.classes

    torch.manual_seed(cfg.seed)
    model = create_model(cfg, len(classes))
    pre = getattr(model, "cnnlab_preprocess", None) or Preprocess(cfg.image_size)
    prep = BatchPrep(pre, cfg.channels_last)
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    plan = TrainablePlan(model, cfg)
    optimizer = make_optimizer(cfg, plan.param_groups(), device)
    train_batches = Batches(images, train_rows, cfg.batch_size, device, shuffle=True, drop_last=True)
    val_batch_size = max(cfg.batch_size, 128)  # no gradients kept: larger batches cost little memory
    val_batches = Batches(images, val_rows, val_batch_size, device, shuffle=False)
    scheduler = make_scheduler(cfg, optimizer, len(train_batches))
    amp = autocast_dtype(cfg.precision, device)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    forward = compile_model(model, cfg.compile)
    store = prepare_store(cfg, model, images, prep, device, amp, progress, log)
    if store is not None:
        split, array = store
        views = cfg.feature_cache_views + 1 if cfg.feature_cache_views else 1
        feature_train = Batches.of_array(array, images.labels, train_rows, cfg.batch_size, device, shuffle=True,
                                         drop_last=True, views=views)
        feature_val = Batches.of_array(array, images.labels, val_rows, val_batch_size, device, shuffle=False)
        feature_prep = FeaturePrep(cfg.channels_last)

    start_epoch, history, best_acc, best_epoch = 1, [], -1.0, 0
    if resume:
        state = load_checkpoint(run_dir / "last.pt", device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(state["scheduler"])
        start_epoch, history = state["epoch"] + 1, state["history"]
        best_acc, best_epoch = state["best_val_acc"], state["best_epoch"]
        atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
        log(f"resuming {run_dir} after epoch {state['epoch']}")
    else:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)

    n_params = sum(p.numel() for p in model.parameters())
    log(f"{run_dir.name}: {cfg.model}, {n_params:,} parameters ({plan.trainable_count():,} trainable), "
        f"{len(train_rows)} train / {len(val_rows)} val images, "
        f"{len(classes)} classes, {device.type}, {'bf16 autocast' if amp else 'fp32'}"
        f"{', channels_last' if cfg.channels_last else ''}")
    tracker = Tracker(cfg, run_dir, group=group, log=log)
    setup_seconds = time.perf_counter() - started  # decoding, feature store, model build: once per run
    status = "completed"
    try:
        for epoch in range(start_epoch, cfg.epochs + 1):
            plan.on_epoch_start(epoch, optimizer, log)
            seed = epoch_seed(cfg.seed, epoch)
            torch.manual_seed(seed)  # dropout and anything else drawing from the global generator
            aug = torch.Generator(device=device).manual_seed(seed) if cfg.augment else None
            t0 = time.perf_counter()
            if store is not None and (cfg.finetune == "partial" or plan.head_only(epoch)):
                # the frozen part's output comes from the store; what trains runs on it (augmentation, if
                # any, is in the stored views: a view per epoch)
                view = 1 + (epoch - 1) % cfg.feature_cache_views if cfg.feature_cache_views else 0
                net, batches, prep_e, val_b = split.rest, feature_train.epoch(seed, view), feature_prep, feature_val
                aug = None
            else:
                net, batches, prep_e, val_b = forward, train_batches.epoch(seed), prep, val_batches
            with tqdm(total=len(train_batches) * cfg.batch_size, desc=f"epoch {epoch}/{cfg.epochs}", unit="img",
                      disable=not progress, leave=False, dynamic_ncols=True) as bar:
                stats = train_one_epoch(net, batches, prep_e, optimizer, scheduler, loss_fn,
                                        device, amp, aug, cfg.grad_clip, bar)
            train_time = time.perf_counter() - t0
            if not math.isfinite(stats["train_loss"]):
                raise TrainingDiverged(f"epoch {epoch}: the training loss is {stats['train_loss']}; "
                                       f"try a lower --lr (now {cfg.lr:g}) or --grad_clip 1")
            val = evaluate(net, val_b, prep_e, device, amp, loss_fn)
            record = {"epoch": epoch, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                      "val_loss": val["loss"], "val_acc": val["acc"], "lr": optimizer.param_groups[0]["lr"],
                      "epoch_time": time.perf_counter() - t0, "images_per_s": stats["seen"] / train_time}
            history.append(record)
            improved = record["val_acc"] > best_acc
            if improved:
                best_acc, best_epoch = record["val_acc"], epoch
            extra = {"best_val_acc": best_acc, "best_epoch": best_epoch}
            if improved:  # best.pt first: a crash between the two saves only redoes this epoch on resume
                atomic_torch_save(checkpoint(model, cfg, classes, pre, epoch, history, **extra), run_dir / "best.pt")
            atomic_torch_save(checkpoint(model, cfg, classes, pre, epoch, history, **extra,
                                         optimizer=optimizer.state_dict(),
                                         scheduler=scheduler.state_dict() if scheduler else None), run_dir / "last.pt")
            append_jsonl(run_dir / "metrics.jsonl", record)
            log(f"epoch {epoch}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  train_acc {record['train_acc']:.4f}  "
                f"val_loss {record['val_loss']:.4f}  val_acc {record['val_acc']:.4f}  lr {record['lr']:.2e}  "
                f"{record['epoch_time']:.1f}s  {record['images_per_s']:.0f} img/s{'  *' if improved else ''}")
            tracker.log(record)
            for callback in callbacks:
                callback(record)
            if cfg.early_stop and epoch - best_epoch >= cfg.early_stop:
                status = "early_stopped"
                log(f"early stop: no better val_acc for {cfg.early_stop} epochs (best {best_acc:.4f} at epoch {best_epoch})")
                break
    except StopTraining:
        status = "stopped"
    finally:
        tracker.finish()
    history = read_jsonl(run_dir / "metrics.jsonl")
    summary = {"status": status, "best_val_acc": best_acc, "best_epoch": best_epoch, "epochs_run": len(history),
               "params": n_params, "trainable_params": plan.trainable_count(), "model": cfg.model,
               "finetune": cfg.finetune, "train_images": len(train_rows), "val_images": len(val_rows),
               "bad_files": n_bad, "classes": classes, "device": str(device), "precision": str(amp or "fp32"),
               "train_seconds": sum(r["epoch_time"] for r in history), "setup_seconds": setup_seconds,
               "images_per_s": (sum(r["images_per_s"] for r in history) / len(history)) if history else 0.0,
               "torch": torch.__version__}
    atomic_write_json(run_dir / "summary.json", summary)
    return FitResult(run_dir, best_acc, best_epoch, history, status)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a cnnlab checkpoint without executing pickled code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"checkpoint {path} not found: expected runs/<name>/best.pt or last.pt")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CnnlabError(f"{path} is not a readable cnnlab checkpoint ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CnnlabError(f"{path} is not a cnnlab checkpoint (no config/model inside)")
    return state
