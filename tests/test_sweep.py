"""Sweeps on the embedded engine: real journal/SQLite/PostgreSQL storages, real processes, real SIGKILL."""

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cnnlab.sweeps import SweepError, load_sweep, parse_sweep, run_sweep
from cnnlab.sweeps.engine import orphans

TINY = ["--image_size=32", "--filters=4", "--dense_units=16", "--batch_size=32", "--decode_workers=1", "--quiet"]


def tiny_base(data, cache):
    return {"data": str(data), "image_size": 32, "filters": 4, "dense_units": 16, "batch_size": 32,
            "cache_dir": str(cache), "decode_workers": 1}


def write(path, sweep):
    path.write_text(yaml.safe_dump(sweep))
    return path


def study_of(folder, name, storage=None):
    import optuna

    from cnnlab.sweeps import make_storage

    return optuna.load_study(study_name=name, storage=make_storage(storage, folder))


# ---- the sweep file ---------------------------------------------------------------------------------------------

def test_every_wandb_parameter_form_parses():
    raw = {
        "program": "train.py", "command": ["${env}", "python", "${program}", "${args}"], "name": "forms",
        "method": "random", "metric": {"name": "val_acc", "goal": "maximize"}, "run_cap": 5,
        "early_terminate": {"type": "hyperband", "min_iter": 3, "eta": 2},
        "parameters": {
            "epochs": {"value": 7},
            "activation": {"values": ["relu", "gelu"]},
            "optimizer": {"values": ["adam", "sgd"], "probabilities": [0.7, 0.3]},
            "dense_units": {"distribution": "int_uniform", "min": 64, "max": 512},
            "dropout": {"min": 0.1, "max": 0.5},
            "label_smoothing": {"distribution": "q_uniform", "min": 0.0, "max": 0.2, "q": 0.05},
            "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "weight_decay": {"distribution": "log_uniform", "min": -9.2, "max": -4.6},
            "momentum": {"distribution": "normal", "mu": 0.9, "sigma": 0.02},
            "grad_clip": {"distribution": "q_log_uniform_values", "min": 0.5, "max": 8, "q": 0.5},
            "model_block": {"parameters": {"filters": {"values": [16, 32]}, "kernel_size": {"values": [3, 5]}}},
        }}
    sweep = parse_sweep(raw)
    assert sweep.name == "forms" and sweep.run_cap == 5 and sweep.hyperband == {"min_iter": 3, "eta": 2}
    assert sweep.params["dense_units"].distribution == "int_uniform"
    assert sweep.params["dropout"].distribution == "uniform"
    assert {"filters", "kernel_size"} <= set(sweep.params)  # nested block flattened

    import optuna

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    from cnnlab.sweeps import suggest

    for _ in range(20):
        values = suggest(study.ask(), sweep)
        assert isinstance(values["dense_units"], int) and 64 <= values["dense_units"] <= 512
        assert 1e-4 <= values["lr"] <= 1e-2 and values["epochs"] == 7
        assert abs(values["label_smoothing"] / 0.05 - round(values["label_smoothing"] / 0.05)) < 1e-9
        assert 0.0001 < values["weight_decay"] < 0.0101 and values["optimizer"] in ("adam", "sgd")
        assert values["grad_clip"] % 0.5 == 0


def test_hyperband_with_max_iter_and_s():
    sweep = parse_sweep({"method": "bayes", "metric": {"name": "val_loss", "goal": "minimize"},
                         "early_terminate": {"type": "hyperband", "max_iter": 27, "eta": 3, "s": 2},
                         "parameters": {"lr": {"min": 0.001, "max": 0.1}}})
    assert sweep.hyperband == {"min_iter": 9, "max_iter": 27, "eta": 3} and sweep.direction == "minimize"


