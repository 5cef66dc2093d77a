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
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

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


def cache_key(files: list[Path], image_size: int, decoder: str = "pil") -> str:
    tag = "" if decoder == "pil" else f":{decoder}"  # another decoder's pixels differ slightly: its own cache
    h = hashlib.sha256(f"cnnlab-decode-v{DECODE_VERSION}:{image_size}{tag}\n".encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def load_images(folder: str | Path, image_size: int, cache_dir: str | Path, workers: int = 0,
                progress: bool = True, decode_device: torch.device | None = None) -> CachedImages:
    """Decode `folder/<class>/*` at `image_size` into the cache (once), then map it read-only.
    Decoding runs in `workers` PIL processes, or, given `decode_device`, with torchvision's decoder on that
    device (nvJPEG on CUDA) in batches."""
    folder = Path(folder)
    classes, files, labels = scan_folder(folder)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    decoder = "pil" if decode_device is None else ("nvjpeg" if decode_device.type == "cuda" else "torchvision-cpu")
    key = cache_key(files, image_size, decoder)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    shape = (len(files), image_size, image_size, 3)
    # One builder at a time per key: sweep workers that start together wait for the first one's cache.
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (npy.exists() and meta.exists()):
            _build(files, image_size, npy, meta, folder, workers, progress, decode_device, decoder)
        try:
            pixels, errors = _open_cache(npy, meta, shape)
        except (ValueError, OSError, KeyError, json.JSONDecodeError):  # damaged on disk: decode again, once
            npy.unlink(missing_ok=True)
            _build(files, image_size, npy, meta, folder, workers, progress, decode_device, decoder)
            pixels, errors = _open_cache(npy, meta, shape)
    return CachedImages(folder, classes, files, labels, pixels, errors)


def _open_cache(npy: Path, meta: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, dict[int, str]]:
    pixels = np.load(npy, mmap_mode="r")
    errors = {int(k): v for k, v in json.loads(meta.read_text())["errors"].items()}
    if pixels.shape != shape:
        raise ValueError(f"shape {pixels.shape}")
    return pixels, errors


def _build(files: list[Path], size: int, npy: Path, meta: Path, folder: Path, workers: int, progress: bool,
           decode_device: torch.device | None, decoder: str) -> None:
    from tqdm import tqdm

    partial = npy.with_suffix(".partial.npy")
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(files), size, size, 3))
    start = time.perf_counter()
    bar = tqdm(total=len(files), desc=f"decoding {folder.name}/ at {size}px ({decoder})", unit="img",
               disable=not progress, dynamic_ncols=True)
    if decode_device is not None:
        from .decode_gpu import decode_into

        with bar:
            errors = decode_into(files, size, out, decode_device, on_progress=bar.update)
        out.flush()
        del out
    else:
        del out  # workers write through their own maps; rows of unreadable files stay zero
        errors = _decode_with_workers(files, size, partial, workers, bar)
    seconds = time.perf_counter() - start
    atomic_write_json(meta, {"folder": str(folder.resolve()), "image_size": size, "count": len(files),
                             "decoder": decoder, "errors": {str(k): v for k, v in sorted(errors.items())},
                             "build_seconds": round(seconds, 2),
                             "images_per_s": round(len(files) / max(seconds, 1e-9), 1)})
    os.replace(partial, npy)  # the .npy appears only when complete: a killed build is redone, never half-read


def _decode_with_workers(files: list[Path], size: int, partial: Path, workers: int, bar) -> dict[int, str]:
    workers = workers or os.cpu_count() or 1
    chunk = max(1, min(64, math.ceil(len(files) / (workers * 8))))
    jobs = [(list(range(i, min(i + chunk, len(files)))), [str(p) for p in files[i:i + chunk]], size)
            for i in range(0, len(files), chunk)]
    errors: dict[int, str] = {}
    if workers == 1 or len(files) < 64:
        init_worker(str(partial))
        results = map(decode_chunk, jobs)
        pool = None
    else:
        # fork on Linux: workers start at once and need no `if __name__ == "__main__"` guard in the caller's
        # script; they only run cnnlab.decode (numpy, PIL), never torch, so torch's threads do not matter
        method = "fork" if sys.platform == "linux" else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=init_worker, initargs=(str(partial),))
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
    return errors


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

