"""Faults a careful (or hostile) user meets: each ends in one clear line, nothing hangs, nothing blocks the next run."""

import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest

from cnnlab.cli import main


@pytest.mark.slow
def test_a_killed_decode_worker_stops_the_run_with_one_line_and_frees_the_cache(big_photos, tmp_path, cache_build):
    proc = cache_build.start(big_photos, tmp_path, "killed")
    worker = cache_build.workers(proc, tmp_path)[0]
    worker.kill()  # as the OOM killer would
    out, err = proc.communicate(timeout=30)  # before: waited forever, holding the cache's lock
    assert proc.returncode == 2 and "a decode worker died" in err and len(err.strip().splitlines()) == 1, err
    again = cache_build.start(big_photos, tmp_path, "again")  # the lock is free, the half-built cache is rebuilt
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err


@pytest.mark.slow
def test_ctrl_c_during_the_cache_build_ends_promptly_without_a_traceback(big_photos, tmp_path, cache_build):
    proc = cache_build.start(big_photos, tmp_path, "interrupted")
    workers = cache_build.workers(proc, tmp_path)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole process group
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and err.strip() == "cnnlab train: interrupted", err
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    assert not list((tmp_path / "cache").glob("*.partial.npy"))  # before: a full-size leftover
    again = cache_build.start(big_photos, tmp_path, "again")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err


def test_runs_started_together_never_share_a_folder(tiny_cfg, tmp_path):
    from cnnlab.run_folder import claim_free_name, default_run_name
    from cnnlab.training import fit

    first = claim_free_name(tmp_path / "runs" / "same-second")
    assert claim_free_name(tmp_path / "runs" / "same-second") == first.with_name("same-second-2")
    a, b = (fit(tiny_cfg(name="", epochs=1), progress=False) for _ in range(2))
    assert a.run_dir != b.run_dir and (a.run_dir / "summary.json").exists() and (b.run_dir / "summary.json").exists()
    # the bug CI met: a finished run already holds the made-up name of this very second (and of the next few)
    import datetime

    cfg = tiny_cfg(name="", epochs=1)
    now, taken = datetime.datetime.now(), set()
    for ahead in range(6):
        stamp = (now + datetime.timedelta(seconds=ahead)).strftime("%Y%m%d-%H%M%S")
        folder = tmp_path / "runs" / default_run_name(cfg).replace(now.strftime("%Y%m%d-%H%M%S"), stamp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text("{}\n")
        taken.add(folder)
    c = fit(cfg, progress=False)  # before the fix: "already holds a run"
    assert (c.run_dir / "summary.json").exists() and c.run_dir not in taken | {a.run_dir, b.run_dir}


def test_a_sweep_name_must_be_one_safe_folder_name():
    from cnnlab.sweeps import SweepError, parse_sweep

    for bad in ("../../x", "a/b", ".hidden", "a b"):
        with pytest.raises(SweepError, match="name"):
            parse_sweep({"name": bad, "method": "grid", "parameters": {"lr": {"values": [0.1]}}}, "file")


def test_data_that_cannot_train_stops_before_any_work(tmp_path, capsys):
    from PIL import Image

    from cnnlab.cli import main

    one = tmp_path / "one" / "train" / "cats"
    one.mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(one / "a.jpg")
    unreadable = tmp_path / "bad" / "train"
    for c in ("a", "b"):
        (unreadable / c).mkdir(parents=True)
        (unreadable / c / "x.jpg").write_text("not an image")
    common = ["--image_size=32", "--out", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["train", "--data", str(tmp_path / "one"), *common]) == 2
    assert "one class folder (cats)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    assert main(["train", "--data", str(tmp_path / "bad"), *common]) == 2
    err = capsys.readouterr().err.strip()
    assert "none of the 2 files" in err and "bad_files.txt" in err and len(err.splitlines()) == 1
    assert main(["train", "--data", str(tmp_path / "one"), "--image_size=16", *common[1:]]) == 2
    assert "needs at least 32" in capsys.readouterr().err


def test_written_files_honour_the_umask(tmp_path):
    from cnnlab.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "shared.txt", "x")
        os.umask(0o077)
        atomic_write_text(tmp_path / "private.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "shared.txt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600


def test_the_storage_url_can_come_from_the_environment(tiny_data, tmp_path, monkeypatch):
    import optuna
    import yaml

    from cnnlab.cli import main

    path = tmp_path / "env.yaml"
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"filters": {"values": [4]}, "epochs": {"value": 1}}}))
    url = f"sqlite:///{tmp_path / 'study.db'}"
    monkeypatch.setenv("CNNLAB_STORAGE", url)
    assert main(["sweep", str(path), "--data", str(tiny_data), "--image_size=32", "--dense_units=8", "--quiet",
                 "--cache_dir", str(tmp_path / "cache"), "--sweeps_dir", str(tmp_path / "sweeps")]) == 0
    study = optuna.load_study(study_name="env", storage=url)
    assert [t.state.name for t in study.get_trials()] == ["COMPLETE"]
    assert main(["sweep-report", str(tmp_path / "sweeps" / "env")]) == 0


