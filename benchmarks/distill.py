"""Does distillation give the small CNN the fine-tuned model's accuracy, and at what price? On real photos
(../shared/data/grocery, flowers or hymenoptera) or the synthetic demo set: the teacher, EfficientNet-Lite0 with
real ImageNet weights (../shared/weights) fine-tuned head only; then, over seeds 0..S-1, the small CNN from scratch
(10 epochs, the plain default, and as long as the students) and distilled in each mode with cnnlab's defaults (no
--epochs: the patient schedule), every model scored by `evaluate` on the test folder. Wall time per student run
includes its teacher passes (stored: one; views: K; online: one per epoch); the teacher's own training is shown
once. All in one run.

    python benchmarks/distill.py [--data grocery|flowers|hymenoptera|demo] [--seeds 3] [--modes stored,views]
                                 [--epochs 0] [--views 8] [--extra key=value,...] [--no_long_scratch]
Last line: `ratio: N.NN`: the share of the gap between the 10-epoch scratch CNN and the teacher closed by the best
distilled mode (its mean test accuracy)."""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

from common import SHARED, cpu_flags, say

import cnnlab
from cnnlab.config import coerce, make_config
from cnnlab.data.demo import make_demo_data
from cnnlab.models import create_model, measured_cost

WEIGHTS = SHARED.parent / "weights" / "tf_efficientnet_lite0.safetensors"


def timed(work):
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="grocery")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--modes", default="stored,views", help="distill_mode values, comma-separated")
    parser.add_argument("--epochs", type=int, default=0, help="the students' epochs (0: cnnlab's default, patient)")
    parser.add_argument("--views", type=int, default=8, help="distill_views of the views mode")
    parser.add_argument("--extra", default="", help="more config values for every student: key=value,...")
    parser.add_argument("--no_long_scratch", action="store_true", help="skip the scratch CNN at the students' epochs")
    args = parser.parse_args()
    import torch

    extra = {k: coerce(k, v) for k, v in (kv.split("=", 1) for kv in args.extra.split(",") if kv)}
    say(f"cores {torch.get_num_threads()}, CPU flags: {cpu_flags() or 'unknown'}, torch {torch.__version__}; {args.data}; "
        f"seeds 0-{args.seeds - 1}; students' epochs {args.epochs or 'default (patient)'}; extra {extra}")
    with tempfile.TemporaryDirectory() as tmp:
        data = make_demo_data(Path(tmp) / "demo", seed=0) if args.data == "demo" else SHARED / args.data
        common = dict(data=str(data), out=f"{tmp}/runs", log=None, progress=False)
        teacher, teacher_s = timed(lambda: cnnlab.train(model="timm/tf_efficientnet_lite0", weights=str(WEIGHTS),
                                                        finetune="head", name="teacher", **common))
        t = teacher.evaluate(log=None, progress=False)
        say(f"teacher: test {t.accuracy:.3f} ({teacher_s:.0f} s)")
        kinds = {"scratch, 10 epochs": {"epochs": 10}}
        for mode in args.modes.split(","):
            kinds[f"distilled ({mode})"] = {"teacher": str(teacher.folder), "distill_mode": mode,
                                            **({"distill_views": args.views} if mode == "views" else {}),
                                            **({"epochs": args.epochs} if args.epochs else {}), **extra}
        rows: dict[str, tuple[list[float], list[float], list[int]]] = {}
        sizes: set[int] = set()  # the students' image sizes, as their runs resolved them (the model's own: 224)

        def measure(kind: str, seed: int, values: dict) -> int:
            name = re.sub(r"[^A-Za-z0-9]+", "-", f"{kind}-{seed}").strip("-")  # a run folder's name
            run, seconds = timed(lambda: cnnlab.train(seed=seed, name=name, **common, **values))
            e = run.evaluate(log=None, progress=False)
            acc, secs, epochs = rows.setdefault(kind, ([], [], []))
            acc.append(e.accuracy)
            secs.append(seconds)
            epochs.append(len(run.history))
            sizes.add(run.config.image_size)
            say(f"  {kind} seed {seed}: test {e.accuracy:.3f}, balanced {e['balanced_accuracy']:.3f}, "
                f"{len(run.history)} epochs, {seconds:.0f} s")
            return len(run.history)

        for seed in range(args.seeds):
            students = [measure(kind, seed, values) for kind, values in kinds.items()][-1]
            if not args.no_long_scratch:  # as many epochs as the students: what the schedule alone gives
                measure("scratch, as long as the students", seed, {"epochs": students, **extra})
        [size] = sizes
        student = create_model(make_config({"image_size": size}), 10).module
        teacher_net = create_model(make_config({"model": "timm/tf_efficientnet_lite0", "weights": "random"}), 10).module
        flops = measured_cost(student, size).flops, measured_cost(teacher_net, 224).flops
    say(f"students at {size} px")
    say("| model | epochs | test accuracy | per seed | GFLOPs per image | wall time per run |")
    say("|---|---|---|---|---|---|")
    say(f"| EfficientNet-Lite0, head only (the teacher) | 10 | {t.accuracy:.3f} | - | {flops[1] / 1e9:.2f} | "
        f"{teacher_s:.0f} s |")
    for kind, (acc, seconds, epochs) in rows.items():
        say(f"| small CNN, {kind} | {epochs[0]} | {mean_sd(acc)} | {', '.join(f'{a:.3f}' for a in acc)} | "
            f"{flops[0] / 1e9:.2f} | {statistics.mean(seconds):.0f} s |")
    scratch = statistics.mean(rows["scratch, 10 epochs"][0])
    closed = {kind: (statistics.mean(acc) - scratch) / (t.accuracy - scratch) for kind, (acc, _, _) in rows.items()
              if kind.startswith("distilled")}
    for kind, share in closed.items():
        say(f"{kind}: {share:.0%} of the gap to the 10-epoch scratch CNN closed")
    say(f"ratio: {max(closed.values()):.2f}")


if __name__ == "__main__":
    main()
