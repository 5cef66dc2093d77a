import pytest
import torch

from cnnlab.config import ACTIVATIONS, ConfigError, make_config
from cnnlab.models import check_config, create_model, measured_cost, smallcnn_cost


def test_golden_parameter_count_of_the_assignment_cnn():
    # 5 x 32 filters, 3x3, batch norm, 256 dense units, 224 px, 10 classes (conv bias dropped under batch norm)
    cfg = make_config({"filters": 32, "filter_org": "same", "conv1_stride": 1})
    assert smallcnn_cost(cfg, 10).params == 442_282
    assert smallcnn_cost(cfg, 10).flops == 394_589_184


@pytest.mark.parametrize("overrides", [
    {}, {"batch_norm": False}, {"filter_org": "double", "filters": 16}, {"filter_org": "half", "filters": 64},
    {"kernel_size": "3,3,5,5,7", "dense_units": 128, "image_size": 100},
    {"filter_org": "8,16,16,32,48", "kernel_size": 4, "image_size": 64},
    {"global_pool": True, "image_size": 128}, {"global_pool": True, "image_size": 50, "batch_norm": False},
    {"conv1_stride": 2, "image_size": 128}, {"conv1_stride": 2, "image_size": 101, "kernel_size": "4,3,3,3,3"},
    {"conv1_stride": 3, "image_size": 100, "kernel_size": 5, "global_pool": True},
])
def test_formula_matches_numel_and_flop_counter(overrides):
    cfg = check_config(make_config(overrides))  # image_size 0 (not given): the small CNN's own, 224
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


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_each_block_computes_conv_bn_activation_then_pool(activation):
    """Monotone activations run after the pool (cheaper): outputs and gradients must be the textbook order's."""
    torch.manual_seed(0)
    model = create_model(make_config({"image_size": 32, "filters": 4, "activation": activation}), 3).module
    model.train()
    x = torch.randn(4, 3, 32, 32)

    def textbook(x: torch.Tensor) -> torch.Tensor:
        for block in model.features:
            conv, bn = block[0], block[1]
            act = next(m for m in block if not isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, torch.nn.MaxPool2d)))
            x = torch.nn.functional.max_pool2d(act(bn(conv(x)).clone()), 2)
        return model.classifier(x)

    torch.manual_seed(1)
    ours = model(x)
    grads = torch.autograd.grad(ours.square().sum(), list(model.parameters()))
    torch.manual_seed(1)  # the same dropout mask
    reference = textbook(x)
    reference_grads = torch.autograd.grad(reference.square().sum(), list(model.parameters()))
    torch.testing.assert_close(ours, reference)
    for g, r in zip(grads, reference_grads):
        torch.testing.assert_close(g, r)


def test_dirac_init_passes_each_blocks_input_through_its_first_filters_and_keeps_the_rest():
    config = {"image_size": 64, "filters": 8, "filter_org": "8,16,16,8,8", "batch_norm": False}
    torch.manual_seed(0)
    dirac = create_model(make_config({**config, "conv_init": "dirac"}), 3).module
    torch.manual_seed(0)
    kaiming = create_model(make_config({**config, "conv_init": "kaiming"}), 3).module
    torch.testing.assert_close(dirac.features[0][0].weight, kaiming.features[0][0].weight)  # conv1_init's, untouched
    for block, plain in list(zip(dirac.features, kaiming.features))[1:]:
        conv = block[0]
        c_out, c_in = conv.weight.shape[:2]
        x = torch.randn(2, c_in, 8, 8)
        kept = min(c_out, c_in)
        torch.testing.assert_close(conv(x)[:, :kept] - conv.bias[:kept, None, None], x[:, :kept])
        torch.testing.assert_close(conv.weight[c_in:], plain[0].weight[c_in:])  # beyond c_in: torch's init
        torch.testing.assert_close(conv.bias, plain[0].bias)


def test_image_too_small_for_five_pools():
    with pytest.raises(ConfigError, match="needs at least 32"):  # refused by its family's rules, before any work
        check_config(make_config({"image_size": 16}))


