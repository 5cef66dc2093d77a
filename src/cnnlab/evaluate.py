"""`evaluate` and `predict_logits`, written once: training's validation, `cnnlab evaluate`, `predict` and
`explain` all use them (model.eval(), torch.inference_mode(), the training's preprocessing)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .data import BatchPrep
from .hardware import autocast


@torch.inference_mode()
def predict_logits(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], prep: BatchPrep,
                   device: torch.device, amp: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as float32 on the CPU, labels) for every batch, in order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        with autocast(device, amp):
            out = model(prep(x))
        logits.append(out.float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], prep: BatchPrep,
             device: torch.device, amp: torch.dtype | None = None, loss_fn: nn.Module | None = None) -> dict[str, float]:
    """Mean loss and accuracy (a fraction) over `batches`."""
    logits, labels = predict_logits(model, batches, prep, device, amp)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    return {"loss": float(loss_fn(logits, labels)), "acc": float((logits.argmax(1) == labels).float().mean())}
