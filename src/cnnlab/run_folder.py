"""A run folder, as training writes it and everything else reads it. Every rule about a run lives here once: its
layout, its config (read through `saved_config`, so an old folder reads as a new one), its best epoch, what kind of
run it is, whether it finished, and whether its test evaluation is of the best.pt it holds now. `api.Run`, the
report, `compare`, the whole job, training and its checkpoint callback all go through it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Config, load_yaml, saved_config
from .io import jsonl_lines, read_jsonl, sha256_of

CONFIG = "config.yaml"  # the run's whole config, as it trained
METRICS = "metrics.jsonl"  # one line per finished epoch
SUMMARY = "summary.json"  # written when training ends, however it ends
BEST = "best.pt"  # the weights of the best epoch (the validated ones: the average with --ema)
LAST = "last.pt"  # the weights, optimiser and schedule after the latest epoch: what --resume continues from
EVAL = "eval"  # `cnnlab evaluate`'s output for best.pt: metrics.json and its figures
EVAL_METRICS = f"{EVAL}/metrics.json"
EXPLAIN = "explain"  # `cnnlab explain`'s figures, and explain.json, written after them: the step's done mark
TEST_LEDGER = "test_ledger.jsonl"  # one line each time a checkpoint of the folder met a test folder (cnnlab evaluate)
TENSORBOARD = "tensorboard"  # TensorBoard's event files, with --tensorboard
WANDB_RUN = "wandb_run.json"  # the W&B run its training logged to (id, project, mode, group), with --wandb
FINISHED = ("completed", "early_stopped")  # statuses of a run that trained to its end


def is_better(record: dict[str, Any], best_val_acc: float, best_val_loss: float) -> bool:
    """Whether an epoch beats the best so far. Validation accuracy decides; at equal accuracy (a small validation
    set saturates) the lower loss wins; at equal both the earlier epoch stays."""
    return record["val_acc"] > best_val_acc or (record["val_acc"] == best_val_acc and record["val_loss"] < best_val_loss)


def best_record(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch best.pt holds, by training's own rule (`is_better`, epoch after epoch); None before any epoch."""
    best = None
    for record in history:
        if best is None or is_better(record, best["val_acc"], best["val_loss"]):
            best = record
    return best


def strategy_of(cfg: Config) -> str:
    """How a run trained: distilled (from a teacher run), scratch (from random weights), or its fine-tuning strategy
    (partial with how many stages it froze). The config rules make finetune=none the same as no pretrained weights."""
    if cfg.teacher:
        return "distilled"
    if cfg.finetune == "none":
        return "scratch"
    return cfg.finetune + (f" (freeze {cfg.freeze_stages})" if cfg.finetune == "partial" else "")


