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

`distill_mode online` runs the teacher instead on the very view the student sees, every step ("a good teacher is
patient and consistent", Beyer et al. 2022): the teacher's images are decoded at its own size with the student's
field of view, batched in the student's order, and cropped, flipped and colour-jittered by the same draws of the
same generator (`OnlineTeacher`). It costs a teacher forward per image per epoch.

`distill_mode views` keeps that consistency at a fixed price (`ViewBank`): the online teacher is run once on K rounds
of the student's views (with distill_mixup, each view mixed with another image of its batch, and the labels mixed
alike: "function matching"), and the student cycles those rounds for its whole schedule. A student given no
--epochs trains the patient schedule (`default_epochs`: about 184,000 image passes). docs/recipe.md measures them.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .errors import CnnlabError, ConfigError, DataError
from .hardware import autocast, autocast_dtype, decode_device
from .io import atomic_write, atomic_write_json, sha256_of
from .run_folder import BEST, SPLIT, TEACHER_INFO, TEACHER_LOGITS, TEACHER_VIEWS
from .sources import epoch_seed

PATIENT_PASSES = 184_000  # training-image passes of a student's default schedule: 150 epochs of grocery's 1,228
PATIENT_MAX_EPOCHS = 150  # a small set is not trained longer than grocery was measured at (docs/recipe.md)
PLAIN_EPOCHS = 10  # epochs=0 without a teacher: the plain default


def default_epochs(teacher: str, train_images: int) -> int:
    """The epochs `epochs=0` stands for: with a teacher, the patient schedule (a good teacher is patient: Beyer et al.
    2022), PATIENT_PASSES image passes, so a larger set gets fewer epochs for about the same time (10 at least,
    PATIENT_MAX_EPOCHS at most); without one, PLAIN_EPOCHS."""
    if not teacher:
        return PLAIN_EPOCHS
    return max(PLAIN_EPOCHS, min(PATIENT_MAX_EPOCHS, round(PATIENT_PASSES / max(1, train_images))))


def teacher_checkpoint(teacher: str) -> Path:
    """The checkpoint `--teacher` names: a run folder's best.pt, or a checkpoint file."""
    path = teacher_checkpoint_path(teacher)
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


def resumed_teacher(teacher: str, run_dir: Path) -> Path:
    """The checkpoint a resumed student goes on learning from: the very one it began with, by the SHA-256 its
    teacher.json holds, at the path its config names, beside the student where the pair was moved together, or where
    it was first read. A teacher trained again since, or another run now at that path, is refused: the student's
    targets would change under it without a word."""
    info_file = run_dir / TEACHER_INFO
    named = teacher_checkpoint_path(teacher)
    if not info_file.is_file():  # stopped before the teacher was first read: it begins now, as a new run's does
        return teacher_checkpoint(teacher)
    info = json.loads(info_file.read_text())
    candidates = [named, *([run_dir / info["relative"]] if "relative" in info else []), Path(info["checkpoint"])]
    changed = []
    for candidate in candidates:
        if candidate.is_file():
            digest = sha256_of(candidate)
            if digest == info["sha256"]:
                return candidate
            changed.append((candidate, digest))
    if changed:
        where, digest = changed[0]
        raise CnnlabError(f"the teacher {where} is not the one {run_dir} began learning from (SHA-256 "
                          f"{info['sha256'][:12]}... then, {digest[:12]}... now: trained again, or another run): restore "
                          f"that best.pt to resume, or start a new student run with --teacher {where.parent}")
    raise CnnlabError(f"the teacher {run_dir} began learning from is gone (not at {named}, nor at "
                      f"{info['checkpoint']}): put it back, or move the student and its teacher together")


def teacher_checkpoint_path(teacher: str) -> Path:
    """Where the checkpoint `--teacher` names would be (a run folder's best.pt, or the file), whether or not it is."""
    path = Path(teacher)
    return path / BEST if path.is_dir() else path


def teacher_split(teacher: str) -> Path | None:
    """The teacher run's split.json, which the student keeps (None: a checkpoint outside a run folder)."""
    split = teacher_checkpoint(teacher).parent / SPLIT
    return split if split.is_file() else None


