"""Weights & Biases, offline (no account, no network), read back from the run's own file (tests/wandb_file.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import wandb  # noqa: F401 - declared in dev: an import error fails the run, never skips the file
from wandb_file import offline_runs

from cnnlab.io import read_jsonl


@pytest.fixture
def clean_wandb_env(monkeypatch):
    """No W&B setting of the machine (an account, a mode, a sweep) reaches the test's runs."""
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("WANDB_SILENT", "true")


def agent_environment(tmp_path, run_id: str) -> dict[str, str]:
    """What `wandb agent` sets for the command it runs (wandb/wandb_agent.py): the sweep's and the run's ids, the
    run's parameters in a YAML file, its project; offline here, as W&B's own WANDB_MODE says."""
    params = tmp_path / "params.yaml"
    params.write_text("filters:\n  value: 8\nactivation:\n  value: gelu\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_SWEEP_ID": "sweep42", "WANDB_RUN_ID": run_id, "WANDB_SWEEP_PARAM_PATH": str(params),
            "WANDB_PROJECT": "course", "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(tmp_path)}


def train_as_the_agent_does(tiny_data, tmp_path, env, *extra):
    # `${program} ${args}`: the sweep's parameters as --key=value flags, as a W&B sweep file's command runs them
    argv = [sys.executable, "-m", "cnnlab.cli", "train", "--filters=8", "--activation=gelu", "--data", str(tiny_data),
            "--image_size=32", "--dense_units=32", "--batch_size=16", "--epochs=3", "--device=cpu", "--precision=fp32",
            "--decode_workers=1", "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"),
            "--name=agent", "--quiet", *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_under_a_wandb_agent_train_logs_into_the_agents_run_with_the_best_epoch_as_summary(tiny_data, tmp_path):
    """Under `wandb agent`, `cnnlab train` (--wandb auto, the default) logged nothing: the W&B sweep got no metric."""
    done = train_as_the_agent_does(tiny_data, tmp_path, agent_environment(tmp_path, "run7"))
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "runs" / "agent"
    [run] = offline_runs(folder / "wandb")
    assert (run.run_id, run.sweep_id, run.project) == ("run7", "sweep42", "course")
    epochs = read_jsonl(folder / "metrics.jsonl")
    rows = [r for r in run.history if "val_acc" in r]
    assert [r["val_acc"] for r in rows] == [e["val_acc"] for e in epochs]  # the sweep's metric, every epoch
    assert [r["_step"] for r in rows] == [1, 2, 3]
    summary = json.loads((folder / "summary.json").read_text())
    best = next(e for e in epochs if e["epoch"] == summary["best_epoch"])
    # what W&B's sweep controller and its panels read: the epoch best.pt holds, not the last one
    assert (run.summary["val_acc"], run.summary["val_loss"], run.summary["best_epoch"]) == (
        summary["best_val_acc"], best["val_loss"], summary["best_epoch"])
    assert run.config["filters"] == 8 and run.config["activation"] == "gelu"


@pytest.mark.slow
def test_wandb_off_still_turns_it_off_under_an_agent(tiny_data, tmp_path):
    done = train_as_the_agent_does(tiny_data, tmp_path, agent_environment(tmp_path, "run8"), "--wandb=off")
    assert done.returncode == 0, done.stderr
    assert not offline_runs(tmp_path) and (tmp_path / "runs" / "agent" / "best.pt").is_file()


def test_auto_is_the_agents_run_only_under_an_agent():
    from cnnlab.callbacks import AGENT, wandb_mode

    assert wandb_mode("auto", {"WANDB_SWEEP_ID": "abc"}) == AGENT
    assert wandb_mode("auto", {"WANDB_PROJECT": "p"}) == "off"  # a project alone is not an agent
    assert [wandb_mode(m, {"WANDB_SWEEP_ID": "abc"}) for m in ("off", "offline", "online")] == ["off", "offline", "online"]


@pytest.mark.slow
def test_an_embedded_sweep_makes_one_wandb_run_per_trial_grouped_tagged_with_its_best(tiny_data, tmp_path, clean_wandb_env):
    import yaml

    from cnnlab.sweeps import load_sweep, run_sweep
    from cnnlab.sweeps.report import load_study

    path = tmp_path / "wb.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
                                    "parameters": {"filters": {"values": [4, 8]}, "epochs": {"value": 3}}}))
    base = {"data": str(tiny_data), "image_size": 32, "dense_units": 16, "batch_size": 32, "decode_workers": 1,
            "cache_dir": str(tmp_path / "cache"), "device": "cpu", "precision": "fp32", "wandb": "offline"}
    run_sweep(load_sweep(path), base, tmp_path / "sweeps" / "wb", progress=False, log=lambda s: None)
    trials = {t.number: t for t in load_study(tmp_path / "sweeps" / "wb").get_trials()}
    runs = offline_runs(tmp_path / "sweeps" / "wb" / "trials")
    assert len(runs) == len(trials) == 2
    for run in runs:
        assert run.group == "wb" and "completed" in run.tags
        trial = next(t for t in trials.values() if t.user_attrs["config"]["filters"] == run.config["filters"])
        assert run.summary["val_acc"] == trial.value  # the trial's value is its best epoch's, as W&B's summary now