@pytest.mark.parametrize("raw,needle", [
    ({"method": "random", "parameters": {"lr": {"min": 0.1, "max": 0.01}}}, "parameter 'lr': min (0.1) must be less than max (0.01)"),
    ({"method": "evolution", "parameters": {"lr": {"value": 0.1}}}, "method 'evolution'"),
    ({"method": "random", "parameters": {"lr": {"distribution": "zipf", "min": 1, "max": 2}}}, "parameter 'lr': unknown distribution 'zipf'"),
    ({"method": "random", "parameters": {"filters": {"values": []}}}, "parameter 'filters': values must be a non-empty list"),
    ({"method": "random", "parameters": {"filtres": {"values": [16]}}}, "parameter 'filtres': not a cnnlab config key"),
    ({"method": "random", "parameters": {"activation": {"values": ["relu", "tanh"]}}}, "parameter 'activation'"),
    ({"method": "grid", "parameters": {"lr": {"min": 0.001, "max": 0.1}}}, "parameter 'lr': grid search needs value or values"),
    ({"method": "random", "metric": {"name": "accuracy"}, "parameters": {"lr": {"value": 0.1}}}, "metric name 'accuracy'"),
    ({"method": "random", "early_terminate": {"type": "hyperband", "max_iter": 9}, "parameters": {"lr": {"value": 0.1}}}, "needs s"),
])
def test_malformed_sweep_files_name_the_problem(raw, needle):
    with pytest.raises(SweepError) as e:
        parse_sweep(raw)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_shipped_part_a_sweep_parses():
    sweep = load_sweep(Path(__file__).parents[1] / "sweeps" / "partA.yaml")
    assert sweep.method == "bayes" and sweep.hyperband and sweep.run_cap == 40
    assert set(sweep.params) >= {"filters", "filter_org", "activation", "batch_norm", "augment", "dropout",
                                 "dense_units", "batch_size", "lr", "kernel_size", "epochs"}


# ---- running --------------------------------------------------------------------------------------------------------

def grid_file(tmp_path, name="grid", a=(4, 8), b=("relu", "gelu"), epochs=2):
    return write(tmp_path / f"{name}.yaml", {"method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
                                             "parameters": {"filters": {"values": list(a)},
                                                            "activation": {"values": list(b)},
                                                            "epochs": {"value": epochs}}})


def completed_points(study):
    from optuna.trial import TrialState

    return sorted((t.user_attrs["config"]["filters"], t.user_attrs["config"]["activation"])
                  for t in study.get_trials() if t.state == TrialState.COMPLETE)


@pytest.mark.cpu_kind
@pytest.mark.slow
def test_grid_runs_each_point_once_and_reports(tiny_data, tmp_path):
    sweep = load_sweep(grid_file(tmp_path))
    result = run_sweep(sweep, tiny_base(tiny_data, tmp_path / "cache"), tmp_path / "sweeps" / "grid", progress=False,
                       log=lambda s: None)
    assert result.complete == 4
    study = study_of(tmp_path / "sweeps" / "grid", "grid")
    assert completed_points(study) == sorted(itertools.product((4, 8), ("relu", "gelu")))
    for t in study.get_trials():  # each trial is a normal run folder, recorded relative to the sweep folder
        assert t.user_attrs["run_dir"] == f"trials/trial-{t.number:04d}"
        assert (tmp_path / "sweeps" / "grid" / t.user_attrs["run_dir"] / "best.pt").exists()
    again = run_sweep(sweep, tiny_base(tiny_data, tmp_path / "cache"), tmp_path / "sweeps" / "grid", progress=False,
                      log=lambda s: None)
    assert again.ran == 0  # resumable: a finished grid has nothing left

    from cnnlab.cli import main

    assert main(["sweep-report", str(tmp_path / "sweeps" / "grid")]) == 0
    report = tmp_path / "sweeps" / "grid" / "report"
    for name in ("index.html", "accuracy_vs_created.png", "parallel_coordinates.png", "importance.png",
                 "correlations.md", "best_trials.md", "best.yaml"):
        assert (report / name).exists(), name
    assert "data:image/png;base64," in (report / "index.html").read_text()
    best = yaml.safe_load((report / "best.yaml").read_text())
    from cnnlab.config import make_config

    assert make_config(best).filters in (4, 8)  # `cnnlab train --config best.yaml` accepts it


