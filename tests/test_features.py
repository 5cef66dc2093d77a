"""The feature store: same numbers as full forward passes, never stale, never half-read."""

import signal
import subprocess
import sys

import pytest
import torch

from cnnlab.checkpoint import load_checkpoint
from cnnlab.config import make_config
from cnnlab.training import fit


def _cfg(tiny_data, tmp_path, **kw):
    base = dict(data=str(tiny_data), model="resnet18", image_size=32, augment=False, precision="fp32", epochs=2,
                batch_size=16, out=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), decode_workers=1,
                optimizer="sgd", lr=0.05, weights="random", tta=False)  # stored features have no mirror image
    return make_config({**base, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("strategy,head", [({"finetune": "head"}, "fc"), ({"finetune": "partial", "freeze_stages": 3}, "fc"),
                                           ({"finetune": "head", "model": "timm/tf_efficientnet_lite0"}, "classifier")])
def test_store_gives_the_same_weights_as_full_forward_passes(tiny_data, tmp_path, strategy, head, capsys):
    if strategy.get("model", "").startswith("timm/"):
        import timm  # noqa: F401 - declared in dev: an import error fails, never skips
    with_store = fit(_cfg(tiny_data, tmp_path, name="store", **strategy), progress=False)
    assert "feature store:" in capsys.readouterr().out
    without = fit(_cfg(tiny_data, tmp_path, name="plain", feature_cache="off", **strategy), progress=False)
    a = load_checkpoint(with_store.run_dir / "last.pt")["model"]
    b = load_checkpoint(without.run_dir / "last.pt")["model"]
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key
    assert not torch.equal(a[f"{head}.weight"], torch.zeros_like(a[f"{head}.weight"]))
    for ra, rb in zip(with_store.history, without.history):
        assert abs(ra["val_loss"] - rb["val_loss"]) < 1e-4 and ra["val_acc"] == rb["val_acc"]


@pytest.mark.slow
def test_store_is_reused_and_keyed_by_what_changes_it(tiny_data, tmp_path, capsys):
    fit(_cfg(tiny_data, tmp_path, name="a", finetune="head", epochs=1), progress=False)
    fit(_cfg(tiny_data, tmp_path, name="b", finetune="head", epochs=1, lr=0.01), progress=False)  # head-only knob
    out = capsys.readouterr().out
    assert "(reused)" in out
    stores = lambda: set((tmp_path / "cache" / "features").glob("*.npy"))
    assert len(stores()) == 1
    fit(_cfg(tiny_data, tmp_path, name="c", finetune="partial", freeze_stages=2, epochs=1), progress=False)
    assert len(stores()) == 2  # another boundary
    fit(_cfg(tiny_data, tmp_path, name="d", finetune="head", epochs=1, image_size=40), progress=False)
    assert len(stores()) == 3  # other preprocessing
    import torchvision

    path = tmp_path / "w.pth"
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    fit(_cfg(tiny_data, tmp_path, name="e", finetune="head", epochs=1, weights=str(path)), progress=False)
    torch.manual_seed(2)
    torch.save(torchvision.models.resnet18().state_dict(), path)  # other weights, same file name
    fit(_cfg(tiny_data, tmp_path, name="f", finetune="head", epochs=1, weights=str(path)), progress=False)
    assert len(stores()) == 5


def test_augmentation_turns_the_store_off_unless_views_are_asked(tiny_data, tmp_path, capsys):
    fit(_cfg(tiny_data, tmp_path, name="aug", finetune="head", epochs=1, augment=True), progress=False)
    assert "feature store off: augmentation" in capsys.readouterr().out
    r = fit(_cfg(tiny_data, tmp_path, name="views", finetune="head", epochs=2, augment=True, feature_cache_views=2),
            progress=False)
    assert "3 view(s) x 160 images" in capsys.readouterr().out and len(r.history) == 2  # plain + 2 augmented


@pytest.mark.slow
def test_gradual_uses_the_store_then_full_passes(tiny_data, tmp_path, capsys):
    r = fit(_cfg(tiny_data, tmp_path, name="g", finetune="gradual", unfreeze_every=1, epochs=3), progress=False)
    out = capsys.readouterr().out
    assert "feature store:" in out and "gradual unfreezing" in out and len(r.history) == 3


def test_store_too_large_falls_back_with_a_reason(tiny_data, tmp_path, capsys):
    fit(_cfg(tiny_data, tmp_path, name="big", finetune="head", epochs=1, feature_cache_max=1e-6), progress=False)
    assert "over the limit" in capsys.readouterr().out
    assert not list((tmp_path / "cache" / "features").glob("*.npy"))


KILLED_IN_THE_THIRD_STORE_PASS = """
import os, signal, sys
from cnnlab import features
forward, calls = features._forward, []
def counted(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(*args, **kwargs)
features._forward = counted
from cnnlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.cpu_kind
@pytest.mark.slow
def test_a_store_cut_off_mid_write_is_rebuilt(tmp_path):
    """A real process killed with SIGKILL while it writes the store; the next run rebuilds it."""
    from cnnlab.data.demo import make_demo_data

    data = make_demo_data(tmp_path / "d", 60, 2, min_size=96, max_size=128)
    argv = [sys.executable, "-m", "cnnlab.cli", "train", "--data", str(data), "--model=resnet18", "--finetune=head", "--weights=random",
            "--augment=false", "--image_size=96", "--epochs=1", "--cache_dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "runs"), "--quiet"]
    # the run kills itself for real (SIGKILL) in its third forward pass of the store (the first probes its shape):
    # mid-write on any machine, however fast (before: killed by this test once the file appeared, which a fast
    # build could outrun)
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_THE_THIRD_STORE_PASS, *argv[3:], "--name=killed"],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    features = tmp_path / "cache" / "features"
    assert list(features.glob("*.partial.npy")) and not [p for p in features.glob("*.npy") if ".partial" not in p.name]
    done = subprocess.run(argv + ["--name=again"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    complete = [p for p in features.glob("*.npy") if ".partial" not in p.name]
    assert len(complete) == 1 and not list(features.glob("*.partial.npy"))
