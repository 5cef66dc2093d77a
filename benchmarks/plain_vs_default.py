"""The plain pipeline course students write, then `cnnlab train` with its defaults, on the same photos, same
5-block CNN, same epochs, one right after the other: test accuracy on val/ and wall time end to end (cnnlab's
cache build included).

Plain: ImageFolder + per-image PIL Resize((s, s)) / ToTensor / Normalize, DataLoader(batch 64, shuffle, 2 workers),
fp32 NCHW, Adam 1e-3 constant, no augmentation, cross-entropy; the model is cnnlab's SmallCNN with the default
config (16 filters doubling, batch norm, 256 dense units), torch's init (no whitening, no identity convs), in the
textbook order (conv, batch norm, ReLU, pool), trained on all of train/ and scored on val/ after the last epoch.
It runs twice: with the stride-1 first convolution of the assignment's network (what students write), and with
cnnlab's default network (a stride-2 first convolution from 128 px up). cnnlab:
`cnnlab train --data D --image_size S --epochs E --seed K`, then `cnnlab evaluate`.

    python benchmarks/plain_vs_default.py [--data flowers] [--image_size 128] [--epochs 8] [--seeds 1]
Last line: `ratio: N.N` (the plain pipeline's wall time, with cnnlab's default network, over cnnlab's; higher is
better). The line before it gives the ratio against the plain pipeline with the stride-1 network."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED, cpu_flags, say
from torch import nn

from cnnlab.cli import main as cnnlab
from cnnlab.config import make_config
from cnnlab.models import create_model


def plain(data: Path, image_size: int, epochs: int, seed: int, conv1_stride: int) -> tuple[float, float]:
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    torch.manual_seed(seed)
    tf = T.Compose([T.Resize((image_size, image_size)), T.ToTensor(),
                    T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    train, test = ImageFolder(str(data / "train"), tf), ImageFolder(str(data / "val"), tf)
    cfg = make_config({"image_size": image_size, "conv1_stride": conv1_stride, "conv_init": "kaiming"})  # torch's init
    model = textbook_order(create_model(cfg, len(train.classes)).module)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        for x, y in torch.utils.data.DataLoader(train, batch_size=64, shuffle=True, num_workers=2):
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in torch.utils.data.DataLoader(test, batch_size=128, num_workers=2):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(test), time.perf_counter() - start


def textbook_order(model: nn.Module) -> nn.Module:
    """Each block as students write it: conv, batch norm, ReLU, then max-pool. cnnlab's SmallCNN pools before
    the ReLU, the same function computed faster; that speed belongs to cnnlab's side of the comparison."""
    for block in model.features:
        pool = next(m for m in block if isinstance(m, nn.MaxPool2d))
        layers = [m for m in block if m is not pool] + [pool]
        for i, layer in enumerate(layers):
            block[i] = layer
    return model


def ours(data: Path, image_size: int, epochs: int, seed: int, work: Path) -> tuple[float, float]:
    start = time.perf_counter()
    name = f"default-{seed}"
    assert cnnlab(["train", "--data", str(data), "--image_size", str(image_size), "--epochs", str(epochs),
                   "--seed", str(seed), "--out", str(work / "runs"), "--name", name,
                   "--cache_dir", str(work / f"cache-{seed}"), "--quiet"]) == 0
    assert cnnlab(["evaluate", str(work / "runs" / name), "--data", str(data), "--cache_dir", str(work / f"cache-{seed}"),
                   "--quiet"]) == 0
    seconds = time.perf_counter() - start
    return json.loads((work / "runs" / name / "eval" / "metrics.json").read_text())["accuracy"], seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="flowers")
    ap.add_argument("--image_size", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1)
    args = ap.parse_args()
    data = SHARED / args.data
    if not data.is_dir():
        say(f"skipped: {data} is absent")
        return
    torch.set_num_threads(2)
    say(f"{os.cpu_count()} cores, CPU flags {cpu_flags()}, torch {torch.__version__}; {args.data} at {args.image_size} px, "
        f"{args.epochs} epochs, {args.seeds} seed(s)")
    default_stride = make_config({"image_size": args.image_size}).first_stride()
    plains = {"plain, stride-1 first conv (the assignment's)": 1,
              f"plain, cnnlab's default network (first conv stride {default_stride})": default_stride}
    rows: dict[str, list[tuple[float, float]]] = {name: [] for name in [*plains, "cnnlab"]}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(args.seeds):
            for name, stride in plains.items():
                rows[name].append(plain(data, args.image_size, args.epochs, seed, stride))
                say(f"{name}, seed {seed}: test {rows[name][-1][0]:.3f} in {rows[name][-1][1]:.0f} s")
            rows["cnnlab"].append(ours(data, args.image_size, args.epochs, seed, Path(tmp)))
            say(f"cnnlab, seed {seed}: test {rows['cnnlab'][-1][0]:.3f} in {rows['cnnlab'][-1][1]:.0f} s (cache build "
                "included: each seed decodes afresh)")
    for name, r in rows.items():
        accs = [a for a, _ in r]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        say(f"| {name} | {statistics.mean(accs):.3f} ± {std:.3f} | {statistics.mean(s for _, s in r):.0f} s |")
    ours_s = statistics.mean(s for _, s in rows["cnnlab"])
    first, same = (statistics.mean(s for _, s in rows[name]) / ours_s for name in plains)
    say(f"ratio against the plain pipeline with the stride-1 network: {first:.1f}")
    say(f"ratio: {same:.1f}")


if __name__ == "__main__":
    main()
