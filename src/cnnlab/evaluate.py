"""`evaluate` and `predict_logits`, written once: training's validation, `cnnlab evaluate`, `predict` and
`explain` all use them (model.eval(), torch.inference_mode(), the training's preprocessing)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .data import Preprocess, to_model_input
from .hardware import autocast


@torch.inference_mode()
def predict_logits(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], pre: Preprocess,
                   device: torch.device, amp: torch.dtype | None = None, channels_last: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as float32 on the CPU, labels) for every batch, in order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        with autocast(device, amp):
            out = model(to_model_input(x, pre, None, channels_last))
        logits.append(out.float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], pre: Preprocess,
             device: torch.device, amp: torch.dtype | None = None, channels_last: bool = True,
             loss_fn: nn.Module | None = None) -> dict[str, float]:
    """Mean loss and accuracy (a fraction) over `batches`."""
    logits, labels = predict_logits(model, batches, pre, device, amp, channels_last)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    return {"loss": float(loss_fn(logits, labels)), "acc": float((logits.argmax(1) == labels).float().mean())}
