"""What trains: the network cut into stem + stages, and the plan that freezes and unfreezes them per
`cfg.finetune` (head, partial, gradual, full) and gives the optimiser its parameter groups."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError
from .parts import ModelParts
from .registry import family_of

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def stages(model_name: str, model: nn.Module, head: nn.Module) -> list[list[nn.Module]]:
    """The body from input to output as [stem, stage 1, stage 2, ...], the head excluded, as its family cuts it."""
    return family_of(model_name).stages(model, head)


class TrainablePlan:
    """What trains, epoch by epoch, for `cfg.finetune`:
    none/full: everything; head: only the new head; partial: all but the stem and first k stages;
    gradual: the head first, then one more stage (from the top) every `unfreeze_every` epochs.
    Frozen batch-norm layers are kept in eval mode so their running statistics do not drift."""

    def __init__(self, parts: ModelParts, cfg: Config):
        model = parts.module
        self.model, self.cfg = model, cfg
        self.mode = cfg.finetune
        self.head = parts.head_module() if self.mode != "none" else None
        self.stages = stages(cfg.model, model, self.head) if self.mode in ("partial", "gradual") else []
        if self.mode == "partial" and cfg.freeze_stages >= len(self.stages):
            raise ConfigError(f"freeze_stages={cfg.freeze_stages}: {cfg.model} has a stem and "
                              f"{len(self.stages) - 1} stages, so at most {len(self.stages) - 1}")
        self._frozen_bn: list[nn.Module] = []
        model.register_forward_pre_hook(self._keep_frozen_bn_in_eval)
        self._apply(self._frozen_params(epoch=1))

    def _frozen_params(self, epoch: int) -> set[int]:
        params = {id(p) for p in self.model.parameters()}
        if self.mode in ("none", "full"):
            return set()
        head = {id(p) for p in self.head.parameters()}
        if self.mode == "head":  # everything else, loose root parameters (ViT's class token) included
            return params - head
        def ids(stage_list: list[list[nn.Module]]) -> set[int]:
            return {id(p) for stage in stage_list for m in stage for p in m.parameters()}
        if self.mode == "partial":
            return ids(self.stages[:self.cfg.freeze_stages + 1])
        # gradual: stages open from the top; parameters outside every stage and the head (final norms,
        # position embeddings) stay frozen until the whole body is open
        opened = (epoch - 1) // self.cfg.unfreeze_every
        keep_frozen = max(0, len(self.stages) - opened)
        loose = params - head - ids(self.stages)
        return ids(self.stages[:keep_frozen]) | (loose if keep_frozen else set())

    def _apply(self, frozen: set[int]) -> None:
        for p in self.model.parameters():
            p.requires_grad_(id(p) not in frozen)
        self._frozen_bn = [m for m in self.model.modules() if isinstance(m, BATCH_NORMS)
                           and m.weight is not None and not m.weight.requires_grad]

    def _keep_frozen_bn_in_eval(self, module: nn.Module, args: Any) -> None:
        for bn in self._frozen_bn:
            bn.eval()

    def param_groups(self) -> list[dict[str, Any]]:
        params = list(self.model.parameters()) if self.mode == "gradual" else \
            [p for p in self.model.parameters() if p.requires_grad]
        if self.mode in ("none",) or not self.cfg.lr_backbone or self.head is None:
            return [{"params": params, "lr": self.cfg.lr}]
        head_ids = {id(p) for p in self.head.parameters()}
        backbone = [p for p in params if id(p) not in head_ids]
        head = [p for p in params if id(p) in head_ids]
        return [g for g in ({"params": backbone, "lr": self.cfg.lr_backbone}, {"params": head, "lr": self.cfg.lr})
                if g["params"]]

    def head_only(self, epoch: int) -> bool:
        """Whether only the head trains in this epoch (so a feature store of the head's input serves)."""
        if self.mode == "head":
            return True
        return self.mode == "gradual" and (epoch - 1) // self.cfg.unfreeze_every == 0

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def on_epoch_start(self, epoch: int, optimizer: torch.optim.Optimizer, log: Callable[[str], None]) -> None:
        if self.mode != "gradual":
            return
        before = self.trainable_count()
        self._apply(self._frozen_params(epoch))
        if self.trainable_count() != before:
            log(f"gradual unfreezing: {self.trainable_count():,} trainable parameters from epoch {epoch}")
