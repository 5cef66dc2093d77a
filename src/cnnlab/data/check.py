"""What is in a data folder: counts per split and class, imbalance, unreadable files, EXIF rotations, colour modes,
image sizes, exact duplicates (content hash) and near-duplicates (a perceptual hash of the decoded image, confirmed
by a second check) within train/, within val/ and across the two (leakage: test images that are also training
images).

The perceptual hash is a 256-bit difference hash (dHash: is each pixel of a 16 x 17 grey thumbnail brighter than
its left neighbour) computed on the decode cache, so it costs one small decode per folder, once. Measured, a photo
re-encoded at another JPEG quality differs in 0 bits, resized and re-encoded in 11; the nearest distinct photos of
../shared/data/grocery in 19 or more. Two images are near-duplicates only when three things hold:
- their hashes differ in at most NEAR_BITS bits;
- both hashes carry information: on a near-uniform image (a sketch or a document on white, a night frame) most of
  the 256 comparisons are decided by JPEG noise, so such hashes match each other by chance. Measured: line
  drawings and dots on white have 2-17% of clear edges, the photos of grocery 56% or more;
- an independent second check agrees: their 12 x 12 colour thumbnails, centred, correlate at MIN_SIMILARITY or
  more (re-encoded and resized copies at 0.98 or more, a re-exposed copy of a flowers photo at 0.95; two distinct
  crosses of nearly one place and size at 0.93, and the hash's decided comparisons already tell them apart).
Clusters join images of one class only; a pair across classes (one picture under two labels) is listed as a pair,
and a test image counts as leaked only when it is matched directly to a training image (or has its bytes), never
through a chain of other images.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .cache import CachedImages, load_images
from .folders import STRONG_IMBALANCE, classes_without_images

NEAR_BITS = 12  # of 256
HASH_SIZE = 32  # the decode size the hash is computed from when no larger cache is at hand
EDGE = 4.0  # grey levels (of 255) between neighbours that make a clear edge: a comparison decided, not JPEG noise
MIN_DECIDED = 8  # decided comparisons (of 256) an image's hash needs to count at all: a blank page has none
MAX_WRONG = 0.1  # of the comparisons decided in either image, the share that may disagree
MIN_SIMILARITY = 0.94  # the second check: correlation of the two 12 x 12 colour thumbnails
THUMB = 12
CROSS_PAIRS_KEPT = 1000  # pairs across classes listed (each is reported, none is chained)


@dataclass
class Signature:
    """What near-duplicate detection knows of each image: its difference hash, how much of that hash real edges
    decide (a near-uniform image's hash is mostly noise), and a small centred colour thumbnail for the second,
    independent check."""

    hashes: torch.Tensor  # (N, 256) bool
    decided: torch.Tensor  # (N, 256) bool: the comparisons a clear edge decides
    thumbs: torch.Tensor  # (N, 3 * THUMB * THUMB) float, centred, unit length (zero where the image is flat)

    informative: torch.Tensor = field(init=False)  # (N,) bool: enough decided comparisons to count at all

    def __post_init__(self) -> None:
        self.informative = self.decided.sum(1) >= MIN_DECIDED

    def confirm(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Which candidate pairs (a[k], b[k]) are near-duplicates: both hashes informative, at most MAX_WRONG of
        the comparisons decided in either image disagreeing (two sketches with strokes in different places
        disagree wherever one has an edge and the other is blank), and thumbnails that correlate."""
        ia, ib = torch.from_numpy(a), torch.from_numpy(b)
        either = self.decided[ia] | self.decided[ib]
        wrong = ((self.hashes[ia] ^ self.hashes[ib]) & either).sum(1)
        similar = (self.thumbs[ia] * self.thumbs[ib]).sum(1)
        useful = self.informative
        return (useful[ia] & useful[ib] & (wrong <= MAX_WRONG * either.sum(1)) & (similar >= MIN_SIMILARITY)).numpy()


def signatures(pixels: np.ndarray, chunk: int = 1024) -> Signature:
    """The signatures of (N, S, S, 3) uint8 images (any S >= 17), read `chunk` at a time from the (mapped) cache."""
    hashes, decided, thumbs = [], [], []
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for i in range(0, len(pixels), chunk):
        x = torch.from_numpy(np.array(pixels[i:i + chunk])).permute(0, 3, 1, 2).float()
        grey = (x * weights).sum(1, keepdim=True)
        small = F.interpolate(grey, size=(16, 17), mode="bilinear", antialias=True, align_corners=False)[:, 0]
        step = small[:, :, 1:] - small[:, :, :-1]
        hashes.append((step > 0).reshape(len(small), -1))
        decided.append((step.abs() >= EDGE).reshape(len(small), -1))
        t = F.adaptive_avg_pool2d(x, THUMB).reshape(len(x), -1)
        t = t - t.mean(1, keepdim=True)
        thumbs.append(t / t.norm(dim=1, keepdim=True).clamp_min(1e-6))
    if not hashes:
        empty = torch.zeros((0, 256), dtype=torch.bool)
        return Signature(empty, empty, torch.zeros((0, 3 * THUMB * THUMB)))
    return Signature(torch.cat(hashes), torch.cat(decided), torch.cat(thumbs))


@dataclass
class NearDuplicates:
    """The outcome of one pass: a cluster id per image (the smallest index in its cluster; clusters join images
    of one class only), the pairs found across classes (the same picture under two labels: listed, never
    chained), and for each image whether it was matched directly to an image of the other side (`side`)."""

    ids: np.ndarray
    cross_pairs: list[tuple[int, int]]
    matched_across: np.ndarray  # (N,) bool: an image with a direct match on the other side of `side`


def find_near_duplicates(sig: Signature, labels: np.ndarray, side: np.ndarray | None = None,
                         max_bits: int = NEAR_BITS, chunk: int = 512, batch: int = 16384) -> NearDuplicates:
    """Pairs whose hashes differ in at most `max_bits` bits (one matrix product of +-1 vectors per `chunk` rows),
    each confirmed by `Signature.confirm`; each chunk's pairs are merged into the clusters at once, so memory stays
    linear in the number of images however many pairs a set of near-identical frames makes. A pair joins a cluster only when
    both images have the same label; `side` (0 train, 1 val) marks the images matched across sides."""
    n = len(labels)
    ids = np.arange(n, dtype=np.int64)
    matched = np.zeros(n, dtype=bool)
    cross: list[tuple[int, int]] = []
    signs = sig.hashes.float() * 2 - 1
    bits = signs.shape[1] if len(signs) else 256
    for i in range(0, n, chunk):
        distance = (bits - signs[i:i + chunk] @ signs.T) / 2
        rows, cols = torch.nonzero(distance <= max_bits, as_tuple=True)
        rows, cols = rows.numpy() + i, cols.numpy()
        keep = cols > rows
        rows, cols = rows[keep], cols[keep]
        for k in range(0, len(rows), batch):  # confirmed a batch at a time: a pair already joined through others is
            a, b = rows[k:k + batch], cols[k:k + batch]  # skipped (8,000 near-identical frames: 32 M candidates)
            new = (ids[a] != ids[b]) & (labels[a] == labels[b])
            if len(cross) < CROSS_PAIRS_KEPT:
                new |= labels[a] != labels[b]
            if side is not None:
                new |= (side[a] != side[b]) & ~(matched[a] & matched[b])
            a, b = a[new], b[new]
            confirmed = sig.confirm(a, b)
            a, b = a[confirmed], b[confirmed]
            same = labels[a] == labels[b]
            ids = merge(ids, a[same], b[same])
            if len(cross) < CROSS_PAIRS_KEPT:
                cross += list(zip(a[~same].tolist(), b[~same].tolist()))[:CROSS_PAIRS_KEPT - len(cross)]
            if side is not None:
                across = side[a] != side[b]
                matched[a[across]] = True
                matched[b[across]] = True
    return NearDuplicates(ids, cross, matched)


def merge(ids: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cluster ids (each the smallest index of its cluster) after joining the pairs (a, b): the connected
    components of the clusters' graph, in O(N + pairs)."""
    ra, rb = ids[a], ids[b]
    apart = ra != rb
    if not apart.any():
        return ids
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    nodes = np.unique(np.concatenate([ra[apart], rb[apart]]))
    la, lb = np.searchsorted(nodes, ra[apart]), np.searchsorted(nodes, rb[apart])
    graph = coo_matrix((np.ones(len(la), dtype=np.int8), (la, lb)), shape=(len(nodes), len(nodes)))
    count, component = connected_components(graph, directed=False)
    smallest = np.full(count, np.iinfo(np.int64).max)
    np.minimum.at(smallest, component, nodes)
    moved = np.isin(ids, nodes)
    ids = ids.copy()
    ids[moved] = smallest[component[np.searchsorted(nodes, ids[moved])]]
    return ids


def groups_of(ids: np.ndarray) -> list[list[int]]:
    """The clusters of two or more, each as its sorted indices, in order of their smallest index (O(N log N))."""
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    ends = np.r_[starts[1:], len(ids)]
    return [order[s:e].tolist() for s, e in zip(starts, ends) if e - s > 1]


def content_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def exact_groups(paths: list[Path]) -> dict[str, list[int]]:
    """Groups (of two or more) of byte-identical files: sizes first, so only files of a shared size are read."""
    by_size: dict[int, list[int]] = {}
    for i, p in enumerate(paths):
        try:
            by_size.setdefault(p.stat().st_size, []).append(i)
        except OSError:
            continue
    groups: dict[str, list[int]] = {}
    for same in by_size.values():
        if len(same) < 2:
            continue
        for i in same:
            try:
                groups.setdefault(content_hash(paths[i]), []).append(i)
            except OSError:
                continue
    return {h: g for h, g in groups.items() if len(g) > 1}


def near_duplicate_clusters(images: CachedImages) -> np.ndarray:
    """A cluster id per file of `images` (unreadable files are their own cluster; a cluster holds one class), from
    the decode cache; kept beside the cache (`<key>.near2.npy`), so later runs and sweep trials on the same cache
    read it."""
    stored = images.cache_file.with_suffix(".near2.npy") if images.cache_file is not None else None
    if stored is not None and stored.exists():
        try:
            ids = np.load(stored)
            if ids.shape == (len(images.files),):
                return ids
        except (OSError, ValueError):
            pass
    valid = images.valid
    ids = np.arange(len(images.files), dtype=np.int64)
    if len(valid) >= 2:
        found = find_near_duplicates(signatures(images.pixels[valid]), images.labels[valid])
        ids[valid] = valid[found.ids]
    if stored is not None:
        try:
            from ..io import atomic_write

            atomic_write(stored, lambda fh: np.save(fh, ids))
        except Exception:  # noqa: BLE001 - a read-only cache folder: computed again next time, nothing lost
            pass
    return ids


def copies_in_test(train_files: list[Path], val_folder: Path) -> list[Path]:
    """Files of `val_folder` (the test set) that are byte-identical to a training file: only files of a size some
    training file has are read, and nothing of val/ is decoded or used but for this warning."""
    from .folders import scan_folder

    try:
        _, val_files, _ = scan_folder(val_folder)
    except Exception:  # noqa: BLE001 - no val/ yet, or an empty one: nothing to compare
        return []
    groups = exact_groups([*train_files, *val_files])
    n = len(train_files)
    return [val_files[i - n] for g in groups.values() if min(g) < n for i in g if i >= n]


def header_facts(path: Path) -> dict[str, Any]:
    """Format, mode, size and EXIF orientation from the file's header (PIL reads no pixels for these)."""
    from .decode import open_image, orientation

    try:
        with open_image(path) as im:
            return {"format": im.format, "mode": im.mode, "size": im.size, "orientation": orientation(im),
                    "transparency": "transparency" in im.info}
    except Exception as e:  # noqa: BLE001 - reported as unreadable by the decode, with its reason
        return {"error": f"{type(e).__name__}"}


@dataclass
class DataReport:
    root: Path
    classes: list[str]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    unreadable: dict[str, list[str]]  # split -> "path\twhy"
    modes: dict[str, int]
    rotated: int
    sizes: list[tuple[int, int]]
    exact: dict[str, list[list[str]]]  # within_train / within_val / across -> groups of paths
    near: dict[str, list[list[str]]]
    seconds: float
    notes: list[str] = field(default_factory=list)
    leaked_files: list[str] = field(default_factory=list)  # test images matched directly to a training image

    @property
    def imbalance(self) -> float:
        train = [n for n in self.counts.get("train", {}).values()]
        return max(train) / max(min(train), 1) if train else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "classes": self.classes, "counts": self.counts,
                "imbalance_ratio": round(self.imbalance, 3), "unreadable": self.unreadable, "modes": self.modes,
                "exif_rotated": self.rotated, "exact_duplicates": self.exact, "near_duplicates": self.near,
                "leaked_test_images": self.leaked,
                "leaked_files": self.leaked_files, "notes": self.notes, "seconds": round(self.seconds, 2)}

    @property
    def leaked(self) -> int:
        """Test images that are copies of a training image: the same bytes, or matched directly (never through a
        chain of other images) by both the hash and the thumbnail check."""
        return len(self.leaked_files)


def check_data(root: str | Path, cache_dir: str | Path, progress: bool = True, log: Callable[[str], None] = print
               ) -> DataReport:
    """One pass over ROOT/train and ROOT/val (val/ is optional): see the module's docstring."""
    started = time.perf_counter()
    root = Path(root)
    splits = {s: root / s for s in ("train", "val") if (root / s).is_dir()}
    if "train" not in splits:
        from ..errors import DataError

        raise DataError(f"{root / 'train'} is not a folder: expected ROOT/train/<class>/* (and ROOT/val/<class>/*)")
    sets = {s: load_images(folder, HASH_SIZE, cache_dir, progress=progress, log=log) for s, folder in splits.items()}
    classes = sets["train"].classes
    counts = {s: {c: int((im.labels[im.valid] == k).sum()) for k, c in enumerate(im.classes)} for s, im in sets.items()}
    unreadable = {s: im.bad_file_report().splitlines() for s, im in sets.items()}
    files = [p for im in sets.values() for p in im.files]
    split_of = [s for s, im in sets.items() for _ in im.files]
    facts = [header_facts(p) for p in files]
    modes: dict[str, int] = {}
    for f in facts:
        if "mode" in f:
            mode = f["mode"] + ("+transparency" if f["transparency"] and f["mode"] == "P" else "")
            modes[mode] = modes.get(mode, 0) + 1
    rotated = sum(1 for f in facts if f.get("orientation", 1) != 1)
    sizes = [tuple(f["size"]) for f in facts if "size" in f]
    exact_index = list(exact_groups(files).values())
    lengths = [len(im.files) for im in sets.values()]
    offsets = np.cumsum([0, *lengths[:-1]])
    valid = np.concatenate([im.valid + off for im, off in zip(sets.values(), offsets)])
    pixels = np.concatenate([np.asarray(im.pixels) for im in sets.values()])
    names = sorted({c for im in sets.values() for c in im.classes})  # val/ classes by name, as train/'s
    labels = np.concatenate([np.asarray([names.index(c) for c in im.classes], dtype=np.int64)[im.labels]
                             if len(im.labels) else np.zeros(0, dtype=np.int64) for im in sets.values()])
    side = np.asarray([s != "train" for s in split_of], dtype=np.int8)
    found = find_near_duplicates(signatures(pixels[valid]), labels[valid], side[valid])
    ids = np.arange(len(files), dtype=np.int64)
    ids[valid] = valid[found.ids]
    near_index = groups_of(ids) + [[int(valid[a]), int(valid[b])] for a, b in found.cross_pairs]
    matched_across = np.zeros(len(files), dtype=bool)
    matched_across[valid] = found.matched_across
    exact_leaks = {i for g in exact_index for i in g if side[i] and not side[g].all()}
    leaked = sorted({int(i) for i in np.flatnonzero(matched_across & (side == 1))} | exact_leaks)

    def where(group: list[int]) -> str:
        sides = {split_of[i] for i in group}
        return "across" if len(sides) > 1 else f"within_{sides.pop()}"

    def sorted_groups(groups: list[list[int]]) -> dict[str, list[list[str]]]:
        out: dict[str, list[list[str]]] = {"within_train": [], "within_val": [], "across": []}
        for g in groups:
            out[where(g)].append([str(files[i]) for i in g])
        return out

    report = DataReport(root, classes, counts, unreadable, modes, rotated, sizes, sorted_groups(exact_index),
                        sorted_groups(near_index), time.perf_counter() - started,
                        leaked_files=[str(files[i]) for i in leaked])
    if "val" in sets and sets["val"].classes != classes:
        report.notes.append(f"val/ has classes {sets['val'].classes}, train/ has {classes}")
    for split, im in sets.items():
        for name, why in classes_without_images(im.root, im.classes, im.files, im.labels, im.errors).items():
            report.notes.append(f"{split}/ class {name!r} has no usable image: {why}"
                                + (" (training refuses it)" if split == "train" else ""))
    return report


def write_check(report: DataReport, out: str | Path) -> dict[str, Path]:
    """check.json, check.md, counts.png (images per class and split) and sizes.png (image sizes) in `out`."""
    import json

    from ..io import atomic_write_text
    from ..visualise import plot_class_counts, plot_sizes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "check.json", json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write_text(out / "check.md", check_markdown(report))
    return {"json": out / "check.json", "markdown": out / "check.md",
            "counts": plot_class_counts(report.counts, report.classes, out / "counts.png"),
            "sizes": plot_sizes(report.sizes, out / "sizes.png")}


def check_markdown(report: DataReport, examples: int = 5) -> str:
    splits = list(report.counts)
    lines = [f"# What is in {report.root}", "",
             "| class | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for c in report.classes:
        lines.append(f"| {c} | " + " | ".join(str(report.counts[s].get(c, 0)) for s in splits) + " |")
    lines.append("| **all** | " + " | ".join(str(sum(report.counts[s].values())) for s in splits) + " |")
    lines += ["", f"- imbalance (largest / smallest training class): {report.imbalance:.1f}"
              + (f" (strong, over {STRONG_IMBALANCE:g}: training weighs the classes by default, --class_weights auto; "
                 "--sampler balanced is the other remedy; read evaluate's balanced accuracy)"
                 if report.imbalance > STRONG_IMBALANCE else ""),
              "- unreadable files: " + ", ".join(f"{s} {len(v)}" for s, v in report.unreadable.items()),
              f"- photos with an EXIF rotation (turned upright when decoded): {report.rotated}",
              "- colour modes: " + ", ".join(f"{m} {n}" for m, n in sorted(report.modes.items())),
              f"- test images that copy a training image (leakage): {report.leaked}"]
    for kind, groups in (("exact duplicates (same bytes)", report.exact),
                         ("near-duplicates (perceptual hash confirmed by thumbnails)", report.near)):
        lines += ["", f"## {kind}", ""]
        for where, found in groups.items():
            lines.append(f"- {where.replace('_', ' ')}: {len(found)} group(s)")
            for g in found[:examples]:
                lines.append("  - " + ", ".join(f"`{p}`" for p in g))
            if len(found) > examples:
                lines.append(f"  - ... {len(found) - examples} more in check.json")
    for s, bad in report.unreadable.items():
        if bad:
            lines += ["", f"## unreadable in {s}/", ""] + [f"- `{b}`" for b in bad[:20]]
    lines += ["", *[f"- note: {n}" for n in report.notes], f"checked in {report.seconds:.1f} s"]
    return "\n".join(lines) + "\n"
