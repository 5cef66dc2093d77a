"""A newcomer's usual mistakes and first questions: each answered in one line, with the fix."""

import json
import subprocess
import sys

import pytest
import yaml

from cnnlab.cli import main
from cnnlab.sweeps import load_sweep


@pytest.mark.parametrize("text,where,problem", [
    ("a: {b: 1\nc: 2\n", ":2:2:", "expected ',' or '}'"),
    ("lr: 1\n\tfilters: 2\n", ":2:1:", "cannot start any token"),
])
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_yaml_errors_say_file_line_column_and_problem(tmp_path, capsys, text, where, problem, command):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    argv = ["train", "--config", str(path)] if command == "train" else ["sweep", str(path)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}{where}" in err and problem in err and len(err.splitlines()) == 1


def test_version_and_help_texts(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("cnnlab ")
    from cnnlab.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["info"].format_help()
    assert "--epochs" not in text and "--filters" in text  # info shows the architecture's flags only
    train = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "2,147,483,647" in train and "e+09" not in train


def test_info_counts_the_classes_of_the_data(tiny_data, tmp_path, capsys):
    import shutil

    three = tmp_path / "three"
    for name in sorted(p.name for p in (tiny_data / "train").iterdir())[:3]:  # not the 10 info assumes without --data
        shutil.copytree(tiny_data / "train" / name, three / "train" / name)
    assert main(["info", "--data", str(three), "--image_size", "32", "--filters", "4"]) == 0
    assert "3 classes" in capsys.readouterr().out


def test_evaluate_takes_a_run_folder_and_refuses_a_non_checkpoint_safely(tiny_cfg, tiny_data, tmp_path, capsys):
    from cnnlab.training import fit

    run = fit(tiny_cfg(epochs=1), progress=False).run_dir
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--cache_dir", str(tmp_path / "cache"), "--quiet"]) == 0
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    assert metrics["checkpoint_epoch"] == 1 and len(metrics["checkpoint_sha256"]) == 64
    fake = tmp_path / "model.pt"
    fake.write_bytes(b"not a checkpoint")
    capsys.readouterr()
    assert main(["evaluate", str(fake), "--data", str(tiny_data)]) == 2
    err = capsys.readouterr().err
    assert "is not a cnnlab checkpoint" in err and "weights_only=False" not in err and len(err.strip().splitlines()) == 1


def test_compare_marks_a_test_score_of_an_older_best_checkpoint(tiny_cfg, tiny_data, tmp_path, capsys):
    from cnnlab.training import fit

    cfg = tiny_cfg(epochs=1, lr=3e-3)
    run = fit(cfg, progress=False).run_dir
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--cache_dir", str(tmp_path / "cache"), "--quiet"]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "4", "--quiet"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    assert main(["compare", str(run), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert ("stale" in table) == (summary["best_epoch"] != 1)
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    assert "has finished all 4 epochs" in capsys.readouterr().out


def test_log_uniform_bounds_that_look_like_values_are_followed_but_warned(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"method": "random", "parameters": {
        "lr": {"distribution": "log_uniform", "min": 1e-4, "max": 1e-2},
        "dropout": {"distribution": "log_uniform", "min": -3, "max": -1}}}))
    sweep = load_sweep(path)
    assert len(sweep.warnings) == 1 and "lr" in sweep.warnings[0] and "log_uniform_values" in sweep.warnings[0]


@pytest.mark.slow
def test_a_failed_trial_is_one_line_and_progress_bars_never_reach_a_file(tiny_data, tmp_path):
    path = tmp_path / "fail.yaml"  # a weights file that is not there: known only when the trial builds its model
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"model": {"value": "resnet18"},
                                                                     "finetune": {"values": ["head"]},
                                                                     "weights": {"values": [str(tmp_path / "w.pth")]}}}))
    argv = [sys.executable, "-m", "cnnlab.cli", "sweep", str(path), "--data", str(tiny_data), "--image_size=32",
            "--filters=4", "--dense_units=8", "--batch_norm=false", "--cache_dir", str(tmp_path / "cache"),
            "--sweeps_dir", str(tmp_path / "sweeps")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.startswith("trial") and " fail " in ln]
    assert len(lines) == 1 and "w.pth" in lines[0] and "errors/trial-0000.txt" in lines[0], lines
    assert "Traceback" not in done.stdout + done.stderr and "\r" not in done.stderr  # no bars in a file
    assert (tmp_path / "sweeps" / "fail" / "errors" / "trial-0000.txt").read_text().startswith("Traceback")


def test_a_combination_the_config_refuses_is_one_line_and_never_trained(tiny_data, tmp_path):
    path = tmp_path / "refused.yaml"  # a frozen backbone without weights: refused before any training
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"model": {"value": "resnet18"},
                                                                     "finetune": {"values": ["head"]}}}))
    argv = [sys.executable, "-m", "cnnlab.cli", "sweep", str(path), "--data", str(tiny_data), "--image_size=32",
            "--cache_dir", str(tmp_path / "cache"), "--sweeps_dir", str(tmp_path / "sweeps")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr  # the grid's only point cannot run: the sweep is refused at once
    said = done.stderr.strip().splitlines()
    assert len(said) == 1 and "no grid point can run with these flags" in said[0], said
    assert "finetune=head needs pretrained weights" in said[0]
    assert not (tmp_path / "sweeps").exists()  # nothing written, nothing trained


def test_predict_takes_folders_recursively_in_bounded_batches(tiny_cfg, tiny_data, tmp_path, capsys):
    from cnnlab.evaluate import load_model, predict_files
    from cnnlab.training import fit

    run = fit(tiny_cfg(epochs=1), progress=False).run_dir
    photos = tmp_path / "photos"
    (photos / "deeper").mkdir(parents=True)
    import shutil

    for i, f in enumerate(sorted((tiny_data / "val").rglob("*.jpg"))):
        shutil.copy(f, (photos / "deeper" if i % 2 else photos) / f"{i:03d}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    capsys.readouterr()
    assert main(["predict", str(run), str(photos)]) == 1  # one file failed, the others are predicted
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 40 and "broken.jpg" in err and len(err.strip().splitlines()) == 1
    loaded = load_model(run / "best.pt", __import__("torch").device("cpu"))
    files = [str(p) for p in sorted(photos.rglob("*.jpg"))]
    stream = predict_files(loaded, files, __import__("torch").device("cpu"), batch=7)
    assert [r["file"] for r in stream] == files  # in order, seven at a time
