"""Compute what the frozen layers compute once: a feature store for fine-tuning with a frozen backbone.

When the frozen part of the network is a pure function of the image (no augmentation before it; frozen
layers run in eval mode, so batch norm uses its running statistics and dropout is off), its output is the
same every epoch. `fit` then computes it once per image into a memory-mapped store and trains the rest on
the stored features:
- `--finetune head`: the input of the new head (2,048 pooled values per image for ResNet50), any model;
- `--finetune partial --freeze_stages k`: the output of stage k (ResNet family, EfficientNet, MobileNet, VGG);
- `--finetune gradual`: the store while only the head trains, full forward passes once stages open.
With augmentation the default is no store: a fixed set of views is a weaker augmentation than a fresh one each
epoch. `--feature_cache_views K` stores K augmented views per image (plus the plain one, for validation);
epoch e trains on view 1 + (e - 1) mod K.

Stored as float16 (float32 with --precision fp32), keyed by everything that changes the content: model,
weights identity, boundary, preprocessing, image-cache key, dtype, views. Written as `.partial.npy` and
renamed when complete, so a store cut off mid-write is rebuilt, never read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .config import Config
from .data import Batches, CachedImages, ImageTransform, cache_key
from .errors import CnnlabError
from .hardware import autocast
from .io import atomic_write_json, new_mapped_array, sha256_of
from .models import ModelParts, TrainablePlan, family_of, stages, weights_file
from .sources import VAL_BATCH, EpochData, ImageSource, training_batches


class FeatureOverflow(ValueError):
    """A feature too large for the store's dtype (float16): the store is built again in float32."""

    def __init__(self, largest: float, dtype: np.dtype):
        super().__init__(f"a feature reaches {largest:.3g}, past {dtype}'s range")
        self.largest = largest


@dataclass
class Split:
    frozen: Callable[[torch.Tensor], torch.Tensor]  # images -> features (eval mode, no grad)
    rest: nn.Module  # features -> logits (what trains)
    boundary: str


class _HeadInput:
    """Runs the whole (frozen) model and returns what arrives at the head."""

    def __init__(self, model: nn.Module, head: nn.Module):
        self.model, self.head = model, head

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        captured: list[torch.Tensor] = []
        handle = self.head.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        try:
            self.model(x)
        finally:
            handle.remove()
        return captured[0]


