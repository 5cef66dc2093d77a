"""What building a model returns: the module, plus the facts about it that training, the feature store,
evaluation and checkpoints need, as data rather than attributes glued onto the module."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..preprocess import Preprocess


@dataclass
class ModelParts:
    module: nn.Module
    head: str  # qualified name of the layer that produces the logits (what `--finetune head` trains)
    preprocess: Preprocess  # input size, mean and std the weights expect (ImageNet's for a scratch model)

    def head_module(self) -> nn.Module:
        return self.module.get_submodule(self.head)