def test_a_trial_keeps_the_epoch_of_the_sweeps_metric_and_is_scored_there(tiny_data, tmp_path):
    import json

    import torch

    path = write(tmp_path / "loss.yaml", {"method": "grid", "metric": {"name": "train_loss", "goal": "minimize"},
                                          "parameters": {"lr": {"values": [0.01]}, "epochs": {"value": 4}}})
    base = {**tiny_base(tiny_data, tmp_path / "cache"), "filters": 8, "dense_units": 32, "batch_size": 16,
            "precision": "fp32", "device": "cpu"}  # one history on every CPU
    run_sweep(load_sweep(path), base, tmp_path / "sweeps" / "loss", progress=False, log=lambda s: None)
    (trial,) = study_of(tmp_path / "sweeps" / "loss", "loss").get_trials()
    folder = tmp_path / "sweeps" / "loss" / trial.user_attrs["run_dir"]
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    lowest = min(history, key=lambda r: (r["train_loss"], r["epoch"]))  # by hand: the epoch of the lowest train_loss
    by_accuracy = max(history, key=lambda r: (r["val_acc"], -r["val_loss"], -r["epoch"]))
    assert lowest["epoch"] != by_accuracy["epoch"]  # where the old rules (best.pt by val_acc) kept another epoch
    kept = torch.load(folder / "best.pt", map_location="cpu", weights_only=True)
    assert kept["epoch"] == lowest["epoch"] and trial.value == lowest["train_loss"]  # the checkpoint and the score agree
    assert yaml.safe_load((folder / "config.yaml").read_text())["keep_best"] == "train_loss"


def test_random_respects_run_cap_and_types(tiny_data, tmp_path):
    path = write(tmp_path / "rnd.yaml", {"method": "random", "run_cap": 3, "parameters": {
        "dense_units": {"distribution": "int_uniform", "min": 8, "max": 32},
        "lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 1e-2},
        "batch_norm": {"values": [True, False]}, "epochs": {"value": 1}}})
    result = run_sweep(load_sweep(path), tiny_base(tiny_data, tmp_path / "cache"), tmp_path / "sw", count=10,
                       progress=False, log=lambda s: None)
    assert result.ran == 3
    for t in study_of(tmp_path / "sw", "rnd").get_trials():
        c = t.user_attrs["config"]
        assert isinstance(c["dense_units"], int) and isinstance(c["batch_norm"], bool) and isinstance(c["lr"], float)
        run_cfg = yaml.safe_load((tmp_path / "sw" / t.user_attrs["run_dir"] / "config.yaml").read_text())
        assert run_cfg["dense_units"] == c["dense_units"] and run_cfg["epochs"] == 1


@pytest.mark.slow
def test_hyperband_prunes_lagging_trials(tiny_data, tmp_path):
    good, bad = [5e-3, 4e-3, 3e-3, 2e-3], [1e-7, 2e-7, 3e-7, 4e-7]
    path = write(tmp_path / "hb.yaml", {"method": "grid", "metric": {"name": "train_loss", "goal": "minimize"},
                                        "early_terminate": {"type": "hyperband", "min_iter": 2, "eta": 2},
                                        "parameters": {"lr": {"values": good + bad}, "epochs": {"value": 4}}})
    # The first rung at epoch 2, on the training loss, fp32, no warm-up: on the 40 validation images of tiny_data
    # the good and bad rates ended epoch 1 0.005 apart, and the pruner's choice hung on bf16 rounding.
    base = {**tiny_base(tiny_data, tmp_path / "cache"), "filters": 8, "dense_units": 32, "batch_size": 16,
            "precision": "fp32", "warmup_epochs": 0}
    result = run_sweep(load_sweep(path), base, tmp_path / "sw", progress=False, log=lambda s: None)
    from optuna.trial import TrialState

    trials = study_of(tmp_path / "sw", "hb").get_trials()
    at_rung = {t.params["lr"]: t.intermediate_values[2] for t in trials}
    assert min(at_rung[lr] for lr in bad) - max(at_rung[lr] for lr in good) > 0.05, at_rung  # a margin, not rounding
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    assert result.pruned == len(pruned) >= 1
    assert all(t.params["lr"] in bad for t in pruned)
    assert all(t.user_attrs["epochs_run"] < 4 for t in pruned)


