"""Which torch.compile mode, measured: whole `fit` trials of the small CNN for each mode, with the compile
time counted honestly (a fresh inductor cache for the run) and its amortisation in a sweep process shown:
per mode, trial 1 compiles from nothing, trial 2 repeats the architecture (a new model, as a sweep's next
trial makes; dynamo is reset between trials, inductor's graph cache serves it), trial 3 is a new architecture.

Data: the flowers photos of ../shared/data at --image_size (synthetic shapes when absent). On CPU the
default size is small (64 px, 2 epochs); on CUDA 224 px and every mode including CUDA graphs.

    python benchmarks/compile_modes.py [--image_size 64] [--epochs 2] [--modes off,default]
Last line: `ratio: N.N` (steady-state training img/s of the best mode over eager; higher is better)."""

from __future__ import annotations

import os
import tempfile

_inductor_cache = tempfile.mkdtemp(prefix="cnnlab-inductor-")
os.environ["TORCHINDUCTOR_CACHE_DIR"] = _inductor_cache  # before torch reads it: trial 1 compiles from nothing

import argparse  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from common import SHARED, say  # noqa: E402

from cnnlab.config import make_config  # noqa: E402
from cnnlab.training import fit  # noqa: E402


def trial(base: dict, mode: str, name: str, **over) -> dict:
    cfg = make_config({**base, "compile": mode, "name": name, **over})
    t = time.perf_counter()
    result = fit(cfg, progress=False, log=lambda s: None)
    wall = time.perf_counter() - t
    epochs = result.history
    steady = statistics.median(r["epoch_time"] for r in epochs[1:]) if len(epochs) > 1 else epochs[0]["epoch_time"]
    return {"wall": wall, "first": epochs[0]["epoch_time"], "steady": steady,
            "ips": statistics.median(r["images_per_s"] for r in epochs[1:] or epochs),
            "val_acc": result.best_val_acc}


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--image_size", type=int, default=224 if cuda else 64)
    ap.add_argument("--epochs", type=int, default=4 if cuda else 3)
    ap.add_argument("--batch_size", type=int, default=256 if cuda else 64)
    ap.add_argument("--modes", default="off,default,reduce-overhead,max-autotune-no-cudagraphs,max-autotune" if cuda
                    else "off,default,max-autotune-no-cudagraphs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = SHARED / "flowers"
        if not data.is_dir():
            from cnnlab.data.demo import make_demo_data

            data = make_demo_data(Path(tmp) / "demo", train_per_class=100, val_per_class=10)
        base = {"data": str(data), "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
                "filters": 32, "batch_norm": True, "augment": True, "cache_dir": str(Path(tmp) / "cache"),
                "out": str(Path(tmp) / "runs")}
        fit(make_config({**base, "epochs": 1, "name": "warm-cache"}), progress=False, log=lambda s: None)
        device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
        say(f"device: {device}; torch {torch.__version__}; {data}; {args.image_size}px, {args.epochs} epochs, "
            f"batch {args.batch_size}; inductor cache {_inductor_cache} (fresh)")
        say(f"{'mode':<28}{'trial 1 s':>10}{'epoch 1 s':>10}{'steady s':>10}{'img/s':>9}{'compile s':>10}"
            f"{'trial 2 s':>10}{'compile s':>10}{'new arch s':>11}{'val_acc':>8}")
        results = {}
        for mode in args.modes.split(","):
            first = trial(base, mode, f"{mode}-1")
            again = trial(base, mode, f"{mode}-2", seed=1)  # same architecture, a new model
            other = trial(base, mode, f"{mode}-3", filter_org="double", filters=16)  # a new graph
            results[mode] = first
            say(f"{mode:<28}{first['wall']:>10.1f}{first['first']:>10.1f}{first['steady']:>10.2f}{first['ips']:>9.0f}"
                f"{first['first'] - first['steady']:>10.1f}{again['wall']:>10.1f}{again['first'] - again['steady']:>10.1f}"
                f"{other['wall']:>11.1f}{first['val_acc']:>8.3f}")
    shutil.rmtree(_inductor_cache, ignore_errors=True)
    eager = results["off"]["ips"] if "off" in results else None
    best = max(results, key=lambda m: results[m]["ips"])
    say(f"fastest steady state: {best}, {results[best]['ips']:.0f} img/s"
        + (f" vs eager {eager:.0f} img/s" if eager else ""))
    say(f"ratio: {results[best]['ips'] / eager:.1f}" if eager else "ratio: n/a (no eager baseline in --modes)")


if __name__ == "__main__":
    main()
