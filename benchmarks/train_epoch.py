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
from dataclasses import replace
from pathlib import Path

import torch
from common import photo_folder, reference_loader, say
from torch import nn

from cnnlab.config import make_config
from cnnlab.hardware import autocast_dtype
from cnnlab.models import create_model
from cnnlab.training import fit


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

        # cnnlab's own training path (one epoch of `fit`): the decoded cache is built in its set-up, which
        # images_per_s leaves out, as the reference below leaves out nothing it could cache
        run = fit(replace(cfg, data=str(root), out=str(Path(tmp) / "runs"), cache_dir=str(Path(tmp) / "cache"),
                          name="bench", epochs=1, batch_size=args.batch_size, device="cpu"),
                  progress=False, log=lambda s: None)
        record = run.history[0]
        ours = 1 / record["images_per_s"]  # seconds per image
        say(f"cnnlab epoch: {record['images_per_s']:.1f} img/s ({len(run.history)} epoch of the training split)")

        torch.manual_seed(0)
        model = create_model(cfg, len([d for d in folder.iterdir() if d.is_dir()])).module
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
        ref = (time.perf_counter() - t) / seen  # seconds per image
        say(f"reference epoch: {1 / ref:.1f} img/s")
    say(f"ratio: {ref / ours:.1f}")


if __name__ == "__main__":
    main()
