"""Knowledge distillation: a student (any cnnlab model; the small CNN is the one worth it) learns from the labels and
from a trained run's outputs, its teacher (`--teacher RUN`).

The teacher is run once per training image, with its own preprocessing (its input size and normalisation, decoded
into the cache at its own size) and its own test-time mirror averaging, and its logits are kept in the student's run
folder (`teacher_logits.npy`, with `teacher.json` naming the checkpoint and its SHA-256). Every epoch then reads them
by row, as it reads the labels: the teacher costs one pass over the training images, not one per epoch (on the CPU,
EfficientNet-Lite0 at 224 px is most of a training run's time per pass). The student sees its augmented views; the
teacher's logits are of the whole image, mirror-averaged, so they fit a flipped view as well as the original.

The loss: (1 - distill_weight) x the labels' loss (with label smoothing and class weights as configured) +
distill_weight x T^2 x KL(teacher's softmax(z/T) || student's softmax(z/T)), T = distill_temperature (Hinton et al.,
2015). The student keeps the teacher's train/validation split, so its validation images were never the teacher's
training images either, and validation accuracy still judges the student fairly.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .errors import CnnlabError, ConfigError, DataError
from .io import atomic_write, atomic_write_json, sha256_of
from .run_folder import BEST

TEACHER_LOGITS = "teacher_logits.npy"
TEACHER_INFO = "teacher.json"


def teacher_checkpoint(teacher: str) -> Path:
    """The checkpoint `--teacher` names: a run folder's best.pt, or a checkpoint file."""
    path = Path(teacher)
    if path.is_dir():
        path = path / BEST
    if not path.is_file():
        raise ConfigError(f"teacher={teacher!r}: {path} not found; give a trained run folder (runs/<name>) or its "
                          "best.pt")
    return path


def check_teacher(teacher: str, classes: list[str]) -> Path:
    """The teacher's checkpoint, refused unless it was trained on these classes (in this order)."""
    from .checkpoint import load_checkpoint

    checkpoint = teacher_checkpoint(teacher)
    theirs = load_checkpoint(checkpoint)["classes"]
    if theirs != classes:
        raise DataError(f"the teacher {checkpoint} was trained on classes {theirs}, but this data has {classes}: "
                        "distil from a run on the same class folders")
    return checkpoint


def teacher_split(teacher: str) -> Path | None:
    """The teacher run's split.json, which the student keeps (None: a checkpoint outside a run folder)."""
    split = teacher_checkpoint(teacher).parent / "split.json"
    return split if split.is_file() else None


def teacher_logits(cfg: Any, images: Any, run_dir: Path, device: torch.device, progress: bool,
                   log: Callable[[str], None]) -> np.ndarray:
    """(images, classes) float32: the teacher's logits for every readable training image (zeros elsewhere), computed
    once and kept in the run folder; a resumed run reads them back when they are of the same checkpoint."""
    from .data import Batches, ImageTransform, load_images
    from .evaluate import load_model
    from .hardware import decode_device, precision_for

    checkpoint = teacher_checkpoint(cfg.teacher)
    digest = sha256_of(checkpoint)
    kept, info = run_dir / TEACHER_LOGITS, run_dir / TEACHER_INFO
    if kept.is_file() and info.is_file() and json.loads(info.read_text()).get("sha256") == digest:
        table = np.load(kept)
        if table.shape[0] == len(images.files):
            return table
    started = time.perf_counter()
    loaded = load_model(checkpoint, device)  # its classes are the data's: check_teacher, before the run began
    pre = loaded.pre
    seen = load_images(images.root, pre.image_size, cfg.resolved_cache_dir(), cfg.decode_workers, progress,
                       decode_device(cfg.decoder, device), pre.crop, pre.interpolation, log)
    if [str(p) for p in seen.files] != [str(p) for p in images.files]:
        raise CnnlabError(f"{images.root} changed while the teacher's view of it was decoded: run again")
    rows = images.valid
    logits, _ = _predict(loaded, Batches(seen, rows, 128, device, shuffle=False), ImageTransform(pre, loaded.cfg.channels_last),
                         device, precision_for(loaded.cfg.precision, device, strict=False).dtype)
    table = np.zeros((len(images.files), len(images.classes)), np.float32)
    table[rows] = logits.numpy()
    atomic_write(kept, lambda fh: np.save(fh, table))
    seconds = time.perf_counter() - started
    atomic_write_json(info, {"checkpoint": str(checkpoint.resolve()), "sha256": digest, "model": loaded.cfg.model,
                             "epoch": int(loaded.state["epoch"]), "preprocess": pre.to_dict(), "images": int(len(rows)),
                             "seconds": seconds})
    log(f"teacher {checkpoint} ({loaded.cfg.model}, input {pre.describe()}): its logits for {len(rows)} training "
        f"images in {seconds:.0f} s, kept in {kept}")
    return table


def teacher_record(run_dir: Path) -> dict[str, Any]:
    """What a student's checkpoints and summary say of its teacher: the checkpoint, its SHA-256, model and epoch."""
    info = json.loads((run_dir / TEACHER_INFO).read_text())
    return {k: info[k] for k in ("checkpoint", "sha256", "model", "epoch")}


def _predict(loaded: Any, batches: Any, transform: Any, device: torch.device, amp: torch.dtype | None) -> tuple:
    from .evaluate import predict_logits

    with torch.inference_mode():
        return predict_logits(loaded.model, batches, transform, device, amp, loaded.cfg.tta)


class DistillationLoss(nn.Module):
    """The labels' loss and the teacher's term, weighted; called as loss(logits, labels, teacher_logits). Without
    teacher logits (validation) it is the labels' loss alone."""

    def __init__(self, labels_loss: nn.Module, weight: float, temperature: float):
        super().__init__()
        self.labels_loss, self.weight, self.temperature = labels_loss, weight, temperature

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        hard = self.labels_loss(logits, labels)
        if teacher is None:
            return hard
        return (1 - self.weight) * hard + self.weight * self.teacher_term(logits, teacher)

    def teacher_term(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """T^2 x KL(teacher || student) at temperature T, per image (T^2 keeps its gradients' scale as T changes)."""
        t = self.temperature
        student = torch.log_softmax(logits.float() / t, dim=1)
        target = torch.log_softmax(teacher.float() / t, dim=1)
        return nn.functional.kl_div(student, target, log_target=True, reduction="batchmean") * t * t
