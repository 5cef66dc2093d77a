"""Batches of (images or stored features, labels) drawn by index from a cached array, on the training device."""

from __future__ import annotations

import math
import os
import warnings
from typing import Iterator

import numpy as np
import torch

from ..hardware import keeps_on_device
from .cache import CachedImages


class DeviceCache:
    """Whole cache arrays uploaded to a device, kept for as long as the caller keeps this object: a run's
    training and validation batches share one copy, and so do the trials a sweep process runs one after
    another when it hands every trial's `fit` the same DeviceCache. Only the latest cache file is kept."""

    def __init__(self) -> None:
        self._kept: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def key(array: np.ndarray, device: torch.device) -> tuple | None:
        """What identifies a cache file's upload; None for an array without a file (never kept)."""
        filename = getattr(array, "filename", None)
        if filename is None:
            return None
        return (filename, os.stat(filename).st_mtime_ns, array.shape, device)

    def holds(self, array: np.ndarray, device: torch.device) -> bool:
        return self.key(array, device) in self._kept

    def upload(self, array: np.ndarray, device: torch.device) -> torch.Tensor:
        """The whole array on `device`, uploaded once; an array without a file is uploaded each time."""
        key = self.key(array, device)
        if key is not None and key in self._kept:
            return self._kept[key]
        if key is not None:
            self._kept.clear()  # before the new upload: the old one's memory is free for it
        host = np.array(array) if device.type == "cpu" else np.ascontiguousarray(array)  # CPU: its own writable copy
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # a read-only map, only read from on its way to the device
            tensor = torch.from_numpy(host).to(device)
        if key is not None:
            self._kept[key] = tensor
        return tensor


