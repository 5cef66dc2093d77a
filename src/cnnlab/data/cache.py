"""The decode-once cache: a folder's images decoded, converted to RGB and resized once into a memory-mapped
`.npy` array (N, S, S, 3), keyed by the files' paths, sizes, mtimes and ctimes, the image size and the decoder.
The ctime is what a user cannot set back: a file replaced or rewritten in place, even with its old size and
mtime restored, gets a new one and so a new cache. (Hashing every file's bytes would also catch this, at the
cost of reading the whole data set on every run; a chmod or a copy of the folder costs one rebuild instead.)
Later runs and sweep trials reuse it. One builder at a time per key (a file lock); decoding runs in a pool
of worker processes (PIL) or in batches on the GPU (nvJPEG).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import multiprocessing as mp
import os
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import DataError
from ..io import atomic_write_json, atomic_write_text, human_size, new_mapped_array, printable
from ..processes import end_with_parent
from .decode import DECODE_VERSION, decode_chunk
from .folders import scan_folder


@dataclass
class CachedImages:
    """One folder's images decoded at one size. Rows of unreadable files are zero and left out of `valid`."""

    root: Path
    classes: list[str]
    files: list[Path]
    labels: np.ndarray  # (N,) int64, for every file
    pixels: np.ndarray  # (N, S, S, 3) uint8, memory-mapped read-only
    errors: dict[int, str] = field(default_factory=dict)  # row -> why the file could not be read
    cache_file: Path | None = None  # the .npy the pixels are mapped from (what derived facts are stored beside)

    @property
    def valid(self) -> np.ndarray:
        ok = np.ones(len(self.files), dtype=bool)
        ok[list(self.errors)] = False
        return np.flatnonzero(ok)

    @property
    def image_size(self) -> int:
        return int(self.pixels.shape[1])

    def bad_file_report(self) -> str:
        return "".join(f"{printable(self.files[i])}\t{msg}\n" for i, msg in sorted(self.errors.items()))