def teacher_logits(cfg: Any, images: Any, run_dir: Path, device: torch.device, progress: bool,
                   log: Callable[[str], None]) -> np.ndarray:
    """(images, classes) float32: the teacher's logits for every readable training image (zeros elsewhere), computed
    once and kept in the run folder; a resumed run reads them back when they are of the same checkpoint."""
    from .data import Batches, ImageTransform

    checkpoint = teacher_checkpoint(cfg.teacher)
    digest = sha256_of(checkpoint)
    kept, info = run_dir / TEACHER_LOGITS, run_dir / TEACHER_INFO
    if kept.is_file() and info.is_file() and json.loads(info.read_text()).get("sha256") == digest:
        table = np.load(kept)
        if table.shape[0] == len(images.files):
            return table
    started = time.perf_counter()
    loaded, seen = _teacher_and_its_view(cfg, checkpoint, images, device, progress, log, crop=None)
    amp = autocast_dtype(loaded.cfg.precision, device)
    # Kept beside the teacher's view in the image cache too, so the next student of this teacher on these images
    # (another seed, a sweep's trials) reads them instead of running the teacher again
    beside = seen.cache_file.with_suffix(f".teacher-{digest[:16]}-{device.type}-{amp}.npy") if seen.cache_file else None
    table, rows = _read_table(beside, len(images.files)), images.valid
    if table is None:
        logits, _ = _predict(loaded, Batches(seen, rows, 128, device, shuffle=False),
                             ImageTransform(loaded.pre, loaded.cfg.channels_last), device, amp)
        table = np.zeros((len(images.files), len(images.classes)), np.float32)
        table[rows] = logits.numpy()
        if beside is not None:
            _keep_quietly(beside, table)
        said = "computed"
    else:
        said = f"read from {beside.name} beside the image cache"
    atomic_write(kept, lambda fh: np.save(fh, table))
    seconds = time.perf_counter() - started
    _write_info(run_dir, checkpoint, digest, loaded, "stored", {"images": int(len(rows)), "seconds": seconds})
    log(f"teacher {checkpoint} ({loaded.cfg.model}, input {loaded.pre.describe()}): its logits for {len(rows)} training "
        f"images {said} in {seconds:.0f} s, kept in {kept}")
    return table


def _read_table(path: Path | None, rows: int) -> np.ndarray | None:
    try:
        table = np.load(path) if path is not None and path.is_file() else None
    except (OSError, ValueError):  # damaged: computed again
        return None
    return table if table is not None and table.shape[0] == rows else None


def _keep_quietly(path: Path, table: np.ndarray) -> None:
    try:
        atomic_write(path, lambda fh: np.save(fh, table))
    except OSError:  # a read-only cache folder: the run folder keeps its own copy, and the next student computes again
        pass


def _teacher_and_its_view(cfg: Any, checkpoint: Path, images: Any, device: torch.device, progress: bool,
                          log: Callable[[str], None], crop: float | None) -> tuple[Any, Any]:
    """The teacher's model on `device`, and the training folder decoded at its input size (with its own crop, or
    `crop` where given), file for file the student's."""
    from .data import load_images
    from .evaluate import load_model

    loaded = load_model(checkpoint, device)  # its classes are the data's: check_teacher, before the run began
    pre = loaded.pre
    seen = load_images(images.root, pre.image_size, cfg.resolved_cache_dir(), cfg.decode_workers, progress,
                       decode_device(cfg.decoder, device), pre.crop if crop is None else crop, pre.interpolation, log)
    if [str(p) for p in seen.files] != [str(p) for p in images.files]:
        raise CnnlabError(f"{images.root} changed while the teacher's view of it was decoded: run again")
    return loaded, seen


def _write_info(run_dir: Path, checkpoint: Path, digest: str, loaded: Any, mode: str, extra: dict[str, Any]) -> None:
    if loaded.sha256 != digest:
        raise CnnlabError(f"the teacher {checkpoint} changed while it was read (trained again meanwhile?): run again "
                          "once its training has ended")
    atomic_write_json(run_dir / TEACHER_INFO, {"checkpoint": str(checkpoint.resolve()), "sha256": digest,
                                               # found by this too when student and teacher move together (a zip)
                                               "relative": os.path.relpath(checkpoint.resolve(), run_dir.resolve()),
                                               "model": loaded.cfg.model, "epoch": int(loaded.state["epoch"]),
                                               "preprocess": loaded.pre.to_dict(), "mode": mode, **extra})


