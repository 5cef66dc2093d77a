"""One test over every registered model (as timm's test suite does), instead of a hand-kept list: each
torchvision classifier `cnnlab models` lists gets its head found and replaced and its body cut into stages;
every one small enough to build quickly on a CPU also runs forward and backward."""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from cnnlab.config import make_config
from cnnlab.models import TrainablePlan, create_model, model_names, stages, torchvision_names
from cnnlab.models.pretrained import find_head, replace_head

SMALL = 30e6  # parameters: built for real and run forward/backward below this
BUILD_LIMIT = 50e6  # parameters: above this, a model that cannot be built on the meta device is skipped


def weights_meta(name: str) -> dict:
    return torchvision.models.get_model_weights(name).DEFAULT.meta


def build_skeleton(name: str) -> nn.Module:
    """The architecture without memory for its weights (the meta device) where it allows that."""
    kwargs = {"aux_logits": True, "init_weights": False} if name in ("inception_v3", "googlenet") else {}
    try:
        with torch.device("meta"):
            return torchvision.models.get_model(name, weights=None, **kwargs)
    except NotImplementedError:  # RegNet computes its widths with tensor ops, which meta cannot answer
        if weights_meta(name)["num_params"] > BUILD_LIMIT:
            pytest.skip(f"{name}: {weights_meta(name)['num_params'] / 1e6:.0f} M parameters, not buildable on meta")
        return torchvision.models.get_model(name, weights=None, **kwargs)


def test_the_registry_lists_smallcnn_every_torchvision_and_every_timm_classifier():
    import timm
    names = model_names()
    assert names == ["smallcnn", *torchvision_names(), *("timm/" + n for n in timm.list_models())]
    assert len(torchvision_names()) >= 80 and len(names) > 1000


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_names())
def test_every_model_has_a_head_and_stages(name):
    model = build_skeleton(name)
    found, _ = find_head(model)
    head_name = replace_head(model, 7)
    head = model.get_submodule(head_name)
    assert head_name == found and getattr(head, "out_features", getattr(head, "out_channels", None)) == 7
    body = stages(name, model, head)
    assert len(body) >= 3, "a stem and at least two stages, so partial and gradual have something to choose"
    in_body = {id(p) for stage in body for m in stage for p in m.parameters()}
    assert not in_body & {id(p) for p in head.parameters()}, "the head is never part of a stage"


SMALL_MODELS = [n for n in torchvision_names() if weights_meta(n)["num_params"] < SMALL]


@pytest.mark.slow
@pytest.mark.parametrize("name", SMALL_MODELS)
def test_every_small_model_trains_a_step_with_a_partial_plan(name):
    torch.manual_seed(0)
    cfg = make_config({"model": name, "finetune": "partial", "freeze_stages": 1, "weights": "random"})
    parts = create_model(cfg, 7)
    plan = TrainablePlan(parts, cfg)
    size = max(64, *weights_meta(name)["min_size"])
    out = parts.module.train()(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in parts.head_module().parameters())
    assert 0 < plan.trainable_count() < sum(p.numel() for p in parts.module.parameters())


def smallest_of_each_family() -> list[str]:
    """One model a family (the letters its name starts with: resnet, squeezenet, vit, ...), the smallest of it."""
    import re

    best: dict[str, str] = {}
    for name in torchvision_names():
        family = re.match(r"[a-z]+", name).group(0)
        if family not in best or weights_meta(name)["num_params"] < weights_meta(best[family])["num_params"]:
            best[family] = name
    return sorted(best.values())


@pytest.mark.slow
@pytest.mark.parametrize("name", [*smallest_of_each_family(), "timm/vit_tiny_patch16_224", "timm/mobilenetv3_small_050"])
def test_every_family_trains_head_only_on_its_feature_store(name, tmp_path):
    """The head-only path through the feature store, which trains the head alone on stored inputs (SqueezeNet's
    convolutional classifier is flattened after it, as the model does), at the smallest size the model takes."""
    import cnnlab
    from cnnlab.data.demo import make_demo_data

    if name.startswith("timm/"):
        import timm  # noqa: F401 - declared in dev: an import error fails, never skips
    data = make_demo_data(tmp_path / "data", train_per_class=3, val_per_class=1, seed=2, min_size=40, max_size=64)
    size = 224 if "vit" in name or "swin" in name or "maxvit" in name else 64
    if not name.startswith("timm/"):
        size = max(size, *weights_meta(name)["min_size"])
    lines: list[str] = []
    run = cnnlab.train(data=str(data), model=name, weights="random", finetune="head", image_size=size, epochs=1,
                       batch_size=8, device="cpu", precision="fp32", cache_dir=str(tmp_path / "cache"),
                       out=str(tmp_path / "runs"), progress=False, log=lines.append)
    assert any(line.startswith("feature store: the head's input") for line in lines), lines
    assert len(run.history) == 1 and np.isfinite(run.history[0]["train_loss"])
