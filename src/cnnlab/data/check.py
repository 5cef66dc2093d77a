"""What is in a data folder: counts per split and class, imbalance, unreadable files, EXIF rotations, colour modes,
image sizes, exact duplicates (content hash) and near-duplicates (a perceptual hash of the decoded image) within
train/, within val/ and across the two (leakage: test images that are also training images).

The perceptual hash is a 256-bit difference hash (dHash: is each pixel of a 16 x 17 grey thumbnail brighter than
its left neighbour) computed on the decode cache, so it costs one small decode per folder, once. Two images are
near-duplicates when their hashes differ in at most NEAR_BITS bits: measured, a photo re-encoded at another JPEG
quality differs in 0, resized and re-encoded in 11; the nearest distinct photos of ../shared/data/grocery in 19
or more. Clusters are the connected groups of such pairs (exact copies included).
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

NEAR_BITS = 12  # of 256
HASH_SIZE = 32  # the decode size the hash is computed from when no larger cache is at hand


def perceptual_hashes(pixels: np.ndarray, chunk: int = 1024) -> torch.Tensor:
    """(N, 256) bool difference hashes of (N, S, S, 3) uint8 images (any S >= 17)."""
    out = []
    weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    for i in range(0, len(pixels), chunk):
        x = torch.from_numpy(np.array(pixels[i:i + chunk])).permute(0, 3, 1, 2).float()
        grey = (x * weights).sum(1, keepdim=True)
        small = F.interpolate(grey, size=(16, 17), mode="bilinear", antialias=True, align_corners=False)[:, 0]
        out.append((small[:, :, 1:] > small[:, :, :-1]).reshape(len(small), -1))
    return torch.cat(out) if out else torch.zeros((0, 256), dtype=torch.bool)


def near_pairs(hashes: torch.Tensor, max_bits: int = NEAR_BITS, chunk: int = 2048) -> list[tuple[int, int]]:
    """Index pairs (i < j) whose hashes differ in at most `max_bits` bits: Hamming distances as one matrix
    product of +-1 vectors per chunk (a 12,000-image set is about 37 GFLOP, seconds on a CPU)."""
    signs = hashes.float() * 2 - 1
    bits = signs.shape[1]
    pairs = []
    for i in range(0, len(signs), chunk):
        distance = (bits - signs[i:i + chunk] @ signs.T) / 2
        rows, cols = torch.nonzero(distance <= max_bits, as_tuple=True)
        keep = cols > rows + i
        pairs += list(zip((rows[keep] + i).tolist(), cols[keep].tolist()))
    return pairs


def clusters_of(n: int, pairs: list[tuple[int, int]]) -> np.ndarray:
    """A cluster id per index (union-find over the pairs); an index in no pair is its own cluster."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n)], dtype=np.int64)


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
    """A cluster id per file of `images` (unreadable files are their own cluster), from the decode cache; kept
    beside the cache (`<key>.near.npy`), so later runs and sweep trials on the same cache read it."""
    stored = images.cache_file.with_suffix(".near.npy") if images.cache_file is not None else None
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
        pairs = near_pairs(perceptual_hashes(images.pixels[valid]))
        ids[valid] = valid[clusters_of(len(valid), pairs)]
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
    from PIL import Image

    from .decode import orientation

    try:
        with Image.open(path) as im:
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

    @property
    def imbalance(self) -> float:
        train = [n for n in self.counts.get("train", {}).values()]
        return max(train) / max(min(train), 1) if train else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"root": str(self.root), "classes": self.classes, "counts": self.counts,
                "imbalance_ratio": round(self.imbalance, 3), "unreadable": self.unreadable, "modes": self.modes,
                "exif_rotated": self.rotated, "exact_duplicates": self.exact, "near_duplicates": self.near,
                "leaked_test_images": self.leaked, "notes": self.notes, "seconds": round(self.seconds, 2)}

    @property
    def leaked(self) -> int:
        """Test images that are (near-)copies of a training image."""
        val_root = str(self.root / "val")
        return len({p for group in self.near["across"] + self.exact["across"] for p in group
                    if p.startswith(val_root)})


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
    valid = np.concatenate([im.valid + sum(len(x.files) for x in list(sets.values())[:k])
                            for k, im in enumerate(sets.values())])
    pixels = np.concatenate([np.asarray(im.pixels) for im in sets.values()])
    near_pairs_found = near_pairs(perceptual_hashes(pixels[valid]))
    near_pairs_found = [(int(valid[a]), int(valid[b])) for a, b in near_pairs_found]
    clusters = clusters_of(len(files), near_pairs_found)
    near_index = [np.flatnonzero(clusters == c).tolist() for c in np.unique(clusters)
                  if (clusters == c).sum() > 1]

    def where(group: list[int]) -> str:
        sides = {split_of[i] for i in group}
        return "across" if len(sides) > 1 else f"within_{sides.pop()}"

    def sorted_groups(groups: list[list[int]]) -> dict[str, list[list[str]]]:
        out: dict[str, list[list[str]]] = {"within_train": [], "within_val": [], "across": []}
        for g in groups:
            out[where(g)].append([str(files[i]) for i in g])
        return out

    report = DataReport(root, classes, counts, unreadable, modes, rotated, sizes, sorted_groups(exact_index),
                        sorted_groups(near_index), time.perf_counter() - started)
    if "val" in sets and sets["val"].classes != classes:
        report.notes.append(f"val/ has classes {sets['val'].classes}, train/ has {classes}")
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
              + (" (strong: training weighs the classes by default, --class_weights balanced; --sampler balanced is the "
                 "other remedy; read evaluate's balanced accuracy)" if report.imbalance > 3 else ""),
              "- unreadable files: " + ", ".join(f"{s} {len(v)}" for s, v in report.unreadable.items()),
              f"- photos with an EXIF rotation (turned upright when decoded): {report.rotated}",
              "- colour modes: " + ", ".join(f"{m} {n}" for m, n in sorted(report.modes.items())),
              f"- test images that copy a training image (leakage): {report.leaked}"]
    for kind, groups in (("exact duplicates (same bytes)", report.exact),
                         ("near-duplicates (perceptual hash, exact ones included)", report.near)):
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
