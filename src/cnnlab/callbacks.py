"""The callbacks `fit` trains with, instead of branches inside its loop (minGPT's way; the hooks: `trainer.Callback`):
per step the schedule, the moving average and the progress bar; per epoch checkpoints, the metrics file, the console
line, Weights & Biases, TensorBoard and early stopping. A sweep's pruning and the range test's rates are callbacks of
their own modules."""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoint import make_checkpoint, save_checkpoint
from .config import Config
from .errors import CnnlabError, ConfigError, first_line
from .io import append_jsonl
from .run_folder import BEST, LAST, METRICS, TENSORBOARD, best_record
from .tracking import NO_LOGIN_FIX, remember_wandb_run, wandb_login_known
from .trainer import Callback, StopTraining, Trainer


class ScheduleStep(Callback):
    """The learning-rate schedule's step after every optimiser step (warm-up and cosine, one-cycle: per step)."""

    def on_step_end(self, run: Trainer, loss: torch.Tensor, images: int) -> None:
        if run.scheduler is not None:
            run.scheduler.step()


class MovingAverage(Callback):
    """--ema: the average of the weights, updated after every optimiser step."""

    def on_step_end(self, run: Trainer, loss: torch.Tensor, images: int) -> None:
        if run.ema is not None:
            run.ema.update_parameters(run.model)


class ProgressBar(Callback):
    """An epoch's bar, in images, with the latest loss on the CPU (reading it costs nothing there; on a GPU it would
    make the host wait for the device at every step)."""

    def __init__(self) -> None:
        self.bar: Any = None

    def on_epoch_start(self, run: Trainer, epoch: int) -> None:
        self.bar = tqdm(total=run.source.steps_per_epoch * run.cfg.batch_size, desc=f"epoch {epoch}/{run.cfg.epochs}",
                        unit="img", leave=False, dynamic_ncols=True)

    def on_step_end(self, run: Trainer, loss: torch.Tensor, images: int) -> None:
        self.bar.update(images)
        if run.device.type == "cpu":
            self.bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        if self.bar.n >= self.bar.total:  # the epoch's last step: gone before validation, as the console line follows
            self.close()

    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        self.close()

    def on_fit_end(self, run: Trainer) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Checkpoints(Callback):
    """best.pt when validation accuracy improves, then last.pt (with the optimiser and schedule, for --resume)
    every epoch. best.pt first: a crash between the two saves only redoes this epoch on resume. With --ema,
    best.pt holds the average (what was validated) and last.pt the trained weights plus the average."""

    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        def state(model: nn.Module, **extra: Any) -> dict[str, Any]:
            return make_checkpoint(model, run.cfg, run.classes, run.preprocess, record["epoch"], run.history,
                                   best_val_acc=run.best_val_acc, best_val_loss=run.best_val_loss,
                                   best_epoch=run.best_epoch, teacher=run.teacher, **extra)

        if run.improved:
            save_checkpoint(state(run.result_model), run.run_dir / BEST)
        save_checkpoint(state(run.model, optimizer=run.optimizer.state_dict(),
                              scheduler=run.scheduler.state_dict() if run.scheduler else None,
                              ema=run.ema.state_dict() if run.ema is not None else None,
                              scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None), run.run_dir / LAST)


class MetricsFile(Callback):
    """One JSON line per epoch in metrics.jsonl, synced: a crash loses at most the line being written."""

    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        append_jsonl(run.run_dir / METRICS, record)


class ConsoleLog(Callback):
    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        r = record
        run.log(f"epoch {r['epoch']}/{run.cfg.epochs}  train_loss {r['train_loss']:.4f}  train_acc {r['train_acc']:.4f}  "
                f"val_loss {r['val_loss']:.4f}  val_acc {r['val_acc']:.4f}  lr {r['lr']:.2e}  "
                f"{r['epoch_time']:.1f}s  {r['images_per_s']:.0f} img/s{'  *' if run.improved else ''}")


