"""What happens to a run after training reaches the trackers its training logged to. W&B: the run folder remembers
that run (`WANDB_RUN`, written by the training's tracker), and `cnnlab evaluate` and `explain` resume it to log the
test metrics, the confusion matrix, per-class metrics, the figures and the best checkpoint, in W&B's own objects.
TensorBoard: the same numbers and figures are added to the run folder's event files, where it has them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .io import atomic_write_json
from .run_folder import BEST, TENSORBOARD, WANDB_RUN, RunFolder


def remember_wandb_run(run_dir: Path, wandb_run: Any, group: str | None) -> None:
    atomic_write_json(run_dir / WANDB_RUN, {"id": wandb_run.id, "project": wandb_run.project,
                                            "mode": wandb_run.settings.mode, "group": group})


def resume_wandb_run(folder: RunFolder) -> Any | None:
    """The run folder's W&B run, resumed (None when its training logged to none, or wandb is gone)."""
    ids = folder.read(WANDB_RUN)
    if not ids:
        return None
    try:
        import wandb
    except ImportError:
        return None
    return wandb.init(id=ids["id"], project=ids["project"], mode=ids["mode"], group=ids.get("group"), resume="allow",
                      dir=str(folder.path), reinit="create_new")


def log_evaluation(folder: RunFolder, metrics: dict[str, Any], out_dir: Path, log: Callable[[str], None]) -> None:
    """To each tracker the run's training used."""
    test = {"test_acc": metrics["accuracy"], "test_balanced_acc": metrics.get("balanced_accuracy"),
            "test_macro_f1": metrics["macro_f1"]}
    figures = {f"test/{name}": out_dir / f"{name}.png" for name in ("predictions", "top_losses", "reliability",
                                                                     "confusion")}
    to_tensorboard(folder, test, figures, int(metrics["checkpoint_epoch"]))
    to_wandb_evaluation(folder, metrics, out_dir, log)


def to_wandb_evaluation(folder: RunFolder, metrics: dict[str, Any], out_dir: Path, log: Callable[[str], None]) -> None:
    """Test accuracy with its interval, balanced accuracy and macro F1 in the summary; per-class metrics as a
    table; the confusion matrix as W&B's own plot; the prediction grid, top losses and reliability diagram as
    images; best.pt as a model artifact."""
    wandb_run = resume_wandb_run(folder)
    if wandb_run is None:
        return
    import wandb

    classes = list(metrics["per_class"])
    low, high = metrics["accuracy_ci95"]
    wandb_run.summary.update({"test_acc": metrics["accuracy"], "test_acc_ci95_low": low, "test_acc_ci95_high": high,
                              "test_balanced_acc": metrics.get("balanced_accuracy"), "test_macro_f1": metrics["macro_f1"],
                              "test_images": metrics["images"], "test_checkpoint_epoch": metrics["checkpoint_epoch"]})
    table = wandb.Table(columns=["class", "precision", "recall", "f1", "images"],
                        data=[[k, v["precision"], v["recall"], v["f1"], v["support"]] for k, v in metrics["per_class"].items()])
    truth = [i for i, row in enumerate(metrics["confusion"]) for j, n in enumerate(row) for _ in range(n)]
    predicted = [j for row in metrics["confusion"] for j, n in enumerate(row) for _ in range(n)]
    media = {"test/per_class": table,
             "test/confusion_matrix": wandb.plot.confusion_matrix(y_true=truth, preds=predicted, class_names=classes)}
    for name in ("predictions", "top_losses", "reliability"):
        if (out_dir / f"{name}.png").is_file():
            media[f"test/{name}"] = wandb.Image(str(out_dir / f"{name}.png"))
    wandb_run.log(media)
    model = wandb.Artifact(f"model-{wandb_run.id}", type="model",
                           metadata={"epoch": metrics["checkpoint_epoch"], "sha256": metrics["checkpoint_sha256"],
                                     "test_acc": metrics["accuracy"]})
    model.add_file(str(folder.path / BEST))
    wandb_run.log_artifact(model, aliases=["best"])
    wandb_run.finish()
    log(f"wandb: the test evaluation logged to run {wandb_run.id}")


def log_export(folder: RunFolder, path: Path, format: str) -> None:
    """An exported model (ONNX, TorchScript) as a model artifact of the run's W&B run, where it has one."""
    wandb_run = resume_wandb_run(folder)
    if wandb_run is None:
        return
    import wandb

    model = wandb.Artifact(f"model-{wandb_run.id}-{format}", type="model", metadata={"format": format})
    model.add_file(str(path))
    wandb_run.log_artifact(model, aliases=["best", format])
    wandb_run.finish()


def log_explanation(folder: RunFolder, figures: dict[str, Path], log: Callable[[str], None]) -> None:
    """The filters, guided back-propagation and Grad-CAM figures, as images of the run, to each tracker."""
    to_tensorboard(folder, {}, {f"explain/{name}": path for name, path in figures.items()}, folder.best_epoch or 0)
    wandb_run = resume_wandb_run(folder)
    if wandb_run is None:
        return
    import wandb

    wandb_run.log({f"explain/{name}": wandb.Image(str(path)) for name, path in figures.items()})
    wandb_run.finish()
    log(f"wandb: the explanation logged to run {wandb_run.id}")


def to_tensorboard(folder: RunFolder, scalars: dict[str, float | None], figures: dict[str, Path], step: int) -> None:
    """Scalars and PNG figures added to the run's TensorBoard event files, where its training wrote some."""
    if not (folder.path / TENSORBOARD).is_dir():
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    import numpy as np
    from PIL import Image

    writer = SummaryWriter(log_dir=str(folder.path / TENSORBOARD))
    try:
        for tag, value in scalars.items():
            if value is not None:
                writer.add_scalar(tag, value, global_step=step)
        for tag, path in figures.items():
            if path.is_file():
                with Image.open(path) as im:
                    writer.add_image(tag, np.asarray(im.convert("RGB")), global_step=step, dataformats="HWC")
    finally:
        writer.close()
