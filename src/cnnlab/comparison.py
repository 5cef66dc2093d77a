"""`cnnlab compare RUN...`: runs side by side (scratch vs fine-tuned, strategy vs strategy), as a markdown
table and one plot of validation accuracy per epoch. Setup is what a run does once (decoding into the cache,
building a feature store); training is the sum of its epochs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from .errors import CnnlabError
from .io import atomic_write_text, read_jsonl
from .visualise import plot_curves

COLUMNS = ("run", "model", "strategy", "trainable / total params", "epochs", "best val_acc", "test acc",
           "setup (s)", "training (s)", "images/s")


def is_stale(metrics: dict[str, Any], summary: dict[str, Any]) -> bool:
    """Whether an evaluation of best.pt is of another model than the run's best.pt now: the run trained on
    (--resume) after it."""
    return (Path(metrics["checkpoint"]).name == "best.pt" and summary.get("best_epoch") is not None
            and metrics.get("checkpoint_epoch") != summary["best_epoch"])


def strategy_of(cfg: dict[str, Any]) -> str:
    """How a run's config trained: scratch, or its fine-tuning strategy (partial with how many stages it froze)."""
    if cfg["model"] == "smallcnn" or cfg.get("finetune", "none") == "none":
        return "scratch"
    return cfg["finetune"] + (f" (freeze {cfg['freeze_stages']})" if cfg["finetune"] == "partial" else "")


def run_row(run: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not (run / "summary.json").exists():
        raise CnnlabError(f"{run} is not a finished run folder (no summary.json)")
    summary = json.loads((run / "summary.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    test = run / "eval" / "metrics.json"
    metrics = json.loads(test.read_text()) if test.exists() else None
    test_acc = "-" if metrics is None else f"{metrics['accuracy']:.4f}"
    evaluated = metrics.get("checkpoint_epoch") if metrics else None
    if metrics is not None and is_stale(metrics, summary):
        test_acc += f" (stale: best.pt of epoch {evaluated if evaluated is not None else '?'}; run cnnlab evaluate again)"
    strategy = strategy_of(cfg)
    row = {"run": run.name, "model": cfg["model"], "strategy": strategy,
           "trainable / total params": f"{summary.get('trainable_params', summary['params']):,} / {summary['params']:,}",
           "epochs": summary["epochs_run"], "best val_acc": f"{summary['best_val_acc']:.4f}",
           "test acc": test_acc,
           "setup (s)": f"{summary.get('setup_seconds', 0.0):.1f}", "training (s)": f"{summary['train_seconds']:.1f}",
           "images/s": f"{summary['images_per_s']:.1f}"}
    return row, read_jsonl(run / "metrics.jsonl")


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