class Batches:
    """Batches of (tensor, int64 label) from rows of a cached array: uint8 images (N, H, W, C), yielded as
    NCHW views in channels_last layout, or stored features (any shape), yielded as they are.

    On CUDA the rows are copied to GPU memory once when they fit, and drawn by index there. Otherwise each
    batch is read from the cache file into kept host memory (on CPU the batch is only valid until the next
    one is drawn, so copy it to keep it); on CUDA that memory is pinned and copied to the GPU asynchronously."""

    def __init__(self, images: CachedImages, rows: np.ndarray, batch_size: int, device: torch.device,
                 shuffle: bool, drop_last: bool = False, resident: bool | None = None,
                 device_cache: DeviceCache | None = None):
        self._setup(images.pixels, images.labels, rows, batch_size, device, shuffle, drop_last, resident, nhwc=True,
                    device_cache=device_cache)

    @classmethod
    def of_array(cls, array: np.ndarray, labels: np.ndarray, rows: np.ndarray, batch_size: int, device: torch.device,
                 shuffle: bool, drop_last: bool = False, views: int = 1) -> "Batches":
        """`array` holds `views` blocks of len(labels) rows each (stored augmented views); epoch(view=v) reads block v."""
        self = cls.__new__(cls)
        self._setup(array, labels, rows, batch_size, device, shuffle, drop_last, False, nhwc=False,
                    device_cache=None)
        self.views = views
        return self

    def _setup(self, array: np.ndarray, labels: np.ndarray, rows: np.ndarray, batch_size: int, device: torch.device,
               shuffle: bool, drop_last: bool, resident: bool | None, nhwc: bool,
               device_cache: DeviceCache | None) -> None:
        self.array, self.rows, self.nhwc, self.views = array, np.asarray(rows), nhwc, 1
        self.n_per_view = len(labels)
        self.batch_size, self.device, self.shuffle = batch_size, device, shuffle
        self.drop_last = drop_last and len(self.rows) > batch_size
        self.labels = torch.from_numpy(labels[self.rows]).to(device)
        device_cache = device_cache if device_cache is not None else DeviceCache()
        if resident is None:
            resident = device.type == "cuda" and (device_cache.holds(array, device) or
                                                  keeps_on_device(array.nbytes, torch.cuda.mem_get_info(device)[0]))
        self._buffers: dict[int, torch.Tensor] = {}
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self.resident = device_cache.upload(array, device) if resident else None
        self.rows_on_device = torch.from_numpy(self.rows).to(device) if resident else None

    def _staging(self, b: int) -> torch.Tensor:
        """Host memory batch `b` is gathered into, kept between batches (fresh memory costs page faults that
        outweigh the copy). CPU: one buffer, valid until the next batch. CUDA: two pinned buffers in turn,
        each refilled only once its last asynchronous copy to the GPU has finished."""
        cuda = self.device.type == "cuda"
        slot = b % 2 if cuda else 0
        if slot not in self._buffers:
            shape = (self.batch_size, *self.array.shape[1:])
            self._buffers[slot] = torch.empty(shape, dtype=torch.from_numpy(np.empty(0, self.array.dtype)).dtype,
                                              pin_memory=cuda)
        if cuda and self._copied[slot] is not None:
            self._copied[slot].synchronize()
        return self._buffers[slot]

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows of the cache file read with pread into `out`: the page cache serves them, but they are never
        mapped into this process, so its memory does not grow with the data set (pages touched through a
        memory map count in its RSS until the kernel reclaims them)."""
        filename = getattr(self.array, "filename", None)
        if filename is None:
            return np.take(self.array, rows, axis=0, out=out)
        if getattr(self, "_fd", None) is None:
            self._fd = os.open(filename, os.O_RDONLY)
        row_bytes = out[0].nbytes
        flat = out.reshape(len(rows), -1)
        for i, r in enumerate(rows):
            got = os.preadv(self._fd, [flat[i]], self.array.offset + int(r) * row_bytes)
            if got != row_bytes:
                raise OSError(f"{filename}: short read at row {r} (the cache file is damaged: delete it)")
        return out

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def attach_targets(self, table: np.ndarray) -> None:
        """A second target per image (a teacher's logits: `table` has one row per image of the cache), yielded with
        each batch after its labels, drawn by the same index."""
        self.targets = torch.from_numpy(np.ascontiguousarray(table[self.rows])).to(self.device)

    def balance_classes(self) -> None:
        """Each epoch then draws len(rows) positions with replacement, every class equally likely (seeded like the
        shuffle, so a resumed run draws the same)."""
        labels = self.labels.cpu()
        counts = torch.bincount(labels)
        self.draw_weights = (1.0 / counts.double())[labels]

    def epoch(self, seed: int, view: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.rows)
        if getattr(self, "draw_weights", None) is not None:
            order = torch.multinomial(self.draw_weights, n, replacement=True,
                                      generator=torch.Generator().manual_seed(seed))
        elif self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        offset = (view % self.views) * self.n_per_view
        # The epoch's order goes to the device once: a copy from pageable memory per batch would wait for
        # the GPU to finish its queue every batch. Each batch's positions ascend: sequential reads of the file.
        order_d = order.to(self.device)
        for b in range(len(self)):
            pos_d = order_d[b * self.batch_size:(b + 1) * self.batch_size].sort().values
            y = self.labels.index_select(0, pos_d)
            if self.resident is not None:
                x = self.resident.index_select(0, self.rows_on_device.index_select(0, pos_d) + offset)
            else:
                pos = order[b * self.batch_size:(b + 1) * self.batch_size].sort().values
                rows = self.rows[pos.numpy()] + offset
                host = self._staging(b)[:len(rows)]
                x = torch.from_numpy(self._gather(rows, host.numpy()))
                if self.device.type == "cuda":  # the copy runs while the next batch is gathered
                    x = x.to(self.device, non_blocking=True)
                    self._copied[b % 2] = torch.cuda.Event()
                    self._copied[b % 2].record()
            x = x.permute(0, 3, 1, 2) if self.nhwc else x  # NHWC viewed as NCHW is exactly channels_last
            targets = getattr(self, "targets", None)
            yield (x, y) if targets is None else (x, y, targets.index_select(0, pos_d))
