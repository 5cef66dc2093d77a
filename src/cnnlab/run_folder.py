"""A run folder, as training writes it and everything else reads it. Every rule about a run lives here once: its
layout, its config (read through `saved_config`, so an old folder reads as a new one), its best epoch, what kind of
run it is, whether it finished, and whether its test evaluation is of the best.pt it holds now. `api.Run`, the
report, `compare`, the whole job, training and its checkpoint callback all go through it."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .config import Config, load_yaml, save_yaml, saved_config
from .errors import CnnlabError, ConfigError
from .io import FolderClaim, atomic_write_json, jsonl_lines, read_jsonl, sha256_of

CONFIG = "config.yaml"  # the run's whole config, as it trained
METRICS = "metrics.jsonl"  # one line per finished epoch
SUMMARY = "summary.json"  # written when training ends, however it ends
BEST = "best.pt"  # the weights of the best epoch (the validated ones: the average with --ema)
LAST = "last.pt"  # the weights, optimiser and schedule after the latest epoch: what --resume continues from
SPLIT = "split.json"  # the seeded train/validation split, by file: a resumed run and a student keep it
BAD_FILES = "bad_files.txt"  # the files of train/ that could not be read, and why
EVAL = "eval"  # `cnnlab evaluate`'s output for best.pt: metrics.json and its figures
EVAL_METRICS = f"{EVAL}/metrics.json"
EXPLAIN = "explain"  # `cnnlab explain`'s figures, and explain.json, written after them: the step's done mark
EXPLAIN_RECORD = "explain.json"  # in explain/ (or another --out): what was explained, written last
TEACHER_LOGITS = "teacher_logits.npy"  # a student's stored teacher logits, one row per training image
TEACHER_VIEWS = "teacher_views.npz"  # distill_mode views: the teacher's logits of K rounds of the student's views
TEACHER_INFO = "teacher.json"  # a student's teacher: its checkpoint (relative and absolute), SHA-256, mode
TEST_LEDGER = "test_ledger.jsonl"  # one line each time a checkpoint of the folder met a test folder (cnnlab evaluate)
TENSORBOARD = "tensorboard"  # TensorBoard's event files, with --tensorboard
WANDB_RUN = "wandb_run.json"  # the W&B run its training logged to (id, project, mode, group), with --wandb
FINISHED = ("completed", "early_stopped")  # statuses of a run that trained to its end
# What `--resume` may change; any other setting would continue a different experiment under the old name.
RESUME_MAY_CHANGE = ("epochs", "early_stop", "device", "decode_workers", "cache_dir", "wandb", "wandb_project",
                     "tensorboard", "data")  # data: where the folder is now (split.json names its files relative to it)


def is_better(record: dict[str, Any], best: dict[str, Any] | None, by: str = "val_acc") -> bool:
    """Whether an epoch beats the best so far (None: there is none yet), by the metric `by` (`Config.keep_best`: an
    accuracy higher, a loss lower is better). At equal values (a small validation set saturates) the lower val_loss
    wins, or for a loss the higher val_acc; at equal both the earlier epoch stays. The one rule of the best epoch:
    training keeps best.pt by it, a sweep reads a trial's value at that epoch, and every reader finds it again."""
    if best is None:
        return True
    sign = -1 if by.endswith("loss") else 1
    tie = ("val_acc", 1) if by.endswith("loss") else ("val_loss", -1)
    return (sign * record[by], tie[1] * record[tie[0]]) > (sign * best[by], tie[1] * best[tie[0]])


def best_record(history: list[dict[str, Any]], by: str = "val_acc") -> dict[str, Any] | None:
    """The epoch best.pt holds, by training's own rule (`is_better`, epoch after epoch); None before any epoch."""
    best = None
    for record in history:
        if is_better(record, best, by):
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
        return best_record(self.history, self.config.keep_best)

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
        return (self.path / EXPLAIN / EXPLAIN_RECORD).is_file()

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


# ---- making a run folder, and what training writes when it ends ----------------------------------------------------

