"""`cnnlab report PATH... --out DIR`: one offline report of the assignment from run, sweep, compare and check folders
(DIR/index.html, one file that opens from file:// with no network; its figures also lie beside it as PNGs). It
re-renders from what is on disk and never retrains; each section says where its numbers came from, or which
command produces what is missing."""

from __future__ import annotations

import datetime
import shlex
import sys
from pathlib import Path

from ..io import atomic_write_text
from ..run_folder import RunFolder
from .inputs import Inputs, gather
from .page import esc, markdown_table, missing, page
from .results import curves_section, explain_section, partb_section, reproducibility_section, test_section
from .sections import budget_section, cost_section, data_section, sweep_section

__all__ = ["write_report", "gather", "Inputs", "RunFolder"]


def choose_best(inputs: Inputs, sweep_best: list[tuple[str, RunFolder, bool]]) -> tuple[RunFolder | None, str]:
    """Part A's model: the small CNN with the highest validation accuracy among the sweeps' best trials and the
    scratch runs given, never chosen on the test folder; and a sentence saying how it was chosen."""
    candidates = [(f"the {'verified winner' if verified else 'best trial'} of sweep {name} ({run.name})", run)
                  for name, run, verified in sweep_best]
    candidates += [(f"run {r.name}", r) for r in inputs.runs if r.is_small_cnn and not r.config.teacher]
    candidates = [c for c in candidates if c[1].best_val_acc is not None]  # a run killed before its first epoch
    if not candidates:
        return None, ""
    how, best = max(candidates, key=lambda c: c[1].best_val_acc)
    taken = ("its configuration's mean over new seeds was the best of the verified ones (the sweep section)"
             if how.startswith("the verified") else "taken as it is (not retrained)")
    why = (f"Part A's model is {how}: the highest validation accuracy ({best.best_val_acc:.4f}, best.pt's epoch) of "
           f"{len(candidates)} candidate(s), {taken}; the test folder played no part in choosing it.")
    return best, why


def write_report(paths: list[str | Path], out: str | Path, argv: list[str] | None = None,
                 storage: str | None = None) -> Path:
    """Render the report of `paths` (run, sweep, compare or check folders, or folders holding them) into
    `out`/index.html; returns its path. `storage`: the RDB URL of a sweep whose sweep_info.json masks it."""
    inputs = gather(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sweep_parts, sweep_best, trial_runs = [], [], []
    for folder in inputs.sweeps:
        text, runs = sweep_section(folder, out, storage)
        sweep_parts.append(text)
        if runs:  # the verified winner's model first where the sweep was verified
            sweep_best.append((folder.name, runs[0], (folder / "verify.json").is_file()))
            trial_runs += runs
    best, why = choose_best(inputs, sweep_best)
    finetuned = [r for r in inputs.runs if not r.is_small_cnn or r.config.teacher]  # distilled: beside Part B
    named = list(inputs.runs) + ([best] if best is not None and best not in inputs.runs else [])
    compares = "".join(f"<details><summary>the table <code>cnnlab compare</code> wrote in {esc(c)}</summary>"
                       + markdown_table((c / "compare.md").read_text()) + "</details>" for c in inputs.compares)
    sections = [
        ("data", "The data", data_section(inputs.checks)),
        ("cost", "Part A: the network and its cost", cost_section(best)),
        ("sweep", "Part A: the hyperparameter sweep", "".join(sweep_parts) or missing(
            "A sweep", "cnnlab sweep sweeps/partA.yaml --data ROOT")),
        ("test", "Part A: the best model on the test folder", test_section(best, why)),
        ("explain", "Part A: what the model learned", explain_section(best)),
        ("partb", "Part B: fine-tuning against training from scratch", partb_section(finetuned, best, out) + compares),
        ("curves", "Learning curves of every run", curves_section(named, [t for t in trial_runs if t is not best], out)),
        *([("budget", "The time budget", budget)] if (budget := budget_section(inputs.given, inputs.sweeps)) else []),
        ("repro", "Reproducibility", reproducibility_section(named, " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv)))),
    ]
    from .. import __version__

    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    header = (f"<p class=muted>Written {esc(stamp)} by cnnlab {esc(__version__)} from "
              + ", ".join(f"<code>{esc(p)}</code>" for p in inputs.given)
              + f": {len(inputs.runs)} run(s), {len(inputs.sweeps)} sweep(s), {len(inputs.compares)} comparison(s), "
              f"{len(inputs.checks)} data check(s). Every number is read from those folders; nothing was retrained.</p>")
    index = out / "index.html"
    atomic_write_text(index, page("cnnlab report", sections, header))
    return index