def test_a_failing_trial_is_recorded_and_the_sweep_goes_on(tiny_data, tmp_path):
    path = write(tmp_path / "fail.yaml", {"method": "grid", "parameters": {
        "weights": {"values": [str(tmp_path / "missing.pth"), "random"]}, "epochs": {"value": 1}}})  # fails in fit
    base = tiny_base(tiny_data, tmp_path / "cache") | {"model": "resnet18", "finetune": "head", "weights": "random"}
    result = run_sweep(load_sweep(path), base, tmp_path / "sw", progress=False, log=lambda s: None)
    assert (result.failed, result.complete) == (1, 1)
    failed = [t for t in study_of(tmp_path / "sw", "fail").get_trials() if t.state.name == "FAIL"][0]
    assert "missing.pth" in failed.user_attrs["error"]
    assert (tmp_path / "sw" / "errors" / f"trial-{failed.number:04d}.txt").exists()


def test_a_grid_drops_the_points_that_cannot_run_up_front(tiny_data, tmp_path):
    path = write(tmp_path / "small.yaml", {"method": "grid", "parameters": {
        "image_size": {"values": [16, 32]}, "conv1_stride": {"values": [1, 2]}, "epochs": {"value": 1}}})
    lines: list[str] = []
    result = run_sweep(load_sweep(path), tiny_base(tiny_data, tmp_path / "cache"), tmp_path / "sw", progress=False,
                       log=lines.append)
    study = study_of(tmp_path / "sw", "small")
    # 16 px cannot take 5 poolings at any stride; 32 px not after a stride-2 first conv: only (32, 1) runs
    assert (result.complete, result.failed, len(study.trials)) == (1, 0, 1)
    assert study.trials[0].params == {"image_size": 32, "conv1_stride": 1}
    dropped = study.user_attrs["grid_dropped"]
    assert sum(dropped.values()) == 3
    assert any("image_size=32" in why and "stride-2 first convolution, so it needs at least 64" in why for why in dropped)
    assert any(line.startswith("dropped 1 of the grid's 4 points that cannot run") and "image_size=16" in line
               for line in lines), lines


def test_random_and_bayes_skip_sampled_combinations_that_cannot_run(tiny_data, tmp_path):
    for method in ("random", "bayes"):
        path = write(tmp_path / f"{method}.yaml", {"method": method, "name": f"skip-{method}", "parameters": {
            "conv1_stride": {"values": [1, 2]}, "filters": {"values": [4, 6]}, "epochs": {"value": 1}}})
        lines: list[str] = []
        result = run_sweep(load_sweep(path), tiny_base(tiny_data, tmp_path / "cache"), tmp_path / method, count=3,
                           progress=False, log=lines.append)
        study = study_of(tmp_path / method, f"skip-{method}")
        trained = [t for t in study.trials if "infeasible" not in t.user_attrs]
        skipped = [t for t in study.trials if "infeasible" in t.user_attrs]
        # 32 px images and a stride-2 first conv never train; they cost none of the 3 trials asked for
        assert result.ran == result.complete == len(trained) == 3 and result.failed == 0
        assert all(t.params["conv1_stride"] == 1 for t in trained)
        assert skipped and all(t.params["conv1_stride"] == 2 and t.state.name == "PRUNED" for t in skipped)
        assert sum(result.skipped.values()) == len(skipped)
        assert any(line.startswith(f"skipped {len(skipped)} sampled combination(s) that cannot run") for line in lines)


def test_a_space_of_combinations_that_cannot_run_is_refused(tiny_data, tmp_path):
    path = write(tmp_path / "never.yaml", {"method": "random", "parameters": {
        "conv1_stride": {"values": [2]}, "filters": {"values": [4, 6]}, "epochs": {"value": 1}}})
    with pytest.raises(SweepError, match="no sampled combination can run with these flags .*needs at least 64"):
        run_sweep(load_sweep(path), tiny_base(tiny_data, tmp_path / "cache"), tmp_path / "never", count=2,
                  progress=False, log=lambda s: None, max_skips=8)
    assert not (tmp_path / "never").exists()  # refused before the study was made


