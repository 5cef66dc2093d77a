"""Models: `smallcnn` (the 5-block CNN trained from scratch), every torchvision classifier (`pretrained`) and,
with the timm extra, every timm classifier as `timm/<name>` (`from_timm`); what trains when fine-tuning
(`plan`). `create_model(cfg, n)` is the one way a model is built; it returns `ModelParts` (the module, its
head's name, its preprocessing, with --mean/--std applied)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..config import Config
from ..errors import ConfigError, first_line
from .parts import ModelParts
from .plan import TrainablePlan, stages
from .pretrained import torchvision_names, weights_file
from .registry import FAMILIES, SMALLCNN_NAME, ModelFamily, family_of
from .smallcnn import SmallCNN, measured_cost, smallcnn_cost, whiten_first_conv


def model_names() -> list[str]:
    """smallcnn, torchvision's classifiers, then timm's (prefixed timm/, when timm is installed)."""
    return [name for family in FAMILIES for name in family.names()]


def check_model_name(name: str) -> None:
    family_of(name).check(Config(model=name))


def check_config(cfg: Config) -> Config:
    """The config's model-dependent rules (the config module itself knows no models), by the model's family;
    returns the config with the family's own values for what was left to it (image_size=0: the model's own)."""
    return family_of(cfg.model).check(cfg)


def create_model(cfg: Config, num_classes: int) -> ModelParts:
    """Build the model the config names, with a `num_classes`-way output: the one way a model is built."""
    cfg = check_config(cfg)
    parts = family_of(cfg.model).create(cfg, num_classes)
    mean, std = cfg.normalisation()
    parts.preprocess = replace(parts.preprocess, mean=mean or parts.preprocess.mean, std=std or parts.preprocess.std)
    return parts


def default_freeze_stages(model: str) -> int:
    """For finetune=partial when no freeze_stages is given: every stage frozen but the last (ResNet50: the stem and
    layer1-3, as the assignment asks), counted on the model itself (built without weights)."""
    parts = create_model(Config(model=model, image_size=64), 2)
    return max(1, len(stages(model, parts.module, parts.head_module())) - 2)


PROBE_SIZES = (32, 48, 64, 75, 96, 112, 128, 160, 192, 224, 256, 299, 320, 384, 448, 512)


def _refusal(module: Any, size: int) -> str | None:
    """Why `module` cannot take one (size x size) image, or None when it can."""
    import torch

    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    except Exception as e:  # noqa: BLE001 - whatever the architecture raises: an assertion, a kernel too large
        return first_line(e)
    return None


def check_input_size(parts: ModelParts, name: str) -> None:
    """Refuse, before any work, an image size the architecture cannot take (a ViT built for 224 px at 64, Inception
    v3 below 75), naming the size it needs: one forward pass of one blank image at that size (and, only on a
    refusal, at a few others to find the one that fits)."""
    size = parts.preprocess.image_size
    module = parts.module
    was_training = module.training
    module.eval()
    try:
        why = _refusal(module, size)
        if why is None:
            return
        fits = next((s for s in PROBE_SIZES if s > size and _refusal(module, s) is None), None)
        if fits is None:
            raise ConfigError(f"model={name!r} does not run on {size} px images ({why}): choose another --image_size "
                              "or another model")
        larger = next((s for s in PROBE_SIZES if s > fits), None)
        exact = larger is not None and _refusal(module, larger) is not None
        raise ConfigError(f"model={name!r} takes {'only' if exact else 'at least'} {fits} px images, not "
                          f"--image_size {size} ({why}): give --image_size {fits}"
                          + ("" if exact else " or more"))
    finally:
        module.train(was_training)


__all__ = ["ModelParts", "check_input_size", "TrainablePlan", "stages", "SmallCNN", "measured_cost", "smallcnn_cost",
           "model_names", "ModelFamily", "FAMILIES", "family_of", "SMALLCNN_NAME", "default_freeze_stages",
           "check_model_name", "check_config", "create_model", "torchvision_names", "weights_file",
           "whiten_first_conv"]
