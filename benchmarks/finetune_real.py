"""Part B for real: EfficientNet-Lite0 with its real ImageNet weights (../shared/weights), fine-tuned by every
strategy on real photos (../shared/data: hymenoptera, flowers), against the from-scratch CNN with cnnlab's
defaults, on this machine's CPU. Every number is test accuracy from `cnnlab evaluate` on the data set's val/
folder (with its 95% Wilson interval), the wall time of the whole `cnnlab train` (cache and feature-store builds
included) and the training images/s. The runs stay in --out, so `cnnlab compare` renders the same table.

    python benchmarks/finetune_real.py [--out bench-finetune] [--only hymenoptera]
Skips with a message when ../shared/weights or ../shared/data is absent. Last line: `ratio: N.N` (flowers: the
best fine-tuning strategy's test accuracy over the scratch CNN's)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from common import SHARED, cpu_flags, say

from cnnlab.cli import main as cnnlab

WEIGHTS = SHARED.parent / "weights" / "tf_efficientnet_lite0.safetensors"
MODEL = ["--model", "timm/tf_efficientnet_lite0", "--weights", str(WEIGHTS)]

# (name, flags): every run of the table, in one place. Frozen-backbone strategies at the weights' own 224 px;
# the ones that train the backbone on flowers at 128 px (its photos are 128 px thumbnails, and a CPU epoch at
# 224 px takes minutes); the scratch CNN with cnnlab's defaults at the image size of its data set.
RUNS = {
    "hymenoptera": [
        ("head", [*MODEL, "--finetune", "head", "--augment", "false", "--lr", "1e-2", "--epochs", "15"]),
        ("partial (5 of 7 stages frozen)", [*MODEL, "--finetune", "partial", "--freeze_stages", "5", "--lr", "1e-3",
                                            "--epochs", "4"]),
        ("gradual", [*MODEL, "--finetune", "gradual", "--unfreeze_every", "1", "--lr", "1e-3", "--epochs", "4"]),
        ("full (lr_backbone 1e-4)", [*MODEL, "--finetune", "full", "--lr", "1e-3", "--lr_backbone", "1e-4",
                                     "--epochs", "4"]),
        ("scratch CNN", ["--image_size", "128", "--epochs", "15"]),
    ],
    "flowers": [
        ("head", [*MODEL, "--finetune", "head", "--augment", "false", "--lr", "1e-2", "--epochs", "15"]),
        ("partial (5 of 7 stages frozen), 128 px", [*MODEL, "--image_size", "128", "--finetune", "partial",
                                                    "--freeze_stages", "5", "--lr", "1e-3", "--epochs", "3"]),
        ("full (lr_backbone 1e-4), 128 px", [*MODEL, "--image_size", "128", "--finetune", "full", "--lr", "1e-3",
                                             "--lr_backbone", "1e-4", "--epochs", "3"]),
        ("scratch CNN, 128 px", ["--image_size", "128", "--epochs", "15"]),
    ],
}


def run(data: Path, name: str, flags: list[str], out: Path, cache: Path) -> dict:
    folder = name.split(" ")[0]
    run_dir = out / data.name / folder
    start = time.perf_counter()
    code = cnnlab(["train", "--data", str(data), *flags, "--out", str(out / data.name), "--name", folder,
                   "--cache_dir", str(cache), "--quiet"]) if not (run_dir / "summary.json").exists() else 0
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{name} on {data.name} failed (exit {code})")
    cnnlab(["evaluate", str(run_dir / "best.pt"), "--data", str(data), "--cache_dir", str(cache), "--quiet"])
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    if seconds < 1:  # reused from an earlier run of this benchmark
        seconds = summary["setup_seconds"] + summary["train_seconds"]
    return {"name": name, "acc": metrics["accuracy"], "ci": metrics["accuracy_ci95"], "seconds": seconds,
            "ips": summary["images_per_s"], "trainable": summary["trainable_params"], "epochs": summary["epochs_run"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench-finetune", help="run folders (kept: a second call only re-evaluates)")
    ap.add_argument("--only", choices=list(RUNS), help="one data set")
    args = ap.parse_args()
    if not WEIGHTS.is_file() or not SHARED.is_dir():
        say(f"skipped: needs {WEIGHTS} and {SHARED} (the developers' ../shared folder)")
        return
    cpu = cpu_flags()
    say(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU flags {cpu}, "
        f"torch {torch.__version__}")
    out, cache = Path(args.out), Path(args.out) / "cache"
    results: dict[str, list[dict]] = {}
    for data_name, runs in RUNS.items():
        if args.only and data_name != args.only:
            continue
        data = SHARED / data_name
        results[data_name] = [run(data, name, flags, out, cache) for name, flags in runs]
        say(f"\n{data_name}: test = {data}/val")
        say("| strategy | test accuracy (95% CI) | trainable params | epochs | wall time | train img/s |")
        say("|---|---|---|---|---|---|")
        for r in results[data_name]:
            say(f"| {r['name']} | {r['acc']:.3f} ({r['ci'][0]:.3f}-{r['ci'][1]:.3f}) | {r['trainable']:,} | "
                f"{r['epochs']} | {r['seconds']:.0f} s | {r['ips']:.0f} |")
    if "flowers" in results:
        rows = results["flowers"]
        scratch = next(r for r in rows if "scratch" in r["name"])
        best = max((r for r in rows if "scratch" not in r["name"]), key=lambda r: r["acc"])
        say(f"\nflowers: best fine-tuning ({best['name']}) {best['acc']:.3f} in {best['seconds']:.0f} s vs scratch CNN "
            f"{scratch['acc']:.3f} in {scratch['seconds']:.0f} s")
        say(f"ratio: {best['acc'] / scratch['acc']:.2f}")


if __name__ == "__main__":
    main()