class OnlineTeacher:
    """The teacher run on the student's own augmented view, every step (`distill_mode online`).

    The teacher's images are the training folder decoded at the teacher's input size but with the student's crop
    (field of view), so a crop box in relative coordinates frames the same part of the photo in both. Its batches
    are drawn with the student's seed, rows and sampler, so batch k holds the same images in the same order (checked
    on each epoch's first batch). Before the student's step draws its augmentation from the epoch's generator, a
    copy of that generator's state drives the teacher's transform (built with the student's crop scale and jitter):
    the same draws in the same order give the same crop box, flip and colour change, at each model's resolution and
    normalisation. This holds because the training loop asks for batch k only after step k - 1 is done."""

    def __init__(self, cfg: Any, images: Any, train_rows: np.ndarray, student_transform: Any, run_dir: Path,
                 device: torch.device, progress: bool, log: Callable[[str], None]):
        from .data import Batches, ImageTransform
        from .sources import training_batches  # the student's own rule for its training draws

        checkpoint = teacher_checkpoint(cfg.teacher)
        self.loaded, seen = _teacher_and_its_view(cfg, checkpoint, images, device, progress, log,
                                                  crop=student_transform.pre.crop)
        self.device, self.amp = device, autocast_dtype(self.loaded.cfg.precision, device)
        self.batches = training_batches(cfg, partial(Batches, seen, train_rows, device=device))
        self.transform = ImageTransform(self.loaded.pre, self.loaded.cfg.channels_last, scale=student_transform.scale,
                                        ratio=student_transform.ratio, jitter=student_transform.jitter,
                                        mixup=student_transform.mixup)
        _write_info(run_dir, checkpoint, sha256_of(checkpoint), self.loaded, "online", {"images": int(len(train_rows))})
        log(f"teacher {checkpoint} ({self.loaded.cfg.model}, input {self.loaded.pre.describe()}): run online on each "
            "training view the student sees")

    def epoch_seed(self, seed: int, epoch: int) -> int:
        """The seed of the student's epoch: its own (each epoch new views)."""
        return epoch_seed(seed, epoch)

    def alongside(self, student: Iterable[tuple[torch.Tensor, ...]], seed: int, aug: torch.Generator | None
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The student's batches of this epoch (drawn with `seed`), each with the teacher's logits of the view
        `aug` is about to give the student."""
        for k, ((x, y), (tx, ty)) in enumerate(zip(student, self.batches.epoch(seed), strict=True)):
            if k == 0 and not torch.equal(y, ty):
                raise CnnlabError("the teacher's batches are not the student's: report this as a bug")
            view = None
            if aug is not None:
                view = torch.Generator(device=aug.device)
                view.set_state(aug.get_state())
            with torch.inference_mode(), autocast(self.device, self.amp):
                logits = self.loaded.model(self.transform(tx, view)).float()
            yield x, y, logits.clone()  # out of inference mode: the loss may take it beside tensors with grad


class ViewBank:
    """`distill_mode views`: the teacher's outputs on K fixed rounds of the student's augmented (and, with
    distill_mixup, mixed) views, computed once in batches by the online teacher, then cycled by the student for as
    many epochs as it trains: "a good teacher is patient and consistent" (Beyer et al. 2022) at K teacher passes
    over the training images instead of one per epoch. The student's epoch e replays round (e - 1) mod K + 1 with
    that round's seed: the same batches, crops, flips, colour changes and mixing partners as the teacher saw,
    with the teacher's logits and the mixed labels (lambda y_i + (1 - lambda) y_order(i)) of each batch. Kept in
    the run folder (TEACHER_VIEWS, with the teacher's SHA-256 and K), so a resumed run reads them back."""

    def __init__(self, cfg: Any, online: OnlineTeacher, source: Any, classes: int, run_dir: Path, progress: bool,
                 log: Callable[[str], None]):
        from tqdm.auto import tqdm

        self.views, self.seed = cfg.distill_views, cfg.seed
        digest = online.loaded.sha256
        kept = run_dir / TEACHER_VIEWS
        if kept.is_file():
            with np.load(kept) as held:
                if str(held["sha256"]) == digest and int(held["views"]) == self.views:
                    self.logits, self.labels, self.ys = held["logits"], held["labels"], held["ys"]
                    log(f"teacher views: {self.views} rounds read back from {kept.name}")
                    return
        started = time.perf_counter()
        logits, labels, ys = [], [], []
        with tqdm(total=self.views, desc="teacher views", unit="round", disable=not progress, dynamic_ncols=True) as bar:
            for r in range(1, self.views + 1):
                seed = epoch_seed(cfg.seed, r)
                data = source.epoch(r, seed)
                if not data.augment:
                    raise ConfigError("distill_mode views: the student's views are its augmentation; set --augment true")
                aug = torch.Generator(device=online.device).manual_seed(seed)
                round_logits, round_labels, round_ys = [], [], []
                for x, y, teacher in online.alongside(data.train, seed, aug):
                    round_ys.append(y.cpu().numpy())
                    data.transform(x, aug, side=data.side)  # the student's draws, as its step makes them: the next batch's match
                    soft = nn.functional.one_hot(y, classes).float()
                    if data.transform.last_mix is not None:
                        lam, order = data.transform.last_mix
                        soft = torch.lerp(soft[order], soft, lam)
                    round_logits.append(teacher.cpu().numpy())
                    round_labels.append(soft.cpu().numpy())
                logits.append(np.stack(round_logits))
                labels.append(np.stack(round_labels))
                ys.append(np.stack(round_ys))
                bar.update(1)
        # (rounds, batches, batch size, classes); every batch is full (training drops the last partial one)
        self.logits, self.labels, self.ys = np.stack(logits), np.stack(labels), np.stack(ys)
        atomic_write(kept, lambda fh: np.savez(fh, logits=self.logits, labels=self.labels, ys=self.ys, sha256=digest,
                                               views=self.views))
        seconds = time.perf_counter() - started
        _write_info(run_dir, teacher_checkpoint(cfg.teacher), digest, online.loaded, "views",
                    {"views": self.views, "mixup": bool(cfg.distill_mixup), "seconds": seconds})
        log(f"teacher views: {self.views} rounds of the student's views ({self.logits.shape[1]} batches each) "
            f"computed in {seconds:.0f} s, kept in {kept.name}")

    def epoch_seed(self, seed: int, epoch: int) -> int:
        """The seed of the round the student's epoch replays."""
        return epoch_seed(seed, (epoch - 1) % self.views + 1)

    def alongside(self, student: Iterable[tuple[torch.Tensor, ...]], seed: int, aug: torch.Generator | None
                  ) -> Iterator[tuple[torch.Tensor, ...]]:
        r = next(i for i in range(self.views) if epoch_seed(self.seed, i + 1) == seed)
        for k, (x, y) in enumerate(student):
            if k == 0 and not np.array_equal(self.ys[r, k], y.cpu().numpy()):
                raise CnnlabError("the teacher's views are not of the student's batches (the data or the split "
                                  f"changed?): delete {TEACHER_VIEWS} in the run folder to compute them again")
            yield (x, y, torch.from_numpy(self.logits[r, k]).to(y.device),
                   torch.from_numpy(self.labels[r, k]).to(y.device))


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

    def forward(self, logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None,
                mixed: torch.Tensor | None = None) -> torch.Tensor:
        """`mixed`: the labels of mixed images as class probabilities (distill_mode views), in place of `labels`."""
        hard = self.labels_loss(logits, labels if mixed is None else mixed)
        if teacher is None:
            return hard
        return (1 - self.weight) * hard + self.weight * self.teacher_term(logits, teacher)

    def teacher_term(self, logits: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """T^2 x KL(teacher || student) at temperature T, per image (T^2 keeps its gradients' scale as T changes)."""
        t = self.temperature
        student = torch.log_softmax(logits.float() / t, dim=1)
        target = torch.log_softmax(teacher.float() / t, dim=1)
        return nn.functional.kl_div(student, target, log_target=True, reduction="batchmean") * t * t
