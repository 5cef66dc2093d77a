"""One sweep trial end to end: the reference pipeline against cnnlab's, same config, same JPEGs, same run.

Config: 5 blocks, 32 filters, batch norm, augmentation, 224 px, 7 epochs. Data: a synthetic JPEG set shaped
like iNaturalist-12K (10 classes of ~800x600 photos-like JPEGs; --per_class sets how many, default 1,000 on a
GPU). On a machine without a GPU it runs at a smaller size (fewer images, 64 px, 1 epoch) and says so.

Reference: ImageFolder + per-image RandomResizedCrop/flip/ColorJitter/ToTensor/Normalize in DataLoader
workers, fp32, the plain training loop users write. cnnlab: `train.fit` (decoded cache, batches on the
device, batched augmentation, channels_last, bf16 autocast, cuDNN autotuning, fused optimiser); its cache
build (nvJPEG on a GPU) is reported separately. Then ResNet50 fine-tuning (--resnet head,full), cnnlab against
the same plain loop, beside NVIDIA's published figure. GPU utilisation is sampled from nvidia-smi throughout.

    python benchmarks/gpu_trial.py [--per_class 1000] [--epochs 7] [--image_size 224]
Last line: `ratio: N.N` (reference seconds per trial over cnnlab's; higher is better)."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import say
from PIL import Image
from torch import nn

from cnnlab.config import make_config
from cnnlab.models import create_model
from cnnlab.training import fit


def make_set(root: Path, per_class: int, val_per_class: int, size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (10, size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(10):
            d = root / split / f"class{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):  # smooth blobs with per-class colour statistics: realistic JPEG sizes
                img = Image.fromarray(np.roll(base[c], int(rng.integers(0, base.shape[2])), axis=1)).resize(size)
                img.save(d / f"{i:05d}.jpg", quality=90)


class GpuSampler:
    """Mean GPU utilisation and peak memory over a block, read from nvidia-smi every 0.2 s in a thread."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, check=False)
            try:
                util, mem = (float(v) for v in out.stdout.splitlines()[0].split(","))
            except (ValueError, IndexError):
                continue
            self.samples.append((util, mem))

    def __enter__(self) -> "GpuSampler":
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def __str__(self) -> str:
        if not self.samples:
            return "GPU utilisation n/a"
        util = sum(u for u, _ in self.samples) / len(self.samples)
        return f"GPU utilisation {util:.0f}% mean, {max(m for _, m in self.samples) / 1024:.1f} GiB peak"


