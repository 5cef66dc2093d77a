"""Where an epoch's batches come from, behind one interface: `source.epoch(epoch, seed)` gives the network to
run, the training batches, the validation batches and the transform that turns a batch into model input.
`ImageSource` draws images from the decoded cache; `features.FeatureSource` draws stored features of a
frozen backbone (and falls back to images in the epochs where the frozen part changes)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .config import Config
from .data import Batches, CachedImages, DeviceCache, ImageTransform

VAL_BATCH = 128  # validation keeps no gradients: larger batches cost little memory


@dataclass
class EpochData:
    net: nn.Module | Callable[[torch.Tensor], torch.Tensor]  # what runs forward (and trains) this epoch
    train: Iterable[tuple[torch.Tensor, torch.Tensor]]
    val: Batches
    transform: Callable[..., torch.Tensor]  # batch -> model input; augments when given a generator
    augment: bool
    tta: bool = False  # validate on each image and its mirror image
    side: int | None = None  # the training images' side this epoch (progressive resizing; None: as cached)


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's draws (its order, augmentation and dropout), from the run's seed."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def training_batches(cfg: Config, make: Callable[..., Batches]) -> Batches:
    """An epoch's training draws as `cfg` asks: batches of batch_size, shuffled, the last partial one dropped, and
    with sampler=balanced each class equally likely. One rule for images, stored features and an online teacher's
    view; `make(batch_size=, shuffle=, drop_last=)` builds the Batches over the training rows."""
    batches = make(batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    if cfg.sampler == "balanced":
        batches.balance_classes()
    return batches


class ImageSource:
    def __init__(self, forward: nn.Module, images: CachedImages, train_rows: np.ndarray, val_rows: np.ndarray,
                 cfg: Config, device: torch.device, transform: ImageTransform, device_cache: DeviceCache | None):
        self.forward, self.transform, self.augment, self.tta = forward, transform, cfg.augments(), cfg.tta
        self.training_side = cfg.training_side
        self.train = training_batches(cfg, partial(Batches, images, train_rows, device=device, device_cache=device_cache))
        self.val = Batches(images, val_rows, max(cfg.batch_size, VAL_BATCH), device, shuffle=False,
                           device_cache=device_cache)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train)

    def epoch(self, epoch: int, seed: int) -> EpochData:
        return EpochData(self.forward, self.train.epoch(seed), self.val, self.transform, self.augment, self.tta,
                         self.training_side(epoch))
