"""A folder cnnlab wrote is a durable record: a full disk at any write (a real tmpfs, filled), a torn line, a file
replaced while it is read, and the rerun afterwards gives an uninterrupted run's numbers."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import missing_component

from cnnlab.cli import main
from cnnlab.errors import StorageError
from cnnlab.io import append_jsonl, read_jsonl, sha256_of
from cnnlab.run_folder import RunFolder

TINY = ["--image_size=32", "--filters=4", "--dense_units=16", "--batch_size=32", "--decode_workers=1", "--quiet",
        "--device=cpu", "--precision=fp32"]


class SmallDisk:
    """A tmpfs of its own, which `fill` leaves with `leave` bytes free: a real ENOSPC at the next write past that."""

    def __init__(self, root: Path) -> None:
        self.root, self.filler = root, root / ".filler"

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def fill(self, leave: int) -> None:
        self.empty()
        size = max(0, self.free_bytes() - leave)
        with open(self.filler, "wb") as fh:
            fh.truncate(0)
            os.posix_fallocate(fh.fileno(), 0, size) if size else None

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path):
    root = tmp_path / "disk"
    root.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(root)], capture_output=True, text=True)
    if mounted.returncode:
        missing_component("a tmpfs mount", f"the tests run as root, as CI does ({mounted.stderr.strip()})")
    yield SmallDisk(root)
    subprocess.run(["umount", "-l", str(root)], capture_output=True)


def used_bytes(folder: Path) -> int:
    """What a folder takes on a tmpfs: its files' pages."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in folder.rglob("*") if p.is_file())


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ---- JSON lines: the ledger, metrics.jsonl ----------------------------------------------------------------------

def test_a_torn_line_is_ended_before_the_next_append_and_no_good_line_is_lost(tmp_path):
    ledger = tmp_path / "test_ledger.jsonl"
    ledger.write_bytes(b'{"n": 1}\n{"n": 2, "acc')  # a kill in the middle of the second line
    append_jsonl(ledger, {"n": 3})
    append_jsonl(ledger, {"n": 4})
    assert ledger.read_bytes() == b'{"n": 1}\n{"n": 2, "acc\n{"n": 3}\n{"n": 4}\n'  # before: the third glued on
    assert [r["n"] for r in read_jsonl(ledger)] == [1, 3, 4]  # before: [1] (the reading stopped at the torn line)


def test_garbled_and_null_ledger_lines_are_counted_as_uses_and_the_report_says_so(tmp_path):
    from cnnlab.reporting.results import test_use_line

    run = tmp_path / "run"
    run.mkdir()
    good = {"checkpoint": "best.pt", "sha256": "a" * 64, "accuracy": 0.5}
    (run / "test_ledger.jsonl").write_bytes(json.dumps(good).encode() + b"\n\xff\xfe garbled\nnull\n[1, 2]\n"
                                            + json.dumps(good).encode() + b"\n")
    ledger = RunFolder(run).test_ledger
    assert len(ledger) == 5 and sum(1 for e in ledger if e.get("unreadable")) == 3
    line = test_use_line(RunFolder(run))  # before: UnicodeDecodeError, or AttributeError on None
    assert "met its test folder 5 time(s)" in line and "3 of its lines unreadable" in line


def test_an_append_the_full_disk_refuses_leaves_the_file_as_it_was(small_disk):
    ledger = small_disk.root / "test_ledger.jsonl"
    ledger.write_text(json.dumps({"pad": "x" * 4000}) + "\n")  # 4,014 bytes: the next line needs a new page
    before = ledger.read_bytes()
    small_disk.fill(leave=0)
    with pytest.raises(StorageError, match="could not append to .*test_ledger.jsonl .*No space left"):
        append_jsonl(ledger, {"accuracy": 0.9, "pad": "y" * 300})
    assert ledger.read_bytes() == before  # the part of the line that fitted is cut off again
    small_disk.empty()
    append_jsonl(ledger, {"accuracy": 0.9})
    assert [r.get("accuracy") for r in read_jsonl(ledger)] == [None, 0.9]


# ---- a sweep's journal ------------------------------------------------------------------------------------------

def grid(tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
                                    "parameters": {"filters": {"values": [4, 6, 8]}, "epochs": {"value": 1}}}))
    return path


