"""timm classifiers (`--model timm/<name>`): preprocessing from the model's pretrained config, every strategy,
weights files that do not fit, and the package's absence. The real-weights checks are in test_e2e_shared.py."""

import subprocess
import sys

import pytest
import timm  # noqa: F401 - declared in dev: an import error fails the run, never skips the file
import torch
from safetensors.torch import save_file
from torch import nn

from cnnlab.cli import main
from cnnlab.config import make_config
from cnnlab.models import TrainablePlan, create_model

SMALL_TIMM = ["tf_efficientnet_lite0", "resnet18", "vit_tiny_patch16_224", "convnext_atto", "mobilenetv3_small_050"]


def test_timm_model_takes_its_pretrained_configs_preprocessing():
    parts = create_model(make_config({"model": "timm/tf_efficientnet_lite0"}), 3)
    pre = parts.preprocess
    assert (pre.image_size, pre.mean, pre.std, pre.crop, pre.interpolation) == (224, (0.5,) * 3, (0.5,) * 3, 0.875, "bicubic")
    assert parts.head == "classifier" and parts.head_module().out_features == 3
    over = create_model(make_config({"model": "timm/tf_efficientnet_lite0", "image_size": 96, "mean": "0.4,0.4,0.4",
                                     "std": "0.2,0.2,0.2"}), 3).preprocess
    assert (over.image_size, over.mean, over.std) == (96, (0.4,) * 3, (0.2,) * 3)


@pytest.mark.parametrize("name", SMALL_TIMM)
@pytest.mark.parametrize("strategy", ["head", "partial", "gradual", "full"])
def test_every_strategy_on_timm_models(name, strategy):
    torch.manual_seed(0)
    cfg = make_config({"model": f"timm/{name}", "finetune": strategy, "weights": "random",
                       "freeze_stages": 2 if strategy == "partial" else 0,
                       "lr_backbone": 1e-4 if strategy in ("partial", "gradual", "full") else 0,
                       "image_size": 64 if "vit" not in name else 224})
    parts = create_model(cfg, 4)
    model = parts.module
    plan = TrainablePlan(parts, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(plan.param_groups(), lr=0.1)
    plan.on_epoch_start(1, opt, lambda s: None)
    model.train()
    x = torch.randn(4, 3, cfg.image_size, cfg.image_size)
    loss = nn.functional.cross_entropy(model(x), torch.arange(4))
    opt.zero_grad()
    loss.backward()
    opt.step()
    changed = {k for k in before if not torch.equal(before[k], model.state_dict()[k])}
    head = {k for k in before if k.startswith(parts.head + ".")}
    assert head <= changed
    if strategy in ("head", "gradual"):  # frozen batch norm keeps its running statistics too
        assert changed == head
    elif strategy == "partial":
        assert head < changed and len(changed) < len(before)
    else:
        assert len(changed) > len(head) * 10


def test_a_weights_file_of_another_architecture_is_one_line_exit_2(tmp_path, capsys, tiny_data):

    path = tmp_path / "resnet18.safetensors"
    save_file(timm.create_model("resnet18").state_dict(), str(path))
    argv = ["train", "--data", str(tiny_data), "--model", "timm/tf_efficientnet_lite0", "--weights", str(path),
            "--finetune", "head", "--out", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not fit model timm/tf_efficientnet_lite0" in err
    assert str(path) in err and "missing" in err and "conv_stem.weight" in err
    assert not (tmp_path / "runs").exists()  # refused before any folder was written


def test_an_unknown_timm_name_and_a_missing_timm_are_one_line(capsys):
    assert main(["info", "--model", "timm/no_such_net"]) == 2
    assert "timm has no architecture 'no_such_net'" in capsys.readouterr().err
    code = ("import sys; sys.modules['timm'] = None\n"  # timm made unimportable, as where it is not installed
            "from cnnlab.cli import main; sys.exit(main(['info', '--model', 'timm/resnet18']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "pip install 'cnnlab[timm]'" in done.stderr and len(done.stderr.splitlines()) == 1


def test_models_lists_timm_names_with_a_filter(capsys):
    assert main(["models", "--grep", "efficientnet_lite"]) == 0
    names = capsys.readouterr().out.split()
    assert "timm/tf_efficientnet_lite0" in names and all("efficientnet_lite" in n for n in names)
