"""`cnnlab compare RUN...`: runs side by side (scratch vs fine-tuned, strategy vs strategy), as a markdown
table and one plot of validation accuracy per epoch. Setup is what a run does once (decoding into the cache,
building a feature store); training is the sum of its epochs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CnnlabError
from .io import atomic_write_text
from .run_folder import RunFolder
from .visualise import plot_curves

COLUMNS = ("run", "model", "strategy", "trainable / total params", "epochs", "best val_acc", "test acc",
           "setup (s)", "training (s)", "images/s")


def run_row(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = RunFolder(path)
    summary = run.summary
    if not summary:
        raise CnnlabError(f"{path} is not a finished run folder (no summary.json)")
    cfg, metrics = run.config, run.evaluation
    test_acc = "-" if metrics is None else f"{metrics['accuracy']:.4f}"
    if metrics is not None and run.evaluation_is_stale(metrics):
        evaluated = metrics.get("checkpoint_epoch")
        test_acc += f" (stale: best.pt of epoch {evaluated if evaluated is not None else '?'}; run cnnlab evaluate again)"
    row = {"run": run.name, "model": cfg.model, "strategy": run.strategy,
           "trainable / total params": f"{summary.get('trainable_params', summary['params']):,} / {summary['params']:,}",
           "epochs": summary["epochs_run"], "best val_acc": "-" if run.best_val_acc is None else f"{run.best_val_acc:.4f}",
           "test acc": test_acc,
           "setup (s)": f"{summary.get('setup_seconds', 0.0):.1f}", "training (s)": f"{summary['train_seconds']:.1f}",
           "images/s": f"{summary['images_per_s']:.1f}"}
    return row, run.history


def compare(runs: list[Path], out: Path) -> tuple[Path, Path]:
    rows, curves = [], {}
    for run in runs:
        row, history = run_row(Path(run))
        rows.append(row)
        curves[row["run"]] = history
    table = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
    table += "".join("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |\n" for r in rows)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare.md", table)
    return out / "compare.md", plot_curves(curves, out / "compare.png")
