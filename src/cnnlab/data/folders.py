"""A data folder (`ROOT/<split>/<class>/<files>`) and the stratified train/validation split of ROOT/train."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CnnlabError, DataError
from ..io import atomic_write_json

CLUTTER = frozenset({"__MACOSX", "@eaDir", "System Volume Information", "$RECYCLE.BIN", "__pycache__"})
"""Folders that archivers and file systems leave (a Mac zip's resource forks, a Synology NAS's thumbnails,
Windows' recycle bin): never a class, never read. Hidden ones (.git, .ipynb_checkpoints) are skipped too."""


def skipped(name: str) -> bool:
    return name.startswith(".") or name in CLUTTER


def class_name(name: str) -> str:
    """A folder's name as a class: Unicode NFC, so 'Épervier' spelt decomposed (macOS) and composed (Linux, Windows)
    is one class in train/ and val/."""
    return unicodedata.normalize("NFC", name)


def list_classes(folder: Path) -> list[str]:
    """The sorted class sub-folder names of `folder` (NFC), hidden and clutter folders skipped. A link to a folder
    that does not exist is listed too, so the class it names is reported as empty rather than silently dropped."""
    return [class_name(p.name) for p in class_folders(folder)]


def class_folders(folder: Path) -> list[Path]:
    """The class folders of `folder` (and links to folders that do not exist), sorted by class name; a folder that
    is missing or holds no class folder is one DataError."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder: expected ROOT/train/<class>/*.jpg and ROOT/val/<class>/*.jpg "
                        f"(run `cnnlab demo-data data/demo` or `cnnlab download inaturalist-12k data/`)")
    found = [p for p in folder.iterdir() if not skipped(p.name) and (p.is_dir() or (p.is_symlink() and not p.exists()))]
    if not found:
        raise DataError(f"{folder} has no class folders: expected {folder}/<class>/<image files>")
    return sorted(found, key=lambda p: class_name(p.name))


def files_of_class(folder: Path) -> list[Path]:
    """Every file under a class folder, its sub-folders included (train/owl/2019/*.jpg are owls), in sorted
    path order; hidden and clutter entries skipped, a linked sub-folder read once (a link loop ends)."""
    files, seen = [], set()
    for top, dirs, names in os.walk(folder, followlinks=True, onerror=_raise):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not skipped(d)]
        files += [Path(top) / n for n in names if not skipped(n)]  # a FIFO or a dangling link too: reported
    return sorted(files)


def _raise(error: OSError) -> None:
    raise error


def scan_folder(folder: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """Classes (sorted sub-folder names, NFC), files and labels of `folder/<class>/**`: sub-folders of a class
    are read too. Hidden files are skipped; every other file is listed, so a non-image (or a link to nowhere) is
    reported rather than silently ignored."""
    folder = Path(folder)
    classes, files, labels = [], [], []
    for path in class_folders(folder):
        classes.append(class_name(path.name))
        try:
            found = files_of_class(path) if path.exists() else []
        except OSError as e:
            raise DataError(f"class folder {e.filename or path} cannot be read ({e.strerror}): check its permissions "
                            "(chmod +rx), or move it out of the data folder") from None
        files += found
        labels += [len(classes) - 1] * len(found)
    if len(set(classes)) < len(classes):
        twice = sorted({c for c in classes if classes.count(c) > 1})
        raise DataError(f"{folder} has two folders for class {twice[0]!r} (the same name spelt in two Unicode forms): "
                        "merge them into one folder")
    if not files:
        raise DataError(f"{folder} has class folders but no files in them")
    return classes, files, np.asarray(labels, dtype=np.int64)


def classes_without_images(folder: Path, classes: list[str], files: list[Path], labels: np.ndarray,
                           errors: dict[int, str]) -> dict[str, str]:
    """Each class of `folder` that has no usable image, with why: an empty folder, sub-folders with no file in
    them, a link to a folder that does not exist, or files none of which could be read (their kinds counted)."""
    from collections import Counter

    from .decode import file_kind

    usable = np.bincount(np.delete(labels, list(errors)), minlength=len(classes))
    if usable.all():  # the usual case: no folder is listed again
        return {}
    paths = {class_name(p.name): p for p in class_folders(folder)}
    reasons = {}
    for k, name in enumerate(classes):
        if usable[k]:
            continue
        path = paths.get(name, folder / name)
        rows = np.flatnonzero(labels == k)
        if path.is_symlink() and not path.exists():
            reasons[name] = f"a link to {os.readlink(path)}, which does not exist"
        elif not len(rows):
            subs = path.is_dir() and any(p.is_dir() and not skipped(p.name) for p in path.iterdir())
            reasons[name] = "only sub-folders, with no file in them" if subs else "an empty folder"
        else:
            kinds = Counter(file_kind(files[i]) for i in rows)
            example = errors[int(rows[0])]
            reasons[name] = (f"only unreadable files ({', '.join(f'{n} {kind}' for kind, n in kinds.most_common())}; "
                             f"{files[int(rows[0])].name}: {example})")
    return reasons


def stratified_split(labels: np.ndarray, candidates: np.ndarray, val_fraction: float, seed: int,
                     groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle of that class's rows; round(n * val_fraction) of them (at least one
    when the class has two or more) go to validation. Same labels, fraction and seed -> same split.
    With `groups` (a group id per row: clusters of near-duplicates), a group is shuffled and placed as one unit,
    so no group has rows on both sides (a group spanning classes goes to training whole); where every group is a
    single row this is the same split as without."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels[candidates]):
        rows = candidates[labels[candidates] == c]
        units = [rows[i:i + 1] for i in range(len(rows))] if groups is None else _units(rows, groups)
        order = rng.permutation(len(units))
        n_val = int(round(len(rows) * val_fraction))
        if len(rows) >= 2:
            n_val = min(max(n_val, 1), len(rows) - 1)
        else:
            n_val = 0
        taken, k = 0, 0
        while k < len(order) and taken < n_val and taken + len(units[order[k]]) < len(rows):
            taken += len(units[order[k]])
            k += 1
        val += [units[i] for i in order[:k]]
        train += [units[i] for i in order[k:]]
    train_rows = np.sort(np.concatenate(train)) if train else np.zeros(0, dtype=np.int64)
    val_rows = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    if groups is not None and len(val_rows):  # a group across classes: what sits on both sides trains
        both = np.isin(groups[val_rows], groups[train_rows])
        train_rows, val_rows = np.sort(np.concatenate([train_rows, val_rows[both]])), val_rows[~both]
    return train_rows, val_rows


def _units(rows: np.ndarray, groups: np.ndarray) -> list[np.ndarray]:
    """`rows` grouped by their group id, in the order each group first appears."""
    if not len(rows):
        return []
    _, first, inverse, counts = np.unique(groups[rows], return_index=True, return_inverse=True, return_counts=True)
    chunks = np.split(rows[np.argsort(inverse, kind="stable")], np.cumsum(counts)[:-1])
    return [chunks[g] for g in np.argsort(first, kind="stable")]


def save_split(path: str | Path, images: Any, train: np.ndarray, val: np.ndarray) -> None:
    """Paths relative to the data root (train/<class>/<file>), so the split reads the same anywhere."""
    rel = [str(p.relative_to(images.root.parent)) for p in images.files]
    atomic_write_json(path, {"root": str(images.root.parent.resolve()), "classes": images.classes,
                             "train": [rel[i] for i in train], "val": [rel[i] for i in val]})


def saved_split(path: str | Path, images: Any, log: Any = print) -> tuple[np.ndarray, np.ndarray]:
    """The split a run was started with (its split.json), over the files of `images` today: a resumed run never
    re-splits, so no row it trained on can become a validation row. Files added since are left out of both sides
    and files gone since are dropped, each counted in one line."""
    path = Path(path)
    saved = json.loads(path.read_text())
    if saved["classes"] != images.classes:
        raise CnnlabError(f"{images.root} has classes {images.classes}, but the run in {path.parent} was started with "
                          f"{saved['classes']}: resume it with its class folders as they were, or start a new run")
    rel = [str(p.relative_to(images.root.parent)) for p in images.files]
    row_of = {r: i for i, r in enumerate(rel)}
    readable = set(images.valid.tolist())
    listed = set(saved["train"]) | set(saved["val"])

    def rows(side: str) -> np.ndarray:
        return np.asarray(sorted(row_of[r] for r in saved[side] if r in row_of and row_of[r] in readable), dtype=np.int64)

    train, val = rows("train"), rows("val")
    added = sum(1 for i in readable if rel[i] not in listed)
    gone = len(listed) - len(train) - len(val)
    if added or gone:
        log(f"kept the split this run was started with ({path}): {added} file(s) added to {images.root} since are "
            f"left out (neither trained nor validated on), {gone} listed file(s) are gone or unreadable; "
            f"start a new run to use them")
    if not len(train) or not len(val):
        raise DataError(f"of the split in {path}, no {'training' if not len(train) else 'validation'} file is left "
                        f"in {images.root}: restore the files, or start a new run")
    return train, val


STRONG_IMBALANCE = 3.0  # largest / smallest class: where cnnlab warns, and where class_weights auto weighs the loss


def imbalance_ratio(counts: np.ndarray) -> float:
    """Images of the largest class over those of the smallest (inf where a class has none)."""
    counts = np.asarray(counts)
    return float(counts.max() / counts.min()) if counts.min() > 0 else float("inf")


def strongly_unbalanced(counts: np.ndarray) -> bool:
    """Whether the classes' sizes differ by more than STRONG_IMBALANCE. Measured (docs/recipe.md, 3 seeds): weighing
    the loss helps there (grocery, 4.0: balanced test accuracy 0.891 against 0.877) and costs below it (flowers,
    1.4: test accuracy 0.712 against 0.723)."""
    return imbalance_ratio(counts) > STRONG_IMBALANCE