def sweep_argv(path: Path, data: Path, sweeps: Path, cache: Path) -> list[str]:
    return ["sweep", str(path), "--data", str(data), "--sweeps_dir", str(sweeps), "--cache_dir", str(cache), *TINY]


def values_by_point(folder: Path, name: str) -> dict[int, float]:
    from cnnlab.sweeps.report import finished_trials, load_study

    study = load_study(folder)
    return {t.user_attrs["config"]["filters"]: t.value for t in finished_trials(study) if t.state.name == "COMPLETE"}


def test_a_journal_with_a_torn_last_line_takes_the_next_trials(tiny_data, tmp_path, capsys):
    path = grid(tmp_path, "torn")
    argv = sweep_argv(path, tiny_data, tmp_path / "sweeps", tmp_path / "cache")
    assert main([*argv, "--count", "1"]) == 0
    journal = tmp_path / "sweeps" / "torn" / "journal.log"
    journal.write_bytes(journal.read_bytes() + b'{"op_code":5,"worker_id":"x","trial_id":1,"us')  # as a full disk left it
    assert main(argv) == 0  # before: the next append joined the torn line, and every later read was a JSONDecodeError
    assert sorted(values_by_point(tmp_path / "sweeps" / "torn", "torn")) == [4, 6, 8]
    assert (journal.parent / "journal.log.torn").read_bytes().startswith(b'{"op_code":5')  # kept aside, not lost
    assert main(["sweep-report", str(tmp_path / "sweeps" / "torn")]) == 0


