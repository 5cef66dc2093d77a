"""Models: `smallcnn` (the 5-block CNN trained from scratch, `smallcnn`) plus every torchvision classifier
(`pretrained`), and what trains when fine-tuning (`plan`). `create_model(cfg, n)` is the one way a model is
built; it returns `ModelParts` (the module, its head's name, its preprocessing)."""

from __future__ import annotations

from ..config import Config
from ..errors import ConfigError
from ..preprocess import Preprocess
from .parts import ModelParts
from .plan import TrainablePlan, stages
from .smallcnn import SmallCNN, measured_cost, smallcnn_cost

SCRATCH = "smallcnn"


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def model_names() -> list[str]:
    return [SCRATCH, *torchvision_names()]


def check_model_name(name: str) -> None:
    if name != SCRATCH and name not in torchvision_names():
        raise ConfigError(f"model={name!r}: expected smallcnn or a torchvision classifier "
                          f"(see `cnnlab models`), e.g. resnet18, resnet50, efficientnet_v2_s")


def check_config(cfg: Config) -> Config:
    """The config's model-dependent rules (the config module itself knows no models)."""
    check_model_name(cfg.model)
    return cfg


def create_model(cfg: Config, num_classes: int) -> ModelParts:
    """Build the model the config names, with a `num_classes`-way output."""
    check_model_name(cfg.model)
    if cfg.model == SCRATCH:
        model = SmallCNN.from_config(cfg, num_classes)
        return ModelParts(model, f"classifier.{len(model.classifier) - 1}", Preprocess(cfg.image_size))
    from .pretrained import create_pretrained

    return create_pretrained(cfg, num_classes)


__all__ = ["ModelParts", "TrainablePlan", "stages", "SmallCNN", "measured_cost", "smallcnn_cost", "model_names",
           "check_model_name", "check_config", "create_model", "torchvision_names"]
