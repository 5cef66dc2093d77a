"""Hyperparameter sweeps: a Weights & Biases sweep file (`schema`) run by Optuna (`engine`) on a journal file or
an RDB (`storage`), in one or several processes (`workers`), then analysed offline (`report`)."""

from typing import Any

from .. import lazy_attribute

__all__ = ["SweepResult", "open_study", "recover_orphans", "run_sweep", "suggest", "Param", "Sweep", "SweepError",
           "load_sweep", "parse_sweep", "make_storage", "mask", "WorkerJob", "launch_workers"]

_HOME = {**{name: "engine" for name in ("SweepResult", "open_study", "recover_orphans", "run_sweep")},
         "suggest": "space",
         **{name: "schema" for name in ("Param", "Sweep", "SweepError", "load_sweep", "parse_sweep")},
         **{name: "storage" for name in ("make_storage", "mask")},
         **{name: "workers" for name in ("WorkerJob", "launch_workers")}}


def __getattr__(name: str) -> Any:
    """The names above, imported on first use: the CLI reads a sweep file (schema) without Optuna or torch."""
    return lazy_attribute(__name__, _HOME, name)