def cache_key(files: list[Path], image_size: int, decoder: str = "pil", crop: float = 0.0,
              interpolation: str = "bilinear") -> str:
    tag = "" if decoder == "pil" else f":{decoder}"  # another decoder's pixels differ slightly: its own cache
    if crop or interpolation != "bilinear":  # the plain squash keeps the key it always had
        tag += f":crop{crop:g}:{interpolation}"
    if heif_readable(files):  # HEIC photos that were unreadable before pillow-heif was installed are read now
        tag += ":heif"
    h = hashlib.sha256(f"cnnlab-decode-v{DECODE_VERSION}:{image_size}{tag}\n".encode())
    for p in files:
        try:
            st = p.stat()
        except FileNotFoundError:  # a dangling link: keyed by the link itself, and reported as unreadable
            st = p.lstat()
        h.update(os.fsencode(p.resolve()) + f"\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()[:24]


HEIF_SUFFIXES = (".heic", ".heif", ".hif", ".avif")


def heif_readable(files: list[Path]) -> bool:
    """Whether some files are HEIC/HEIF (by name) and pillow-heif is installed to read them: part of the cache key,
    so installing it after a first run decodes those photos instead of keeping them as unreadable."""
    import importlib.util

    return any(p.suffix.lower() in HEIF_SUFFIXES for p in files) and importlib.util.find_spec("pillow_heif") is not None


def load_images(folder: str | Path, image_size: int, cache_dir: str | Path, workers: int = 0,
                progress: bool = True, decode_device: torch.device | None = None, crop: float = 0.0,
                interpolation: str = "bilinear", log: Callable[[str], None] = print) -> CachedImages:
    """Decode `folder/<class>/*` at `image_size` into the cache (once), then map it read-only. `crop` and
    `interpolation` are the decode geometry of `Preprocess` (0: the whole image squashed to a square).
    Decoding runs in `workers` PIL processes, or, given `decode_device`, with torchvision's decoder on that
    device (nvJPEG on CUDA) in batches. A complete cache is read without the lock, so a read-only cache folder
    serves; a new cache replaces the one it supersedes (same folder and geometry, older files)."""
    folder = Path(folder)
    classes, files, labels = scan_folder(folder)
    cache_dir = Path(cache_dir)
    decoder = "pil" if decode_device is None else ("nvjpeg" if decode_device.type == "cuda" else "torchvision-cpu")
    geometry = (image_size, crop, interpolation)
    key = cache_key(files, image_size, decoder, crop, interpolation)
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    shape = (len(files), image_size, image_size, 3)
    if npy.exists() and meta.exists():  # complete: the .npy is renamed into place only after its .json is written
        try:
            pixels, errors = _open_cache(npy, meta, shape)
            return CachedImages(folder, classes, files, labels, pixels, errors, npy)
        except (ValueError, KeyError, FileNotFoundError):  # damaged (or replaced meanwhile): see below, under the lock
            pass
    cache_dir.mkdir(parents=True, exist_ok=True)
    # One builder at a time per key: sweep workers that start together wait for the first one's cache.
    with open(cache_dir / f"{key}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is building the image cache of {folder} ({cache_dir})")
            fcntl.flock(lock, fcntl.LOCK_EX)
        if not (npy.exists() and meta.exists()):
            _build(files, geometry, npy, meta, folder, workers, progress, decode_device, decoder, lock.fileno())
            remove_superseded(cache_dir, key, log)
        try:
            pixels, errors = _open_cache(npy, meta, shape)
        except (ValueError, KeyError, FileNotFoundError):  # damaged on disk: decode again, once (another OSError,
            # such as too many open files or no memory for the map, says nothing against the cache: it propagates)
            npy.unlink(missing_ok=True)
            _build(files, geometry, npy, meta, folder, workers, progress, decode_device, decoder, lock.fileno())
            pixels, errors = _open_cache(npy, meta, shape)
    return CachedImages(folder, classes, files, labels, pixels, errors, npy)


SAME_CACHE_FOR = ("folder", "image_size", "crop", "interpolation", "decoder")  # what a newer cache supersedes


def remove_superseded(cache_dir: Path, key: str, log: Callable[[str], None] = print) -> int:
    """Remove the caches that the new cache `key` replaces: the same folder decoded with the same geometry and
    decoder, keyed by files as they were before (a touch, a chmod, an edited photo). Without this each change of
    the folder left a full-size cache behind for good. A cache whose lock another process holds is left alone
    (it is being built); one mapped by a running process stays readable to it until it ends (Linux unlinks
    lazily). Returns the bytes freed."""
    try:
        mine = json.loads((cache_dir / f"{key}.json").read_text())
    except (OSError, ValueError):
        return 0
    freed = 0
    for other in cache_dir.glob("*.json"):
        if other.stem == key:
            continue
        try:
            theirs = json.loads(other.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(theirs, dict) or any(theirs.get(k) != mine.get(k) for k in SAME_CACHE_FOR):
            continue
        try:
            with open(other.with_suffix(".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                for path in (other.with_suffix(".npy"), other.with_suffix(".partial.npy"), other):
                    if path.exists():
                        freed += path.stat().st_size
                        path.unlink()
                other.with_suffix(".lock").unlink(missing_ok=True)
        except OSError:  # held by a builder, or not ours to remove: kept
            continue
    if freed:
        log(f"removed {human_size(freed)} of older image caches of {mine['folder']} (superseded by this one)")
    return freed


def _open_cache(npy: Path, meta: Path, shape: tuple[int, ...]) -> tuple[np.ndarray, dict[int, str]]:
    pixels = np.load(npy, mmap_mode="r")
    errors = {int(k): v for k, v in json.loads(meta.read_text())["errors"].items()}
    if pixels.shape != shape:
        raise ValueError(f"shape {pixels.shape}")
    return pixels, errors


def _build(files: list[Path], geometry: tuple[int, float, str], npy: Path, meta: Path, folder: Path, workers: int, progress: bool,
           decode_device: torch.device | None, decoder: str, lock_fd: int | None = None) -> None:
    size = geometry[0]
    partial = npy.with_suffix(".partial.npy")  # one per key: a build killed with -9 leaves it, the next reuses it
    out = new_mapped_array(partial, np.uint8, (len(files), size, size, 3), f"the image cache of {folder} at {size}px")
    try:
        _fill(files, geometry, out, partial, npy, meta, folder, workers, progress, decode_device, decoder, lock_fd)
    except BaseException:  # Ctrl-C, SIGTERM, a dead worker, a full disk: no full-size leftover on the disk
        partial.unlink(missing_ok=True)
        raise


def _fill(files: list[Path], geometry: tuple[int, float, str], out: np.ndarray, partial: Path, npy: Path, meta: Path,
          folder: Path, workers: int, progress: bool, decode_device: torch.device | None, decoder: str,
          lock_fd: int | None) -> None:
    from tqdm.auto import tqdm

    size = geometry[0]
    start = time.perf_counter()
    bar = tqdm(total=len(files), desc=f"decoding {folder.name}/ at {size}px ({decoder})", unit="img",
               disable=not progress, dynamic_ncols=True)
    if decode_device is not None:
        from .decode_gpu import decode_into

        with bar:
            errors = decode_into(files, geometry, out, decode_device, on_progress=bar.update)
        out.flush()
        del out
    else:
        del out  # workers write through their own maps; rows of unreadable files stay zero
        errors = _decode_with_workers(files, geometry, partial, workers, bar, lock_fd)
    seconds = time.perf_counter() - start
    atomic_write_json(meta, {"folder": str(folder.resolve()), "image_size": size, "crop": geometry[1],
                             "interpolation": geometry[2], "count": len(files),
                             "decoder": decoder, "errors": {str(k): v for k, v in sorted(errors.items())},
                             "build_seconds": round(seconds, 2),
                             "images_per_s": round(len(files) / max(seconds, 1e-9), 1)})
    os.replace(partial, npy)  # the .npy appears only when complete: a killed build is redone, never half-read


def _decode_with_workers(files: list[Path], geometry: tuple[int, float, str], partial: Path, workers: int, bar,
                         lock_fd: int | None = None) -> dict[int, str]:
    cores = os.cpu_count() or 1
    workers = min(workers or cores, cores)  # more processes than cores only cost memory
    chunk = max(1, min(64, math.ceil(len(files) / (workers * 8))))
    jobs = [(str(partial), list(range(i, min(i + chunk, len(files)))), [str(p) for p in files[i:i + chunk]], *geometry)
            for i in range(0, len(files), chunk)]
    errors: dict[int, str] = {}

    def take(chunk_results: list[tuple[int, str | None]]) -> None:
        errors.update({row: err for row, err in chunk_results if err is not None})
        bar.update(len(chunk_results))

    try:
        if workers == 1 or len(files) < 64:
            for job in jobs:
                take(decode_chunk(job))
        else:
            _decode_in_processes(jobs, workers, take, lock_fd)
    finally:
        bar.close()
    return errors


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


def _decode_in_processes(jobs: list[tuple], workers: int, take: Any, lock_fd: int | None) -> None:
    """A pool whose death is noticed: a worker killed (OOM killer, kill -9) breaks the pool at once, and the
    run stops with one line instead of waiting forever; on any exit (Ctrl-C included) the workers are ended,
    so none of them keeps the cache's lock. Fork on Linux: workers start at once and only run
    cnnlab.data.decode (numpy, PIL), never torch."""
    import psutil

    before = {c.pid for c in psutil.Process().children()}
    method = "fork" if sys.platform == "linux" else "spawn"
    pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker,
                               initargs=(lock_fd, os.getpid()))
    # Workers are forked by the first submit; with SIGINT blocked meanwhile, a Ctrl-C in that instant waits in the
    # parent (raised once unblocked) instead of reaching a worker before its initializer ignores it. SIGTERM and
    # SIGHUP too: their handler's exception, raised inside an at-fork hook (logging's), was swallowed ('Exception
    # ignored') and the run went on. What unblocking raises lands inside the outer try, whose finally ends the workers.
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            futures = [pool.submit(decode_chunk, job) for job in jobs]
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        for future in as_completed(futures):
            take(future.result())
    except BrokenProcessPool:
        raise DataError("a decode worker died (killed, or out of memory) while the image cache was built: run again "
                        "(decoding restarts from the beginning), with --decode_workers 1 if memory is short") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for child in psutil.Process().children():
            if child.pid not in before:
                child.kill()


def _init_worker(lock_fd: int | None, parent: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent alone answers it
    for signum in (signal.SIGTERM, signal.SIGHUP):  # the parent's handlers (raise in Python) are not a worker's
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # forked with them blocked (none is pending here)
    end_with_parent(parent)
    if lock_fd is not None:  # the forked copy of the cache lock's descriptor would keep the lock held
        os.close(lock_fd)


def write_bad_file_report(path: str | Path, *image_sets: CachedImages) -> int:
    report = "".join(s.bad_file_report() for s in image_sets)
    count = sum(len(s.errors) for s in image_sets)
    if count:
        atomic_write_text(path, report)
    return count