def leaves(need: int) -> list[int]:
    """Free space to leave on the disk so that it fills at a different write each time: the first pages (the lock,
    the journal, config.yaml, split.json, the first checkpoint), the middle, and the last pages (the last metrics
    line, summary.json): what the whole uninterrupted job wrote, `need`, less a few pages."""
    page = 4096
    return sorted({0, page, 2 * page, 4 * page, need // 2, need - 3 * page, need - 2 * page})


@pytest.mark.slow
def test_a_sweep_that_fills_the_disk_stops_in_one_line_and_its_rerun_ends_as_an_uninterrupted_one(
        tiny_data, tmp_path, small_disk, capsys):
    """The disk fills at a different write each time (the journal, sweep.yaml, a trial's files, a checkpoint, a
    metrics line, summary.json); space is freed and the same command finishes the grid, every point's value the
    uninterrupted sweep's. Before: the journal was torn for good, and a failed point never ran again."""
    path, cache = grid(tmp_path, "full"), tmp_path / "cache"
    assert main(sweep_argv(path, tiny_data, tmp_path / "reference", cache)) == 0
    reference = values_by_point(tmp_path / "reference" / "full", "full")
    failed_at = set()
    for i, leave in enumerate(leaves(used_bytes(tmp_path / "reference" / "full"))):
        small_disk.fill(leave)
        argv = sweep_argv(path, tiny_data, small_disk.root / f"sweeps-{i}", cache)
        capsys.readouterr()
        assert main(argv) == 2, leave
        line = one_line(capsys)
        assert "No space left" in line and "free some disk space" in line and str(small_disk.root) in line, line
        failed_at.add(line.split(str(small_disk.root))[1].split()[0])
        small_disk.empty()
        assert main(argv) == 0
        assert values_by_point(small_disk.root / f"sweeps-{i}" / "full", "full") == reference
        shutil.rmtree(small_disk.root / f"sweeps-{i}")
    assert len(failed_at) >= 5, failed_at  # that many different writes


# ---- an evaluation ----------------------------------------------------------------------------------------------

@pytest.fixture
def trained(tiny_cfg):
    from cnnlab.training import fit

    return fit(tiny_cfg(epochs=1, name="evaluated"), progress=False, log=lambda s: None).run_dir


def test_an_evaluation_names_the_weights_it_read_even_when_training_replaces_them(trained, tiny_cfg, tiny_data,
                                                                                 monkeypatch):
    """`best.pt` replaced (training's atomic rename) after evaluate loaded it: the record names the bytes that made
    the numbers, so the evaluation reads as stale against the new file. Before: the new file's SHA-256 was written
    beside the old model's accuracy, and the stale score passed as current."""
    import cnnlab.evaluate as evaluate
    from cnnlab.training import fit

    other = fit(tiny_cfg(epochs=2, name="other", seed=5), progress=False, log=lambda s: None).run_dir
    loaded_bytes = (trained / "best.pt").read_bytes()
    real = evaluate.load_test_images

    def replaced_meanwhile(*args, **kwargs):
        os.replace(shutil.copy(other / "best.pt", trained / ".best.pt.tmp"), trained / "best.pt")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate, "load_test_images", replaced_meanwhile)
    assert main(["evaluate", str(trained), "--data", str(tiny_data), "--device", "cpu", "--quiet"]) == 0
    metrics = json.loads((trained / "eval" / "metrics.json").read_text())
    import hashlib

    assert metrics["checkpoint_sha256"] == hashlib.sha256(loaded_bytes).hexdigest() != sha256_of(trained / "best.pt")
    assert RunFolder(trained).test_ledger[-1]["sha256"] == metrics["checkpoint_sha256"]
    assert not RunFolder(trained).evaluated  # the whole job evaluates the new best.pt again


@pytest.mark.slow
def test_an_evaluation_the_full_disk_stops_is_not_done_and_its_rerun_gives_the_same_numbers(
        trained, tiny_data, tmp_path, small_disk, capsys):
    argv = lambda run: ["evaluate", str(run), "--data", str(tiny_data), "--device", "cpu", "--quiet",
                        "--cache_dir", str(tmp_path / "cache")]
    reference_run = shutil.copytree(trained, tmp_path / "reference")
    assert main(argv(reference_run)) == 0
    reference = json.loads((reference_run / "eval" / "metrics.json").read_text())
    failed_at = set()
    for i, leave in enumerate(leaves(used_bytes(reference_run / "eval"))):  # bad files, the figures, the mistakes
        run = shutil.copytree(trained, small_disk.root / f"run-{i}")
        small_disk.fill(leave)
        capsys.readouterr()
        assert main(argv(run)) == 2
        assert "No space left" in (line := one_line(capsys)) and str(run) in line, line
        failed_at.add(line.split(str(run))[1].split()[0])
        assert not RunFolder(run).evaluated and not (run / "eval" / "metrics.json").exists()  # before: done at reliability.png
        small_disk.empty()
        assert main(argv(run)) == 0
        again = json.loads((run / "eval" / "metrics.json").read_text())
        for key in ("accuracy", "accuracy_ci95", "confusion", "per_class", "calibration", "checkpoint_sha256", "mistakes"):
            assert again[key] == reference[key], key
        assert RunFolder(run).evaluated and {p.name for p in (run / "eval").iterdir()} == {
            p.name for p in (reference_run / "eval").iterdir()}
        ledger = RunFolder(run).test_ledger
        assert all(not e.get("unreadable") for e in ledger) and len(ledger) in (1, 2)  # each time the score was seen
        shutil.rmtree(run)
    assert len(failed_at) >= 4, failed_at


# ---- a training run ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_training_the_full_disk_stops_resumes_to_the_uninterrupted_numbers(tiny_data, tmp_path, small_disk, capsys):
    argv = lambda out: ["train", "--data", str(tiny_data), "--out", str(out), "--name", "r", "--epochs", "3",
                        "--cache_dir", str(tmp_path / "cache"), *TINY]
    assert main(argv(tmp_path / "reference")) == 0
    reference = [r["val_acc"] for r in read_jsonl(tmp_path / "reference" / "r" / "metrics.jsonl")]
    failed_at = set()
    for i, leave in enumerate(leaves(used_bytes(tmp_path / "reference" / "r"))):
        out = small_disk.root / f"runs-{i}"
        small_disk.fill(leave)
        capsys.readouterr()
        assert main(argv(out)) == 2, leave
        assert "No space left" in (line := one_line(capsys)) and str(out) in line, line
        failed_at.add(line.split(str(out))[1].split()[0])
        small_disk.empty()
        resumable = RunFolder(out / "r").resumable
        assert main(["train", "--resume", str(out / "r"), "--quiet"] if resumable else argv(out)) == 0
        assert [r["val_acc"] for r in read_jsonl(out / "r" / "metrics.jsonl")] == reference, leave
        shutil.rmtree(out)
    assert len(failed_at) >= 5, failed_at


# ---- flags ------------------------------------------------------------------------------------------------------

def test_sweep_sampler_seed_and_training_seed_are_two_flags(tiny_data, tmp_path):
    from cnnlab.cli import build_parser
    from cnnlab.commands import config_overrides
    from cnnlab.config import make_config

    args = build_parser().parse_args(["sweep", "s.yaml", "--sampler_seed", "5"])
    assert args.sampler_seed == 5 and "seed" not in config_overrides(args)  # before: every trial's seed became 5
    args = build_parser().parse_args(["sweep", "s.yaml", "--seed", "7"])
    assert args.sampler_seed == 0 and make_config(config_overrides(args)).seed == 7  # before: the sampler's, as '7'


# ---- a student and its teacher ----------------------------------------------------------------------------------

def test_a_resumed_student_learns_from_the_teacher_it_began_with_or_is_refused(tiny_cfg, tmp_path, capsys, monkeypatch):
    from cnnlab.training import fit

    monkeypatch.chdir(tmp_path)
    teacher = fit(tiny_cfg(name="teachA", epochs=2), progress=False, log=lambda s: None).run_dir
    other = fit(tiny_cfg(name="teachB", epochs=2, seed=4), progress=False, log=lambda s: None).run_dir
    student = fit(tiny_cfg(name="student", teacher="runs/teachA", epochs=1), progress=False, log=lambda s: None).run_dir
    began = json.loads((student / "teacher.json").read_text())
    assert yaml.safe_load((student / "config.yaml").read_text())["teacher"] == str(teacher.resolve())  # not as typed
    original = (teacher / "best.pt").read_bytes()
    (teacher / "best.pt").write_bytes((other / "best.pt").read_bytes())  # the teacher trained again (or replaced)
    kept = {p.name: p.read_bytes() for p in student.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main(["train", "--resume", str(student), "--epochs", "2", "--quiet"]) == 2  # before: recomputed, no word
    assert "is not the one" in one_line(capsys)
    assert {p.name: p.read_bytes() for p in student.iterdir() if p.is_file()} == kept  # refused before any write
    (teacher / "best.pt").write_bytes(original)
    # student and teacher moved together, resumed from a folder whose runs/teachA is another run of the same classes
    shutil.move(tmp_path / "runs", tmp_path / "moved")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "moved" / "teachB", elsewhere / "runs" / "teachA")
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(tmp_path / "moved" / "student"), "--epochs", "2", "--quiet"]) == 0
    now = json.loads((tmp_path / "moved" / "student" / "teacher.json").read_text())
    assert now["sha256"] == began["sha256"]
    config = yaml.safe_load((tmp_path / "moved" / "student" / "config.yaml").read_text())
    assert config["teacher"] == str(tmp_path / "moved" / "teachA" / "best.pt")  # where it is now, found beside it


