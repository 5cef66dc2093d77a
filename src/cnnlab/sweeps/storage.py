"""Where a study lives: a journal file in the sweep folder by default (safe for many local processes), or any
Optuna RDB URL (`--storage postgresql://...`) so processes on many machines share one study."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any

from ..errors import CnnlabError
from ..io import append_whole

JOURNAL = "journal.log"  # a sweep folder's study, when no RDB URL is given
STORAGE_VARIABLE = "CNNLAB_STORAGE"  # an RDB URL in the environment keeps its password out of `ps`


def storage_url(url: str | None) -> str | None:
    """The storage a sweep uses: the URL given, else $CNNLAB_STORAGE, else None (a journal file in its folder). The
    one place this is decided, so the CLI, the Python API and worker processes share a study the same way."""
    return url or os.environ.get(STORAGE_VARIABLE) or None


def make_storage(url: str | None, folder: Path):
    import optuna

    url = storage_url(url)
    if not url:

        return optuna.storages.JournalStorage(journal_file(folder / JOURNAL))
    for attempt in range(5):
        try:
            with warnings.catch_warnings():  # the heartbeat API is marked experimental in Optuna
                warnings.simplefilter("ignore")
                return optuna.storages.RDBStorage(
                    url, heartbeat_interval=30, grace_period=120,
                    heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
                    engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
        except Exception as e:  # noqa: BLE001 - bad URL, server down, missing driver
            # two processes creating the tables at once: one loses the race, and simply opens them after
            if attempt < 4 and type(e).__name__ in ("IntegrityError", "OperationalError", "ProgrammingError"):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise CnnlabError(f"cannot open storage {mask(url)}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")


def mask(url: str) -> str:
    """The URL with its password replaced by ***, for every output."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def journal_file(path: Path) -> Any:
    """Optuna's journal file, made safe against a full disk (`SafeJournalFile`)."""
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    class SafeJournalFile(JournalFileBackend):
        """Optuna's journal file, whose appends cannot tear it. Each append first cuts off a torn last line that a
        kill or a full disk left behind (kept aside in journal.log.torn), then writes; a write that fails is cut back
        off and raised as one StorageError, so the journal always ends on a whole line. Optuna's own append adds to
        a torn line, and the glued line then ends every later read in a JSONDecodeError: the sweep was lost."""

        def __init__(self, path: Path) -> None:
            self.path, self.lock = Path(path), JournalFileOpenLock(str(path))
            super().__init__(str(path), lock_obj=self.lock)

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs).encode("utf-8")
            self.lock.acquire()
            try:
                repair_torn_tail(self.path)
                append_whole(self.path, data, "the sweep's trials so far are kept in its journal")
            finally:
                self.lock.release()

    return SafeJournalFile(path)


def repair_torn_tail(path: Path) -> None:
    """Cut a journal back to its last whole line (the torn bytes appended to `path`.torn, for the record). A
    journal's lines are whole records, so nothing before the last newline is touched."""
    if not path.exists() or not path.stat().st_size:
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        end = size
        while end > 0:  # back to the last newline, a block at a time
            start = max(0, end - 65536)
            f.seek(start)
            block = f.read(end - start)
            if start + len(block) == size and block.endswith(b"\n"):
                return
            newline = block.rfind(b"\n")
            if newline >= 0:
                end = start + newline + 1
                break
            end = start
        f.seek(end)
        torn = f.read()
        with contextlib.suppress(OSError):
            with open(path.with_name(path.name + ".torn"), "ab") as kept:
                kept.write(torn + b"\n")
        f.truncate(end)
