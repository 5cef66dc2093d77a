"""Hyperparameter sweeps: a Weights & Biases sweep file (`schema`) run by Optuna (`engine`) on a journal file or
an RDB (`storage`), in one or several processes (`workers`), then analysed offline (`report`)."""

from .engine import SweepResult, open_study, recover_orphans, run_sweep, suggest
from .schema import Param, Sweep, SweepError, load_sweep, parse_sweep
from .storage import make_storage, mask
from .workers import WorkerJob, launch_workers

__all__ = ["SweepResult", "open_study", "recover_orphans", "run_sweep", "suggest", "Param", "Sweep", "SweepError",
           "load_sweep", "parse_sweep", "make_storage", "mask", "WorkerJob", "launch_workers"]
