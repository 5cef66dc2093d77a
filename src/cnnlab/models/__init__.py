"""Models: `smallcnn` (the 5-block CNN trained from scratch), every torchvision classifier (`pretrained`) and,
with the timm extra, every timm classifier as `timm/<name>` (`from_timm`); what trains when fine-tuning
(`plan`). `create_model(cfg, n)` is the one way a model is built; it returns `ModelParts` (the module, its
head's name, its preprocessing, with --mean/--std applied)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..config import Config
from ..errors import ConfigError
from ..preprocess import Preprocess
from .from_timm import PREFIX as TIMM_PREFIX
from .from_timm import check_timm_name, timm_names
from .parts import ModelParts
from .plan import TrainablePlan, stages
from .pretrained import weights_file
from .smallcnn import SmallCNN, measured_cost, smallcnn_cost, whiten_first_conv

SCRATCH = "smallcnn"


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    """smallcnn, torchvision's classifiers, then timm's (prefixed timm/, when timm is installed)."""
    return [SCRATCH, *torchvision_names(), *timm_names()]


def check_model_name(name: str) -> None:
    if name.startswith(TIMM_PREFIX):
        check_timm_name(name)
    elif name != SCRATCH and name not in torchvision_names():
        raise ConfigError(f"model={name!r}: expected smallcnn, a torchvision classifier or timm/<name> "
                          f"(see `cnnlab models`), e.g. resnet18, resnet50, timm/tf_efficientnet_lite0")


def check_config(cfg: Config) -> Config:
    """The config's model-dependent rules (the config module itself knows no models)."""
    check_model_name(cfg.model)
    return cfg


def create_model(cfg: Config, num_classes: int) -> ModelParts:
    """Build the model the config names, with a `num_classes`-way output."""
    check_model_name(cfg.model)
    if cfg.model == SCRATCH:
        model = SmallCNN.from_config(cfg, num_classes)
        parts = ModelParts(model, f"classifier.{len(model.classifier) - 1}", Preprocess(cfg.image_size))
    elif cfg.model.startswith(TIMM_PREFIX):
        from .from_timm import create_timm

        parts = create_timm(cfg, num_classes)
    else:
        from .pretrained import create_pretrained

        parts = create_pretrained(cfg, num_classes)
    mean, std = cfg.normalisation()
    parts.preprocess = replace(parts.preprocess, mean=mean or parts.preprocess.mean, std=std or parts.preprocess.std)
    return parts


PROBE_SIZES = (32, 48, 64, 75, 96, 112, 128, 160, 192, 224, 256, 299, 320, 384, 448, 512)


def _refusal(module: Any, size: int) -> str | None:
    """Why `module` cannot take one (size x size) image, or None when it can."""
    import torch

    try:
        with torch.no_grad():
            module(torch.zeros(1, 3, size, size))
    except Exception as e:  # noqa: BLE001 - whatever the architecture raises: an assertion, a kernel too large
        return str(e).splitlines()[0] if str(e) else type(e).__name__
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
           "model_names",
           "check_model_name", "check_config", "create_model", "torchvision_names", "weights_file",
           "whiten_first_conv"]
