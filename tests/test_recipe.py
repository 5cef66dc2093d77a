"""The parts of the training recipe, each checked on its own."""

import math

import pytest
import torch

from cnnlab.config import make_config
from cnnlab.data.demo import make_demo_data
from cnnlab.evaluate import predict_logits
from cnnlab.train import fit, make_scheduler, warmup_cosine


def test_warmup_rises_linearly_then_cosine_falls_to_zero():
    f = warmup_cosine(total=100, warmup=10)
    assert [round(f(s), 3) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert f(10) == 1.0 and abs(f(55) - 0.5) < 1e-9 and f(100) == 0.0
    assert all(f(s) >= f(s + 1) for s in range(10, 100))  # never rises after the warm-up
    plain = warmup_cosine(total=100, warmup=0)  # no warm-up: CosineAnnealingLR's own curve
    assert all(abs(plain(s) - 0.5 * (1 + math.cos(math.pi * s / 100))) < 1e-12 for s in range(101))


def test_the_cosine_schedule_steps_every_batch_with_the_warm_up_in_epochs():
    cfg = make_config({"scheduler": "cosine", "warmup_epochs": 2, "epochs": 10, "lr": 0.1})
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_scheduler(cfg, opt, steps_per_epoch=5)
    lrs = []
    for _ in range(50):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert abs(lrs[0] - 0.01) < 1e-12 and abs(lrs[9] - 0.1) < 1e-12 and max(lrs) == lrs[9] and lrs[-1] < 1e-3


def test_flip_tta_averages_an_image_and_its_mirror():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    x = torch.randn(3, 3, 4, 4)
    y = torch.zeros(3, dtype=torch.long)
    plain, _ = predict_logits(model, [(x, y)], lambda t: t, torch.device("cpu"))
    mirrored, _ = predict_logits(model, [(x.flip(3), y)], lambda t: t, torch.device("cpu"))
    both, _ = predict_logits(model, [(x, y)], lambda t: t, torch.device("cpu"), tta=True)
    assert torch.allclose(both, (plain + mirrored) / 2, atol=1e-6)


def test_label_smoothing_is_the_loss_the_config_names():
    logits, target = torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([0])
    smooth = torch.nn.CrossEntropyLoss(label_smoothing=make_config({"label_smoothing": 0.3}).label_smoothing)
    logp = logits.log_softmax(1)[0]
    expected = -(0.8 * logp[0] + 0.1 * logp[1] + 0.1 * logp[2])  # 1 - 0.3 + 0.3/3 on the true class
    assert torch.isclose(smooth(logits, target), expected)


OLD_RECIPE = {"optimizer": "adam", "lr": 1e-3, "scheduler": "none", "warmup_epochs": 0, "weight_decay": 0.0,
              "label_smoothing": 0.0, "tta": False, "filters": 32, "filter_org": "same"}


@pytest.mark.slow
def test_the_default_recipe_beats_the_old_constant_lr_recipe(tmp_path):
    """Same synthetic photos, same seed, same epochs: only the recipe differs (a fixed seed, so the margin is a
    property of this data and seed, measured, not luck from run to run)."""
    data = make_demo_data(tmp_path / "demo", train_per_class=40, val_per_class=2, seed=5)
    base = {"data": str(data), "image_size": 48, "epochs": 6, "seed": 0, "decode_workers": 1, "out": str(tmp_path / "runs"),
            "cache_dir": str(tmp_path / "cache")}
    new = fit(make_config(base, {"name": "default"}), progress=False, log=lambda s: None)
    old = fit(make_config(base, OLD_RECIPE, {"name": "old"}), progress=False, log=lambda s: None)
    assert new.best_val_acc >= old.best_val_acc + 0.05, (new.best_val_acc, old.best_val_acc)
