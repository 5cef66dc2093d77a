"""`evaluate` and `predict_logits`, written once: training's validation, `cnnlab evaluate`, `predict` and
`explain` all use them (model.eval(), torch.inference_mode(), the training's preprocessing)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .checkpoint import read_checkpoint
from .config import Config, saved_config
from .data import Batches, ImageTransform, load_images
from .data.decode import describe_error, image_from_array, load_rgb, prepare
from .errors import DataError
from .hardware import autocast, autocast_dtype, decode_device, precision_for
from .io import append_jsonl, atomic_write_csv, atomic_write_json, atomic_write_text, printable, spreadsheet_cell
from .models import create_model
from .preprocess import Preprocess
from .run_folder import BAD_FILES, CONFIG, EVAL, TEST_LEDGER


@torch.inference_mode()
def predict_logits(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], transform: Callable,
                   device: torch.device, amp: torch.dtype | None = None, tta: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits as float32 on the CPU, labels) for every batch, in order; with `tta`, the mean of the logits of
    each image and its mirror image."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in batches:
        with autocast(device, amp):
            x = transform(x)
            out = model(x).float()
            if tta:
                out = (out + model(x.flip(3)).float()) / 2
        logits.append(out)
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], transform: Callable,
             device: torch.device, amp: torch.dtype | None = None, loss_fn: nn.Module | None = None,
             tta: bool = False) -> dict[str, float]:
    """Mean loss, accuracy and balanced accuracy (the mean of the per-class recalls) over `batches`."""
    logits, labels = predict_logits(model, batches, transform, device, amp, tta)
    loss_fn = loss_fn or nn.CrossEntropyLoss()
    hit = (logits.argmax(1) == labels).float()
    per_class = torch.zeros(int(labels.max()) + 1).index_add_(0, labels, hit)
    counts = torch.bincount(labels).float()
    present = counts > 0
    return {"loss": float(loss_fn(logits, labels)), "acc": float(hit.mean()),
            "balanced_acc": float((per_class[present] / counts[present]).mean())}


# ---- a trained model on the test folder ---------------------------------------------------------------------

@dataclass
class LoadedModel:
    model: nn.Module
    cfg: Config
    classes: list[str]
    pre: Preprocess
    state: dict[str, Any]
    sha256: str  # of the bytes the weights were read from, not of whatever the file holds later


def load_model(checkpoint: str | Path, device: torch.device) -> LoadedModel:
    """Rebuild the model a checkpoint was trained as (no weights download) and load its weights."""
    state, sha256 = read_checkpoint(checkpoint, device)
    saved = state["config"]  # the weights come from the checkpoint: nothing to download or read besides it
    cfg = saved_config(saved, {"weights": "none" if saved.get("finetune", "none") == "none" else "random"})
    model = create_model(cfg, len(state["classes"])).module
    model.load_state_dict(state["model"])
    model = model.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
    model.eval()
    return LoadedModel(model, cfg, list(state["classes"]), Preprocess.from_dict(state["preprocess"]), state,
                       sha256)


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sound near 0 and 1, unlike the normal approximation."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str], top_k: int = 3
                           ) -> dict[str, Any]:
    """Accuracy with its 95% interval, top-k accuracy, per-class precision/recall/F1, macro F1, confusion."""
    n, c = len(labels), len(classes)
    pred = logits.argmax(1)
    correct = int((pred == labels).sum())
    k = min(top_k, c)
    topk = int((logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum())
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones(n, dtype=torch.long), accumulate=True)
    per_class = {}
    for i, name in enumerate(classes):
        tp = int(confusion[i, i])
        predicted, actual = int(confusion[:, i].sum()), int(confusion[i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {"precision": precision, "recall": recall, "f1": f1, "support": actual}
    low, high = wilson_interval(correct, n)
    present = [v["recall"] for v in per_class.values() if v["support"]]
    return {"images": n, "accuracy": correct / max(n, 1), "accuracy_ci95": [low, high],
            "balanced_accuracy": sum(present) / max(len(present), 1),  # mean per-class recall
            f"top{k}_accuracy": topk / max(n, 1), "macro_f1": sum(v["f1"] for v in per_class.values()) / c,
            "per_class": per_class, "classes": classes, "confusion": confusion.tolist()}


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> dict[str, Any]:
    """Expected calibration error (the gap between confidence and accuracy, averaged over equal-width confidence
    bins weighted by their share of the images) and each bin's count, mean confidence and accuracy: the data of a
    reliability diagram."""
    confidence, pred = probs.max(1)
    hit = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    rows, ece = [], 0.0
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist()):
        inside = (confidence > lo) & (confidence <= hi)
        n = int(inside.sum())
        if n:
            conf, acc = float(confidence[inside].mean()), float(hit[inside].mean())
            ece += n / len(labels) * abs(acc - conf)
            rows.append({"lo": lo, "hi": hi, "count": n, "confidence": conf, "accuracy": acc})
    return {"ece": ece, "bins": rows, "mean_confidence": float(confidence.mean())}


def format_metrics(m: dict[str, Any]) -> str:
    lo, hi = m["accuracy_ci95"]
    topk = next(k for k in m if k.startswith("top"))
    balanced = f"  balanced accuracy {m['balanced_accuracy']:.4f}" if "balanced_accuracy" in m else ""
    calibrated = (f"calibration: expected calibration error {m['calibration']['ece']:.4f} (mean confidence "
                  f"{m['calibration']['mean_confidence']:.4f}; reliability.png)" if "calibration" in m else "")
    lines = [f"test accuracy {m['accuracy']:.4f} (95% CI {lo:.4f}-{hi:.4f}, {m['images']} images){balanced}  "
             f"{topk.replace('_', ' ')} {m[topk]:.4f}  macro F1 {m['macro_f1']:.4f}",
             f"{'class (worst recall first)':<28}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}"]
    for name, v in sorted(m["per_class"].items(), key=lambda kv: (kv[1]["recall"], kv[0])):
        lines.append(f"{name:<28}{v['precision']:>10.3f}{v['recall']:>10.3f}{v['f1']:>10.3f}{v['support']:>9d}")
    return "\n".join(lines + ([calibrated] if calibrated else []))


def load_test_images(loaded: LoadedModel, data: str | Path, cache_dir: str | Path, progress: bool = True):
    """`data`/val decoded with the checkpoint's image size (and, on a GPU, its decoder); refused when its
    classes are not the checkpoint's."""
    device = next(loaded.model.parameters()).device
    on_device = decode_device(loaded.cfg.decoder if device.type == "cuda" else "pil", device)
    test = load_images(Path(data) / "val", loaded.pre.image_size, cache_dir, loaded.cfg.decode_workers, progress,
                       on_device, loaded.pre.crop, loaded.pre.interpolation)
    if test.classes != loaded.classes:
        raise DataError(f"{Path(data) / 'val'} has classes {test.classes}, but the checkpoint was trained on "
                        f"{loaded.classes}: use data with the same class folders")
    if not len(test.valid):
        first = min(test.errors)
        raise DataError(f"none of the {len(test.files)} files in {Path(data) / 'val'} is a readable image (the first, "
                        f"{test.files[first]}: {test.errors[first]}), so there is nothing to test on: put the test "
                        "images there")
    return test


