"""Image folders -> a decoded uint8 cache -> batches on the training device, augmented there.

Images are decoded, converted to RGB and resized once into a memory-mapped `.npy` array (N, S, S, 3)
keyed by the files' paths, sizes and mtimes and the image size; later runs and sweep trials reuse it.
The training loop draws whole batches from it by index: no per-image Python work on the hot path.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .decode import DECODE_VERSION, decode_chunk, init_worker
from .errors import DataError
from .io import atomic_write_json, atomic_write_text

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---- folders ------------------------------------------------------------------------------------------

def scan_folder(folder: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Classes (sorted sub-folder names), files and labels of `folder/<class>/*`. Hidden files are
    skipped; every other file is listed, so a non-image is reported rather than silently ignored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: expected ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg "
                        f"(run `cnnlab demo-data data/demo` or `cnnlab download inaturalist-12k data/`)")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{folder} has no class folders: expected {folder}/<class>/<image files>")
    files, labels = [], []
    for label, name in enumerate(classes):
        for p in sorted((folder / name).iterdir()):
            if p.is_file() and not p.name.startswith("."):
                files.append(p)
                labels.append(label)
    if not files:
        raise DataError(f"{folder} has class folders but no files in them")
    return classes, files, np.asarray(labels, dtype=np.int64)


# ---- the decoded cache --------------------------------------------------------------------------------

@dataclass
class CachedImages:
    """One folder's images decoded at one size. Rows of unreadable files are zero and left out of `valid`."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: np.ndarray  # (N,) int64, for every file
    pixels: np.ndarray  # (N, S, S, 3) uint8, memory-mapped read-only
    errors: dict[int, str] = field(default_factory=dict)  # row -> why the file could not be read

    @property
    def valid(self) -> np.ndarray:
        ok = np.ones(len(self.files), dtype=bool)
        ok[list(self.errors)] = False
        return np.flatnonzero(ok)

    @property
    def image_size(self) -> int:
        return int(self.pixels.shape[1])

    def bad_file_report(self) -> str:
        return "".join(f"{self.files[i]}\t{msg}\n" for i, msg in sorted(self.errors.items()))