@pytest.mark.parametrize("field,value,needle", [
    ("metric", "val_acc", "metric 'val_acc': expected a mapping"),
    ("metric", {"name": "val_acc", "goal": "up"}, "goal 'up'"),
    ("early_terminate", {"type": "hyperband", "eta": "x", "min_iter": 1}, "eta 'x'"),
    ("early_terminate", {"type": "hyperband", "min_iter": 0}, "min_iter 0"),
    ("early_terminate", {"type": "hyperband", "max_iter": 9}, "needs s"),
    ("early_terminate", {"type": "hyperband", "min_iter": 1, "etta": 2}, "unknown field(s) etta"),
    ("early_terminate", "hyperband", "type: hyperband"),
    ("run_cap", True, "run_cap"),
    ("parameters", {"lr": {"values": [0.1, 0.01], "probabilities": 0.5}}, "probabilities"),
    ("parameters", {"lr": {"values": [0.1, 0.01], "probabilities": [1.0]}}, "probabilities"),
    ("parameters", {"lr": {"distribution": "normal", "mu": 0.01, "sigma": "wide"}}, "sigma 'wide'"),
    ("parameters", {"lr": {"distribution": "q_uniform", "min": 0.1, "max": 0.5, "q": -1}}, "q -1"),
])
def test_every_malformed_sweep_field_is_one_line_exit_2(tmp_path, capsys, field, value, needle):
    import yaml

    from cnnlab.cli import main

    sweep = {"method": "random", "parameters": {"lr": {"values": [0.1]}}, field: value}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(sweep))
    assert main(["sweep", str(path), "--count", "1", "--sweeps_dir", str(tmp_path / "sweeps")]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.slow
def test_an_edited_sweep_file_or_other_base_flags_never_join_the_old_study(tiny_data, tmp_path, capsys):
    import yaml

    from cnnlab.cli import main

    path = tmp_path / "grid.yaml"
    common = ["--data", str(tiny_data), "--image_size=32", "--dense_units=8", "--epochs=1", "--quiet",
              "--cache_dir", str(tmp_path / "cache"), "--sweeps_dir", str(tmp_path / "sweeps")]
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"filters": {"values": [4]}}}))
    assert main(["sweep", str(path), *common]) == 0
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"filters": {"values": [4, 8]}}}))
    capsys.readouterr()
    assert main(["sweep", str(path), *common]) == 2
    err = capsys.readouterr().err
    assert "exists with another sweep file: parameters was" in err and "name: grid-2" in err
    path.write_text(yaml.safe_dump({"method": "grid", "parameters": {"filters": {"values": [4]}}}))
    assert main(["sweep", str(path), *common, "--lr", "0.01"]) == 2
    assert "another base config (flags): lr was" in capsys.readouterr().err


def test_resume_refuses_changed_settings_but_takes_more_epochs(tiny_cfg, tmp_path, capsys, monkeypatch):
    import yaml

    from cnnlab.cli import main
    from cnnlab.training import fit

    run = fit(tiny_cfg(epochs=1), progress=False).run_dir
    assert yaml.safe_load((run / "config.yaml").read_text())["data"].startswith("/")  # resumable from anywhere
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--image_size", "48"]) == 2
    assert "image_size=48 differs from its 32" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["image_size"] == 32  # untouched
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(run), "--epochs", "2", "--quiet"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2


def _limited(max_file_bytes):
    """preexec_fn: the kernel refuses to grow any file past `max_file_bytes` (EFBIG, a real write error, as a
    full disk gives ENOSPC; Python ignores SIGXFSZ, so the write fails instead of killing the process)."""
    import resource

    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_previous_file(tiny_cfg, tmp_path):
    from cnnlab.training import fit

    cfg = tiny_cfg(epochs=1, dense_units=256, name="r")
    run = fit(cfg, progress=False, log=lambda s: None).run_dir
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix == ".pt"}
    limit = min(len(b) for b in before.values()) // 2  # checkpoints no longer fit; the small files still do
    proc = subprocess.run([sys.executable, "-m", "cnnlab.cli", "train", "--resume", str(run), "--epochs=2", "--quiet"],
                          capture_output=True, text=True, preexec_fn=_limited(limit), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "could not write" in err[0] and "File too large" in err[0] and "is kept" in err[0]
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.suffix == ".pt"} == before  # the good files stand
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]  # no temp file left behind
    assert main(["train", "--resume", str(run), "--epochs=2", "--quiet"]) == 0  # and the run goes on from there


