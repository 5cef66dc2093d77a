"""Pretrained torchvision classifiers: weights, a new head, stages, and what trains (the strategies).

- `create_pretrained(cfg, n)`: torchvision model + weights (enum name or local file) + `n`-way head.
- `find_head(model)`: the classifier layer, found generically (the last layer producing the logits).
- `stages(model)`: the network cut from input to output into stem + stages, per family.
- `TrainablePlan`: freezes and unfreezes per `cfg.finetune` and gives the optimiser its param groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .config import Config
from .data import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from .errors import ConfigError, DataError

ORIGINAL_CLASSES = 1000  # every torchvision classifier is built for ImageNet-1k


def resolve_weights(model_name: str, weights: str):
    """None, a local file Path, or a torchvision WeightsEnum member."""
    import torchvision

    if weights.lower() == "none":
        return None
    if weights.endswith((".pth", ".pt", ".safetensors", ".bin")) or Path(weights).exists():
        path = Path(weights)
        if not path.is_file():
            raise ConfigError(f"weights={weights!r}: file not found")
        return path
    enum = torchvision.models.get_model_weights(model_name)
    try:
        return enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except KeyError:
        names = ", ".join(["DEFAULT", *enum.__members__])
        raise ConfigError(f"weights={weights!r} for {model_name}: expected none, a file path, or one of {names}") from None


def _download_state_dict(weights) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
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


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: str, head_name: str) -> None:
    """Load every tensor whose name and shape match; only the head may differ (another class count)."""
    own = model.state_dict()
    state = {k.removeprefix("module."): v for k, v in state.items()}
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith(head_name + ".")
               and not k.endswith("num_batches_tracked")]
    if missing:
        raise DataError(f"{source} does not fit {type(model).__name__}: {len(missing)} tensors missing or of "
                        f"another shape, e.g. {missing[0]}")
    model.load_state_dict(usable, strict=False)


def find_head(model: nn.Module) -> tuple[str, nn.Module]:
    """The layer that produces the logits: the last Linear (or 1x1 Conv2d, SqueezeNet) in module order
    whose output size is the model's class count (or the one replace_head put in, once replaced)."""
    if isinstance(getattr(model, "cnnlab_head", None), str):
        return model.cnnlab_head, model.get_submodule(model.cnnlab_head)
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
    model.cnnlab_head = name
    return name


def create_pretrained(cfg: Config, num_classes: int) -> nn.Module:
    import torchvision

    weights = resolve_weights(cfg.model, cfg.weights)
    kwargs: dict[str, Any] = {}
    if cfg.model in ("inception_v3", "googlenet"):
        kwargs = {"aux_logits": True, "init_weights": weights is None}
    model = torchvision.models.get_model(cfg.model, weights=None, **kwargs)
    head = find_head(model)[0]
    if isinstance(weights, Path):
        _load_matching(model, load_weights_file(weights), str(weights), head)
    elif weights is not None:
        _load_matching(model, _download_state_dict(weights), str(weights), head)
    if cfg.model in ("inception_v3", "googlenet"):  # auxiliary heads only help ImageNet training: drop them
        model.aux_logits = False
        for aux in ("AuxLogits", "aux1", "aux2"):
            if hasattr(model, aux):
                setattr(model, aux, None)
    replace_head(model, num_classes)
    model.cnnlab_preprocess = preprocess_for(cfg, weights)
    return model


def preprocess_for(cfg: Config, weights) -> Preprocess:
    """Mean and std from the weights' metadata (ImageNet's otherwise); image size as configured, except
    that the config's default 224 gives way to the weights' own crop size (299 for Inception v3)."""
    size, mean, std = cfg.image_size, IMAGENET_MEAN, IMAGENET_STD
    if weights is not None and not isinstance(weights, Path):
        t = weights.transforms()
        mean, std = tuple(t.mean), tuple(t.std)
        if cfg.image_size == 224:
            size = int(t.crop_size[0])
    elif cfg.model == "inception_v3" and cfg.image_size == 224:
        size = 299
    return Preprocess(size, mean, std)


# ---- stages and strategies --------------------------------------------------------------------------------

def stages(model: nn.Module) -> list[list[nn.Module]]:
    """The body from input to output as [stem, stage 1, stage 2, ...], the head excluded."""
    from .models import SmallCNN

    if isinstance(model, SmallCNN):
        return [[b] for b in model.features]
    if hasattr(model, "layer4"):  # ResNet, ResNeXt, Wide ResNet
        stem = [m for n, m in model.named_children() if n in ("conv1", "bn1", "relu", "maxpool")]
        return [stem] + [[getattr(model, f"layer{i}")] for i in range(1, 5)]
    if hasattr(model, "encoder") and hasattr(model.encoder, "layers"):  # ViT
        return [[model.conv_proj]] + [[layer] for layer in model.encoder.layers]
    if hasattr(model, "trunk_output"):  # RegNet
        return [[model.stem]] + [[s] for s in model.trunk_output]
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        blocks = list(model.features)  # EfficientNet, MobileNet, VGG, DenseNet, ConvNeXt, Swin, MNASNet...
        return [[blocks[0]]] + [[b] for b in blocks[1:]]
    head = find_head(model)[1]
    children = [m for m in model.children() if m is not head and any(p.numel() for p in m.parameters())
                and head not in list(m.modules())]
    return [[c] for c in children]


class TrainablePlan:
    """What trains, epoch by epoch, for `cfg.finetune`:
    none/full: everything; head: only the new head; partial: all but the stem and first k stages;
    gradual: the head first, then one more stage (from the top) every `unfreeze_every` epochs.
    Frozen batch-norm layers are kept in eval mode so their running statistics do not drift."""

    def __init__(self, model: nn.Module, cfg: Config):
        self.model, self.cfg = model, cfg
        self.mode = cfg.finetune
        self.head = find_head(model)[1] if self.mode != "none" else None
        self.stages = stages(model) if self.mode in ("partial", "gradual") else []
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
        self._frozen_bn = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
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
