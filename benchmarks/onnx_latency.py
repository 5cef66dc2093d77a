"""ONNX Runtime on the CPU against PyTorch eager: latency per image of an exported cnnlab model, same weights,
same uint8 input, same machine, measured in one run (interleaved, median of repeats).

Models (untrained: the cost does not depend on the weights): the default small CNN at 224 px (smallcnn) or 128 px
(smallcnn128), timm's EfficientNet-Lite0 at its 224 px (lite0), a torchvision ResNet50 at 224 px (resnet50).
PyTorch runs what `cnnlab predict` runs (the checkpoint's model, fp32 and bf16 autocast where the CPU has bf16, with
the flip TTA); ONNX Runtime runs the exported graph (fp32, TTA inside).

    python benchmarks/onnx_latency.py [--batch 1] [--repeats 20] [--models smallcnn,resnet50]
Last line: `ratio: N.N` (PyTorch eager latency over ONNX Runtime's, for the first model; higher: ONNX faster)."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import cpu_flags, say

from cnnlab.checkpoint import make_checkpoint, save_checkpoint
from cnnlab.config import make_config
from cnnlab.data import ImageTransform
from cnnlab.evaluate import load_model, predict_logits
from cnnlab.export import OnnxClassifier, export_model
from cnnlab.hardware import autocast_dtype
from cnnlab.models import create_model

MODELS = {"smallcnn": {"model": "smallcnn"},
          "smallcnn128": {"model": "smallcnn", "image_size": 128},  # the distilled student's size (docs/recipe.md)
          "lite0": {"model": "timm/tf_efficientnet_lite0", "weights": "random"},  # its teacher's network
          "resnet50": {"model": "resnet50", "weights": "random", "finetune": "head"}}


def checkpoint_of(name: str, folder: Path) -> Path:
    cfg = make_config({"image_size": 224, **MODELS[name]})
    parts = create_model(cfg, 10)
    path = folder / f"{name}.pt"
    save_checkpoint(make_checkpoint(parts.module, cfg, [f"c{i}" for i in range(10)], parts.preprocess, 1, []), path)
    return path


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: first-call allocations, oneDNN primitive creation
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", default="smallcnn,resnet50")
    args = parser.parse_args()
    say(f"cores {torch.get_num_threads()}, CPU flags: {cpu_flags() or 'unknown'}, torch {torch.__version__}")
    import onnxruntime

    say(f"onnxruntime {onnxruntime.__version__}; batch {args.batch}, median of {args.repeats}")
    first_ratio = None
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            ckpt = checkpoint_of(name, Path(tmp))
            classifier = OnnxClassifier(export_model(ckpt, Path(tmp) / f"{name}.onnx"))
            loaded = load_model(ckpt, torch.device("cpu"))
            transform = ImageTransform(loaded.pre, loaded.cfg.channels_last)
            size = loaded.pre.image_size
            images = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
            x = torch.from_numpy(images).permute(0, 3, 1, 2)
            y = torch.zeros(args.batch, dtype=torch.long)
            amp = autocast_dtype("auto", torch.device("cpu"))
            rows = {}
            for label, fn in (
                    ("pytorch eager fp32", lambda: predict_logits(loaded.model, [(x, y)], transform, torch.device("cpu"),
                                                                  None, loaded.cfg.tta)),
                    (f"pytorch eager {'bf16' if amp else 'fp32 (no native bf16)'}",
                     lambda: predict_logits(loaded.model, [(x, y)], transform, torch.device("cpu"), amp,
                                            loaded.cfg.tta)),
                    ("onnxruntime fp32", lambda: classifier.logits(images))):
                rows[label] = timed(fn, args.repeats) / args.batch
            for label, seconds in rows.items():
                say(f"{name:<9} {label:<34} {seconds * 1e3:8.2f} ms/image")
            ratio = rows["pytorch eager fp32"] / rows["onnxruntime fp32"]
            say(f"{name:<9} pytorch fp32 / onnxruntime: {ratio:.2f}")
            first_ratio = ratio if first_ratio is None else first_ratio
    say(f"ratio: {first_ratio:.2f}")


if __name__ == "__main__":
    main()
