"""Run checkpoints: what a run folder's best.pt and last.pt hold, written by training and read by resume,
evaluate, predict, explain and the feature store. Plain tensors, numbers and strings only, so
`torch.load(weights_only=True)` reads them and never runs pickled code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import Config
from .errors import CnnlabError
from .io import atomic_torch_save
from .preprocess import Preprocess


def make_checkpoint(model: nn.Module, cfg: Config, classes: list[str], pre: Preprocess, epoch: int,
                    history: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"model": model.state_dict(), "config": cfg.to_dict(), "classes": classes, "preprocess": pre.to_dict(),
            "epoch": epoch, "history": history, "cnnlab_version": __version__, **extra}


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a cnnlab checkpoint without executing pickled code (weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"checkpoint {path} not found: expected runs/<name>/best.pt or last.pt")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - PyTorch's own message advises weights_only=False: never repeat that
        raise CnnlabError(f"{path} is not a cnnlab checkpoint ({type(e).__name__} while reading it safely): expected "
                          f"runs/<name>/best.pt or last.pt, or the run folder itself") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CnnlabError(f"{path} is not a cnnlab checkpoint (no config/model inside)")
    return state