def default_run_name(cfg: Config) -> str:
    knobs = f"{cfg.filters}{cfg.filter_org}-{cfg.activation}" if cfg.model == "smallcnn" else cfg.finetune
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model}-{knobs}".replace(",", "_").replace("/", "-")


def claim_free_name(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ...: the first that this process creates itself (mkdir is atomic, so two
    processes asking at once never get one folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for k in range(1, 10_000):
        candidate = path if k == 1 else path.with_name(f"{path.name}-{k}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise CnnlabError(f"{path.parent} holds 10,000 folders named {path.name}: choose a --name")


def check_outside_the_data(cfg: Config) -> None:
    """Refuse, before anything is written, a run folder or cache inside ROOT/train or ROOT/val: there it would be
    read as a class folder (of no image) by this run and every later one."""
    for key in ("out", "cache_dir"):
        where = Path(str(cfg.resolved_cache_dir()) if key == "cache_dir" else cfg.out).resolve()
        for side in ("train", "val"):
            inside_data = (Path(cfg.data) / side).resolve()
            if where == inside_data or where.is_relative_to(inside_data):
                raise ConfigError(f"{key}={getattr(cfg, key) or str(where)!r} is inside the data folder's {side}/ "
                                  f"({inside_data}), where it would become a class: give --{key} outside {inside_data}")


def open_run_dir(cfg: Config, resume: bool) -> tuple[Config, Path, FolderClaim]:
    """The run folder (made and claimed by this process until the run ends), with the config it holds saved; the
    config gets the folder's name. Two processes given one --name at once: the second is refused in one line."""
    run_dir = Path(cfg.out) / (cfg.name or default_run_name(cfg))
    if resume and not (run_dir / LAST).exists():
        raise CnnlabError(f"{run_dir} has no last.pt to resume from; start it without --resume")
    if not resume and not cfg.name:  # a made-up name is claimed atomically: two runs started in the same second
        run_dir = claim_free_name(run_dir)  # (a shell loop, a sweep launcher) get two folders
    claim = FolderClaim(run_dir, "a training run", "choose another --name")
    try:  # every look at what the folder holds happens under the claim
        if not resume and ((run_dir / LAST).exists() or read_jsonl(run_dir / METRICS)):  # (not a run stopped before
            # its first epoch was written, by a full disk say: that one starts again in its folder)
            raise CnnlabError(f"{run_dir} already holds a run: resume it with `cnnlab train --resume {run_dir}` "
                              f"or choose another --name")
        cfg = replace(cfg, name=run_dir.name, data=str(Path(cfg.data).resolve()),  # --resume works from anywhere
                      teacher=str(Path(cfg.teacher).resolve()) if cfg.teacher else cfg.teacher)
        if cfg.model == "smallcnn":  # the stride it trains with, not "auto": a later auto rule cannot change the model
            cfg = replace(cfg, conv1_stride=cfg.first_stride())
        save_config(run_dir, cfg)
    except BaseException:
        claim.release()
        raise
    return cfg, run_dir, claim


def save_config(run_dir: Path, cfg: Config) -> None:
    """config.yaml: the run's whole config as it trains (again once a value chosen on the data is known: epochs 0)."""
    save_yaml(cfg, run_dir / CONFIG)


def write_summary(run_dir: Path, cfg: Config, facts: dict[str, Any], environment: dict[str, Any]) -> dict[str, Any]:
    """summary.json when training ends, however it ends: `facts` of the run (status, best epoch, sizes, device,
    precision, ...), what its metrics file holds (every epoch, resumed ones included) and its provenance (`environment`,
    what `cnnlab env` shows; the seed; the command that started this process and the one that trains the run again).
    Returned with the history."""
    import shlex
    import sys

    history = read_jsonl(run_dir / METRICS)
    summary = {**facts, "epochs_run": len(history), "train_seconds": sum(r["epoch_time"] for r in history),
               "images_per_s": (sum(r["images_per_s"] for r in history) / len(history)) if history else 0.0,
               "provenance": {**environment, "seed": cfg.seed, "argv": " ".join(shlex.quote(a) for a in sys.argv),
                              "reproduce": again_command(run_dir)}}
    atomic_write_json(run_dir / SUMMARY, summary)
    return {**summary, "history": history}