def test_a_cache_the_disk_cannot_hold_is_refused_before_decoding(tiny_data, tmp_path):
    from cnnlab.errors import StorageError
    from cnnlab.io import check_free_space

    with pytest.raises(StorageError, match=r"needs .* GB in .* GB free: free some space, or choose another --cache_dir"):
        check_free_space(tmp_path, shutil.disk_usage(tmp_path).free + 2**30, "the image cache")
    # Space that runs out after the check (another process, a quota) fails the allocation, not a write into the map:
    argv = [sys.executable, "-m", "cnnlab.cli", "train", "--data", str(tiny_data), "--image_size=128", "--epochs=1",
            "--cache_dir", str(tmp_path / "cache"), "--out", str(tmp_path / "runs"), "--quiet"]
    proc = subprocess.run(argv, capture_output=True, text=True, preexec_fn=_limited(2**20), timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "image cache" in proc.stderr and "could not be allocated" in proc.stderr
    assert not list((tmp_path / "cache").glob("*.npy"))  # no partial cache left to mistake for one


def test_a_jpeg_over_the_pixel_limit_never_reaches_the_batch_decoder(tmp_path):
    """nvJPEG (and torchvision's CPU decoder, which stands in for it here) allocate whatever a header claims: a
    20,000 x 20,000 header on a few hundred bytes took 6.4 GB. It is now refused from its header, like PIL does."""
    script = """
import io, struct, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from cnnlab.data.decode_gpu import decode_into
buf = io.BytesIO()
Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, "JPEG")
b = bytearray(buf.getvalue())
struct.pack_into(">HH", b, b.index(b"\\xff\\xc0") + 5, 20000, 20000)  # the frame header's height and width
path = Path(sys.argv[1]) / "bomb.jpg"
path.write_bytes(bytes(b))
errors = decode_into([path], (32, 0.0, "bilinear"), np.zeros((1, 32, 32, 3), np.uint8), torch.device("cpu"))
print(errors.get(0))
print(next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) // 1024)
"""
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True,
                         timeout=300).stdout.splitlines()
    assert out[0].startswith("image too large to decode safely")
    assert int(out[1]) < 2000, f"peak memory {out[1]} MB"  # VmHWM: ru_maxrss would inherit pytest's own peak


def test_a_file_replaced_with_its_old_size_and_mtime_is_decoded_again(tmp_path):
    from PIL import Image

    from cnnlab.data import load_images

    for c, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / "train" / c).mkdir(parents=True)
        Image.new("RGB", (40, 40), colour).save(tmp_path / "train" / c / "x.bmp")
    first = load_images(tmp_path / "train", 32, tmp_path / "cache", workers=1, progress=False)
    assert first.pixels[0, 0, 0, 0] > 200
    target, donor = tmp_path / "train" / "a" / "x.bmp", tmp_path / "train" / "b" / "x.bmp"
    st = target.stat()
    assert donor.stat().st_size == st.st_size  # uncompressed: only the colour differs
    target.write_bytes(donor.read_bytes())
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # size and mtime as they were
    again = load_images(tmp_path / "train", 32, tmp_path / "cache", workers=1, progress=False)
    assert again.pixels[0, 0, 0, 0] < 50 and again.pixels[0, 0, 0, 2] > 200


def test_an_unrelated_os_error_never_deletes_a_valid_cache(tiny_data, tmp_path):
    """Mapping the cache fails for want of address space (ENOMEM): before, the cache was deleted as 'damaged'."""
    from cnnlab.data import load_images

    load_images(tiny_data / "train", 512, tmp_path / "cache", workers=1, progress=False)  # 160 images: 126 MB
    npy = next((tmp_path / "cache").glob("*.npy"))
    script = f"""
import resource, psutil
from cnnlab.data import load_images
room = psutil.Process().memory_info().vms + 64 * 2**20  # less than the cache's 126 MB map
resource.setrlimit(resource.RLIMIT_AS, (room, room))
try:
    load_images({str(tiny_data / 'train')!r}, 512, {str(tmp_path / 'cache')!r}, workers=1, progress=False)
except OSError as e:
    print("OSError", e.errno)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "OSError 12" in out.stdout, out.stdout + out.stderr
    assert npy.exists() and npy.stat().st_size > 120 * 2**20


def test_sweep_workers_are_bounded_by_the_cores(tmp_path, capsys):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("name: s\nmethod: grid\nparameters:\n  lr:\n    values: [0.001]\n")
    for workers in (0, (os.cpu_count() or 1) + 1):
        assert main(["sweep", str(sweep), "--workers", str(workers), "--sweeps_dir", str(tmp_path / "sweeps")]) == 2
        err = capsys.readouterr().err
        assert f"--workers {workers}: this machine has {os.cpu_count()} cores" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "sweeps").exists()