def test_a_teacher_trained_on_other_photos_leaves_the_students_data_whole(tiny_data, tiny_cfg, tmp_path):
    from cnnlab.training import fit

    fewer = shutil.copytree(tiny_data, tmp_path / "fewer")
    for c in (fewer / "train").iterdir():  # the teacher saw a third of the photos fewer
        for f in sorted(c.iterdir())[::3]:
            f.unlink()
    teacher = fit(tiny_cfg(name="teacher", data=str(fewer), epochs=1), progress=False, log=lambda s: None).run_dir
    lines = []
    student = fit(tiny_cfg(name="student", teacher=str(teacher), epochs=1), progress=False, log=lines.append).run_dir
    theirs, ours = (json.loads((r / "split.json").read_text()) for r in (teacher, student))
    assert len(ours["train"]) + len(ours["val"]) == 160  # before: 106, the files the teacher's split named
    assert set(theirs["val"]) <= set(ours["val"]) and set(theirs["train"]) <= set(ours["train"])
    assert any("are in the teacher's split" in line and "split by this run's seed" in line for line in lines)
    assert not any("start a new run" in line for line in lines)


# ---- folders moved, copied, zipped ------------------------------------------------------------------------------

def test_a_sweep_run_from_another_folder_verifies_and_its_copy_reads_its_own_runs(tiny_data, tmp_path, monkeypatch):
    from cnnlab.api import SweepRun

    path, sweeps = grid(tmp_path, "moving"), tmp_path / "abs" / "sweeps"
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert main(sweep_argv(path, tiny_data, Path("../abs/sweeps"), tmp_path / "cache")) == 0  # a relative --sweeps_dir
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "b")
    assert main([*sweep_argv(path, tiny_data, sweeps, tmp_path / "cache"), "--verify", "1"]) == 0  # before: not found
    copy = shutil.copytree(sweeps / "moving", tmp_path / "copy")
    shutil.move(sweeps / "moving", tmp_path / "moved")
    for folder in (copy, tmp_path / "moved"):
        swept = SweepRun(folder)
        assert swept.best.folder.parent == folder / "trials" and swept.verified.folder.is_relative_to(folder)
        assert all(Path(t["run_dir"]).is_relative_to(folder) for t in swept.trials)
        assert main(["sweep-report", str(folder)]) == 0


