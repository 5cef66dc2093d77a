"""Pretrained torchvision classifiers: weights (an enum name or a local file), and a new head.

- `create_pretrained(cfg, n)`: torchvision model + weights + `n`-way head, returned with the head's name and
  the weights' preprocessing as data (`ModelParts`).
- `find_head(model)`: the classifier layer, found generically (the last layer producing the 1,000 logits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Config
from ..errors import ConfigError, DataError
from ..preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .parts import ModelParts

ORIGINAL_CLASSES = 1000  # every torchvision classifier is built for ImageNet-1k


def torchvision_names() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def torchvision_stages(model: nn.Module, head: nn.Module) -> list[list[nn.Module]]:
    """A torchvision classifier's body from input to output as [stem, stage 1, stage 2, ...], the head excluded,
    found by the layout of each architecture family."""
    if hasattr(model, "layer4"):  # ResNet, ResNeXt, Wide ResNet
        stem = [m for n, m in model.named_children() if n in ("conv1", "bn1", "relu", "maxpool")]
        return [stem] + [[getattr(model, f"layer{i}")] for i in range(1, 5)]
    if hasattr(model, "encoder") and hasattr(model.encoder, "layers"):  # ViT
        return [[model.conv_proj]] + [[layer] for layer in model.encoder.layers]
    if hasattr(model, "trunk_output"):  # RegNet
        return [[model.stem]] + [[s] for s in model.trunk_output]
    if hasattr(model, "stem") and isinstance(getattr(model, "blocks", None), nn.ModuleList):  # MaxViT
        return [[model.stem]] + [[b] for b in model.blocks]
    if isinstance(getattr(model, "layers", None), nn.Sequential):  # MNASNet: stem layers, block stacks, last conv
        layers = list(model.layers)
        stacks = [i for i, m in enumerate(layers) if isinstance(m, nn.Sequential)]
        return [layers[:stacks[0]]] + [[layers[i]] for i in stacks] + [layers[stacks[-1] + 1:]]
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        blocks = list(model.features)  # EfficientNet, MobileNet, VGG, DenseNet, ConvNeXt, Swin, MNASNet...
        return [[blocks[0]]] + [[b] for b in blocks[1:]]
    children = [m for m in model.children() if m is not head and any(p.numel() for p in m.parameters())
                and head not in list(m.modules())]
    return [[c] for c in children]


def weights_file(weights: str) -> Path | None:
    """The local weights file `--weights` names (~ expanded), None when it names no file (none, random, a
    torchvision or timm tag); a name that looks like a file but is missing is refused."""
    if weights.lower() in ("none", "random"):
        return None
    path = Path(weights).expanduser()
    if weights.endswith((".pth", ".pt", ".safetensors", ".bin")) or path.exists():
        if not path.is_file():
            raise ConfigError(f"weights={weights!r}: file not found")
        return path
    return None


def resolve_weights(model_name: str, weights: str):
    """None, a local file Path, or a torchvision WeightsEnum member."""
    import torchvision

    if weights.lower() in ("none", "random"):
        return None
    path = weights_file(weights)
    if path is not None:
        return path
    enum = torchvision.models.get_model_weights(model_name)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(f"weights={weights!r} for {model_name}: expected none, a file path, or one of {names}") from None


def _download_state_dict(weights) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any download failure gets the same advice
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise DataError(
            f"could not download {weights} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"torchvision looks for it at {cache}: copy the file {Path(weights.url).name} there, "
            f"or pass --weights /path/to/{Path(weights.url).name}") from None


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, never executing pickled code; a cnnlab
    checkpoint's `model` entry is taken too."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise DataError(f"{path}: not a readable weights file ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise DataError(f"{path}: expected a state dict (name -> tensor)")
    return state


def load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str, head_name: str, name: str) -> None:
    """Load a weights file into `model`: every tensor must match in name and shape, except the head's (it may
    have another class count). Anything else is refused in one line naming the model, the file and the first
    mismatching keys: never a silent partial load."""
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    def body(k: str) -> bool:
        return not k.startswith(head_name + ".") and not k.endswith("num_batches_tracked")
    missing = [k for k in own if body(k) and k not in state]
    unexpected = [k for k in state if body(k) and k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                if body(k) and k in state and state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        parts = [f"{len(v)} {what} (first: {', '.join(v[:3])})" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("of another shape", reshaped)) if v]
        raise DataError(f"{source} does not fit model {name}: " + "; ".join(parts) +
                        ": pass weights saved from this architecture")
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The layer that produces the ImageNet logits: the last Linear (or 1x1 Conv2d, SqueezeNet) in module order
    with 1,000 outputs."""
    found = None
    for name, m in model.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == ORIGINAL_CLASSES) or \
           (isinstance(m, nn.Conv2d) and m.out_channels == ORIGINAL_CLASSES and m.kernel_size == (1, 1)):
            found = (name, m)
    if found is None:
        raise ConfigError(f"cannot find the classifier layer of {type(model).__name__}")
    return found


