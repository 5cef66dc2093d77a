import pytest
import torch

from cnnlab.config import ACTIVATIONS, ConfigError, make_config
from cnnlab.models import create_model, measured_cost, smallcnn_cost


def test_golden_parameter_count_of_the_assignment_cnn():
    # 5 x 32 filters, 3x3, batch norm, 256 dense units, 224 px, 10 classes (conv bias dropped under batch norm)
    cfg = make_config({"filters": 32, "filter_org": "same"})
    assert smallcnn_cost(cfg, 10).params == 442_282
    assert smallcnn_cost(cfg, 10).flops == 394_589_184


@pytest.mark.parametrize("overrides", [
    {}, {"batch_norm": False}, {"filter_org": "double", "filters": 16}, {"filter_org": "half", "filters": 64},
    {"kernel_size": "3,3,5,5,7", "dense_units": 128, "image_size": 100},
    {"filter_org": "8,16,16,32,48", "kernel_size": 4, "image_size": 64},
    {"global_pool": True, "image_size": 128}, {"global_pool": True, "image_size": 50, "batch_norm": False},
])
def test_formula_matches_numel_and_flop_counter(overrides):
    cfg = make_config(overrides)
    model = create_model(cfg, 10).module
    formula, measured = smallcnn_cost(cfg, 10), measured_cost(model, cfg.image_size)
    assert formula.params == measured.params == sum(p.numel() for p in model.parameters())
    assert formula.flops == measured.flops


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_every_activation_trains_a_step(activation):
    cfg = make_config({"activation": activation, "image_size": 32, "filters": 4, "dense_units": 8})
    model = create_model(cfg, 7).module
    out = model(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 7) and torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_image_too_small_for_five_pools():
    with pytest.raises(ConfigError, match="needs at least 32"):  # refused with the config, before any work
        make_config({"image_size": 16})
