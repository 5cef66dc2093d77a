"""Part B's head-only fine-tuning of ResNet50, 10 epochs: the assignment's way against cnnlab's, same photos.

Reference (how it is usually written): ImageFolder + per-image Resize/ToTensor/Normalize + DataLoader(2
workers), torchvision ResNet50 with every parameter but the new fc (and layer4, for --strategy partial)
frozen by requires_grad=False, fp32, the whole network run
forward over every image every epoch (train split, then the validation split). Its epochs all cost the
same, so it is timed for --ref_epochs and scaled to --epochs (said in the output).
cnnlab: `cnnlab train --model resnet50 --finetune head --augment false`: decode once into the image cache,
the frozen network's output computed once into the feature store, 10 epochs of the head on stored features.
Everything cnnlab does is timed, cache and store builds included. ResNet50 has random weights here (no
pretrained weights can be downloaded on this machine): the cost is the same as with ImageNet weights.

    python benchmarks/finetune_head.py [--strategy head|partial] [--epochs 10]
Last line: `ratio: N.N` (reference wall time over cnnlab's; higher is better)."""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
from common import photo_folder, say
from torch import nn

from cnnlab.config import make_config
from cnnlab.training import fit


def reference(folder: Path, epochs: int, image_size: int, batch_size: int, strategy: str) -> tuple[float, int]:
    import torchvision
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.Resize((image_size, image_size)), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    data = ImageFolder(str(folder), tf)
    idx = list(range(len(data)))
    random.Random(0).shuffle(idx)
    n_val = len(idx) // 5
    train = torch.utils.data.Subset(data, idx[n_val:])
    val = torch.utils.data.Subset(data, idx[:n_val])
    model = torchvision.models.resnet50()
    for p in model.parameters():
        p.requires_grad = False
    if strategy == "partial":  # stem and layer1..3 frozen: layer4 trains with the new head
        for p in model.layer4.parameters():
            p.requires_grad = True
    model.fc = nn.Linear(model.fc.in_features, len(data.classes))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=2):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            for x, _ in torch.utils.data.DataLoader(val, batch_size=batch_size, num_workers=2):
                model(x)
    return time.perf_counter() - start, len(data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", default="head", choices=("head", "partial"))
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--ref_epochs", type=int, default=2)
    ap.add_argument("--image_size", type=int, default=224)
    ap.add_argument("--batch_size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        root, what = photo_folder(Path(tmp))
        extra = {"finetune": "partial", "freeze_stages": 3} if args.strategy == "partial" else {"finetune": "head"}
        extra["weights"] = "random"  # the cost is the same as with ImageNet weights, which cannot be downloaded here
        cfg = make_config({"data": str(root), "model": "resnet50", "augment": False, "epochs": args.epochs,
                           "image_size": args.image_size, "batch_size": args.batch_size, "cache_dir": str(Path(tmp) / "cache"),
                           "out": str(Path(tmp) / "runs"), "name": "bench", **extra})
        say(f"data: {what}; ResNet50 (random weights), {args.image_size}px, {args.strategy}"
            f"{' (stem + 3 stages frozen)' if args.strategy == 'partial' else ''}, {args.epochs} epochs, batch {args.batch_size}")
        start = time.perf_counter()
        result = fit(cfg, progress=False, log=lambda s: say("  cnnlab: " + s) if "store" in s else None)
        ours = time.perf_counter() - start
        n_images = sum(1 for p in (root / "train").rglob("*") if p.is_file())
        say(f"cnnlab: {ours:.1f}s for {args.epochs} epochs, everything included (best val_acc {result.best_val_acc:.3f})")

        ref_time, n = reference(root / "train", args.ref_epochs, args.image_size, args.batch_size, args.strategy)
        ref = ref_time * args.epochs / args.ref_epochs
        say(f"reference: {ref_time:.1f}s for {args.ref_epochs} epochs, scaled to {args.epochs}: {ref:.1f}s "
            f"({ref_time / args.ref_epochs / n * 1000:.0f} ms per image per epoch)")
        per_image_ours = ours / n_images
        say(f"projected for iNaturalist-12K's 10,000 training images on this CPU: reference "
            f"{ref / n * 10_000 / 3600:.1f} h, cnnlab {per_image_ours * 10_000 / 60:.1f} min")
    say(f"ratio: {ref / ours:.1f}")


if __name__ == "__main__":
    main()
