"""The options every command shares (device, cache folder, progress bars, storage) are declared once and read once
into one `Common` carried to the work."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import pytest

from cnnlab.cli import build_parser
from cnnlab.options import CACHE_HELP, DEVICE_HELP, QUIET_HELP, STORAGE_HELP, Common, progress_bars

SHARED = {"--device": DEVICE_HELP, "--cache_dir": CACHE_HELP, "--quiet": QUIET_HELP, "--storage": STORAGE_HELP}


def help_of(command: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    return " ".join(out.getvalue().split())


def test_each_shared_flag_means_the_same_on_every_command_that_takes_it():
    takes = {"--device": ("evaluate", "predict", "assignment"), "--cache_dir": ("check", "evaluate", "explain", "assignment"),
             "--quiet": ("train", "lr-find", "check", "sweep", "assignment", "evaluate", "explain"),
             "--storage": ("sweep", "sweep-report", "assignment")}
    for flag, commands in takes.items():
        for command in commands:
            assert f"{flag} " in help_of(command) and " ".join(SHARED[flag].split()) in help_of(command), (command, flag)


@pytest.mark.parametrize("argv, expected", [
    (["evaluate", "runs/a", "--data", "d"], Common()),
    (["evaluate", "runs/a", "--data", "d", "--device", "cpu", "--cache_dir", "/c", "--quiet"],
     Common(device="cpu", cache_dir="/c", progress=False)),
    (["assignment", "--data", "d", "--storage", "sqlite:///s.db", "--device", "cuda:1"],
     Common(device="cuda:1", storage="sqlite:///s.db")),
    (["train", "--device", "cpu"], Common(device="cpu")),
    (["predict", "runs/a", "x.jpg"], Common()),
    (["assignment", "--data", "d", "--wandb", "offline"], Common(wandb="offline")),
])
def test_the_flags_are_read_into_one_common_object(argv, expected):
    args, _ = build_parser().parse_known_args(argv)
    common = Common.from_args(args)
    assert common == expected
    given = (("device", expected.device), ("cache_dir", expected.cache_dir), ("wandb", expected.wandb))
    assert common.config_values() == {k: v for k, v in given if v and v != "auto"}
    assert common.for_model() == {"device": expected.device, "cache_dir": expected.cache_dir,
                                  "progress": expected.progress, "log": print}


def test_progress_bars_follow_one_rule():
    """As asked; else on a terminal, never into a redirected file: checked in real processes, one whose stderr is
    a pseudo-terminal and one whose stderr is a pipe."""
    assert progress_bars(True) and not progress_bars(False)
    probe = [sys.executable, "-c", "import sys; from cnnlab.options import progress_bars; print(progress_bars(None))"]
    piped = subprocess.run(probe, capture_output=True, text=True, timeout=60)
    leader, follower = os.openpty()
    try:
        on_terminal = subprocess.run(probe, stdout=subprocess.PIPE, stderr=follower, text=True, timeout=60)
    finally:
        os.close(leader)
        os.close(follower)
    assert (piped.stdout.strip(), on_terminal.stdout.strip()) == ("False", "True")
    assert Common(log=None).say("dropped") is None


def test_the_sweep_worker_command_is_a_launchers_child_not_in_help():
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    assert "sweep-worker" not in out.getvalue() and "sweep-report" in out.getvalue()


LIGHT = '''
import contextlib, io, json, sys
from cnnlab.cli import COMMANDS, main
heavy = ("torch", "torchvision", "optuna", "matplotlib", "scipy")
found = {}
for argv in [["--help"], *([c, "--help"] for c in COMMANDS), ["train", "--activation", "swish"], ["train", "--epoch", "3"],
             ["sweep", "no-such-file.yaml"], ["trian"]]:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
    found[" ".join(argv)] = [code, [m for m in heavy if m in sys.modules]]
print(json.dumps(found))
'''


def test_help_and_refused_arguments_import_no_torch_optuna_or_matplotlib():
    """`cnnlab --help`, each command's --help and the usual refusals answer at once: what they print needs none of the
    heavy packages (checked in one fresh interpreter, where nothing was imported before)."""
    import json

    from cnnlab.commands import COMMANDS

    done = subprocess.run([sys.executable, "-c", LIGHT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert len(found) == len(COMMANDS) + 5
    for argv, (code, heavy) in found.items():
        assert heavy == [], f"cnnlab {argv} imported {heavy}"
        assert code == (0 if argv.endswith("--help") else 2), argv
