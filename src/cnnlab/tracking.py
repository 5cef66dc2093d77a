"""Optional Weights & Biases logging. The local run folder is always written and is the source of
truth; wandb gets the same config and per-epoch metrics when `--wandb offline|online`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .config import Config
from .errors import ConfigError


class Tracker:
    def __init__(self, cfg: Config, run_dir: Path, group: str | None = None, log: Callable[[str], None] = print):
        self.run = None
        if cfg.wandb == "off":
            return
        try:
            import wandb
        except ImportError:
            raise ConfigError("wandb=%s needs the wandb package: pip install wandb (or --wandb off)" % cfg.wandb) from None
        self.run = wandb.init(project=cfg.wandb_project, name=run_dir.name, group=group, mode=cfg.wandb,
                              dir=str(run_dir), config=cfg.to_dict(), reinit="create_new")
        log(f"wandb {cfg.wandb}: {self.run.dir}")

    def log(self, record: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(record, step=int(record["epoch"]))

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