def _sweep_cmd(path, data, tmp_path, *extra):
    return [sys.executable, "-m", "cnnlab.cli", "sweep", str(path), "--data", str(data), "--cache_dir",
            str(tmp_path / "cache"), "--sweeps_dir", str(tmp_path / "sweeps"), *TINY, *extra]


@pytest.mark.slow
def test_two_processes_share_a_journal_study_via_workers(tiny_data, tmp_path):
    path = grid_file(tmp_path, "shared", a=(4, 6, 8), b=("relu", "gelu"))
    # --count 3: each worker runs three of the six points, so both work whatever their start-up times (before: one
    # worker could take every point while the other was still starting)
    subprocess.run(_sweep_cmd(path, tiny_data, tmp_path, "--workers", "2", "--count", "3"), check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    study = study_of(tmp_path / "sweeps" / "shared", "shared")
    assert completed_points(study) == sorted(itertools.product((4, 6, 8), ("relu", "gelu")))
    owners = [t.user_attrs["owner"]["pid"] for t in study.get_trials() if "owner" in t.user_attrs]
    assert sorted(owners.count(pid) for pid in set(owners)) == [3, 3]  # two processes, three trials each


def test_worker_i_gets_gpu_i_mod_n_and_its_share_of_the_cores():
    from cnnlab.sweeps.workers import visible_gpus, worker_envs

    envs = worker_envs(3, {"PATH": "/bin"}, ["0", "1"], cores=8)
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "0"]
    assert [e["CNNLAB_WORKER"] for e in envs] == ["0", "1", "2"] and {e["CNNLAB_THREADS"] for e in envs} == {"2"}
    assert [e["CUDA_VISIBLE_DEVICES"] for e in worker_envs(4, {}, ["2", "5"], cores=2)] == ["2", "5", "2", "5"]
    assert all("CUDA_VISIBLE_DEVICES" not in e for e in worker_envs(2, {}, [], cores=2))  # no GPU: none is named
    import torch

    if not torch.cuda.is_available():
        assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == []


@pytest.mark.slow
def test_each_worker_process_runs_on_the_gpu_it_was_given(tiny_data, tmp_path):
    """Real worker processes, spawned as `--workers 2` spawns them on a 2-GPU machine: each trial records the
    environment its process received (on a CPU machine the device stays the CPU)."""
    from cnnlab.run_folder import RunFolder
    from cnnlab.sweeps import launch_workers

    path = grid_file(tmp_path, "gpus", a=(4, 6, 8), b=("relu", "gelu"), epochs=1)
    gpus = ["3", "7"]  # ids that are not worker numbers: a worker index passed off as a GPU id would show
    base = {**tiny_base(tiny_data, tmp_path / "cache"), "image_size": 40}
    assert launch_workers(load_sweep(path), base, tmp_path / "sweeps", 2, None, gpus=gpus, log=lambda s: None) == 0
    study = study_of(tmp_path / "sweeps" / "gpus", "gpus")
    # the base config reached every trial as data (no command line rebuilt from it and parsed again)
    configs = [RunFolder(tmp_path / "sweeps" / "gpus" / t.user_attrs["run_dir"]).config for t in study.get_trials()]
    assert len(configs) == 6 and {(c.image_size, c.dense_units, c.data) for c in configs} == {(40, 16, str(tiny_data))}
    owners = [t.user_attrs["owner"] for t in study.get_trials() if "owner" in t.user_attrs]
    assert len(owners) == 6
    by_worker = {}
    for owner in owners:
        by_worker.setdefault(owner["worker"], set()).add((owner["pid"], owner["gpu"]))
    # what each child process read from its own environment: worker i on GPU gpus[i mod n]
    assert {w: {gpu for _, gpu in seen} for w, seen in by_worker.items()} == {str(i): {gpus[i % 2]} for i in range(2)}
    assert all(len(seen) == 1 for seen in by_worker.values())  # one process per worker, on one GPU
    assert len({pid for seen in by_worker.values() for pid, _ in seen}) == 2 and os.getpid() not in {
        pid for seen in by_worker.values() for pid, _ in seen}  # two real processes, neither this one


