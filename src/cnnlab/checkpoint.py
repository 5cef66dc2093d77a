"""Run checkpoints: what a run folder's best.pt and last.pt hold, written by training and read by resume,
evaluate, predict, explain and the feature store. Plain tensors, numbers and strings only, so
`torch.load(weights_only=True)` reads them and never runs pickled code."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .config import Config
from .errors import CnnlabError
from .io import atomic_torch_save
from .preprocess import Preprocess


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict's names, dtypes, shapes and bytes: stored in every checkpoint and checked on every
    load, since torch.load does not notice overwritten bytes inside a tensor (it loaded them and predicted nan%)."""
    h = hashlib.sha256()
    for name, tensor in weights.items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def make_checkpoint(model: nn.Module, cfg: Config, classes: list[str], pre: Preprocess, epoch: int,
                    history: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    weights = model.state_dict()
    return {"model": weights, "weights_sha256": weights_digest(weights), "config": cfg.to_dict(), "classes": classes,
            "preprocess": pre.to_dict(), "epoch": epoch, "history": history, "cnnlab_version": __version__, **extra}


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    atomic_torch_save(state, path)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a cnnlab checkpoint without executing pickled code (weights_only=True)."""
    return read_checkpoint(path, device)[0]


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, Any], str]:
    """(the checkpoint, the SHA-256 of the very bytes it was read from). The file is read once, so the digest names
    the weights that were loaded even when training replaces the file in the meantime (its atomic rename)."""
    path = Path(path)
    if not path.is_file():
        raise CnnlabError(f"checkpoint {path} not found: expected runs/<name>/best.pt or last.pt")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001 - PyTorch's own message advises weights_only=False: never repeat that
        raise CnnlabError(f"{path} is not a cnnlab checkpoint ({type(e).__name__} while reading it safely): expected "
                          f"runs/<name>/best.pt or last.pt, or the run folder itself") from None
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise CnnlabError(f"{path} is not a cnnlab checkpoint (no config/model inside)")
    damaged = f"{path} is damaged: its weights "
    fix = "(changed or corrupted on the disk after training wrote it): restore a copy, or train again"
    if "weights_sha256" in state:
        if weights_digest(state["model"]) != state["weights_sha256"]:
            raise CnnlabError(damaged + "do not match the checksum written with them " + fix)
    else:  # written before checkpoints carried a checksum: at least no NaN or infinity slipped in
        bad = next((k for k, t in state["model"].items() if t.is_floating_point() and not torch.isfinite(t).all()), None)
        if bad is not None:
            raise CnnlabError(damaged + f"hold NaN or infinite values ({bad}) " + fix)
    return state, digest