@pytest.mark.slow
def test_an_assignment_folder_moved_or_unzipped_elsewhere_reports_and_resumes_there(tiny_data, tmp_path, monkeypatch,
                                                                                    capsys):
    """The whole job (Part A verified, Part B, the distilled student) with 2 trials; moved, and zipped and unpacked on
    "another machine" with the data at another path, where it goes on to 3 trials and reports its own files."""
    argv = lambda out, data, trials: [
        "assignment", "--data", str(data), "--out", str(out), "--quick", "--trials", str(trials), "--image_size", "32",
        "--model", "resnet18", "--weights", "random", "--strategies", "head", "--verify", "2", "--quiet",
        "--device", "cpu", "--cache_dir", str(tmp_path / "cache")]
    monkeypatch.chdir(tmp_path)
    assert main(argv("asg", tiny_data, 2)) == 0
    shutil.make_archive(str(tmp_path / "asg"), "zip", tmp_path, "asg")
    shutil.move(tmp_path / "asg", tmp_path / "asg-moved")
    capsys.readouterr()
    assert main(argv("asg-moved", tiny_data, 2)) == 0  # before: "checkpoint asg/sweeps/.../best.pt not found"
    out = capsys.readouterr().out
    assert " started " not in out and "resumed" not in out and ": trained" not in out  # nothing redone
    unzipped = tmp_path / "laptop"
    shutil.unpack_archive(tmp_path / "asg.zip", unzipped)
    monkeypatch.chdir(unzipped)
    shutil.copytree(tiny_data, unzipped / "data")  # the data at another path on the other machine
    assert main(argv(unzipped / "asg", unzipped / "data", 3)) == 0
    assert main(["report", str(unzipped / "asg"), "--out", str(unzipped / "report")]) == 0
    page = (unzipped / "report" / "index.html").read_text()
    assert str(tmp_path / "asg" / "") not in page and "asg-moved" not in page  # a copy shows its own files
    assert f"cnnlab train --config {unzipped / 'asg' / 'runs' / 'partB-head' / 'config.yaml'} --name partB-head-again" in page
    from cnnlab.sweeps.report import finished_trials, load_study

    assert len(finished_trials(load_study(unzipped / "asg" / "sweeps" / "partA"))) == 3  # it went on there
    assert len(finished_trials(load_study(tmp_path / "asg-moved" / "sweeps" / "partA"))) == 2  # and the original not
    for run in ("distilled", "partB-head"):
        assert RunFolder(unzipped / "asg" / "runs" / run).evaluated


# ---- refusals before any write ----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["xpu", "meta"])
def test_a_device_cnnlab_does_not_run_on_is_refused_by_every_command_before_any_work(trained, tiny_data, tmp_path,
                                                                                     capsys, device):
    photo = next((tiny_data / "val").rglob("*.jpg"))
    commands = [["train", "--data", str(tiny_data), "--out", str(tmp_path / "new"), *TINY[:-2]],
                ["lr-find", "--data", str(tiny_data), "--out", str(tmp_path / "new"), *TINY[:-2]],
                ["evaluate", str(trained), "--data", str(tiny_data)], ["predict", str(trained), str(photo)],
                ["export", str(trained)], ["explain", str(trained), "--data", str(tiny_data)], ["env"]]
    before = sorted(p.name for p in trained.rglob("*"))
    for argv in commands:
        capsys.readouterr()
        assert main([*argv, "--device", device]) == 2, argv  # before: tracebacks; evaluate blamed the checkpoint
        assert f"device={device!r}: expected auto, cpu, cuda, cuda:N or mps" in one_line(capsys)
    assert not (tmp_path / "new").exists() and sorted(p.name for p in trained.rglob("*")) == before