def evaluate_checkpoint(checkpoint: str | Path, data: str | Path, device: torch.device, cache_dir: str | Path,
                        out_dir: str | Path | None = None, top_k: int = 3, seed: int = 0,
                        progress: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The test folder (`data`/val), once: the confusion matrix, the reliability diagram, the prediction grid and
    the mistakes, then metrics.json, written last: an evaluation is complete when its metrics.json is there (a crash
    or a full disk before leaves none, and the next run evaluates again). The ledger's line comes as soon as the
    score is known, since from then on the test folder has been seen, whatever happens after."""
    loaded = load_model(checkpoint, device)
    out_dir = Path(out_dir) if out_dir else Path(checkpoint).parent / EVAL
    test = load_test_images(loaded, data, cache_dir, progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics.json").unlink(missing_ok=True)  # an earlier evaluation's: not the record of this one
    if test.errors:
        atomic_write_text(out_dir / BAD_FILES, test.bad_file_report())
        log(f"skipped {len(test.errors)} unreadable test file(s): listed in {out_dir / BAD_FILES}")
    rows = test.valid
    batches = Batches(test, rows, 128, device, shuffle=False)
    precision = precision_for(loaded.cfg.precision, device, strict=False)  # the training's, where this device runs it
    started = time.perf_counter()
    logits, labels = predict_logits(loaded.model, batches, ImageTransform(loaded.pre, loaded.cfg.channels_last), device,
                                    precision.dtype, loaded.cfg.tta)
    seconds = time.perf_counter() - started  # the decoded test images through the model (and its TTA), in batches
    metrics = classification_metrics(logits, labels, loaded.classes, top_k)
    probs = logits.softmax(1)
    metrics.update({"calibration": calibration(probs, labels),
                   "checkpoint": str(checkpoint), "checkpoint_epoch": int(loaded.state["epoch"]),
                    "checkpoint_sha256": loaded.sha256,  # the weights predicted with: --resume may replace the file
                    "data": str(Path(data) / "val"), "device": str(device), "precision": precision.name,
                    "skipped_files": len(test.errors),
                    "inference": {"ms_per_image": 1000 * seconds / len(rows), "batch": 128, "tta": bool(loaded.cfg.tta),
                                  "threads": torch.get_num_threads()}})
    record_test_use(Path(checkpoint), metrics)
    from .visualise import most_confused, plot_confusion, plot_prediction_grid, plot_reliability  # matplotlib: here,
    # not at import, where every training run (which validates through this module) would pay for it
    shown = most_confused(metrics["confusion"])  # all up to 30 classes: the figures stay a page, whatever the count
    write_confusion_csv(metrics["confusion"], loaded.classes, out_dir / "confusion.csv")
    plot_confusion(metrics["confusion"], loaded.classes, out_dir / "confusion.png", shown)
    plot_reliability(metrics["calibration"], out_dir / "reliability.png")
    plot_prediction_grid(test, rows, labels, probs, loaded.classes, out_dir / "predictions.png", seed=seed, shown=shown)
    metrics["mistakes"] = write_mistakes(test, rows, logits, labels, loaded.classes, out_dir)
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def write_confusion_csv(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    """The whole confusion matrix, rows the true class and columns the predicted one, class names as heads."""
    atomic_write_csv(path, [["true \\ predicted", *map(spreadsheet_cell, classes)],
                            *([spreadsheet_cell(name), *row] for name, row in zip(classes, confusion))])


def record_test_use(checkpoint: Path, metrics: dict[str, Any]) -> None:
    """One line in the checkpoint's run folder's test ledger: this checkpoint met this test folder (and scored so).
    A checkpoint outside a run folder (no config.yaml beside it) has no ledger to keep."""
    if not (checkpoint.parent / CONFIG).is_file():
        return
    append_jsonl(checkpoint.parent / TEST_LEDGER, {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "checkpoint": checkpoint.name, "sha256": metrics["checkpoint_sha256"],
        "epoch": metrics["checkpoint_epoch"], "data": metrics["data"], "images": metrics["images"],
        "accuracy": metrics["accuracy"]})


def write_mistakes(test: Any, rows: np.ndarray, logits: torch.Tensor, labels: torch.Tensor, classes: list[str],
                   out_dir: Path, shown: int = 16) -> int:
    """mistakes.csv (every misclassified test file: true, predicted, confidence, loss; highest loss first) and
    top_losses.png (the `shown` most confident mistakes); returns how many mistakes there are."""
    loss = nn.functional.cross_entropy(logits, labels, reduction="none")
    probs = logits.softmax(1)
    pred = probs.argmax(1)
    wrong = torch.nonzero(pred != labels).flatten()
    wrong = wrong[loss[wrong].argsort(descending=True)].tolist()
    atomic_write_csv(out_dir / "mistakes.csv", [["file", "true", "predicted", "confidence", "loss"], *(
        [spreadsheet_cell(printable(test.files[rows[i]])), spreadsheet_cell(classes[int(labels[i])]),
         spreadsheet_cell(classes[int(pred[i])]), f"{float(probs[i, pred[i]]):.4f}", f"{float(loss[i]):.4f}"]
        for i in wrong)])
    top = wrong[:shown]
    from .visualise import plot_top_losses

    plot_top_losses([test.pixels[rows[i]] for i in top],
                    [f"true: {classes[int(labels[i])]}\npred: {classes[int(pred[i])]} ({float(probs[i, pred[i]]):.0%})"
                     f"\nloss {float(loss[i]):.2f}" for i in top], out_dir / "top_losses.png")
    return len(wrong)


def expand_paths(paths: list[str]) -> list[str]:
    """Files as given; folders replaced by every file below them (recursively, sorted, hidden ones skipped)."""
    out: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += [str(f) for f in sorted(p.rglob("*")) if not f.is_dir()
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)]  # a FIFO: reported
        else:
            out.append(str(p))
    return out


def decoded_image(item: Any, pre: Preprocess) -> tuple[str, np.ndarray]:
    """(what the result names, the image as the cache would hold it) for a path, a PIL image or an array."""
    from PIL import Image

    if isinstance(item, (str, Path)):
        return str(item), load_rgb(str(item), pre.image_size, pre.crop, pre.interpolation)
    image = item if isinstance(item, Image.Image) else image_from_array(item)
    return f"<image {image.size[0]}x{image.size[1]}>", prepare(image, pre.image_size, pre.crop, pre.interpolation)


def predict_files(loaded: LoadedModel, paths: list[Any], device: torch.device, top: int = 3, batch: int = 64
                  ) -> Iterator[dict[str, Any]]:
    """Top-k classes of each image (a file in any format PIL reads, a PIL image or an (H, W, 3) uint8 array), in
    order, `batch` images at a time, so memory stays bounded however many there are; an unreadable one gets an
    `error` entry and the others are still predicted."""
    transform = ImageTransform(loaded.pre, loaded.cfg.channels_last)
    amp = autocast_dtype(loaded.cfg.precision, device)

    def logits(arrays: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(arrays).to(device).permute(0, 3, 1, 2)
        y = torch.zeros(len(arrays), dtype=torch.long, device=device)
        return predict_logits(loaded.model, [(x, y)], transform, device, amp, loaded.cfg.tta)[0]

    yield from predict_images(paths, loaded.pre, loaded.classes, logits, top, batch)


def predict_images(items: list[Any], pre: Preprocess, classes: list[str],
                   logits: Callable[[np.ndarray], Any], top: int = 3, batch: int = 64) -> Iterator[dict[str, Any]]:
    """The one predict loop, for any model that maps (N, S, S, 3) uint8 images to logits (PyTorch, ONNX Runtime):
    each item decoded as the cache would hold it, `batch` at a time, and its top-k classes, or its error."""
    for start in range(0, len(items), batch):
        results: list[dict[str, Any]] = []
        arrays, where = [], []
        for p in items[start:start + batch]:
            name = str(p) if isinstance(p, (str, Path)) else "<image>"
            try:
                name, array = decoded_image(p, pre)
                arrays.append(array)
                where.append(len(results))
                results.append({"file": name})
            except FileNotFoundError:
                results.append({"file": name, "error": "no such file"})
            except Exception as e:  # noqa: BLE001 - reported per file
                results.append({"file": name, "error": describe_error(e)})
        if arrays:
            probs = torch.as_tensor(logits(np.stack(arrays))).float().softmax(1)
            values, indices = probs.topk(min(top, probs.shape[1]), dim=1)
            for row, i in enumerate(where):
                results[i]["top"] = [{"class": classes[int(c)], "prob": float(v)}
                                     for v, c in zip(values[row], indices[row])]
        yield from results


def as_image_list(images: Any) -> list[Any]:
    """One image (a path, a PIL image or an array) as a list of one; a list or other iterable as a list."""
    if isinstance(images, (str, Path, np.ndarray)) or hasattr(images, "getpixel"):
        return [images]
    return list(images)