class _HeadOutput(nn.Module):
    """The head alone, as the whole model uses it: a head whose output keeps spatial axes (SqueezeNet's
    convolutional classifier, which the model flattens after it) is flattened to (N, classes) here too."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(x)
        return torch.flatten(out, 1) if out.dim() > 2 else out


def split_for_store(parts: ModelParts, cfg: Config, head_only: bool) -> Split | str:
    """Where to cut the model for a store under `cfg`, or why it cannot be cut."""
    model, head = parts.module, parts.head_module()
    if head_only:
        return Split(_HeadInput(model, head), _HeadOutput(head), "the head's input")
    body = stages(cfg.model, model, head)
    k = cfg.freeze_stages
    rest = family_of(cfg.model).tail(model, [m for stage in body[k + 1:] for m in stage])
    if rest is None:
        return f"partial freezing of {cfg.model} is not supported by the feature store"
    frozen_modules = [m for stage in body[:k + 1] for m in stage]

    def frozen(x: torch.Tensor) -> torch.Tensor:
        for m in frozen_modules:
            x = m(x)
        return x

    return Split(frozen, rest, f"the output of stage {k}")


def store_key(cfg: Config, images: CachedImages, boundary: str, dtype: np.dtype, pre: dict[str, Any]) -> str:
    path = weights_file(cfg.weights)  # the rule create_model reads --weights by: ~ expanded, tags are no file
    if path is not None:
        weights = "file:" + sha256_of(path)
    elif cfg.weights.lower() in ("none", "random"):  # the backbone is what this seed initialised
        weights = f"random:{cfg.seed}"
    else:
        weights = cfg.weights
    parts = [cfg.model, weights, boundary, json.dumps(pre, sort_keys=True), cache_key(images.files, images.image_size),
             str(np.dtype(dtype)), str(cfg.feature_cache_views)]
    if cfg.feature_cache_views:  # the stored views are drawn with this seed and this augmentation strength
        parts += [str(cfg.seed), f"{cfg.crop_min:g}", f"{cfg.jitter:g}"]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def default_max_bytes(folder: Path) -> int:
    """Half the free disk where the store would go: it is memory-mapped, so disk, not RAM, is the limit."""
    return int(shutil.disk_usage(folder).free * 0.5)


def build_store(split: Split, images: CachedImages, transform: ImageTransform, device: torch.device, amp: torch.dtype | None,
                path: Path, dtype: np.dtype, shape: tuple[int, ...], views: int, seed: int,
                progress: bool = True) -> np.ndarray:
    """Features of every valid image (views > 0: that many augmented views each), memory-mapped."""
    from tqdm.auto import tqdm

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return np.load(path, mmap_mode="r")
        rows, n = images.valid, len(images.files)
        blocks = views + 1 if views else 1  # block 0 unaugmented (validation), then the augmented views
        partial = path.with_suffix(".partial.npy")
        out = new_mapped_array(partial, dtype, (blocks * n, *shape), "the feature store")
        limit = float(np.finfo(dtype).max)
        batches = Batches(images, rows, 64, device, shuffle=False)
        try:
            with tqdm(total=blocks * len(rows), desc=f"feature store ({split.boundary})", unit="img",
                      disable=not progress, dynamic_ncols=True) as bar:
                for v in range(blocks):
                    gen = torch.Generator(device=device).manual_seed(seed * 1009 + v) if v > 0 else None
                    done = 0
                    for x, _ in batches.epoch(0):
                        f = _forward(split, transform(x, gen), device, amp).float()
                        largest = float(f.abs().max()) if f.numel() else 0.0
                        if largest > limit:  # float16 ends at 65,504: what lies past it would be stored as inf
                            raise FeatureOverflow(largest, np.dtype(dtype))
                        idx = rows[done:done + len(f)] + v * n
                        out[idx] = f.cpu().numpy().astype(dtype)
                        done += len(f)
                        bar.update(len(f))
            out.flush()
            del out
        except BaseException:  # an overflow, Ctrl-C, a full disk: no half-written store left behind
            partial.unlink(missing_ok=True)
            raise
        os.replace(partial, path)  # complete: only now can a run read it
        atomic_write_json(path.with_suffix(".json"), {"boundary": split.boundary, "rows": n, "views": blocks,
                                                       "shape": list(shape), "dtype": str(np.dtype(dtype))})
    return np.load(path, mmap_mode="r")


@torch.inference_mode()
def _forward(split: Split, x: torch.Tensor, device: torch.device, amp: torch.dtype | None) -> torch.Tensor:
    with autocast(device, amp):
        return split.frozen(x)


def _feature_shape(split: Split, images: CachedImages, transform: ImageTransform, device: torch.device,
                   amp: torch.dtype | None) -> tuple[int, ...]:
    """The shape of one image's features, from one forward pass of the first readable image."""
    row = images.valid[:1]
    x = torch.from_numpy(np.ascontiguousarray(images.pixels[row])).to(device).permute(0, 3, 1, 2)
    return tuple(_forward(split, transform(x), device, amp).shape[1:])


class FeatureTransform:
    """Stored features -> model input: float32 (the stored dtype is float16), channels_last for 4-D maps."""

    def __init__(self, channels_last: bool):
        self.channels_last = channels_last

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None, side: int | None = None
                 ) -> torch.Tensor:
        x = x.float()  # stored features keep their shape: `side` (progressive resizing) is for images
        if x.dim() == 4 and self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def prepare_store(cfg: Config, parts: ModelParts, images: CachedImages, transform: ImageTransform, device: torch.device,
                  amp: torch.dtype | None, progress: bool, log: Callable[[str], None]
                  ) -> tuple[Split, np.ndarray] | None:
    """The split and the store for this run, or None (and one line saying why) when training runs without."""
    if cfg.finetune not in ("head", "partial", "gradual"):
        return None
    if cfg.feature_cache == "off":
        log("feature store off (--feature_cache off): the frozen layers run every epoch")
        return None
    if cfg.teacher and cfg.distill_mode in ("online", "views"):
        log(f"feature store off: with --distill_mode {cfg.distill_mode} the teacher sees each augmented view the student sees, "
            "so the student trains on the images")
        return None
    if cfg.augments() and not cfg.feature_cache_views:
        log("feature store off: augmentation changes the frozen layers' input every epoch "
            "(use --augment false, or --feature_cache_views K to store K augmented views)")
        return None
    split = split_for_store(parts, cfg, head_only=cfg.finetune != "partial")
    model = parts.module
    if isinstance(split, str):
        log(f"feature store off: {split}")
        return None
    dtype = np.dtype(np.float32 if cfg.precision == "fp32" else np.float16)
    was_training = model.training
    model.eval()  # frozen layers: batch norm on running statistics, dropout off
    try:
        shape = _feature_shape(split, images, transform, device, amp)
        blocks = cfg.feature_cache_views + 1 if cfg.feature_cache_views else 1
        folder = cfg.resolved_cache_dir() / "features"
        folder.mkdir(parents=True, exist_ok=True)
        limit = int(cfg.feature_cache_max * 1e9) if cfg.feature_cache_max else default_max_bytes(folder)
        array = store_of(cfg, split, images, transform, device, amp, folder, dtype, shape, blocks, limit, progress,
                         log)
    finally:
        model.train(was_training)
    return None if array is None else (split, array)


