"""Writing files so that a crash never leaves one half-written: write a temp file beside, then rename."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

from .errors import CnnlabError, StorageError


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """`write(file_object)` into a temp file beside `path`, synced, then renamed over it. On a full disk or any
    other I/O error, one StorageError naming the file; the previous `path`, if any, is left as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; results are shared like any other tool's files
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        kept = f"the previous {path.name} is kept" if path.exists() else "nothing was written"
        raise StorageError(f"could not write {path} ({e.strerror or e}); {kept}: free some disk space or check the "
                           "folder's permissions, then run again") from None


def _umask() -> int:
    """The process's umask (reading it means setting it: set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8, with the bytes of a file name that is not UTF-8 (a Latin-1 name) written back as they were."""
    data = text.encode("utf-8", "surrogateescape")
    atomic_write(path, lambda fh: fh.write(data), "wb")


def printable(path: str | Path) -> str:
    """A path for a one-line-per-file report: a newline, tab or other control character in a file name is
    written as its escape (\\n), so the name stays on its line."""
    text = str(path)
    if not any(ord(c) < 32 or ord(c) == 127 for c in text):
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or ord(c) == 127 else c for c in text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    buffer = io.BytesIO()  # serialised first: torch's zip writer turns a failed write (disk full) into an
    torch.save(obj, buffer)  # opaque RuntimeError; a plain write of the bytes keeps the OSError and its reason
    atomic_write(path, lambda fh: fh.write(buffer.getbuffer()), "wb")


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """One JSON line, flushed and synced. A write that fails (a full disk) is cut back off, so the file ends as it
    was; a torn last line that a kill left (no newline) is ended first, so the new line never joins it: the torn
    one is then one unreadable line that `read_jsonl` counts and skips, never glued to a good one."""
    line = (json.dumps(record) + "\n").encode("utf-8", "surrogateescape")
    append_whole(path, b"\n" + line if _ends_torn(path) else line, "the lines before are kept")


def append_whole(path: str | Path, data: bytes, kept: str) -> None:
    """`data` appended to `path`, flushed and synced, whole or not at all: a write that fails (a full disk) is cut
    back off, so the file ends as it was, and is one StorageError naming the file and what is `kept`."""
    size = None
    try:
        with open(path, "ab") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as e:
        if size is not None:
            with contextlib.suppress(OSError):
                os.truncate(path, size)  # the part that made it to the disk: gone again
        raise StorageError(f"could not append to {path} ({e.strerror or e}); {kept}: free some disk space or check "
                           "the folder's permissions, then run the same command again") from None


def _ends_torn(path: str | Path) -> bool:
    """Whether the file's last line lacks its newline (a kill in the middle of an append)."""
    try:
        with open(path, "rb") as fh:
            if not fh.seek(0, os.SEEK_END):
                return False
            fh.seek(-1, os.SEEK_END)
            return fh.read(1) != b"\n"
    except FileNotFoundError:
        return False


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file, in order. A line that is not one (torn by a kill, garbled bytes, a
    `null`) is skipped, never the end of the reading: the good lines after it still count (`jsonl_lines` says how
    many were bad)."""
    return jsonl_lines(path)[0]


def jsonl_lines(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(the readable JSON objects, how many non-empty lines were not one)."""
    p = Path(path)
    if not p.is_file():
        return [], 0
    records, bad = [], 0
    for raw in p.read_bytes().split(b"\n"):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def sha256_of(path: str | Path) -> str:
    """The SHA-256 of a file, read a megabyte at a time (archives, weights files, checkpoints)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def human_size(n: float) -> str:
    """Bytes as a person reads them: GB from 1 GB up, else MB (a 0.35 MB shortfall is not '0.00 GB')."""
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e9 else f"{n / 1e6:.2f} MB"


def check_free_space(folder: Path, needed: int, what: str, replaces: Path | None = None) -> None:
    """Refuse, before writing anything, to start a file that the disk cannot hold; the space of `replaces`, a file
    the new one will overwrite (a build killed earlier left it), counts as free."""
    free = shutil.disk_usage(folder).free
    reclaimable = replaces.stat().st_size if replaces is not None and replaces.is_file() else 0
    if needed > free + reclaimable:
        kept = f" (counting the {human_size(reclaimable)} of {replaces.name}, which it replaces)" if reclaimable else ""
        raise StorageError(f"{what} needs {human_size(needed)} in {folder}, which has {human_size(free + reclaimable)} "
                           f"free{kept}: free some space, or choose another --cache_dir (or $CNNLAB_CACHE)")


def new_mapped_array(path: Path, dtype: Any, shape: tuple[int, ...], what: str) -> Any:
    """A new `.npy` file at `path`, memory-mapped for writing, with its blocks allocated now. Writing into a sparse
    map on a disk that fills up meanwhile kills the process with SIGBUS; here the space is checked and taken
    before any work, and a disk that cannot give it is one StorageError naming `what` (nothing is left behind)."""
    import numpy as np

    check_free_space(path.parent, int(np.prod(shape)) * np.dtype(dtype).itemsize, what, replaces=path)
    try:
        out = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, path.stat().st_size)
        finally:
            os.close(fd)
    except OSError as e:
        path.unlink(missing_ok=True)
        raise StorageError(f"{what} could not be allocated in {path.parent} ({e.strerror}): free some space, or "
                           "choose another --cache_dir (or $CNNLAB_CACHE)") from None
    return out


class FolderClaim:
    """This process's exclusive claim on a folder it writes into (a run folder, an assignment's --out): a lock
    file held with flock for as long as the work goes on. A second process that wants the same folder is refused
    at once, before it writes anything, instead of interleaving its files with the first one's; the kernel drops
    the lock when the process ends, however it ends (a kill -9 leaves no stale claim to clean up)."""

    NAME = ".cnnlab.lock"

    def __init__(self, folder: str | Path, what: str, fix: str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.folder / self.NAME, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.seek(0)
            holder = self._fh.read().strip() or "?"
            self._fh.close()
            raise CnnlabError(f"{self.folder} is in use by another cnnlab process (pid {holder}) writing {what}: "
                              f"wait for it to end, or {fix}") from None
        try:
            self._fh.seek(0)
            self._fh.truncate()
            self._fh.write(f"{os.getpid()}\n")
            self._fh.flush()
        except OSError as e:
            with contextlib.suppress(OSError):  # closing flushes the same bytes again
                self._fh.close()
            raise StorageError(f"could not write {self.folder / self.NAME} ({e.strerror or e}); nothing else was written: "
                               "free some disk space or check the folder's permissions, then run again") from None

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()  # closing the descriptor drops the flock

    def __enter__(self) -> "FolderClaim":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def atomic_write_csv(path: str | Path, rows: Iterable[Iterable[Any]]) -> None:
    """A CSV file of `rows` (the head first), written whole or not at all (`atomic_write_text`)."""
    import csv

    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    atomic_write_text(path, buffer.getvalue())


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(text: str) -> str:
    """A CSV cell that a spreadsheet shows as text: one that begins like a formula (=, +, -, @; class and file
    names come from folder names) gets a leading apostrophe, as OWASP's CSV-injection advice has it."""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def from_spreadsheet_cell(text: str) -> str:
    """What `spreadsheet_cell` wrote, as it was."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) else text
