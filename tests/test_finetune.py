"""Fine-tuning torchvision models, built without pretrained weights (none can be downloaded here)."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from torch import nn

from cnnlab.config import make_config
from cnnlab.errors import ConfigError, DataError
from cnnlab.models import TrainablePlan, create_model
from cnnlab.models.pretrained import _download_state_dict


def _steps(cfg, n=3, size=32):
    torch.manual_seed(0)
    parts = create_model(cfg, 4)
    model = parts.module
    plan = TrainablePlan(parts, cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(plan.param_groups(), lr=0.1)
    for _ in range(n):
        plan.on_epoch_start(1, opt, lambda s: None)
        model.train()
        loss = nn.functional.cross_entropy(model(torch.randn(4, 3, size, size)), torch.tensor([0, 1, 2, 3]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return model, plan, changed


def test_head_strategy_changes_only_the_head_and_keeps_frozen_bn_statistics():
    model, plan, changed = _steps(make_config({"model": "resnet18", "finetune": "head", "weights": "random"}))
    assert changed == {"fc.weight", "fc.bias"}  # running means/vars of every frozen BN untouched too
    assert plan.trainable_count() == 512 * 4 + 4


def test_partial_freezes_stem_and_first_k_stages():
    _, _, changed = _steps(make_config({"model": "resnet18", "finetune": "partial", "freeze_stages": 2, "weights": "random"}))
    assert not any(k.startswith(("conv1", "bn1", "layer1.", "layer2.")) for k in changed)
    assert any(k.startswith("layer3.") for k in changed) and any(k.startswith("layer4.") for k in changed)
    assert "layer3.0.bn1.running_mean" in changed  # trainable stages keep training their BN


def test_full_changes_everything():
    _, _, changed = _steps(make_config({"model": "resnet18", "finetune": "full", "weights": "random"}))
    assert any(k.startswith("conv1") for k in changed) and "fc.weight" in changed


def test_gradual_opens_one_stage_per_period_from_the_top():
    cfg = make_config({"model": "resnet18", "finetune": "gradual", "unfreeze_every": 2, "weights": "random"})
    parts = create_model(cfg, 4)
    model = parts.module
    plan = TrainablePlan(parts, cfg)
    opt = torch.optim.SGD(plan.param_groups(), lr=0.1)
    trainable = []
    for epoch in range(1, 12):
        plan.on_epoch_start(epoch, opt, lambda s: None)
        trainable.append({n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad})
    assert trainable[0] == {"fc"} and trainable[1] == {"fc"}
    assert trainable[2] == {"fc", "layer4"} and trainable[4] == {"fc", "layer4", "layer3"}
    assert {"conv1", "bn1"} <= trainable[10]


def test_discriminative_learning_rates():
    cfg = make_config({"model": "resnet18", "finetune": "full", "lr": 1e-3, "lr_backbone": 1e-4, "weights": "random"})
    groups = TrainablePlan(create_model(cfg, 4), cfg).param_groups()
    assert [g["lr"] for g in groups] == [1e-4, 1e-3] and len(groups[1]["params"]) == 2


def test_partial_refuses_more_stages_than_the_model_has():
    cfg = make_config({"model": "resnet18", "finetune": "partial", "freeze_stages": 9, "weights": "random"})
    with pytest.raises(ConfigError, match="at most 4"):
        TrainablePlan(create_model(cfg, 4), cfg)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_is_loaded(tmp_path, suffix):
    import torchvision

    torch.manual_seed(123)
    source = torchvision.models.resnet18()  # stands in for downloaded ImageNet weights
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = create_model(make_config({"model": "resnet18", "weights": str(path), "finetune": "head"}), 3).module
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.fc.out_features == 3


def test_a_weights_file_for_another_architecture_is_refused(tmp_path):
    import torchvision

    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v3_small().state_dict(), path)
    with pytest.raises(DataError, match="does not fit"):
        create_model(make_config({"model": "resnet18", "weights": str(path), "finetune": "head"}), 3)


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    """torchvision's real download code against a real local server that has no such file."""
    class Missing(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Missing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    import torchvision

    real = torchvision.models.ResNet18_Weights.IMAGENET1K_V1

    class LocalWeights:  # the real enum entry, pointed at the local server
        url = f"http://127.0.0.1:{server.server_address[1]}/resnet18-f37072fd.pth"

        def get_state_dict(self, **kwargs):
            return torch.hub.load_state_dict_from_url(self.url, **kwargs)

        def __str__(self):
            return str(real)

    try:
        with pytest.raises(DataError) as e:
            _download_state_dict(LocalWeights())
    finally:
        server.shutdown()
    message = str(e.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "torch") in message and "--weights" in message


def test_unknown_weights_name_lists_the_choices():
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        create_model(make_config({"model": "resnet18", "weights": "IMAGENET9K", "finetune": "head"}), 3)


@pytest.mark.cpu_kind
@pytest.mark.slow
def test_finetune_run_records_preprocessing_and_compares(tiny_data, tmp_path, capsys):
    from cnnlab.cli import main

    common = ["--data", str(tiny_data), "--image_size=32", "--epochs=1", "--batch_size=16", "--quiet",
              "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"), "--decode_workers=1"]
    assert main(["train", *common, "--name=scratch", "--filters=8", "--dense_units=16"]) == 0
    for strategy in ("head", "partial", "gradual", "full"):
        extra = ["--freeze_stages=2"] if strategy == "partial" else []
        assert main(["train", *common, f"--name={strategy}", "--model=resnet18", f"--finetune={strategy}", "--weights=random",
                     *extra]) == 0
    from cnnlab.checkpoint import load_checkpoint

    state = load_checkpoint(tmp_path / "runs" / "head" / "best.pt")
    assert state["preprocess"]["image_size"] == 32 and len(state["preprocess"]["mean"]) == 3
    assert main(["evaluate", str(tmp_path / "runs" / "head" / "best.pt"), "--data", str(tiny_data),
                 "--cache_dir", str(tmp_path / "cache"), "--quiet"]) == 0
    runs = [str(tmp_path / "runs" / n) for n in ("scratch", "head", "partial", "gradual", "full")]
    assert main(["compare", *runs, "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count("\n") == 7 and "| head | resnet18 | head | 5,130 / 11,181,642 | 1 |" in table  # 512 x 10 + 10
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 10_000


def test_a_tampered_file_in_the_hub_cache_is_never_unpickled(tmp_path, monkeypatch):
    """The real enum entry; its file in the hub cache replaced by a pickle that would run code when loaded."""
    import pickle

    import torchvision

    class Payload:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save({"fc.weight": Payload()}, cached, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(DataError, match="could not download"):
        _download_state_dict(weights)  # check_hash would also refuse it: weights_only refuses before that
    assert not (tmp_path / "pwned").exists()
