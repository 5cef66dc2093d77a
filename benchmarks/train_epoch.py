"""Wall time of one training epoch of the same model (the small CNN, or --model resnet50 trained in full).
cnnlab: decoded cache, batched augmentation, channels_last, bf16 autocast where the CPU has native bf16.
Reference: ImageFolder + per-image transforms + DataLoader(num_workers=2), fp32 NCHW, no augmentation.
Same JPEGs, same run.

    python benchmarks/train_epoch.py [--image_size 224] [--model resnet50]
Last line: `ratio: N.N` (reference time over ours; higher is better)."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import photo_folder, reference_loader, say
from torch import nn

from cnnlab.config import make_config
from cnnlab.data import Batches, ImageTransform, load_images
from cnnlab.hardware import autocast_dtype
from cnnlab.models import create_model
from cnnlab.preprocess import Preprocess
from cnnlab.training import train_one_epoch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--model", default="smallcnn", help="smallcnn, or a torchvision model trained in full (random weights)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    # the assignment's network (5 x 32 filters), the model this benchmark has always timed
    extra = {"filters": 32, "filter_org": "same", "conv1_stride": 1} if args.model == "smallcnn" else \
        {"model": args.model, "finetune": "full", "weights": "random"}
    cfg = make_config({"image_size": args.image_size, **extra})
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        root, what = photo_folder(Path(tmp))
        folder = root / "train"
        amp = autocast_dtype("auto", cpu)
        name = "5x32 filters, 3x3, batch norm" if args.model == "smallcnn" else f"{args.model} (random weights, all layers train)"
        say(f"data: {what}; model: {name}, {args.image_size}px, batch {args.batch_size}; "
            f"cnnlab precision: {amp or 'fp32'} (auto)")

        t = time.perf_counter()
        images = load_images(folder, args.image_size, Path(tmp) / "cache", progress=False)
        say(f"cnnlab cache build (once): {time.perf_counter() - t:.1f}s, not counted below")

        torch.manual_seed(0)
        model = create_model(cfg, len(images.classes)).module.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        batches = Batches(images, images.valid, args.batch_size, cpu, shuffle=True, drop_last=True)
        t = time.perf_counter()
        stats = train_one_epoch(model, batches.epoch(0), ImageTransform(Preprocess(args.image_size)), opt, None,
                                nn.CrossEntropyLoss(), cpu, amp, torch.Generator().manual_seed(0))
        ours = time.perf_counter() - t
        say(f"cnnlab epoch: {ours:.1f}s, {stats['seen'] / ours:.1f} img/s")

        torch.manual_seed(0)
        model = create_model(cfg, len(images.classes)).module
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss_fn = nn.CrossEntropyLoss()
        t, seen = time.perf_counter(), 0
        model.train()
        for x, y in reference_loader(folder, args.image_size, args.batch_size):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
        ref = time.perf_counter() - t
        say(f"reference epoch: {ref:.1f}s, {seen / ref:.1f} img/s")
    say(f"ratio: {ref / ours:.1f}")


if __name__ == "__main__":
    main()
