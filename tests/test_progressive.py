"""Progressive resizing: the schedule of sides, the transform's smaller crops of the same regions, the small CNN
taking smaller images, and a real run that trains small and validates at full size."""

from __future__ import annotations

import torch
from stopping import StopAfter

from cnnlab.cli import main
from cnnlab.config import make_config
from cnnlab.data import ImageTransform
from cnnlab.models.smallcnn import SmallCNN
from cnnlab.preprocess import Preprocess
from cnnlab.trainer import Callback
from cnnlab.training import fit


def test_the_side_grows_from_the_fraction_to_full_size_by_the_middle_epoch():
    cfg = make_config({"image_size": 128, "epochs": 10, "progressive": 0.5})
    sides = [cfg.training_side(e) for e in range(1, 11)]
    assert sides == [64, 80, 96, 112, 128, 128, 128, 128, 128, 128]
    assert make_config({"image_size": 128, "epochs": 10}).training_side(1) == 128  # off: full size throughout
    small = make_config({"image_size": 64, "epochs": 15, "progressive": 0.25})
    assert all(s >= 32 and s % 16 == 0 for s in map(small.training_side, range(1, 16)))  # never below 32 px
    assert small.training_side(99) == 64  # epochs past the plan (a resumed, extended run) stay full size


def test_a_fraction_out_of_range_is_refused_in_one_line(tiny_data, tmp_path, capsys):
    assert main(["train", "--data", str(tiny_data), "--out", str(tmp_path), "--progressive", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "progressive=0.1" in err and "0.25" in err and len(err.splitlines()) == 1


def _columns(n: int, width: int) -> torch.Tensor:
    """n images whose red value is their column index x 2 (0..254), the same in every row."""
    x = torch.zeros(n, width, width, 3, dtype=torch.uint8)
    x[..., 0] = (torch.arange(width) * (256 // width)).to(torch.uint8)
    return x.permute(0, 3, 1, 2)


def test_a_smaller_side_crops_the_same_region_from_the_same_draws():
    x = _columns(16, 128)
    transform = ImageTransform(Preprocess(128), scale=(0.25, 1.0), jitter=0)
    full = transform(x, torch.Generator().manual_seed(5)).clone()
    half = transform(x, torch.Generator().manual_seed(5), side=64).clone()
    assert full.shape == (16, 3, 128, 128) and half.shape == (16, 3, 64, 64)
    assert half.is_contiguous(memory_format=torch.channels_last)
    # the same crop, sampled at half the rate: each image's columns span the same range of the source's columns
    for i in range(16):
        a, b = full[i, 0, 0], half[i, 0, 0]
        assert abs(a.min() - b.min()) < 0.1 and abs(a.max() - b.max()) < 0.1  # within two source columns
        assert (a[::2] - b).abs().max() < 0.1 or (a.flip(0)[::2] - b.flip(0)).abs().max() < 0.1


def test_without_augmentation_a_smaller_side_is_the_whole_image_resized():
    x = torch.zeros(2, 64, 64, 3, dtype=torch.uint8)
    x[:, :32, :32] = 255  # the top-left quadrant white
    out = ImageTransform(Preprocess(64), jitter=0)(x.permute(0, 3, 1, 2), None, side=32)
    white = out[:, 0] > 0
    assert out.shape == (2, 3, 32, 32)
    assert white[:, :16, :16].all() and not white[:, 16:].any() and not white[:, :, 16:].any()


def test_the_small_cnn_takes_smaller_images_and_is_unchanged_at_its_own_size():
    torch.manual_seed(0)
    model = SmallCNN.from_config(make_config({"image_size": 128}), 10).eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(model(x), model.classifier(model.features(x)))  # the pooling never runs at full size
        for side in (64, 96, 112):
            assert model(torch.randn(2, 3, side, side)).shape == (2, 10)


class InputSides(Callback):
    """The side of every input the model sees, per epoch, in training and in validation (a forward pre-hook)."""

    def __init__(self):
        self.epoch, self.seen = 0, {}

    def on_fit_start(self, run):
        run.model.register_forward_pre_hook(
            lambda module, args: self.seen.setdefault((self.epoch, module.training), set()).add(args[0].shape[-1]))

    def on_epoch_start(self, run, epoch):
        self.epoch = epoch


def test_a_run_trains_on_smaller_images_early_and_validates_at_full_size(tiny_cfg, tmp_path):
    sides, lines = InputSides(), []
    result = fit(tiny_cfg(image_size=64, epochs=6, progressive=0.5), callbacks=[sides], progress=False,
                 log=lines.append)
    training = {e: sides.seen[(e, True)] for e in range(1, 7)}
    assert training == {1: {32}, 2: {48}, 3: {64}, 4: {64}, 5: {64}, 6: {64}}
    assert all(sides.seen[(e, False)] == {64} for e in range(1, 7))  # validation at full size
    assert any("progressive resizing: training images 32 px in epoch 1, growing to 64 px by epoch 3" in line
               for line in lines)
    assert len(result.history) == 6 and all(r["train_loss"] == r["train_loss"] for r in result.history)


def test_another_family_takes_the_smaller_sides_too(tiny_cfg):
    sides = InputSides()
    fit(tiny_cfg(model="resnet18", image_size=64, epochs=2, progressive=0.5),
        callbacks=[sides], progress=False, log=lambda line: None)
    assert sides.seen[(1, True)] == {32} and sides.seen[(2, True)] == {64}


def test_a_resumed_progressive_run_ends_with_the_uninterrupted_run_s_numbers(tiny_cfg):
    """The side is a function of the epoch alone, so a run stopped in its growing phase resumes at the right side."""
    cfg = tiny_cfg(image_size=64, epochs=5, progressive=0.5, name="whole")
    whole = fit(cfg, progress=False, log=lambda line: None).history
    stopped = tiny_cfg(image_size=64, epochs=5, progressive=0.5, name="stopped")
    assert len(fit(stopped, callbacks=[StopAfter(1)], progress=False, log=lambda line: None).history) == 1
    sides = InputSides()
    resumed = fit(stopped, callbacks=[sides], resume=True, progress=False, log=lambda line: None).history
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in h]
    assert strip(resumed) == strip(whole)
    assert sides.seen[(2, True)] == {48} and (1, True) not in sides.seen  # resumed after epoch 1, still growing