@pytest.mark.slow
def test_the_evaluation_and_explanation_reach_the_wandb_run_of_the_training(tiny_cfg, clean_wandb_env):
    """evaluate and explain logged nothing to W&B: no test accuracy, confusion matrix, grid, filters or model."""
    import cnnlab

    run = cnnlab.train(tiny_cfg(wandb="offline", epochs=2, name="tracked"), progress=False, log=None)
    evaluation = run.evaluate(progress=False, log=None, device="cpu")
    explanation = run.explain(progress=False, log=None, neurons=2, per_neuron=1)
    runs = offline_runs(run.folder / "wandb")
    assert len(runs) == 3 and len({r.run_id for r in runs}) == 1  # training, then the same run resumed twice
    # W&B's own media objects, each logged under its key with its type (nested keys come flattened with dots)
    media = {k.removesuffix("._type"): v for r in runs for row in r.history for k, v in row.items() if k.endswith("._type")}
    summary = {k: v for r in runs for k, v in r.summary.items()}
    assert summary["test_acc"] == evaluation.accuracy and summary["test_images"] == evaluation["images"]
    assert [summary["test_acc_ci95_low"], summary["test_acc_ci95_high"]] == evaluation["accuracy_ci95"]
    assert {k: media.get(k) for k in ("test/per_class", "test/confusion_matrix_table", "test/predictions",
                                      "test/reliability", "test/top_losses")} == {
        "test/per_class": "table-file", "test/confusion_matrix_table": "table-file", "test/predictions": "image-file",
        "test/reliability": "image-file", "test/top_losses": "image-file"}
    assert {media.get(f"explain/{name}") for name in explanation.figures} == {"image-file"}
    [model] = [a for r in runs for a in r.artifacts if a["type"] == "model"]
    assert model["files"] == ["best.pt"]
    onnx = run.export()
    exported = [a for r in offline_runs(run.folder / "wandb") for a in r.artifacts if a["type"] == "model"]
    assert sorted(a["files"][0] for a in exported) == ["best.pt", onnx.name]


@pytest.mark.slow
def test_assignment_with_wandb_logs_every_run_and_each_evaluation_into_its_own_run(tiny_data, tmp_path, clean_wandb_env):
    import cnnlab

    out = tmp_path / "job"
    cnnlab.assignment(tiny_data, out, quick=True, trials=2, image_size=32, model="resnet18", weights="random",
                      strategies="head", cache_dir=str(tmp_path / "cache"), log=None, progress=False, wandb="offline")
    trials = offline_runs(out / "sweeps" / "partA" / "trials")
    assert len({r.run_id for r in trials}) == 2 and {r.group for r in trials} == {"partA"}
    part_b = offline_runs(out / "runs" / "partB-head" / "wandb")
    for runs in (trials, part_b):
        tested = [r for r in runs if "test_acc" in r.summary]
        assert tested and all(r.run_id in {t.run_id for t in runs if "val_acc" in t.summary} for r in tested)
    assert any(k.startswith("explain/") for r in trials for row in r.history for k in row)  # the best trial's


SIGTERM_AFTER_A_BETTER_CHECKPOINT = """
import os, signal, sys
from cnnlab import callbacks
save = callbacks.Checkpoints.on_epoch_end
def save_then_stop(self, run, record):
    save(self, run, record)
    if record["epoch"] >= 3 and run.improved:  # best.pt now holds an epoch no log line has yet
        os.kill(os.getpid(), signal.SIGTERM)
callbacks.Checkpoints.on_epoch_end = save_then_stop
from cnnlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_the_agents_sigterm_ends_the_wandb_run_with_what_was_trained(tiny_data, tmp_path):
    """hyperband stops a run by sending it SIGTERM: the run ends, W&B's file has its epochs, its best as summary and
    the tag 'interrupted', and the run folder can be resumed. The SIGTERM lands at the worst moment, on purpose (the
    process sends it to itself): just after a better epoch's checkpoint, before its metrics line and W&B row. Before,
    the summary then named that epoch, which no history holds (CI met it by chance)."""
    import signal

    env = agent_environment(tmp_path, "run9")
    argv = ["train", "--data", str(tiny_data), "--image_size=32", "--filters=8", "--dense_units=32", "--batch_size=16",
            "--epochs=200", "--device=cpu", "--precision=fp32", "--decode_workers=1", "--cache_dir",
            str(tmp_path / "cache"), "--out", str(tmp_path / "runs"), "--name=agent", "--quiet"]
    done = subprocess.run([sys.executable, "-c", SIGTERM_AFTER_A_BETTER_CHECKPOINT, *argv], env=env,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    assert done.returncode == 128 + signal.SIGTERM and "Traceback" not in done.stderr, done.stderr
    metrics = tmp_path / "runs" / "agent" / "metrics.jsonl"
    [run] = offline_runs(tmp_path / "runs" / "agent" / "wandb")
    epochs = read_jsonl(metrics)
    assert "interrupted" in run.tags and len([r for r in run.history if "val_acc" in r]) == len(epochs) >= 2
    best = max(epochs, key=lambda e: (e["val_acc"], -e["val_loss"], -e["epoch"]))  # by hand: val_acc, then val_loss
    assert run.summary["val_acc"] == best["val_acc"] and run.summary["best_epoch"] == best["epoch"]
    assert (tmp_path / "runs" / "agent" / "last.pt").is_file()