def test_first_stride_is_2_from_128_px_unless_set():
    assert make_config({"image_size": 128}).first_stride() == 2
    assert make_config({"image_size": 127}).first_stride() == 1
    assert make_config({"image_size": 224, "conv1_stride": 1}).first_stride() == 1
    model = create_model(make_config({"image_size": 128}), 5).module
    assert model.features[0][0].stride == (2, 2)
    assert model(torch.zeros(2, 3, 128, 128)).shape == (2, 5)
    with pytest.raises(ConfigError, match="after a stride-2 first convolution, so it needs at least 64"):
        check_config(make_config({"image_size": 48, "conv1_stride": 2}))


def test_a_checkpoint_saved_before_conv1_stride_existed_loads_as_stride_1(tmp_path):
    """Its config has no conv1_stride key: it was trained at stride 1, whatever the default is now."""
    from cnnlab.checkpoint import make_checkpoint, save_checkpoint
    from cnnlab.evaluate import load_model

    cfg = make_config({"image_size": 128, "filters": 4, "dense_units": 8, "conv1_stride": 1})
    parts = create_model(cfg, 3)
    model = parts.module
    state = make_checkpoint(model, cfg, ["a", "b", "c"], parts.preprocess, epoch=1, history=[])
    del state["config"]["conv1_stride"]
    save_checkpoint(state, tmp_path / "best.pt")
    loaded = load_model(tmp_path / "best.pt", torch.device("cpu"))
    assert loaded.cfg.conv1_stride == 1 and loaded.model.features[0][0].stride == (1, 1)
    x = torch.randn(2, 3, 128, 128)
    assert torch.allclose(loaded.model(x), model.eval()(x), atol=1e-5)  # loaded channels_last: other sum order


def correlated_images(n: int = 40, size: int = 24) -> torch.Tensor:
    """uint8 (n, size, size, 3) images whose pixels are correlated across channels and neighbours, like photos."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(n, 1, size + 2, size + 2, generator=g), 3, 1)  # smooth
    tint = torch.rand(n, 3, 1, 1, generator=g)
    x = 0.6 * base + 0.3 * tint + 0.1 * torch.rand(n, 3, size, size, generator=g)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@pytest.mark.parametrize("batch_norm", [True, False])
def test_whitening_makes_the_first_layer_responses_decorrelated_with_unit_variance(batch_norm):
    from cnnlab.models import whiten_first_conv

    cfg = make_config({"image_size": 32, "filters": 8, "kernel_size": 3, "batch_norm": batch_norm})
    model = create_model(cfg, 3).module
    images, mean, std = correlated_images(), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = (images.permute(0, 3, 1, 2).double() / 255 - torch.tensor(mean, dtype=torch.float64)[:, None, None]) \
        / torch.tensor(std, dtype=torch.float64)[:, None, None]
    assert whiten_first_conv(model, x.split(16), eps=0.0) == 8
    conv = model.features[0][0]
    responses = torch.nn.functional.conv2d(x, conv.weight.double(), None if conv.bias is None else conv.bias.double(),
                                           stride=3).permute(0, 2, 3, 1).reshape(-1, 8)
    first_half = responses[:, :4]
    cov = torch.cov(first_half.T, correction=0)
    assert torch.allclose(cov, torch.eye(4, dtype=torch.float64), atol=1e-4)  # whitened (float32 weights)
    assert torch.equal(conv.weight[4:], -conv.weight[:4])  # each filter paired with its negative
    if not batch_norm:  # the bias centres the responses (no batch norm to do it)
        assert first_half.mean(0).abs().max() < 1e-4


def test_whitening_fills_at_most_twice_the_patch_dimension_and_keeps_the_rest():
    from cnnlab.models import whiten_first_conv

    cfg = make_config({"image_size": 32, "filters": 10, "filter_org": "same", "kernel_size": 1})
    model = create_model(cfg, 3).module
    before = model.features[0][0].weight.detach().clone()
    x = (correlated_images().permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    assert whiten_first_conv(model, [x]) == 6  # 1x1x3 patches: 3 pairs
    after = model.features[0][0].weight
    assert not torch.equal(after[:6], before[:6]) and torch.equal(after[6:], before[6:])
