"""timm classifiers, `--model timm/<name>`: built by `timm.create_model`, with weights from a local file
(.safetensors / .pth, never unpickled) or, online, timm's pretrained tags (`--weights DEFAULT` or a tag such as
`in1k`); a new head through timm's own `reset_classifier`; the preprocessing from the model's pretrained config
(`timm.data.resolve_model_data_config`: mean, std, input size, crop fraction, interpolation); and stages from
timm's own parameter groups (`group_matcher`, the ones its layer-wise learning-rate decay uses)."""

from __future__ import annotations

from torch import nn

from ..config import Config
from ..errors import ConfigError, DataError
from ..preprocess import INTERPOLATIONS, Preprocess
from .parts import ModelParts

PREFIX = "timm/"


def _timm():
    try:
        import timm
    except ImportError:
        raise ConfigError("timm models need the timm package: pip install 'cnnlab[timm]'") from None
    return timm


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def timm_names() -> list[str]:
    """Every timm architecture, prefixed (empty when timm is not installed)."""
    if not timm_available():
        return []
    return [PREFIX + n for n in _timm().list_models()]


def check_timm_name(model: str) -> None:
    name = model.removeprefix(PREFIX)
    if not _timm().is_model(name):
        raise ConfigError(f"model={model!r}: timm has no architecture {name!r} (see `cnnlab models --grep WORD`)")


def create_timm(cfg: Config, num_classes: int) -> ModelParts:
    from .pretrained import load_matching, load_weights_file, weights_file

    timm = _timm()
    name = cfg.model.removeprefix(PREFIX)
    check_timm_name(cfg.model)
    path = weights_file(cfg.weights)
    online = cfg.weights.lower() not in ("none", "random") and path is None
    if online:  # timm's pretrained tags: DEFAULT is the architecture's default tag
        tagged = name if cfg.weights == "DEFAULT" else f"{name}.{cfg.weights}"
        try:
            model = timm.create_model(tagged, pretrained=True)
        except Exception as e:  # noqa: BLE001 - no network, unknown tag, hub error: one line with the way out
            raise DataError(f"could not get the pretrained weights {tagged!r} from timm ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); download the weights file where you "
                            f"have a network and pass --weights /path/to/{name}.safetensors") from None
    else:
        model = timm.create_model(name, pretrained=False)
    head = head_name(model)
    if path is not None:
        load_matching(model, load_weights_file(path), f"{path}", head, cfg.model)
    model.reset_classifier(num_classes)
    return ModelParts(model, head, preprocess_of(model, cfg))


def head_name(model: nn.Module) -> str:
    classifier = model.pretrained_cfg.get("classifier", "")
    if isinstance(classifier, (list, tuple)):  # distilled models: a second head, reset along with the first
        classifier = classifier[0]
    try:
        model.get_submodule(classifier)
    except AttributeError:
        raise ConfigError(f"cannot find the classifier layer {classifier!r} of {type(model).__name__}") from None
    return classifier


def preprocess_of(model: nn.Module, cfg: Config) -> Preprocess:
    """The pretrained config's preprocessing; image_size 0 (the default) is the model's own input size."""
    data = _timm().data.resolve_model_data_config(model)
    size = cfg.image_size or int(data["input_size"][-1])
    interpolation = data.get("interpolation", "bilinear")
    crop = float(data.get("crop_pct", 0.875)) if data.get("crop_mode", "center") == "center" else 0.0
    return Preprocess(size, tuple(data["mean"]), tuple(data["std"]), min(crop, 1.0),
                      interpolation if interpolation in INTERPOLATIONS else "bicubic")


def timm_stages(model: nn.Module, head: nn.Module) -> list[list[nn.Module]]:
    """[stem, stage 1, ...] from timm's coarse parameter groups; the head's group is left out."""
    from timm.models import group_modules

    groups = group_modules(model, model.group_matcher(coarse=True))
    head_ids = {id(m) for m in head.modules()}
    body = []
    for names in groups.values():
        modules = [model.get_submodule(n) for n in names if n]
        modules = [m for m in modules if id(m) not in head_ids]
        if modules:
            body.append(modules)
    return body


def is_timm_model(model: nn.Module) -> bool:
    return hasattr(model, "pretrained_cfg") and hasattr(model, "reset_classifier")
