import json
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from cnnlab.checkpoint import load_checkpoint
from cnnlab.cli import main
from cnnlab.errors import CnnlabError
from cnnlab.io import read_jsonl
from cnnlab.training import Callback, StopTraining, TrainingDiverged, fit

METRICS = {"epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_balanced_acc", "lr", "epoch_time", "images_per_s"}


def test_run_folder_holds_everything(tiny_cfg):
    result = fit(tiny_cfg(), progress=False)
    run = result.run_dir
    for name in ("config.yaml", "split.json", "metrics.jsonl", "best.pt", "last.pt", "summary.json"):
        assert (run / name).is_file(), name
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2] and all(set(r) == METRICS for r in rows)
    assert all(0 <= r["val_acc"] <= 1 for r in rows)
    best = load_checkpoint(run / "best.pt")  # weights_only=True inside
    assert best["classes"][0] == "checker" and best["preprocess"]["image_size"] == 32
    assert best["config"]["filters"] == 8
    split = json.loads((run / "split.json").read_text())
    assert not set(split["train"]) & set(split["val"])
    assert all(p.startswith("train/") for p in split["train"] + split["val"])  # the test folder is never read
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_val_acc"] == max(r["val_acc"] for r in rows) and summary["status"] == "completed"


def test_same_seed_same_numbers_other_seed_other_numbers(tiny_cfg):
    a = fit(tiny_cfg(name="a"), progress=False).history
    b = fit(tiny_cfg(name="b"), progress=False).history
    c = fit(tiny_cfg(name="c", seed=1), progress=False).history
    key = lambda h: [(r["train_loss"], r["val_acc"]) for r in h]
    assert key(a) == key(b) and key(a) != key(c)


@pytest.mark.slow
def test_learns_well_above_chance(tiny_cfg, tmp_path):
    from cnnlab.data.demo import make_demo_data

    data = make_demo_data(tmp_path / "d60", 60, 10, seed=2, min_size=48, max_size=80)
    result = fit(tiny_cfg(data=str(data), epochs=15, lr=3e-3, augment=False, image_size=48, filters=16,
                          dense_units=64, batch_size=32), progress=False)
    assert result.best_val_acc >= 0.45  # 10 classes: chance is 0.1 (this run: 0.61)


@pytest.mark.parametrize("overrides", [
    {"optimizer": "sgd", "scheduler": "onecycle", "label_smoothing": 0.1, "grad_clip": 1.0},
    {"optimizer": "adamw", "scheduler": "cosine", "weight_decay": 0.05, "batch_norm": False, "activation": "gelu"},
    {"optimizer": "nadam", "precision": "bf16", "channels_last": False, "filter_org": "double", "kernel_size": 5},
])
def test_optimisers_schedules_and_precisions_run(tiny_cfg, overrides):
    result = fit(tiny_cfg(**overrides), progress=False)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in result.history)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["precision"] == overrides.get("precision", "fp32")  # bf16 asked: bf16 autocast ran (on any CPU)
    if overrides.get("precision") == "bf16":  # and it computed in bf16: the same run in fp32 rounds otherwise
        fp32 = fit(tiny_cfg(**{**overrides, "precision": "fp32"}, name="fp32-twin"), progress=False)
        assert [r["train_loss"] for r in fp32.history] != [r["train_loss"] for r in result.history]
    saved, asked = yaml.safe_load((result.run_dir / "config.yaml").read_text()), tiny_cfg(**overrides)
    assert all(str(saved[k]) == str(getattr(asked, k)) for k in overrides)  # the optimiser and schedule it trained with


def test_existing_run_is_not_overwritten(tiny_cfg):
    fit(tiny_cfg(epochs=1), progress=False)
    with pytest.raises(CnnlabError, match="--resume"):
        fit(tiny_cfg(epochs=1), progress=False)


def test_diverging_loss_is_a_clear_error(tiny_cfg):
    with pytest.raises(TrainingDiverged, match="lower --lr"):
        fit(tiny_cfg(optimizer="sgd", lr=10.0, momentum=0.99, batch_norm=False, epochs=3), progress=False)


def test_early_stop_and_callbacks(tiny_cfg):
    seen = []

    class StopAfterTwo(Callback):
        def on_epoch_end(self, run, record):
            seen.append(record["epoch"])
            if record["epoch"] == 2:
                raise StopTraining

    result = fit(tiny_cfg(epochs=5), callbacks=[StopAfterTwo()], progress=False)
    assert seen == [1, 2] and result.status == "stopped" and len(result.history) == 2
    result = fit(tiny_cfg(epochs=30, early_stop=1, lr=1e-6, name="es"), progress=False)
    assert result.status == "early_stopped" and len(result.history) < 30


