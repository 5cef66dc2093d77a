"""The options every command shares: where the work runs (device), where decoded images are cached, whether
progress bars are drawn, where messages go and where a sweep's study lives. They are declared once for the
parser (`common_flags`, used as argparse parents) and read once into a `Common` at the entry point, CLI or Python,
which is carried whole to every step, so a value given once reaches each one."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, fields
from typing import Any, Callable

Log = Callable[[str], None]

DEVICE_HELP = "auto (cuda when present, else cpu), cpu, cuda, cuda:N or mps [default: auto]"
CACHE_HELP = "where decoded images are cached [default: $CNNLAB_CACHE or ~/.cache/cnnlab]"
QUIET_HELP = "no progress bars (they are drawn on a terminal only; a redirected run writes a line per step instead)"
STORAGE_HELP = ("Optuna RDB URL of the sweep's study, shared by many machines, or set $CNNLAB_STORAGE (keeps a "
                "password out of `ps`) [default: a journal file in the sweep folder]")


def silent(message: str) -> None:
    """A log that drops every message (log=None)."""


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (a notebook, JupyterLab, Colab): its IPython shell has a kernel.
    A process that merely imported ipykernel (a test runner driving a notebook in another process) is not one."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None
    return shell is not None and getattr(shell, "kernel", None) is not None


def progress_bars(progress: bool | None) -> bool:
    """The one rule for progress bars: as asked, else on a terminal or in a notebook, never into a file a
    script's output is redirected to."""
    if progress is not None:
        return progress
    return in_notebook() or (sys.stderr is not None and sys.stderr.isatty())


@dataclass(frozen=True)
class Common:
    device: str = "auto"
    cache_dir: str | None = None  # None: $CNNLAB_CACHE, else ~/.cache/cnnlab
    progress: bool | None = None  # None: `progress_bars`' rule
    log: Log | None = print  # None: silent
    storage: str | None = None  # None: $CNNLAB_STORAGE, else a journal file in the sweep folder
    wandb: str | None = None  # the tracker of every run the work trains: None, the config's own (auto)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Common:
        """From the flags `common_flags` declared (a command without one of them gets its default)."""
        return cls(device=getattr(args, "device", None) or "auto", cache_dir=getattr(args, "cache_dir", None) or None,
                   progress=False if getattr(args, "quiet", False) else None, storage=getattr(args, "storage", None),
                   wandb=getattr(args, "wandb", None))

    @property
    def bars(self) -> bool:
        return progress_bars(self.progress)

    @property
    def say(self) -> Log:
        return self.log or silent

    def config_values(self) -> dict[str, Any]:
        """The config keys it sets for a training run, only those given (a run's own config keeps the others)."""
        given = (("device", self.device), ("cache_dir", self.cache_dir), ("wandb", self.wandb))
        return {k: v for k, v in given if v and v != "auto"}

    def keywords(self) -> dict[str, Any]:
        """All of it, as the keywords of the Python API's entry points (`cnnlab.assignment(..., **keywords)`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def for_model(self) -> dict[str, Any]:
        """Keywords of `Run.evaluate` and the steps like it: the same device, cache, bars and log."""
        return {"device": self.device, "cache_dir": self.cache_dir, "progress": self.progress, "log": self.log}


def common_flags(*names: str) -> argparse.ArgumentParser:
    """A parent parser declaring the shared flags `names` (device, cache_dir, quiet, storage, wandb), each in one
    place (--wandb as the config declares it)."""
    from .config import FIELDS

    parent = argparse.ArgumentParser(add_help=False)
    tracker = FIELDS["wandb"]
    declare = {"device": lambda: parent.add_argument("--device", default="auto", help=DEVICE_HELP),
               "cache_dir": lambda: parent.add_argument("--cache_dir", default="", help=CACHE_HELP),
               "quiet": lambda: parent.add_argument("--quiet", action="store_true", help=QUIET_HELP),
               "storage": lambda: parent.add_argument("--storage", help=STORAGE_HELP),
               "wandb": lambda: parent.add_argument("--wandb", choices=tracker.metadata["choices"],
                                                    help=tracker.metadata["help"] + " [default: auto]")}
    for name in names:
        declare[name]()
    return parent
