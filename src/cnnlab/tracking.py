"""What happens to a run after training reaches the trackers its training logged to. W&B: the run folder remembers
that run (`WANDB_RUN`, written by the training's tracker), and `cnnlab evaluate` and `explain` resume it to log the
test metrics, the confusion matrix, per-class metrics, the figures and the best checkpoint, in W&B's own objects.
TensorBoard: the same numbers and figures are added to the run folder's event files, where it has them."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import first_line
from .io import atomic_write_json
from .run_folder import BEST, TENSORBOARD, WANDB_RUN, RunFolder


def remember_wandb_run(run_dir: Path, wandb_run: Any, group: str | None) -> None:
    atomic_write_json(run_dir / WANDB_RUN, {"id": wandb_run.id, "project": wandb_run.project,
                                            "mode": wandb_run.settings.mode, "group": group})


def wandb_login_known() -> bool:
    """Whether this machine has a W&B API key for its W&B server: $WANDB_API_KEY, or the netrc entry `wandb login`
    writes (read with the standard library, where wandb looks: $NETRC, ~/.netrc, ~/_netrc). Asked before an online
    run starts, so that no login is one line before any work, not a traceback after the run folder is made."""
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").netloc
    for path in filter(None, (os.environ.get("NETRC"), "~/.netrc", "~/_netrc")):
        try:
            found = netrc.netrc(os.path.expanduser(path)).authenticators(host)
        except (OSError, netrc.NetrcParseError):
            continue
        if found and found[2]:
            return True
    return False


NO_LOGIN_FIX = "run `wandb login` (or set WANDB_API_KEY), or use --wandb offline and `wandb sync` the run folder later"


@contextmanager
def resumed_wandb_run(folder: RunFolder, what: str, log: Callable[[str], None]) -> Iterator[Any | None]:
    """The run folder's W&B run, resumed for the block and finished after it, however the block ends (None when
    its training logged to none, or wandb is gone). W&B's own failure (no login on this machine, no network) is
    one line naming what was not logged and the fix: it never fails the work the block follows, which is done and
    kept in the run folder."""
    ids = folder.read(WANDB_RUN)
    if not ids:
        yield None
        return
    try:
        import wandb
    except ImportError:
        yield None
        return
    not_logged = f"wandb: {what} not logged to run {ids['id']}"
    try:
        if ids["mode"] == "online" and not wandb_login_known():
            raise RuntimeError("no W&B login on this machine")
        wandb_run = wandb.init(id=ids["id"], project=ids["project"], mode=ids["mode"], group=ids.get("group"),
                               resume="allow", dir=str(folder.path), reinit="create_new")
    except Exception as e:  # noqa: BLE001 - W&B's errors (UsageError, CommError, ...) end in its own classes
        log(f"{not_logged} ({first_line(e)}): {NO_LOGIN_FIX}, then run the command again")
        yield None
        return
    try:
        yield wandb_run
    except Exception as e:  # noqa: BLE001 - the upload failed midway: the local results stand
        log(f"{not_logged} in full ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): run the command "
            "again to add it")
    finally:
        try:
            wandb_run.finish()
        except Exception:  # noqa: BLE001 - as above
            pass


def log_evaluation(folder: RunFolder, metrics: dict[str, Any], out_dir: Path, log: Callable[[str], None]) -> None:
    """To each tracker the run's training used: the test metrics and the evaluation's figures."""
    scalars = {"test_acc": metrics["accuracy"], "test_balanced_acc": metrics.get("balanced_accuracy"),
               "test_macro_f1": metrics["macro_f1"]}
    figures = {f"test/{name}": out_dir / f"{name}.png" for name in ("predictions", "top_losses", "reliability",
                                                                     "confusion")}
    to_tensorboard(folder, scalars, figures, int(metrics["checkpoint_epoch"]))
    to_wandb_evaluation(folder, metrics, scalars, figures, log)


def to_wandb_evaluation(folder: RunFolder, metrics: dict[str, Any], scalars: dict[str, Any], figures: dict[str, Path],
                        log: Callable[[str], None]) -> None:
    """`scalars` with the accuracy's interval in the summary; per-class metrics as a table; the confusion matrix as
    W&B's own plot (not our figure of it); the other figures as images; best.pt as a model artifact."""
    with resumed_wandb_run(folder, "the test evaluation", log) as wandb_run:
        if wandb_run is not None:
            _log_evaluation_to(wandb_run, folder, metrics, scalars, figures)
            log(f"wandb: the test evaluation logged to run {wandb_run.id}")


def _log_evaluation_to(wandb_run: Any, folder: RunFolder, metrics: dict[str, Any], scalars: dict[str, Any],
                       figures: dict[str, Path]) -> None:
    import wandb

    classes = list(metrics["per_class"])
    low, high = metrics["accuracy_ci95"]
    wandb_run.summary.update({**scalars, "test_acc_ci95_low": low, "test_acc_ci95_high": high,
                              "test_images": metrics["images"], "test_checkpoint_epoch": metrics["checkpoint_epoch"]})
    table = wandb.Table(columns=["class", "precision", "recall", "f1", "images"],
                        data=[[k, v["precision"], v["recall"], v["f1"], v["support"]] for k, v in metrics["per_class"].items()])
    truth = [i for i, row in enumerate(metrics["confusion"]) for j, n in enumerate(row) for _ in range(n)]
    predicted = [j for row in metrics["confusion"] for j, n in enumerate(row) for _ in range(n)]
    media = {"test/per_class": table,
             "test/confusion_matrix": wandb.plot.confusion_matrix(y_true=truth, preds=predicted, class_names=classes)}
    media |= {tag: wandb.Image(str(path)) for tag, path in figures.items() if tag != "test/confusion" and path.is_file()}
    wandb_run.log(media)
    model = wandb.Artifact(f"model-{wandb_run.id}", type="model",
                           metadata={"epoch": metrics["checkpoint_epoch"], "sha256": metrics["checkpoint_sha256"],
                                     "test_acc": metrics["accuracy"]})
    model.add_file(str(folder.path / BEST))
    wandb_run.log_artifact(model, aliases=["best"])


def log_export(folder: RunFolder, path: Path, format: str, log: Callable[[str], None]) -> None:
    """An exported model (ONNX, TorchScript) as a model artifact of the run's W&B run, where it has one."""
    with resumed_wandb_run(folder, f"the {format} model", log) as wandb_run:
        if wandb_run is not None:
            import wandb

            model = wandb.Artifact(f"model-{wandb_run.id}-{format}", type="model", metadata={"format": format})
            model.add_file(str(path))
            wandb_run.log_artifact(model, aliases=["best", format])


def log_explanation(folder: RunFolder, figures: dict[str, Path], log: Callable[[str], None]) -> None:
    """The filters, guided back-propagation and Grad-CAM figures, as images of the run, to each tracker."""
    to_tensorboard(folder, {}, {f"explain/{name}": path for name, path in figures.items()}, folder.best_epoch or 0)
    with resumed_wandb_run(folder, "the explanation", log) as wandb_run:
        if wandb_run is not None:
            import wandb

            wandb_run.log({f"explain/{name}": wandb.Image(str(path)) for name, path in figures.items()})
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