@pytest.fixture
def no_wandb_login(tmp_path, monkeypatch):
    """A machine where nobody ran `wandb login`: no key in the environment, no netrc."""
    for key in [k for k in os.environ if k.startswith("WANDB_") or k == "NETRC"]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def test_wandb_online_without_a_login_is_refused_before_the_run_folder(no_wandb_login, tiny_data, tmp_path, capsys):
    argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "runs"), "--wandb", "online", *TINY]
    assert main(argv) == 2  # before: wandb's UsageError traceback, after the run folder was made
    assert "no W&B login" in (line := one_line(capsys)) and "wandb login" in line and "--wandb offline" in line
    assert not (tmp_path / "runs").exists()


def test_an_evaluation_of_an_online_run_on_a_machine_without_a_login_succeeds_and_says_what_was_not_logged(
        no_wandb_login, tiny_data, tmp_path, capsys):
    argv = ["train", "--data", str(tiny_data), "--out", str(tmp_path / "runs"), "--name", "r", "--epochs", "1",
            "--wandb", "offline", *TINY]
    assert main(argv) == 0
    run = tmp_path / "runs" / "r"
    record = json.loads((run / "wandb_run.json").read_text())
    (run / "wandb_run.json").write_text(json.dumps({**record, "mode": "online"}))  # trained online on a Colab GPU
    capsys.readouterr()
    assert main(["evaluate", str(run), "--data", str(tiny_data), "--quiet", "--device", "cpu"]) == 0  # before: exit 1
    out = capsys.readouterr().out
    assert f"wandb: the test evaluation not logged to run {record['id']} (no W&B login on this machine)" in out
    assert RunFolder(run).evaluated and len(RunFolder(run).test_ledger) == 1
    assert main(["explain", str(run), "--data", str(tiny_data), "--quiet", "--device", "cpu"]) == 0
    assert "wandb: the explanation not logged" in capsys.readouterr().out


