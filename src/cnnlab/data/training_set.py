"""The training set of a run, as training looks at it before the first epoch: its decoded images checked (a
folder of no readable image, a class left empty, refused in one line naming the fix), then the seeded stratified
split into train and validation, after a cheap look at the data (imbalance, near-duplicate clusters kept on one
side, test images that copy training images), and beside a teacher's own split when a student has one. The run
folder's files (the bad-file report, the split) are written by the caller, under `run_folder`'s names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from ..config import Config
from ..errors import DataError
from .cache import CachedImages
from .folders import classes_without_images, stratified_split, strongly_unbalanced


def check_training_images(images: CachedImages, report: Path, log: Callable[[str], None]) -> None:
    """Refuse a train/ of no readable image or with a class of none (a class the model would learn never to
    predict, never trained on silently); say how many files were skipped. `report`: the bad-file report written."""
    n_bad = len(images.errors)
    if n_bad == len(images.files):
        raise DataError(f"none of the {n_bad} files in {images.root} is a readable image: see {report} for why, file "
                        "by file")
    empty = classes_without_images(images.root, images.classes, images.files, images.labels, images.errors)
    if empty:
        name, why = next(iter(empty.items()))
        more = f" (and {len(empty) - 1} more class(es): {', '.join(list(empty)[1:4])})" if len(empty) > 1 else ""
        raise DataError(f"class {name!r} in {images.root} has no usable image: {why}{more}; add images to it, or move "
                        "the folder out of train/")
    if n_bad:
        log(f"skipped {n_bad} unreadable file(s) of {len(images.files)}: listed in {report}")


def training_split(cfg: Config, images: CachedImages, teacher: Path | None,
                   log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """The seeded stratified split of a new run (`teacher`: the teacher's split.json, whose sides its images keep)."""
    groups = look_at_the_data(cfg, images, log)
    train_rows, val_rows = stratified_split(images.labels, images.valid, cfg.val_fraction, cfg.seed, groups)
    if teacher is not None:
        train_rows, val_rows = teacher_sides(teacher, images, train_rows, val_rows, log)
    if not len(val_rows):
        raise DataError(f"no image of {images.root} is left for validation (val_fraction {cfg.val_fraction:g}): a "
                        "class needs at least two readable images to give one to validation; add images")
    return train_rows, val_rows


def teacher_sides(split: Path, images: CachedImages, train_rows: np.ndarray, val_rows: np.ndarray,
                  log: Callable[[str], None]) -> tuple[np.ndarray, np.ndarray]:
    """A student's split: each image its teacher's split names stays on the teacher's side (the teacher's validation
    images are never the student's training images, so validation judges the student fairly, and the teacher's
    training images never judge it); every other image keeps the student's own seeded split. A teacher trained on
    the same folder gives its split whole; one trained on other photos leaves the student's data whole."""
    teacher = json.loads(split.read_text())
    rel = [str(p.relative_to(images.root.parent)) for p in images.files]
    sides = {name: "train" for name in teacher["train"]} | {name: "val" for name in teacher["val"]}
    on_val = np.zeros(len(rel), bool)
    on_val[val_rows] = True
    for i in np.concatenate([train_rows, val_rows]):
        if rel[i] in sides:
            on_val[i] = sides[rel[i]] == "val"
    rows = np.sort(np.concatenate([train_rows, val_rows]))
    shared = sum(1 for i in rows if rel[i] in sides)
    if shared < len(rows):
        log(f"{shared} of the {len(rows)} training images are in the teacher's split ({split}) and keep its sides; the "
            f"other {len(rows) - shared} are split by this run's seed")
    return rows[~on_val[rows]], rows[on_val[rows]]


def look_at_the_data(cfg: Config, images: CachedImages, log: Callable[[str], None]) -> np.ndarray | None:
    """The cheap part of `cnnlab check`, before training: one line each for strong imbalance, near-duplicate
    clusters in train/ (returned, to keep each on one side of the split) and test images that are byte-identical
    copies of training images (val/ is listed and such files' bytes compared; nothing of it is decoded or used)."""
    from .check import copies_in_test, near_duplicate_clusters

    counts = np.bincount(images.labels[images.valid], minlength=len(images.classes))
    if counts.min() > 0 and strongly_unbalanced(counts):
        log(f"warning: the classes of train/ are unbalanced ({images.classes[int(counts.argmax())]} {counts.max()} "
            f"images, {images.classes[int(counts.argmin())]} {counts.min()})"
            + ("; the loss weighs each class by its rarity (--class_weights " + cfg.class_weights + ")"
               if cfg.class_weights in ("auto", "balanced") else ": consider --class_weights balanced or --sampler balanced")
            + "; read evaluate's balanced accuracy")
    leaked = copies_in_test(images.files, Path(cfg.data) / "val")
    if leaked:
        log(f"warning: {len(leaked)} test image(s) in val/ are byte-identical copies of training images (leakage: "
            f"test accuracy on them is inflated), e.g. {leaked[0]}; see cnnlab check {cfg.data}")
    if not cfg.group_duplicates:
        return None
    groups = near_duplicate_clusters(images)
    sizes = np.bincount(groups[images.valid])
    clustered = sizes[sizes > 1]
    if len(clustered):
        log(f"{len(clustered)} cluster(s) of near-duplicate training images ({int(clustered.sum())} images) are each "
            "kept on one side of the train/validation split (--group_duplicates false to split them freely)")
    return groups
