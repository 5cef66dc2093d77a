"""The documentation cannot rot: every ```bash block in the README and in docs/ runs on the demo data, and is run
here, in order, in a fresh folder per file; ```sh blocks (other data, hardware, a network) are shown only."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SETUP = ("python3 -m venv", ".venv/bin/pip ", "pip install", ".venv/bin/python -m pytest", "python -m pytest",
         "CNNLAB_CPU_BF16=")


def blocks(path: Path, kind: str) -> list[str]:
    return [body for lang, body in FENCE.findall(path.read_text()) if lang == kind]


def commands(path: Path) -> list[str]:
    """The shell commands of a file's bash blocks, `&&` chains split; installing and testing are what CI itself
    does around this test, so they are left out."""
    out = []
    for body in blocks(path, "bash"):
        for line in body.splitlines():
            for part in line.split(" && "):
                part = part.strip()
                if part and not part.startswith("#") and not part.startswith(SETUP):
                    out.append(part.replace(".venv/bin/cnnlab", "cnnlab"))
    return out


def test_ci_runs_exactly_the_readme_s_test_command():
    readme = blocks(ROOT / "README.md", "bash")[0].splitlines()[1]
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith(".venv/bin/python -m pytest")]
    assert ci == [readme] and "-m cpu_kind --other-cpu-kind" in readme  # both kinds of CPU, on any machine


def test_every_doc_is_found_and_sh_blocks_hold_no_demo_command():
    assert (ROOT / "docs" / "usage.md") in DOCS and len(DOCS) >= 8
    for path in DOCS:
        for body in blocks(path, "sh"):
            for line in body.splitlines():
                assert "data/demo" not in line, f"{path.name}: {line!r} runs on the demo data: put it in a bash block"


@pytest.mark.slow
@pytest.mark.parametrize("path", [pytest.param(p, marks=[pytest.mark.cpu_kind] if p.name == "README.md" else [])
                                  for p in DOCS if commands(p)], ids=lambda p: p.name)
def test_the_bash_commands_of_a_doc_run(path, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "CNNLAB_CACHE": str(tmp_path / "cache")}
    for command in commands(path):  # as the doc shows it (on the CPU: conftest hides the GPUs from every process)
        result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        assert result.returncode == 0, f"{path.name}: {command}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
        said = re.search(r"~(0\.\d+) validation accuracy", path.read_text()) if path.name == "README.md" else None
        words = shlex.split(command)
        if said and words[:2] == ["cnnlab", "train"]:  # the accuracy the README states for its first command
            got = float(re.search(r"best val_acc (\d\.\d+)", result.stdout).group(1))
            assert got >= float(said.group(1)) - 0.04, f"the README says ~{said.group(1)}, the run gave {got}"
            assert "precision" not in command and "device" not in command  # the command a newcomer runs, with auto