_UPLOADED: dict[tuple, torch.Tensor] = {}


def upload_key(array: np.ndarray, device: torch.device) -> tuple | None:
    """What identifies a cache file's upload; None for an array without a file (never kept)."""
    filename = getattr(array, "filename", None)
    if filename is None:
        return None
    return (filename, os.stat(filename).st_mtime_ns, array.shape, device)


def uploaded(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """The whole cached array on `device`, uploaded once per process: a run's training and validation batches
    share one copy, and so do the trials a sweep process runs one after another. Only the latest cache file
    is kept; an array without a file is uploaded each time."""
    key = upload_key(array, device)
    if key is not None and key in _UPLOADED:
        return _UPLOADED[key]
    if key is not None:
        _UPLOADED.clear()  # before the new upload: the old one's memory is free for it
    host = np.array(array) if device.type == "cpu" else np.ascontiguousarray(array)  # CPU: its own writable copy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only map, only read from on its way to the device
        tensor = torch.from_numpy(host).to(device)
    if key is not None:
        _UPLOADED[key] = tensor
    return tensor


class Batches:
    """Batches of (tensor, int64 label) from rows of a cached array: uint8 images (N, H, W, C), yielded as
    NCHW views in channels_last layout, or stored features (any shape), yielded as they are.

    On CUDA the rows are copied to GPU memory once when they fit, and drawn by index there. Otherwise each
    batch is read from the cache file into kept host memory (on CPU the batch is only valid until the next
    one is drawn, so copy it to keep it); on CUDA that memory is pinned and copied to the GPU asynchronously."""

    def __init__(self, images: CachedImages, rows: np.ndarray, batch_size: int, device: torch.device,
                 shuffle: bool, drop_last: bool = False, resident: bool | None = None):
        self._setup(images.pixels, images.labels, rows, batch_size, device, shuffle, drop_last, resident, nhwc=True)

    @classmethod
    def of_array(cls, array: np.ndarray, labels: np.ndarray, rows: np.ndarray, batch_size: int, device: torch.device,
                 shuffle: bool, drop_last: bool = False, views: int = 1) -> "Batches":
        """`array` holds `views` blocks of len(labels) rows each (stored augmented views); epoch(view=v) reads block v."""
        self = cls.__new__(cls)
        self._setup(array, labels, rows, batch_size, device, shuffle, drop_last, False, nhwc=False)
        self.views = views
        return self

    def _setup(self, array: np.ndarray, labels: np.ndarray, rows: np.ndarray, batch_size: int, device: torch.device,
               shuffle: bool, drop_last: bool, resident: bool | None, nhwc: bool) -> None:
        self.array, self.rows, self.nhwc, self.views = array, np.asarray(rows), nhwc, 1
        self.n_per_view = len(labels)
        self.batch_size, self.device, self.shuffle = batch_size, device, shuffle
        self.drop_last = drop_last and len(self.rows) > batch_size
        self.labels = torch.from_numpy(labels[self.rows]).to(device)
        if resident is None:
            resident = device.type == "cuda" and (upload_key(array, device) in _UPLOADED or
                                                  array.nbytes < 0.5 * torch.cuda.mem_get_info(device)[0])
        self._buffers: dict[int, torch.Tensor] = {}
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self.resident = uploaded(array, device) if resident else None
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

    def epoch(self, seed: int, view: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.rows)
        if self.shuffle:
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
            yield (x.permute(0, 3, 1, 2) if self.nhwc else x), y  # NHWC viewed as NCHW is exactly channels_last


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


class BatchPrep:
    """uint8 batches -> normalised float model input (channels_last), augmented when a generator is given.

    Augmentation, per image, all drawn from the generator:
    - random resized crop (area 25-100%, aspect 3/4-4/3) and horizontal flip, as one nearest-neighbour
      gather of the whole batch (index_select on pixel rows);
    - colour jitter: brightness, contrast (about the image's mean) and a per-channel gain (colour balance).
      These and the normalisation are all per-channel affine maps, so they fold into one multiply-add.
    Output buffers are reused from batch to batch: on CPU, fresh 40 MB tensors per batch cost more in page
    faults than the arithmetic (measured: float() 14 ms vs copy_ into a kept buffer 1.5 ms for 64x224x224)."""

    def __init__(self, pre: Preprocess, channels_last: bool = True, scale: tuple[float, float] = (0.25, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), jitter: float = 0.2):
        self.pre, self.channels_last = pre, channels_last
        self.scale, self.ratio, self.jitter = scale, ratio, jitter
        self._buffers: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffers_for(self, shape: tuple[int, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (shape, device)
        if key not in self._buffers:
            if len(self._buffers) >= 4:  # full and last-partial batches of training and validation
                self._buffers.clear()
            self._buffers[key] = (torch.empty(shape, dtype=torch.uint8, device=device),
                                  torch.empty(shape, dtype=torch.float32, device=device))
        return self._buffers[key]

    def crop_indices(self, b: int, h: int, w: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
        """Flat pixel-row indices (b, h, w) of a random resized, randomly flipped crop of each image."""
        def rand(n: int) -> torch.Tensor:
            return torch.rand(n, generator=generator, device=device)

        area = self.scale[0] + (self.scale[1] - self.scale[0]) * rand(b)
        log_r = math.log(self.ratio[0]) + (math.log(self.ratio[1]) - math.log(self.ratio[0])) * rand(b)
        cw = torch.sqrt(area * torch.exp(log_r)).clamp(max=1.0) * w
        ch = torch.sqrt(area / torch.exp(log_r)).clamp(max=1.0) * h
        x0, y0 = (w - cw) * rand(b), (h - ch) * rand(b)
        flip = rand(b) < 0.5
        xs = (x0[:, None] + (torch.arange(w, device=device) + 0.5) / w * cw[:, None]).long().clamp_(0, w - 1)
        ys = (y0[:, None] + (torch.arange(h, device=device) + 0.5) / h * ch[:, None]).long().clamp_(0, h - 1)
        xs = torch.where(flip[:, None], xs.flip(1), xs)
        dtype = torch.int32 if b * h * w < 2**31 else torch.int64
        rows = (ys * w + torch.arange(b, device=device)[:, None] * (h * w)).to(dtype)
        return rows[:, :, None] + xs.to(dtype)[:, None, :]

    def colour_maps(self, x_nhwc: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image and channel, (gain, offset) taking uint8 values to jittered, normalised ones."""
        b, dev = x_nhwc.shape[0], x_nhwc.device
        if dev not in self._stats:  # made once: a tensor built from a list per batch is a host-to-GPU copy that waits
            self._stats[dev] = (torch.tensor(self.pre.mean, device=dev) * 255, torch.tensor(self.pre.std, device=dev) * 255)
        mean, std = self._stats[dev]
        if generator is None or self.jitter <= 0:
            return (1 / std).expand(b, 3), (-mean / std).expand(b, 3)
        u = torch.rand(b, 5, generator=generator, device=dev) * 2 - 1
        bright, contrast = 1 + self.jitter * u[:, 0:1], 1 + self.jitter * u[:, 1:2]
        balance = 1 + 0.5 * self.jitter * u[:, 2:5]
        channel_means = x_nhwc.view(b, -1, 3)[:, ::16].float().mean(1)  # a subsample is plenty for the mean
        gain = bright * balance  # y = gain * x
        grey = (gain * channel_means).mean(1, keepdim=True)  # contrast pivots about the jittered image's mean
        return contrast * gain / std, ((1 - contrast) * grey - mean) / std

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x: uint8 (B, 3, H, W) in channels_last layout (as Batches yields it)."""
        nhwc = x.permute(0, 2, 3, 1)
        if not nhwc.is_contiguous():
            nhwc = nhwc.contiguous()
        b, h, w, _ = nhwc.shape
        crop, out = self._buffers_for(tuple(nhwc.shape), x.device)
        if generator is not None:
            idx = self.crop_indices(b, h, w, generator, x.device)
            torch.index_select(nhwc.view(-1, 3), 0, idx.view(-1), out=crop.view(-1, 3))
            src = crop
        else:
            src = nhwc
        gain, offset = self.colour_maps(src, generator)
        out.copy_(src)
        rows = out.view(b, h, w * 3)  # per-channel maps repeated along a row: contiguous, vectorised broadcast
        torch.addcmul(offset.repeat(1, w)[:, None, :], rows, gain.repeat(1, w)[:, None, :], out=rows)
        result = out.permute(0, 3, 1, 2)
        return result if self.channels_last else result.contiguous()