def reference_trial(root: Path, image_size: int, epochs: int, batch_size: int, device: torch.device, workers: int,
                    model_name: str = "smallcnn", head_only: bool = False) -> tuple[float, int]:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.RandomResizedCrop(image_size, scale=(0.25, 1.0)), T.RandomHorizontalFlip(),
                    T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = ImageFolder(str(root / "train"), tf)
    plain = ImageFolder(str(root / "train"), T.Compose([T.Resize((image_size, image_size)), T.ToTensor(),
                                                        T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]))
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0)).tolist()
    n_val = len(order) // 5  # the same 80/20 shape as cnnlab's split, validated every epoch like cnnlab does
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(data, order[n_val:]), batch_size=batch_size,
                                         shuffle=True, num_workers=workers, pin_memory=device.type == "cuda")
    val_loader = torch.utils.data.DataLoader(torch.utils.data.Subset(plain, order[:n_val]), batch_size=batch_size,
                                             num_workers=workers)
    torch.manual_seed(0)
    extra = {} if model_name == "smallcnn" else {"model": model_name, "finetune": "full", "weights": "random"}
    model = create_model(make_config({"image_size": image_size, **extra}), 10).module.to(device)
    if head_only:  # what users write: freeze everything, a new fc
        for p in model.parameters():
            p.requires_grad_(False)
        model.fc = nn.Linear(model.fc.in_features, 10).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        model.eval()
        with torch.no_grad():
            for x, _ in val_loader:
                model(x.to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, seen


def cnnlab_trial(cfg_values: dict) -> tuple[float, float, float, str]:
    """Seconds, mean training img/s, best val_acc and GPU use of one `fit` (the cache is already built)."""
    with GpuSampler() as gpu:
        t = time.perf_counter()
        result = fit(make_config(cfg_values), progress=False, log=lambda s: None)
        seconds = time.perf_counter() - t
    ips = sum(r["images_per_s"] for r in result.history) / len(result.history)
    return seconds, ips, result.best_val_acc, str(gpu)


def main() -> None:
    gpu = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--per_class", type=int, default=1000 if gpu else 60)
    ap.add_argument("--epochs", type=int, default=7 if gpu else 2)
    ap.add_argument("--image_size", type=int, default=224 if gpu else 64)
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8 if gpu else 2)
    ap.add_argument("--resnet", default="head,full" if gpu else "", help="ResNet50 fine-tuning trials to time: head, full")
    ap.add_argument("--resnet_epochs", type=int, default=2 if gpu else 1)
    args = ap.parse_args()
    device = torch.device("cuda" if gpu else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        t = time.perf_counter()
        make_set(root, args.per_class, max(2, args.per_class // 5), (800, 600))
        say(f"device: {torch.cuda.get_device_name() if gpu else 'CPU (no GPU: smaller size)'}; torch {torch.__version__}; "
            f"{10 * args.per_class} synthetic 800x600 JPEGs written in {time.perf_counter() - t:.0f}s; "
            f"{args.image_size}px, {args.epochs} epochs, batch {args.batch_size}")
        base = {"data": str(root), "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
                "val_fraction": 0.2, "cache_dir": str(Path(tmp) / "cache"), "out": str(Path(tmp) / "runs")}
        from cnnlab.data import load_images

        decoders = [("nvJPEG", device), (f"PIL, {os.cpu_count()} processes", None)] if gpu else [("PIL", None)]
        for k, (label, on) in enumerate(decoders):  # the first one's cache is what the trials use
            t = time.perf_counter()
            load_images(root / "train", args.image_size, Path(tmp) / ("cache" if k == 0 else f"cache{k}"),
                        progress=False, decode_device=on)
            build = time.perf_counter() - t
            say(f"cache build ({label}; once per data set and size): {build:.1f}s = {10 * args.per_class / build:,.0f} img/s")
        ours, ours_ips, acc, use = cnnlab_trial({**base, "name": "smallcnn"})
        say(f"cnnlab trial (split, training, validation, checkpoints): {ours:.1f}s, {ours_ips:,.0f} training img/s, "
            f"best val_acc {acc:.3f}; {use}")
        with GpuSampler() as gpu_use:
            ref, seen = reference_trial(root, args.image_size, args.epochs, args.batch_size, device, args.workers)
        say(f"reference trial: {ref:.1f}s, {seen / ref:,.0f} img/s; {gpu_use}")
        for strategy in filter(None, args.resnet.split(",")):
            values = {**base, "name": f"resnet50-{strategy}", "model": "resnet50", "finetune": strategy, "weights": "random",
                      "epochs": args.resnet_epochs, "feature_cache": "off"}  # every epoch through the network
            sec, ips, _, use = cnnlab_trial(values)
            with GpuSampler() as gpu_use:
                r_sec, r_seen = reference_trial(root, args.image_size, args.resnet_epochs, args.batch_size, device,
                                                args.workers, "resnet50", head_only=strategy == "head")
            say(f"resnet50 {strategy}: cnnlab {ips:,.0f} training img/s ({sec:.1f}s, {use}); reference "
                f"{r_seen / r_sec:,.0f} img/s ({r_sec:.1f}s, {gpu_use}); ratio {r_sec / sec:.1f}")
        if args.resnet:
            say("published: NVIDIA DeepLearningExamples ResNet50 v1.5, 1x A100 80GB: 2,470 img/s mixed precision, "
                "938 img/s TF32 (pytorch-21.03 container, DALI)")
    say(f"ratio: {ref / ours:.1f}")


if __name__ == "__main__":
    main()