@pytest.mark.slow
def test_wandb_online_with_a_key_but_no_network_is_one_line_and_the_same_command_runs_again(
        no_wandb_login, tiny_data, tmp_path):
    import sys

    # a process of its own: W&B reads its init timeout once per process (its service), and this one must be short
    env = {**os.environ, "WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": "http://127.0.0.1:9",  # nothing listens there
           "WANDB_INIT_TIMEOUT": "3"}
    argv = [sys.executable, "-m", "cnnlab.cli", "train", "--data", str(tiny_data), "--out", str(tmp_path / "runs"),
            "--name", "r", "--epochs", "1", "--cache_dir", str(tmp_path / "cache"), *TINY]
    done = subprocess.run([*argv, "--wandb", "online"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr  # before: a CommError traceback
    assert len(done.stderr.strip().splitlines()) == 1 and "the W&B run could not start" in done.stderr
    assert "--wandb offline" in done.stderr
    done = subprocess.run([*argv, "--wandb", "offline"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr  # the folder it began is taken up again, not refused
    assert len(read_jsonl(tmp_path / "runs" / "r" / "metrics.jsonl")) == 1


def test_a_sweep_none_of_whose_points_can_run_is_refused_at_once_and_writes_nothing(tiny_data, tmp_path, capsys):
    from cnnlab.sweeps.schema import shipped_sweep

    strided = tmp_path / "strided.yaml"  # every point a stride-2 first conv on 32 px images: too small for each
    strided.write_text(yaml.safe_dump({"method": "grid", "parameters": {"conv1_stride": {"value": 2},
                                                                       "filters": {"values": [4, 8]}}}))
    for sweep in (shipped_sweep("partB.yaml"), strided):  # bayes without --weights; the grid
        capsys.readouterr()
        assert main(["sweep", str(sweep), "--data", str(tiny_data), "--sweeps_dir", str(tmp_path / "s"), "--count", "1",
                     "--cache_dir", str(tmp_path / "cache"), "--quiet", "--image_size", "32"]) == 2  # before: 36 s
        assert "can run with these flags" in one_line(capsys)
        assert not (tmp_path / "s").exists()


def test_a_run_or_sweep_folder_inside_the_data_is_refused_before_it_is_written(tiny_data, tmp_path, capsys):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    for argv in (["train", "--data", str(data), "--out", str(data / "train" / "runs"), *TINY],
                 ["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--cache_dir", str(data / "val" / "c"), *TINY],
                 ["sweep", str(grid(tmp_path, "in-data")), "--data", str(data), "--sweeps_dir", str(data / "train"), *TINY]):
        capsys.readouterr()
        assert main(argv) == 2
        assert "is inside the data folder's" in one_line(capsys)
    assert sorted(p.name for p in (data / "train").iterdir()) == sorted(p.name for p in (tiny_data / "train").iterdir())
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "runs"), "--epochs", "1", *TINY]) == 0  # not stuck


def test_the_evaluation_figures_of_many_classes_stay_a_page_and_the_whole_matrix_is_a_csv(tmp_path):
    """100 classes took 1.9 GB to draw, 300 over 12 GB (a MemoryError traceback), 1,000 were killed at 23 GB."""
    script = f"""
import numpy as np
from types import SimpleNamespace
from PIL import Image
from cnnlab.evaluate import write_confusion_csv
from cnnlab.visualise import most_confused, plot_confusion, plot_prediction_grid
n = 300
rng = np.random.default_rng(0)
labels = np.repeat(np.arange(n), 3)
probs = rng.dirichlet(np.ones(n), size=len(labels))
confusion = np.zeros((n, n), int)
np.add.at(confusion, (labels, probs.argmax(1)), 1)
classes = [f"class {{i}}" for i in range(n)]
shown = most_confused(confusion.tolist())
images = SimpleNamespace(pixels=rng.integers(0, 255, (len(labels), 16, 16, 3), dtype=np.uint8))
plot_confusion(confusion.tolist(), classes, "{tmp_path}/confusion.png", shown)
plot_prediction_grid(images, np.arange(len(labels)), labels, probs, classes, "{tmp_path}/predictions.png", shown=shown)
write_confusion_csv(confusion.tolist(), classes, __import__("pathlib").Path("{tmp_path}/confusion.csv"))
errors = confusion.sum(0) + confusion.sum(1) - 2 * np.diag(confusion)
print(len(shown), min(errors[shown]) >= max(np.delete(errors, shown)))
print(max(Image.open("{tmp_path}/confusion.png").size), max(Image.open("{tmp_path}/predictions.png").size))
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024)
"""
    out = subprocess.run([os.environ.get("PYTHON", __import__("sys").executable), "-c", script], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    shown, confused = out.stdout.split()[:2]
    assert shown == "30" and confused == "True"  # the 30 classes with the most mistakes
    sizes = [int(v) for v in out.stdout.splitlines()[1].split()]
    assert max(sizes) < 10_000, sizes  # before: 81,000 px tall
    assert int(out.stdout.splitlines()[2]) < 1500, "peak memory (MB)"
    import csv

    rows = list(csv.reader((tmp_path / "confusion.csv").open()))
    assert len(rows) == 301 and len(rows[0]) == 301 and rows[1][0] == "class 0"
    assert sum(int(v) for row in rows[1:] for v in row[1:]) == 900  # every test image, in the whole matrix


@pytest.mark.slow
def test_a_sweep_trial_cut_by_ctrl_c_runs_again_on_the_next_run(tiny_data, tmp_path):
    """Before: only a killed trial was queued again; one stopped by Ctrl-C (or SIGTERM) stayed failed, and the grid
    was called done without it."""
    import signal
    import sys
    import time

    from cnnlab.sweeps.engine import RETRY, orphans
    from cnnlab.sweeps.report import load_study

    path = tmp_path / "sig.yaml"
    path.write_text(yaml.safe_dump({"name": "sig", "method": "grid", "metric": {"name": "val_acc", "goal": "maximize"},
                                    "parameters": {"filters": {"values": [4, 6]}, "epochs": {"value": 30}}}))
    argv = [sys.executable, "-m", "cnnlab.cli", *sweep_argv(path, tiny_data, tmp_path / "sweeps", tmp_path / "cache")]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = tmp_path / "sweeps" / "sig" / "trials" / "trial-0000" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(read_jsonl(metrics)) >= 1):  # the trial trains
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    # the same command, as two worker processes starting at once: the cut trial is queued again once, not by each
    assert main([*sweep_argv(path, tiny_data, tmp_path / "sweeps", tmp_path / "cache"), "--workers", "2"]) == 0
    study = load_study(tmp_path / "sweeps" / "sig")
    cut = study.trials[0]
    assert cut.state.name == "FAIL" and cut.user_attrs[RETRY] == "interrupted" and 0 in orphans(study)
    assert len([t for t in study.trials if t.user_attrs.get("retry_of") == 0]) == 1
    assert sorted(values_by_point(tmp_path / "sweeps" / "sig", "sig")) == [4, 6]  # both points ran to the end
