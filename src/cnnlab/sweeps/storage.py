"""Where a study lives: a journal file in the sweep folder by default (safe for many local processes), or any
Optuna RDB URL (`--storage postgresql://...`) so processes on many machines share one study."""

from __future__ import annotations

import os
import re
import time
import warnings
from pathlib import Path

from ..errors import CnnlabError

STORAGE_VARIABLE = "CNNLAB_STORAGE"  # an RDB URL in the environment keeps its password out of `ps`


def storage_url(url: str | None) -> str | None:
    """The storage a sweep uses: the URL given, else $CNNLAB_STORAGE, else None (a journal file in its folder). The
    one place this is decided, so the CLI, the Python API and worker processes share a study the same way."""
    return url or os.environ.get(STORAGE_VARIABLE) or None


def make_storage(url: str | None, folder: Path):
    import optuna

    url = storage_url(url)
    if not url:
        from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

        path = folder / "journal.log"
        return optuna.storages.JournalStorage(JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path))))
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