@dataclass(frozen=True)
class RunFolder:
    """One run folder (runs/<name>). Nothing is cached: a run that is still training (or resumed) reads as it is
    now. Reading it loads JSON and YAML only, never a checkpoint."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @staticmethod
    def holds_a_run(folder: Path) -> bool:
        """Whether `folder` is a run folder: training has written its config and begun its metrics."""
        return (folder / CONFIG).is_file() and (folder / METRICS).is_file()

    @property
    def name(self) -> str:
        return self.path.name

    def file(self, relative: str) -> Path:
        return self.path / relative

    @property
    def config(self) -> Config:
        return saved_config(load_yaml(self.path / CONFIG))

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per finished epoch: epoch, train_loss, train_acc, val_loss, val_acc, lr, epoch_time, ..."""
        return read_jsonl(self.path / METRICS)

    @property
    def summary(self) -> dict[str, Any]:
        """What training wrote when it ended ({} while it runs, or when it was killed before it could)."""
        return self.read(SUMMARY) or {}

    def read(self, relative: str) -> Any:
        """A JSON file of the folder (summary.json, eval/metrics.json, ...), or None where there is none."""
        path = self.path / relative
        return json.loads(path.read_text()) if path.is_file() else None

    def figure(self, relative: str) -> Path | None:
        path = self.path / relative
        return path if path.is_file() else None

    @property
    def best(self) -> dict[str, Any] | None:
        """The history's record of the epoch best.pt holds."""
        return best_record(self.history)

    @property
    def best_epoch(self) -> int | None:
        best = self.best
        return int(best["epoch"]) if best else None

    @property
    def best_val_acc(self) -> float | None:
        best = self.best
        return float(best["val_acc"]) if best else None

    @property
    def strategy(self) -> str:
        return strategy_of(self.config)

    @property
    def is_small_cnn(self) -> bool:
        """A run of cnnlab's own 5-block CNN: what Part A of the assignment trains."""
        return self.config.model == "smallcnn"

    @property
    def finished(self) -> bool:
        """Trained to its end (all its epochs, or stopped early by patience), not interrupted or pruned."""
        return self.summary.get("status") in FINISHED

    @property
    def resumable(self) -> bool:
        return (self.path / LAST).is_file()

    @property
    def evaluation(self) -> dict[str, Any] | None:
        """What `cnnlab evaluate` wrote for this run's best.pt (eval/metrics.json), or None."""
        return self.read(EVAL_METRICS)

    @property
    def evaluated(self) -> bool:
        """Whether eval/ holds a whole evaluation of the best.pt here now: `evaluate` writes metrics.json after every
        figure, so its presence marks the step done, and its SHA-256 ties it to these weights."""
        metrics = self.evaluation
        return metrics is not None and not self.evaluation_is_stale(metrics)

    @property
    def explained(self) -> bool:
        """Whether explain/ holds a whole explanation: explain.json is written after its last figure."""
        return (self.path / EXPLAIN / "explain.json").is_file()

    def evaluation_is_stale(self, metrics: dict[str, Any]) -> bool:
        """Whether an evaluation of this folder's best.pt is of other weights than the best.pt here now (the run
        trained on with --resume after it). Decided by the checkpoint's SHA-256 the evaluation recorded; an
        evaluation of another checkpoint file (last.pt, a copy) is never stale."""
        if Path(metrics.get("checkpoint", BEST)).name != BEST:
            return False
        best = self.path / BEST
        if "checkpoint_sha256" in metrics and best.is_file():
            return metrics["checkpoint_sha256"] != sha256_of(best)
        return metrics.get("checkpoint_epoch") != self.best_epoch  # evaluations before the SHA-256 was recorded

    @property
    def test_ledger(self) -> list[dict[str, Any]]:
        """Every evaluation of one of the folder's checkpoints on a test folder, oldest first (time, checkpoint,
        sha256, epoch, data, accuracy): how often its test folder has been seen. A line that cannot be read is
        there as {"unreadable": True}."""
        records, unreadable = jsonl_lines(self.path / TEST_LEDGER)
        # a line a kill or a full disk tore, or bytes garbled since, was still a use of the test folder: counted
        return records + [{"unreadable": True} for _ in range(unreadable)]

    def trained_after_test(self) -> bool:
        """Whether best.pt changed after its test score was seen: trained again (resumed, or replaced) since an
        evaluation of it, so the test folder may have steered it."""
        best = self.path / BEST
        seen = [e for e in self.test_ledger if e.get("checkpoint") == BEST]
        return bool(seen) and best.is_file() and any(e["sha256"] != sha256_of(best) for e in seen)


def again_command(run_dir: Path) -> str:
    """The command that trains the run in `run_dir` again, under a new name: its config.yaml, read from there."""
    import shlex

    return f"cnnlab train --config {shlex.quote(str(Path(run_dir) / CONFIG))} --name {shlex.quote(Path(run_dir).name)}-again"


def recorded_path(folder: Path, path: Path) -> str:
    """How a folder (a sweep's, an assignment's) records one of its own sub-folders: relative to itself, so the
    record still holds when the folder is moved, copied or unzipped elsewhere."""
    try:
        return str(Path(path).resolve().relative_to(Path(folder).resolve()))
    except ValueError:  # not inside it: as it is, absolute
        return str(Path(path).resolve())


def inside(folder: Path, recorded: str | Path) -> Path:
    """Where a sub-folder that `folder` recorded is now: relative records are of `folder` itself; an absolute or a
    working-directory-relative one (older cnnlab, or a folder since moved) is its copy here, by its last two parts
    (trials/trial-0003, verify/...-seed1), so a copy never reads the original's files."""
    folder, recorded = Path(folder), Path(recorded)
    if not recorded.is_absolute() and (folder / recorded).exists():
        return folder / recorded
    here = folder / recorded.parent.name / recorded.name
    return here if here.exists() or not recorded.exists() else recorded
