"""What `cnnlab report` was given, sorted by kind: run folders, sweep folders, compare folders and data checks.
A folder that is none of these (the output of `cnnlab assignment`, a runs/ folder) is searched two levels down."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CnnlabError
from ..run_folder import RunFolder


def kind_of(folder: Path) -> str | None:
    if (folder / "sweep_info.json").is_file():
        return "sweep"
    if RunFolder.holds_a_run(folder):
        return "run"
    if (folder / "compare.md").is_file():
        return "compare"
    if (folder / "check.json").is_file():
        return "check"
    return None


@dataclass
class Inputs:
    runs: list[RunFolder] = field(default_factory=list)
    sweeps: list[Path] = field(default_factory=list)
    compares: list[Path] = field(default_factory=list)
    checks: list[Path] = field(default_factory=list)
    given: list[Path] = field(default_factory=list)


def gather(paths: list[str | Path]) -> Inputs:
    """Sort the given folders by kind (searching a folder of none two levels down); refuse a path that holds none."""
    found = Inputs(given=[Path(p) for p in paths])
    seen: set[Path] = set()

    def add(folder: Path, depth: int) -> int:
        key = folder.resolve()
        if key in seen:
            return 0
        kind = kind_of(folder)
        if kind is None:
            if depth >= 2 or not folder.is_dir():
                return 0
            return sum(add(child, depth + 1) for child in sorted(folder.iterdir())
                       if child.is_dir() and not child.name.startswith(".") and child.name != "trials")
        seen.add(key)
        if kind == "run":
            found.runs.append(RunFolder(folder))
        else:
            {"sweep": found.sweeps, "compare": found.compares, "check": found.checks}[kind].append(folder)
        return 1

    for p in found.given:
        if not p.exists():
            raise CnnlabError(f"{p} not found: give run folders (runs/<name>), sweep folders (sweeps/<name>), "
                              "compare or check folders, or a folder holding them")
        if not p.is_dir():
            raise CnnlabError(f"{p} is a file: give the folder it is in (a run, sweep, compare or check folder)")
        if not add(p, 0):
            raise CnnlabError(f"{p} holds no run, sweep, compare or check folder (a run folder has config.yaml and "
                              "metrics.jsonl; a sweep folder sweep_info.json)")
    return found