def replace_head(model: nn.Module, num_classes: int) -> str:
    name, old = find_head(model)
    new = (nn.Linear(old.in_features, num_classes) if isinstance(old, nn.Linear)
           else nn.Conv2d(old.in_channels, num_classes, 1))
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], new)
    return name


def create_pretrained(cfg: Config, num_classes: int) -> ModelParts:
    import torchvision

    weights = resolve_weights(cfg.model, cfg.weights)
    kwargs: dict[str, Any] = {}
    if cfg.model in ("inception_v3", "googlenet"):
        kwargs = {"aux_logits": True, "init_weights": weights is None}
    model = torchvision.models.get_model(cfg.model, weights=None, **kwargs)
    head = find_head(model)[0]
    if isinstance(weights, Path):
        load_matching(model, load_weights_file(weights), str(weights), head, cfg.model)
    elif weights is not None:
        load_matching(model, _download_state_dict(weights), str(weights), head, cfg.model)
    if cfg.model in ("inception_v3", "googlenet"):  # auxiliary heads only help ImageNet training: drop them
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    head = replace_head(model, num_classes)
    return ModelParts(model, head, preprocess_for(cfg, weights))


def preprocess_for(cfg: Config, weights) -> Preprocess:
    """The weights' own preprocessing: mean, std, interpolation and crop (crop size over resize size, 224/256)
    from the enum's transforms; ImageNet's standard ones for a local file. The image size is as configured; 0
    (the default) is the weights' own crop size (224 for most, 299 for Inception v3; ImageNet's 224 for a file)."""
    own = 299 if cfg.model == "inception_v3" else 224
    mean, std, crop, interpolation = IMAGENET_MEAN, IMAGENET_STD, 224 / 256, "bilinear"
    if weights is not None and not isinstance(weights, Path):
        t = weights.transforms()
        mean, std = tuple(t.mean), tuple(t.std)
        crop, interpolation = t.crop_size[0] / t.resize_size[0], t.interpolation.value
        own = int(t.crop_size[0])
    return Preprocess(cfg.image_size or own, mean, std, crop, interpolation)


class TorchvisionTail(nn.Module):
    """The trainable part of a partially frozen torchvision network, from a stage's features to the logits: the
    stages after it, the model's pooling and its head (`fc` of a ResNet, `classifier` of EfficientNet, MobileNet,
    VGG), run as the model's own forward runs them."""

    def __init__(self, model: nn.Module, stages: list[nn.Module], head: str):
        super().__init__()
        self.model_ref = [model]  # not a submodule: the parameters belong to (and are saved with) the model
        self.stages = nn.ModuleList(stages)
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model_ref[0]
        for stage in self.stages:
            x = stage(x)
        return getattr(m, self.head)(torch.flatten(m.avgpool(x), 1))


def torchvision_tail(model: nn.Module, after: list[nn.Module]) -> nn.Module | None:
    """What trains on stored features of a torchvision model cut before the modules `after`: None where its forward
    is not stages, pooling, flatten and head (a ViT's, a ConvNeXt's, whose classifier starts with a LayerNorm)."""
    if hasattr(model, "layer4") and hasattr(model, "avgpool") and hasattr(model, "fc"):
        return TorchvisionTail(model, after, "fc")  # ResNet
    if isinstance(getattr(model, "features", None), nn.Sequential) and hasattr(model, "avgpool") and \
            isinstance(getattr(model, "classifier", None), nn.Sequential) and \
            not type(model.classifier[0]).__name__.startswith("LayerNorm"):
        return TorchvisionTail(model, after, "classifier")  # EfficientNet, MobileNet v2/v3, VGG
    return None
