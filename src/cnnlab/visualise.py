"""Figures (PNG, matplotlib's Agg backend: no display needed). Each function takes plain data and a path."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

from .options import in_notebook

if not in_notebook():  # in a notebook its inline backend shows the figures cnnlab returns
    matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from .io import atomic_write  # noqa: E402


def save_figure(fig: Any, path: str | Path) -> Path:
    """The figure as a PNG (written whole or not at all), its texts in fonts that have their characters."""
    import warnings

    path = Path(path)
    try:
        use_fonts_for_every_script(fig)
        with warnings.catch_warnings():  # a character no installed font has is drawn as a box, never a warning
            warnings.filterwarnings("ignore", message="Glyph .* missing from")
            atomic_write(path, lambda fh: fig.savefig(fh, format=path.suffix.lstrip(".") or "png", dpi=110,
                                                      bbox_inches="tight"))
    finally:
        plt.close(fig)
    return path


def use_fonts_for_every_script(fig: Any) -> list[str]:
    """Class names come from folder names, in any script: a text with characters that matplotlib's DejaVu Sans
    lacks (CJK, emoji) gets, after DejaVu Sans, the installed fonts that have them (Noto CJK, Droid Sans Fallback,
    ...), as a per-glyph fallback list. Returns the fonts added; [] when none was needed or none is installed."""
    from matplotlib import font_manager, ft2font
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if t.get_text()]
    base = ft2font.FT2Font(font_manager.findfont("DejaVu Sans")).get_charmap()
    missing = {ord(c) for t in texts for c in t.get_text() if not c.isspace() and ord(c) not in base}
    if not missing:
        return []
    families, wanted = [], set(missing)
    paths = sorted({f.fname for f in font_manager.fontManager.ttflist} | set(font_manager.findSystemFonts()))
    for font in paths:  # read only when a text needs it: a folder of Latin class names costs nothing
        try:
            covered = wanted & ft2font.FT2Font(font).get_charmap().keys()
        except (OSError, RuntimeError, ValueError):
            continue
        if not covered:
            continue
        name = font_manager.FontProperties(fname=font).get_name()
        if name.startswith("Last Resort"):  # matplotlib's own final fallback: it covers everything, with boxes
            continue
        font_manager.fontManager.addfont(font)  # fonts installed after matplotlib built its list
        families.append(name)
        wanted -= covered
        if not wanted:
            break
    for t in texts:
        if families and any(ord(c) in missing for c in t.get_text()):
            t.set_fontfamily(["DejaVu Sans", *dict.fromkeys(families)])
    return families


FIGURE_CLASSES = 30  # classes a confusion matrix or a prediction grid shows: beyond, a figure grows with the square


def most_confused(confusion: Sequence[Sequence[int]], limit: int = FIGURE_CLASSES) -> list[int]:
    """The classes a figure shows: every one up to `limit`, else the `limit` most involved in mistakes (as the
    true class or the predicted one), in their own order; the whole matrix stays in metrics.json and confusion.csv."""
    counts = np.asarray(confusion, dtype=np.int64)
    if len(counts) <= limit:
        return list(range(len(counts)))
    errors = counts.sum(0) + counts.sum(1) - 2 * np.diag(counts)
    return sorted(np.argsort(-errors, kind="stable")[:limit].tolist())


def plot_confusion(confusion: Sequence[Sequence[int]], classes: list[str], path: str | Path,
                   shown: list[int] | None = None) -> Path:
    """Row-normalised confusion matrix (each row: where one true class went), counts in the cells; of the classes
    `shown` only (default: all), normalised by each whole row, so a share is of the class's every image."""
    counts = np.asarray(confusion, dtype=float)
    norm = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    shown = list(range(len(classes))) if shown is None else shown
    counts, norm = counts[np.ix_(shown, shown)], norm[np.ix_(shown, shown)]
    title = ("confusion matrix (rows normalised)" if len(shown) == len(classes) else
             f"confusion matrix of the {len(shown)} classes most often confused, of {len(classes)} (rows normalised; "
             "every class: confusion.csv)")
    classes = [classes[i] for i in shown]
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * n, 0.8 + 0.55 * n))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    for i in range(n):
        for j in range(n):
            if counts[i, j]:
                ax.text(j, i, f"{norm[i, j]:.2f}\n({int(counts[i, j])})", ha="center", va="center", fontsize=7,
                        color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_title(title, fontsize=10 if n > 8 else None)
    return save_figure(fig, path)


def plot_prediction_grid(images: Any, rows: np.ndarray, labels: Any, probs: Any, classes: list[str],
                         path: str | Path, per_class: int = 3, seed: int = 0, shown: list[int] | None = None) -> Path:
    """A (classes x per_class) grid of test images drawn with a seeded sample, titled with the true and
    predicted class and the confidence; framed green when right, red when wrong. One row per class `shown`
    (default: all)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    probs = np.asarray(probs)
    shown = list(range(len(classes))) if shown is None else shown
    fig, axes = plt.subplots(len(shown), per_class, figsize=(2.3 * per_class, 2.45 * len(shown)), squeeze=False)
    for row, c in enumerate(shown):
        name = classes[c]
        positions = np.flatnonzero(labels == c)
        chosen = rng.choice(positions, size=min(per_class, len(positions)), replace=False) if len(positions) else []
        for j in range(per_class):
            ax = axes[row, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(chosen):
                ax.axis("off")
                continue
            k = int(chosen[j])
            pred = int(probs[k].argmax())
            ax.imshow(images.pixels[rows[k]])
            colour = "#1a9e3a" if pred == c else "#d62728"
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(4)
            ax.set_title(f"true: {name}\npred: {classes[pred]} ({probs[k, pred]:.0%})", fontsize=8, color=colour)
    fig.suptitle("test predictions (green: right, red: wrong)" + (
        f"; {len(shown)} of {len(classes)} classes, the most often confused" if len(shown) < len(classes) else ""), y=1.0)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_top_losses(pixels: list[np.ndarray], titles: list[str], path: str | Path, columns: int = 4) -> Path:
    """The most confident mistakes (fastai's top losses), worst first, each titled true / predicted / confidence."""
    n = max(1, len(pixels))
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(pixels):
            ax.axis("off")
            continue
        ax.imshow(pixels[i])
        for spine in ax.spines.values():
            spine.set_edgecolor("#d62728")
            spine.set_linewidth(3)
        ax.set_title(titles[i], fontsize=7.5, color="#d62728")
    fig.suptitle("most confident mistakes (highest loss first)" if pixels else "no mistakes on the test folder", y=1.0)
    fig.tight_layout(h_pad=1.2)  # room for each image's three-line title below the row above
    return save_figure(fig, path)


def _unit(a: np.ndarray) -> np.ndarray:
    a = a - a.min()
    return a / a.max() if a.max() > 0 else a


def plot_filters(weights: np.ndarray, path: str | Path) -> Path:
    """First-layer filters (out, in, k, k) as small images, each normalised on its own; colour when in=3."""
    n = weights.shape[0]
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 0.9, rows * 0.9), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            w = weights[i]
            img = _unit(w.transpose(1, 2, 0)) if w.shape[0] == 3 else _unit(w.mean(0))
            ax.imshow(img, cmap=None if w.shape[0] == 3 else "gray", interpolation="nearest")
    fig.suptitle(f"first convolution layer: {n} filters of {weights.shape[2]}x{weights.shape[3]}", fontsize=9)
    return save_figure(fig, path)


def plot_guided(neurons: list[int], images: list[list[np.ndarray]], maps: list[list[np.ndarray]],
                scores: list[list[float]], path: str | Path) -> Path:
    """One row per neuron: the test images that excite it most, each followed by its guided-backprop map."""
    k = max(len(r) for r in images)
    fig, axes = plt.subplots(len(neurons), 2 * k, figsize=(2 * k * 1.5, len(neurons) * 1.6), squeeze=False)
    for r, neuron in enumerate(neurons):
        for j in range(k):
            a, b = axes[r, 2 * j], axes[r, 2 * j + 1]
            a.axis("off")
            b.axis("off")
            if j < len(images[r]):
                a.imshow(images[r][j])
                b.imshow(_unit(maps[r][j]))
                a.set_title(f"neuron {neuron}: {scores[r][j]:.2f}", fontsize=7)
                b.set_title("guided backprop", fontsize=7)
    fig.suptitle("last conv layer: top-exciting test images and guided back-propagation", fontsize=10, y=1.01)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_gradcam(images: list[np.ndarray], cams: list[np.ndarray], titles: list[str], path: str | Path,
                 cols: int = 6) -> Path:
    rows = int(np.ceil(len(images) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.8, rows * 2.3 + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < len(images):
            ax.imshow(images[i])
            ax.imshow(cams[i], cmap="jet", alpha=0.45, extent=(0, images[i].shape[1], images[i].shape[0], 0))
            ax.set_title(titles[i], fontsize=7)
    fig.suptitle("Grad-CAM of the predicted class (last conv layer)", fontsize=10)
    fig.tight_layout(h_pad=1.2)  # room for each image's two-line title below the row above
    return save_figure(fig, path)


def plot_reliability(calibration: dict[str, Any], path: str | Path) -> Path:
    """Reliability diagram: accuracy against confidence per bin (bars), the diagonal a calibrated model follows,
    and how many images each bin holds."""
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(5, 5.6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    bins = calibration["bins"]
    width = [b["hi"] - b["lo"] for b in bins]
    ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge", color="#1f77b4",
           edgecolor="white", label="accuracy in the bin")
    ax.bar([b["lo"] for b in bins], [b["confidence"] - b["accuracy"] for b in bins], bottom=[b["accuracy"] for b in bins],
           width=width, align="edge", facecolor="none", edgecolor="#d62728", hatch="///", lw=0.8,
           label="gap to the bin's mean confidence")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="calibrated")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: expected calibration error {calibration['ece']:.3f}")
    ax.legend(fontsize=8, loc="upper left")
    counts.bar([b["lo"] for b in bins], [b["count"] for b in bins], width=width, align="edge", color="#7f7f7f")
    counts.set_xlabel("confidence (top-1 probability)")
    counts.set_ylabel("images")
    return save_figure(fig, path)


def plot_curves(runs: dict[str, list[dict[str, Any]]], path: str | Path, key: str = "val_acc") -> Path:
    return save_figure(curves_figure(runs, key), path)


def curves_figure(runs: dict[str, list[dict[str, Any]]], key: str = "val_acc") -> Any:
    """A Figure of `key` per epoch, one line per run (not registered with pyplot: nothing to close)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    ax = fig.subplots()
    for name, history in runs.items():
        ax.plot([r["epoch"] for r in history], [r[key] for r in history], marker="o", ms=3, label=name)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no tick at 1.25
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_class_counts(counts: dict[str, dict[str, int]], classes: list[str], path: str | Path) -> Path:
    """Images per class, one bar per split (train, val), largest training class first."""
    order = sorted(classes, key=lambda c: -counts.get("train", {}).get(c, 0))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(classes) + 2), 4.2))
    width = 0.8 / max(1, len(counts))
    for k, (split, per_class) in enumerate(counts.items()):
        ax.bar(np.arange(len(order)) + k * width, [per_class.get(c, 0) for c in order], width, label=split)
    ax.set_xticks(np.arange(len(order)) + width * (len(counts) - 1) / 2)
    ax.set_xticklabels(order, rotation=45 if len(order) > 6 else 0, ha="right" if len(order) > 6 else "center",
                       fontsize=8)
    ax.set_ylabel("images")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("images per class")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_sizes(sizes: list[tuple[int, int]], path: str | Path) -> Path:
    """Histogram of the images' widths and heights (pixels, as stored)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    if sizes:
        w, h = np.array(sizes).T
        low, high = min(w.min(), h.min()), max(w.max(), h.max())
        bins = np.linspace(low * 0.98, high * 1.02 + 1, 40)
        ax.hist(w, bins=bins, alpha=0.6, label="width")
        ax.hist(h, bins=bins, alpha=0.6, label="height")
        ax.legend()
    ax.set_xlabel("pixels")
    ax.set_ylabel("images")
    ax.set_title(f"image sizes ({len(sizes)} images)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_lr_find(lrs: list[float], losses: list[float], smoothed: list[float], marks: dict[str, float],
                 path: str | Path) -> Path:
    """Loss against learning rate (log axis), raw and smoothed, with named learning rates marked (the first red)."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(lrs, losses, color="#bbbbbb", lw=1, label="loss per step")
    ax.plot(lrs, smoothed, color="#1f77b4", lw=2, label="smoothed")
    for k, (name, value) in enumerate(marks.items()):
        ax.axvline(value, color="#d62728" if k == 0 else "#555555", ls=("-", "--", "-.", ":")[k % 4], lw=1.3,
                   label=f"{name}: {value:.1e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    finite = [v for v in smoothed if np.isfinite(v)]
    if finite:
        ax.set_ylim(min(finite) * 0.9, min(max(finite), 2.5 * min(finite)) * 1.1 + 1e-9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("learning-rate range test")
    fig.tight_layout()
    return save_figure(fig, path)