def cache_key(files: list[Path], image_size: int) -> str:
    h = hashlib.sha256(f"cnnlab-decode-v{DECODE_VERSION}:{image_size}\n".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_images(folder: str | Path, image_size: int, cache_dir: str | Path, workers: int = 0,
                progress: bool = True) -> CachedImages:
    """Decode `folder/<class>/*` at `image_size` into the cache (once), then map it read-only."""
    folder = Path(folder)
    classes, files, labels = scan_folder(folder)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(files, image_size)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    # One builder at a time per key: sweep workers that start together wait for the first one's cache.
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (npy.exists() and meta.exists()):
            _build(files, image_size, npy, meta, folder, workers, progress)
    errors = {int(k): v for k, v in json.loads(meta.read_text())["errors"].items()}
    return CachedImages(folder, classes, files, labels, np.load(npy, mmap_mode="r"), errors)


def _build(files: list[Path], size: int, npy: Path, meta: Path, folder: Path, workers: int, progress: bool) -> None:
    from tqdm import tqdm

    partial = npy.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    del out  # workers write through their own maps; rows of unreadable files stay zero
    workers = workers or os.cpu_count() or 1
    chunk = max(1, min(64, math.ceil(len(files) / (workers * 8))))
    jobs = [(list(range(i, min(i + chunk, len(files)))), [str(p) for p in files[i:i + chunk]], size)
            for i in range(0, len(files), chunk)]
    errors: dict[int, str] = {}
    start = time.perf_counter()
    bar = tqdm(total=len(files), desc=f"decoding {folder.name}/ at {size}px", unit="img", disable=not progress,
               dynamic_ncols=True)
    if workers == 1 or len(files) < 64:
        init_worker(str(partial))
        results = map(decode_chunk, jobs)
        pool = None
    else:
        # spawn: the workers import only numpy and PIL (cnnlab.decode), never a forked copy of torch's threads
        pool = mp.get_context("spawn").Pool(workers, initializer=init_worker, initargs=(str(partial),))
        results = pool.imap_unordered(decode_chunk, jobs)
    try:
        for chunk_results in results:
            for row, err in chunk_results:
                if err is not None:
                    errors[row] = err
            bar.update(len(chunk_results))
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        bar.close()
    seconds = time.perf_counter() - start
    atomic_write_json(meta, {"folder": str(folder.resolve()), "image_size": size, "count": len(files),
                             "errors": {str(k): v for k, v in sorted(errors.items())},
                             "build_seconds": round(seconds, 2),
                             "images_per_s": round(len(files) / max(seconds, 1e-9), 1)})
    os.replace(partial, npy)  # the .npy appears only when complete: a killed build is redone, never half-read


# ---- the split ------------------------------------------------------------------------------------------

def stratified_split(labels: np.ndarray, candidates: np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle of that class's rows; round(n * val_fraction) of them (at least one
    when the class has two or more) go to validation. Same labels, fraction and seed -> same split."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels[candidates]):
        rows = candidates[labels[candidates] == c]
        rows = rows[rng.permutation(len(rows))]
        n_val = int(round(len(rows) * val_fraction))
        if len(rows) >= 2:
            n_val = min(max(n_val, 1), len(rows) - 1)
        else:
            n_val = 0
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def save_split(path: str | Path, images: CachedImages, train: np.ndarray, val: np.ndarray) -> None:
    """Paths relative to the data root (train/<class>/<file>), so the split reads the same anywhere."""
    rel = [str(p.relative_to(images.root.parent)) for p in images.files]
    atomic_write_json(path, {"root": str(images.root.parent.resolve()), "classes": images.classes,
                             "train": [rel[i] for i in train], "val": [rel[i] for i in val]})


def write_bad_file_report(path: str | Path, *image_sets: CachedImages) -> int:
    report = "".join(s.bad_file_report() for s in image_sets)
    count = sum(len(s.errors) for s in image_sets)
    if count:
        atomic_write_text(path, report)
    return count


# ---- batches on the device ----------------------------------------------------------------------------

class Batches:
    """Batches of (uint8 images NCHW in channels_last layout, int64 labels) from cached rows.

    On CUDA the rows are copied to GPU memory once when they fit, and drawn by index there; otherwise
    each batch is gathered from the memory map and copied (pinned, asynchronously on CUDA)."""

    def __init__(self, images: CachedImages, rows: np.ndarray, batch_size: int, device: torch.device,
                 shuffle: bool, drop_last: bool = False, resident: bool | None = None):
        self.images, self.rows = images, np.asarray(rows)
        self.batch_size, self.device, self.shuffle = batch_size, device, shuffle
        self.drop_last = drop_last and len(self.rows) > batch_size
        self.labels = torch.from_numpy(images.labels[self.rows]).to(device)
        nbytes = len(self.rows) * images.pixels[0].nbytes
        if resident is None:
            resident = device.type == "cuda" and nbytes < 0.5 * torch.cuda.mem_get_info(device)[0]
        self.resident = torch.from_numpy(np.ascontiguousarray(images.pixels[self.rows])).to(device) if resident else None

    def __len__(self) -> int:
        n = len(self.rows)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.epoch(0)

    def epoch(self, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.rows)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        else:
            order = torch.arange(n)
        for b in range(len(self)):
            pos = order[b * self.batch_size:(b + 1) * self.batch_size]
            pos = pos.sort().values  # ascending rows read the memory map sequentially
            if self.resident is not None:
                pos_d = pos.to(self.device, non_blocking=True)
                x = self.resident.index_select(0, pos_d)
                y = self.labels.index_select(0, pos_d)
            else:
                x = torch.from_numpy(self.images.pixels[self.rows[pos.numpy()]])
                if self.device.type == "cuda":
                    x = x.pin_memory()
                x = x.to(self.device, non_blocking=True)
                y = self.labels[pos.to(self.device)]
            yield x.permute(0, 3, 1, 2), y  # NHWC storage viewed as NCHW is exactly channels_last


@dataclass
class Preprocess:
    """What turns cached uint8 pixels into model input; saved in every checkpoint so evaluate and
    predict use exactly what training used."""

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        return cls(int(d["image_size"]), tuple(d["mean"]), tuple(d["std"]))


def to_model_input(x_uint8: torch.Tensor, pre: Preprocess, generator: torch.Generator | None = None,
                   channels_last: bool = True) -> torch.Tensor:
    """uint8 NCHW batch -> normalised float batch; augmented when a generator is given (training)."""
    x = x_uint8.float()
    if generator is not None:
        x = augment(x.div_(255), generator).mul_(255)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1) * 255
    x = (x - mean) / std
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def augment(x: torch.Tensor, generator: torch.Generator, scale: tuple[float, float] = (0.25, 1.0),
            ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.2) -> torch.Tensor:
    """Random resized crop + horizontal flip (one affine grid_sample per batch) and brightness /
    contrast / saturation jitter, each drawn per image, on float images in [0, 1] on any device."""
    b, dev = x.shape[0], x.device

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=dev)

    area = scale[0] + (scale[1] - scale[0]) * rand(b)
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(b)
    w = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0)
    h = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0)
    cx = (1 - w) * (2 * rand(b) - 1)
    cy = (1 - h) * (2 * rand(b) - 1)
    flip = torch.where(rand(b) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    if jitter > 0:
        factors = 1 + jitter * (2 * rand(3, b, 1, 1, 1) - 1)
        x = x * factors[0]  # brightness
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * factors[1] + mean  # contrast
        grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - grey) * factors[2] + grey  # saturation
        x = x.clamp(0, 1)
    return x