@pytest.mark.slow
def test_killed_sweep_process_resumes_without_losing_or_repeating(tiny_data, tmp_path):
    path = grid_file(tmp_path, "killed", epochs=6)
    proc = subprocess.Popen(_sweep_cmd(path, tiny_data, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "sweeps" / "killed" / "trials" / "trial-0001" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and not (second.exists() and second.read_text().count("\n") >= 1):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    subprocess.run(_sweep_cmd(path, tiny_data, tmp_path), check=True, timeout=300, stdout=subprocess.DEVNULL)
    study = study_of(tmp_path / "sweeps" / "killed", "killed")
    assert completed_points(study) == sorted(itertools.product((4, 8), ("relu", "gelu")))
    failed = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert len(failed) == 1 and failed[0].number == 1 and orphans(study) == {1: "orphaned: its sweep process died"}
    retry = [t for t in study.get_trials() if t.user_attrs.get("retry_of") == 1]
    assert len(retry) == 1 and retry[0].params == failed[0].params and retry[0].state.name == "COMPLETE"


# ---- PostgreSQL -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_share_a_postgresql_study(postgres, tiny_data, tmp_path):
    path = grid_file(tmp_path, "pg", a=(4, 6, 8), b=("relu", "gelu"))
    procs = [subprocess.Popen(_sweep_cmd(path, tiny_data, tmp_path, "--storage", postgres), stdout=subprocess.DEVNULL)
             for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    study = study_of(tmp_path / "sweeps" / "pg", "pg", storage=postgres)
    assert completed_points(study) == sorted(itertools.product((4, 6, 8), ("relu", "gelu")))
    from cnnlab.cli import main

    assert main(["sweep-report", str(tmp_path / "sweeps" / "pg"), "--storage", postgres]) == 0


@pytest.mark.slow
def test_processes_joining_a_random_sweep_propose_their_own_points(tiny_data, tmp_path):
    path = write(tmp_path / "rand2.yaml", {"method": "random", "parameters": {
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2}, "epochs": {"value": 1}}})
    subprocess.run(_sweep_cmd(path, tiny_data, tmp_path, "--workers", "2", "--count", "2"), check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    trials = study_of(tmp_path / "sweeps" / "rand2", "rand2").get_trials()
    assert len(trials) == 4 and len({t.params["lr"] for t in trials}) == 4


def test_shipped_sweep_files_parse():
    root = Path(__file__).resolve().parents[1] / "sweeps"
    for name in ("partA", "partB"):
        sweep = load_sweep(root / f"{name}.yaml")
        assert sweep.name == name and sweep.method == "bayes" and sweep.metric == "val_acc"


@pytest.mark.slow
def test_knobs_a_strategy_does_not_use_are_dropped_not_failed(tiny_data, tmp_path):
    """A W&B sweep cannot make freeze_stages conditional on finetune=partial: head trials run without it."""
    path = write(tmp_path / "b.yaml", {"method": "grid", "parameters": {
        "finetune": {"values": ["head", "partial"]}, "freeze_stages": {"values": [2]}, "epochs": {"value": 1}}})
    base = {**tiny_base(tiny_data, tmp_path / "cache"), "model": "resnet18", "weights": "random", "augment": False}
    result = run_sweep(load_sweep(path), base, tmp_path / "sw", progress=False, log=lambda s: None)
    assert result.complete == 2 and result.failed == 0
    configs = {t.user_attrs["config"]["finetune"]: t.user_attrs["config"] for t in study_of(tmp_path / "sw", "b").get_trials()}
    assert configs["head"] == {"finetune": "head", "epochs": 1}
    assert configs["partial"] == {"finetune": "partial", "freeze_stages": 2, "epochs": 1}