KILLED_IN_EPOCH_3 = """
import os, signal, sys
from cnnlab.trainer import Trainer
step, steps = Trainer.step, []
def counted(self, *args):
    if len(self.history) == 2:
        steps.append(1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGKILL)
    return step(self, *args)
Trainer.step = counted
from cnnlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_metrics(tiny_cfg, tmp_path):
    """A real process killed mid-epoch with SIGKILL, resumed, ends with the uninterrupted run's numbers."""
    cfg = tiny_cfg(epochs=6, image_size=96, filters=16, batch_size=8)
    reference = fit(cfg.__class__(**{**cfg.to_dict(), "name": "reference"}), progress=False).history
    args = [sys.executable, "-m", "cnnlab.cli", "train", "--quiet"] + \
        [f"--{k}={v}" for k, v in cfg.to_dict().items() if k != "name"] + ["--name=killed"]
    # the run kills itself for real (SIGKILL) at the third step of epoch 3, after two epochs are written: mid-run on
    # any machine, however fast (before: killed by this test once two epochs were written, which a fast run could
    # outrun by an epoch or more)
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_EPOCH_3, *args[3:]], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    assert len(read_jsonl(metrics)) == 2
    assert main(["train", "--resume", str(tmp_path / "runs" / "killed"), "--quiet"]) == 0
    resumed = read_jsonl(metrics)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("epoch_time", "images_per_s")} for r in h]
    assert strip(resumed) == strip(reference)


@pytest.mark.slow
def test_wandb_offline_logs_config_and_metrics_without_an_account(tiny_cfg, monkeypatch):
    import wandb  # noqa: F401 - declared in dev: an import error fails, never skips
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    from wandb_file import offline_runs

    result = fit(tiny_cfg(wandb="offline", epochs=2, name="tracked"), progress=False)
    [run] = offline_runs(result.run_dir / "wandb")  # read back from the run's own file
    assert run.config["filter_org"] == "double" and run.config["batch_norm"] is True and run.project == "cnnlab"
    rows = [r for r in run.history if "val_acc" in r]
    epochs = read_jsonl(result.run_dir / "metrics.jsonl")  # the local run folder is still the source of truth
    assert [(r["train_loss"], r["val_acc"], r["images_per_s"]) for r in rows] == [
        (e["train_loss"], e["val_acc"], e["images_per_s"]) for e in epochs]


def test_balanced_sampler_and_class_weights_on_an_unbalanced_set(tiny_cfg, tiny_data, tmp_path):
    import json
    import shutil

    from cnnlab.data import Batches, load_images
    from cnnlab.training import fit, make_losses

    data = tmp_path / "unbalanced"
    shutil.copytree(tiny_data, data)
    for k, folder in enumerate(sorted((data / "train").iterdir())):
        for extra in sorted(folder.iterdir())[2 + k:]:  # class k keeps 2 + k of its 16 photos... up to 11
            extra.unlink()
    images = load_images(data / "train", 32, tmp_path / "c", workers=1, progress=False)
    counts = np.bincount(images.labels)
    assert counts.min() == 2 and counts.max() == 11
    batches = Batches(images, images.valid, 8, torch.device("cpu"), shuffle=True)
    batches.balance_classes()
    drawn = np.concatenate([y.numpy() for epoch in range(40) for _, y in batches.epoch(epoch)])
    share = np.bincount(drawn, minlength=10) / len(drawn)
    assert share.max() - share.min() < 0.05  # every class about a tenth; unbalanced it spans 0.03 to 0.17
    assert [y.tolist() for _, y in batches.epoch(3)] == [y.tolist() for _, y in batches.epoch(3)]  # seeded
    loss, val_loss = make_losses(tiny_cfg(class_weights="balanced"), images.labels, 10, torch.device("cpu"))
    weights = loss.weight.numpy()
    assert np.allclose(weights * counts, len(images.labels) / 10)  # each class weighs the same in total
    auto, _ = make_losses(tiny_cfg(class_weights="auto"), images.labels, 10, torch.device("cpu"))
    assert torch.equal(auto.weight, loss.weight)  # 11 / 2 = 5.5 > 3: auto weighs the classes
    mild = np.repeat(np.arange(10), [14, 12, 12, 11, 10, 10, 10, 10, 10, 10])  # 1.4, as flowers: the plain loss
    assert make_losses(tiny_cfg(class_weights="auto"), mild, 10, torch.device("cpu"))[0].weight is None
    assert make_losses(tiny_cfg(class_weights="balanced"), mild, 10, torch.device("cpu"))[0].weight is not None
    run = fit(tiny_cfg(data=str(data), class_weights="balanced", sampler="balanced", epochs=2), progress=False,
              log=lambda s: None)
    history = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    # the last epoch's balanced accuracy, recomputed by hand: last.pt's predictions on split.json's validation files,
    # the mean over classes of the share of each class's images predicted as it
    from cnnlab.data import ImageTransform
    from cnnlab.evaluate import load_model, predict_logits

    loaded = load_model(run.run_dir / "last.pt", torch.device("cpu"))
    seen = load_images(data / "train", 32, tiny_cfg().cache_dir, workers=1, progress=False)
    names = [str(p.relative_to(data)) for p in seen.files]
    rows = np.asarray(sorted(names.index(f) for f in json.loads((run.run_dir / "split.json").read_text())["val"]))
    logits, labels = predict_logits(loaded.model, Batches(seen, rows, 64, torch.device("cpu"), shuffle=False),
                                    ImageTransform(loaded.pre, loaded.cfg.channels_last), torch.device("cpu"),
                                    tta=loaded.cfg.tta)  # validation averages each image with its mirror image
    pred, truth = logits.argmax(1).numpy(), labels.numpy()
    by_hand = np.mean([np.mean(pred[truth == c] == c) for c in np.unique(truth)])
    assert abs(history[-1]["val_balanced_acc"] - by_hand) < 1e-6, (history[-1]["val_balanced_acc"], by_hand)
    assert abs(history[-1]["val_acc"] - np.mean(pred == truth)) < 1e-6
