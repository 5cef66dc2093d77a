"""The model families cnnlab builds, registered in timm's manner: each says which model names are its, lists them,
checks a config that names one of them (its own rules, with `image_size=0` resolved to the model's own size), builds
one with its preprocessing and a new head, and cuts it into stages for fine-tuning. `family_of(name)` is the one
place a model name is told apart for these. (Code about the small CNN's own knobs, conv1_stride and its cost
formula, still asks `model == "smallcnn"` where it reads them: training's run name and saved stride, `info`, and
the report's Part A candidates.)"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from ..config import Config
from ..errors import ConfigError
from ..preprocess import Preprocess
from .from_timm import PREFIX as TIMM_PREFIX
from .from_timm import check_timm_name, create_timm, timm_names, timm_stages
from .parts import ModelParts
from .pretrained import create_pretrained, torchvision_names, torchvision_stages, torchvision_tail
from .smallcnn import SmallCNN, with_own_size

SMALLCNN_NAME = "smallcnn"


@dataclass(frozen=True)
class ModelFamily:
    name: str
    owns: Callable[[str], bool]  # whether a model name is one of this family's
    names: Callable[[], list[str]]  # every model name it builds
    check: Callable[[Config], Config]  # its rules for a config naming one of its models; image_size=0 resolved
    create: Callable[[Config, int], ModelParts]  # the model with an n-way head, and its preprocessing
    stages: Callable[[nn.Module, nn.Module], list[list[nn.Module]]]  # (model, head) -> [stem, stage 1, ...]
    pretrained: bool  # whether it has pretrained weights to start from (fine-tuning)
    # (model, the modules after a frozen stage) -> what trains on the feature store's features (None: it cannot
    # be cut there; a head alone always can)
    tail: Callable[[nn.Module, list[nn.Module]], nn.Module | None] = lambda model, after: None


def _check_smallcnn(cfg: Config) -> Config:
    if cfg.finetune != "none":
        raise ConfigError(f"finetune={cfg.finetune!r} needs a pretrained model (model=resnet50, timm/..., see "
                          "`cnnlab models`); smallcnn trains from scratch")
    if cfg.weights.lower() != "none":
        raise ConfigError(f"weights={cfg.weights!r}: smallcnn has no pretrained weights and trains from scratch; "
                          "drop --weights, or fine-tune a pretrained model (--model resnet50 --finetune head)")
    cfg = with_own_size(cfg)
    stride = cfg.first_stride()
    if cfg.image_size < 32 * stride:
        raise ConfigError(f"image_size={cfg.image_size}: the small CNN halves the image five times"
                          + (f" after a stride-{stride} first convolution" if stride > 1 else "")
                          + f", so it needs at least {32 * stride}")
    return cfg


def _create_smallcnn(cfg: Config, num_classes: int) -> ModelParts:
    model = SmallCNN.from_config(cfg, num_classes)
    return ModelParts(model, f"classifier.{len(model.classifier) - 1}", Preprocess(cfg.image_size))


def _check_pretrained(cfg: Config) -> Config:
    """A model with pretrained weights: what fine-tunes and from which weights must agree. image_size=0 is left
    to the weights' own preprocessing (their input size), known once they are."""
    if cfg.finetune == "none" and cfg.weights.lower() not in ("none", "random"):
        raise ConfigError(f"finetune=none trains from scratch, but weights={cfg.weights!r} is set: write "
                          "--finetune full to train every layer from those weights (or head, partial, gradual)")
    if cfg.finetune != "none" and cfg.weights.lower() == "none":
        raise ConfigError(f"finetune={cfg.finetune} needs pretrained weights (a frozen or fine-tuned random network "
                          "learns little): add --weights DEFAULT (or a weights file), or --finetune none to train "
                          "from scratch (--weights random freezes a random backbone on purpose)")
    return cfg


def _check_torchvision(cfg: Config) -> Config:
    if cfg.model not in torchvision_names():
        raise ConfigError(f"model={cfg.model!r}: expected smallcnn, a torchvision classifier or timm/<name> "
                          f"(see `cnnlab models`), e.g. resnet18, resnet50, timm/tf_efficientnet_lite0")
    return _check_pretrained(cfg)


def _check_timm(cfg: Config) -> Config:
    check_timm_name(cfg.model)
    return _check_pretrained(cfg)


FAMILIES = (  # in the order `cnnlab models` lists them; each name is owned by exactly one
    ModelFamily(SMALLCNN_NAME, lambda name: name == SMALLCNN_NAME, lambda: [SMALLCNN_NAME], _check_smallcnn,
                _create_smallcnn, lambda model, head: [], pretrained=False),
    ModelFamily("torchvision", lambda name: not name.startswith(TIMM_PREFIX) and name != SMALLCNN_NAME,
                torchvision_names, _check_torchvision, create_pretrained, torchvision_stages, pretrained=True,
                tail=torchvision_tail),
    ModelFamily("timm", lambda name: name.startswith(TIMM_PREFIX), timm_names, _check_timm, create_timm, timm_stages,
                pretrained=True),
)


def family_of(model: str) -> ModelFamily:
    """The family whose name `model` is (the torchvision family takes any other name, and refuses an unknown one
    in its `check`)."""
    return next(f for f in FAMILIES if f.owns(model))