class EarlyStopping(Callback):
    """Stop after `patience` epochs without a better epoch by keep_best (0: never)."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        if self.patience and record["epoch"] - run.best_epoch >= self.patience:
            by = run.cfg.keep_best
            run.log(f"early stop: no better {by} for {self.patience} epochs "
                    f"(best {run.best_record[by]:.4f} at epoch {run.best_epoch})")
            raise StopTraining("early_stopped")


AGENT = "agent"  # what --wandb auto means under `wandb agent`: its run, in W&B's own mode and project


def wandb_mode(setting: str, env: Mapping[str, str]) -> str:
    """off, offline, online, or `AGENT` when `wandb agent` started this process (it sets $WANDB_SWEEP_ID and the
    run's id) and --wandb is auto: the agent's sweep then gets its metric without a flag."""
    if setting != "auto":
        return setting
    return AGENT if env.get("WANDB_SWEEP_ID") else "off"


class Tracker(Callback):
    """What a tracker (W&B, TensorBoard) knows of its own log: the last epoch it holds. Its summary names the best
    epoch (the run's own rule) among those: an epoch that a stop (SIGTERM, Ctrl-C) cut off between its checkpoint and
    its log line is in no tracker's history, so it is not in the summary either."""

    through = 0

    def began(self, run: Trainer) -> None:
        self.through = run.history[-1]["epoch"] if run.history else 0  # a resumed run's earlier epochs were logged

    def logged(self, record: dict[str, Any]) -> None:
        self.through = int(record["epoch"])

    def best_logged(self, run: Trainer) -> dict[str, Any] | None:
        return best_record([r for r in run.history if r["epoch"] <= self.through], run.cfg.keep_best)


class WandbTracker(Tracker):
    """Weights & Biases logging of the config and every epoch's metrics (`--wandb offline|online`; offline needs
    no account; under `wandb agent`, the agent's run). The run's summary holds the best epoch's values, the ones
    best.pt keeps, so a W&B sweep ranks runs as cnnlab does. The local run folder stays the source of truth."""

    def __init__(self, cfg: Config, group: str | None = None):
        self.group, self.wandb_run = group, None
        self.mode = wandb_mode(cfg.wandb, os.environ)
        if self.mode != "off":
            try:
                import wandb  # noqa: F401 - refused at once, before any training, when it is missing
            except ImportError:
                why = "runs under `wandb agent`" if self.mode == AGENT else f"wandb={cfg.wandb}"
                raise ConfigError(f"{why}: that needs the wandb package: pip install wandb (or --wandb off)") from None
        if self.mode == "online" and not wandb_login_known():
            raise ConfigError(f"wandb=online: this machine has no W&B login: {NO_LOGIN_FIX}")

    def on_fit_start(self, run: Trainer) -> None:
        if self.mode == "off":
            return
        import wandb

        agent = self.mode == AGENT  # the agent's environment names the run, its project and its mode
        try:
            self.wandb_run = wandb.init(project=None if agent else run.cfg.wandb_project, name=run.run_dir.name,
                                        group=self.group, mode=None if agent else self.mode, dir=str(run.run_dir),
                                        config=run.cfg.to_dict(), reinit="create_new")
        except Exception as e:  # noqa: BLE001 - no network, a key W&B refuses: its own error classes, one line here
            raise CnnlabError(f"wandb={self.mode}: the W&B run could not start ({first_line(e)}); no epoch was trained: check "
                              "the network and the login (`wandb login`), or use --wandb offline and `wandb sync` the run "
                              "folder later; then run the same command again") from None
        self.began(run)
        remember_wandb_run(run.run_dir, self.wandb_run, self.group)  # evaluate and explain log to it later
        run.log(f"wandb {'agent run ' + self.wandb_run.id if agent else self.mode}: {self.wandb_run.dir}")

    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        if self.wandb_run is not None:  # committed now, so the summary written at the end is not overwritten
            self.wandb_run.log(record, step=int(record["epoch"]), commit=True)
            self.logged(record)

    def on_fit_end(self, run: Trainer) -> None:
        if self.wandb_run is None:
            return
        best = self.best_logged(run)
        if best is not None:  # W&B would keep the last epoch's values; best.pt holds the best epoch's
            self.wandb_run.summary.update({**best, "best_epoch": best["epoch"]})
        tag = {"stopped": "pruned"}.get(run.status, run.status)  # a sweep's pruner is what stops a run early
        self.wandb_run.tags = (*self.wandb_run.tags, tag)
        self.wandb_run.finish(exit_code=0 if run.status in ("completed", "early_stopped", "stopped") else 1)
        self.wandb_run = None


class TensorBoardTracker(Tracker):
    """TensorBoard, the tracker that needs no account (`--tensorboard`): every epoch's metrics as scalars, and at the
    end the hyperparameters with the best epoch's metrics (TensorBoard's HPARAMS tab), in run_dir/tensorboard/."""

    def __init__(self, cfg: Config):
        self.writer: Any = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 - refused before any training
            except ImportError:
                raise ConfigError("tensorboard=true needs the tensorboard package: pip install 'cnnlab[tensorboard]' "
                                  "(or drop --tensorboard)") from None

    def on_fit_start(self, run: Trainer) -> None:
        if run.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run.run_dir / TENSORBOARD))
            self.began(run)

    def on_epoch_end(self, run: Trainer, record: dict[str, Any]) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, global_step=int(record["epoch"]))
        self.writer.flush()  # an epoch on disk as soon as it is in metrics.jsonl
        self.logged(record)

    def on_fit_end(self, run: Trainer) -> None:
        if self.writer is None:
            return
        best = self.best_logged(run)
        if best is not None:
            hparams = {k: v for k, v in run.cfg.to_dict().items() if isinstance(v, (int, float, str, bool))
                       and k not in ("data", "out", "name", "cache_dir")}
            self.writer.add_hparams(hparams, {"hparam/best_val_acc": best["val_acc"], "hparam/best_val_loss":
                                              best["val_loss"], "hparam/best_epoch": best["epoch"]}, run_name=".")
        self.writer.close()
        self.writer = None