def store_of(cfg: Config, split: Split, images: CachedImages, transform: ImageTransform, device: torch.device,
             amp: torch.dtype | None, folder: Path, dtype: np.dtype, shape: tuple[int, ...], blocks: int, limit: int,
             progress: bool, log: Callable[[str], None]) -> np.ndarray | None:
    """The store in `dtype`, or in float32 when a feature lies past float16's range (Inception v3's reach 4.9e8);
    None (no store) when the one it would build passes the size limit."""
    wide = np.dtype(np.float32)
    for kind in (dtype, wide) if dtype != wide else (dtype,):
        path = folder / f"{store_key(cfg, images, split.boundary, kind, transform.pre.to_dict())}.npy"
        size = blocks * len(images.files) * int(np.prod(shape)) * kind.itemsize
        if size > limit:  # checked for each kind: the float32 fallback is twice the size
            log(f"feature store off: in {kind} it would take {size / 1e9:.2f} GB, over the limit of "
                f"{limit / 1e9:.2f} GB (--feature_cache_max)")
            return None
        log(f"feature store: {split.boundary}, {blocks} view(s) x {len(images.files)} images x {tuple(shape)} {kind}, "
            f"{size / 1e6:.1f} MB{' (reused)' if path.exists() else ''}: {path}")
        try:
            return build_store(split, images, transform, device, amp, path, kind, shape, cfg.feature_cache_views,
                               cfg.seed, progress)
        except FeatureOverflow as e:
            log(f"feature store: {e}; storing float32 instead")
    raise CnnlabError(f"the frozen layers of {cfg.model} output values past float32's range on these images: check "
                      "--weights and --mean/--std (the inputs may not be normalised as the weights expect)")


class FeatureSource:
    """Epochs trained on stored features of the frozen part: always for `partial`, and while only the head
    trains for `head` and `gradual` (later gradual epochs, with stages open, run on images). With stored
    augmented views, epoch e reads view 1 + (e - 1) mod K; block 0 (plain) serves validation."""

    def __init__(self, images: ImageSource, split: Split, array: np.ndarray, labels: np.ndarray,
                 train_rows: np.ndarray, val_rows: np.ndarray, cfg: Config, device: torch.device,
                 plan: TrainablePlan):
        self.images, self.split, self.cfg, self.plan = images, split, cfg, plan
        views = cfg.feature_cache_views + 1 if cfg.feature_cache_views else 1
        self.train = training_batches(cfg, partial(Batches.of_array, array, labels, train_rows, device=device,
                                                   views=views))
        self.val = Batches.of_array(array, labels, val_rows, max(cfg.batch_size, VAL_BATCH), device, shuffle=False)
        self.transform = FeatureTransform(cfg.channels_last)

    @property
    def steps_per_epoch(self) -> int:
        return self.images.steps_per_epoch

    def epoch(self, epoch: int, seed: int) -> EpochData:
        if not (self.cfg.finetune == "partial" or self.plan.head_only(epoch)):
            return self.images.epoch(epoch, seed)
        k = self.cfg.feature_cache_views
        view = 1 + (epoch - 1) % k if k else 0
        return EpochData(self.split.rest, self.train.epoch(seed, view), self.val, self.transform, augment=False)
