"""cnnlab installed from its wheel, not from a checkout: the wheel is built, installed (no -e) into a fresh virtual
environment whose dependencies come from this one (no network), and the README's headline command runs in a folder
that holds no part of the checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import devices_recorded

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ folder of a fresh venv with cnnlab's wheel installed."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy of what the wheel is built from: the build leaves nothing in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("src", "sweeps"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                            str(work / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    wheel = next((work / "dist").glob("cnnlab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    packages = {str(p.parent.relative_to(ROOT / "src")).replace("/", ".") for p in (ROOT / "src" / "cnnlab").rglob("*.py")}
    assert {p for p in packages if "__pycache__" not in p} <= {n.rsplit("/", 1)[0].replace("/", ".") for n in names}
    assert "cnnlab/shipped_sweeps/partA.yaml" in names and "cnnlab/reporting/parcoords.js" in names
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next(venv.glob("lib/python*/site-packages"))
    # this environment's packages (torch, optuna, ...) without its editable cnnlab: a plain path entry, whose own
    # .pth files (the editable install's finder) are not run
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--no-index",
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr
    return venv / "bin"


@pytest.mark.slow
def test_the_installed_wheel_runs_the_whole_assignment(installed, tiny_data, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    where = subprocess.run([str(installed / "python"), "-c", "import cnnlab; print(cnnlab.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=env, timeout=120)
    assert str(installed.parent) in where.stdout and str(ROOT) not in where.stdout, where  # the wheel's copy
    result = subprocess.run([str(installed / "cnnlab"), "assignment", "--data", str(tiny_data), "--out", "job", "--quick",
                             "--trials", "2", "--image_size", "32", "--cache_dir", "cache", "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "job" / "report" / "index.html").is_file()
    assert (tmp_path / "job" / "sweeps" / "partA").is_dir()  # the shipped sweep, read from the installed package
    # --device reached every step: each trial's config and training, the best trial's evaluation and explanation
    assert devices_recorded(tmp_path / "job") == {"configs": {"cpu"}, "trainings": {"cpu"}, "evaluations": {"cpu"},
                                                 "explanations": {"cpu"}}
    named = subprocess.run([str(installed / "cnnlab"), "sweep", "partB", "--data", str(tiny_data), "--count", "1",
                            "--sweeps_dir", "s", "--image_size", "32", "--cache_dir", "cache", "--quiet"],
                           cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    # the shipped partB.yaml, found by name in the installed package; without --weights none of its points can run,
    # refused at once in one line before anything is written (before: exit 2 after 36 s of sampling, unchecked)
    assert named.returncode == 2 and not (tmp_path / "s").exists(), named.stdout[-2000:] + named.stderr[-2000:]
    assert named.stderr.startswith("cnnlab sweep: error: sweep 'partB': no sampled combination can run") and \
        "add --weights" in named.stderr and len(named.stderr.strip().splitlines()) == 1, named.stderr
