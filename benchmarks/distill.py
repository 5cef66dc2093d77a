"""Does distillation give the small CNN the fine-tuned model's accuracy? On real photos (../shared/data/grocery or
flowers): the teacher, EfficientNet-Lite0 with real ImageNet weights (../shared/weights) fine-tuned head only; then
the small CNN from scratch and the small CNN distilled from that teacher (`--teacher`), each over seeds 0-2 with the
set's reference settings, every model scored by `evaluate` on the test folder. Wall time includes the teacher's:
its training once, and for each student its teacher passes: one over the training images (distill_mode stored), or
one per epoch on the student's views (online). The baseline is the scratch CNN, in the same run.

    python benchmarks/distill.py [--data grocery] [--epochs 10] [--image_size 128] [--seeds 3] [--weight 0.5]
                                 [--modes stored,online]
Last line: `ratio: N.NN`: the share of the scratch-to-teacher gap in test accuracy closed by the better mode."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from common import SHARED, cpu_flags, say

import cnnlab
from cnnlab.config import make_config
from cnnlab.models import create_model, measured_cost

WEIGHTS = SHARED.parent / "weights" / "tf_efficientnet_lite0.safetensors"


def timed(work):
    started = time.perf_counter()
    result = work()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default="grocery")
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--weight", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--modes", default="stored,online", help="distill_mode values to measure, comma-separated")
    args = parser.parse_args()
    import torch

    data = SHARED / args.data
    say(f"cores {torch.get_num_threads()}, CPU flags: {cpu_flags() or 'unknown'}, torch {torch.__version__}")
    say(f"{data}: students at {args.image_size} px, {args.epochs} epochs, seeds 0-{args.seeds - 1}; distill_weight "
        f"{args.weight}, distill_temperature {args.temperature}")
    with tempfile.TemporaryDirectory() as tmp:
        common = dict(data=str(data), out=f"{tmp}/runs", log=None, progress=False)
        teacher, teacher_s = timed(lambda: cnnlab.train(model="timm/tf_efficientnet_lite0", weights=str(WEIGHTS),
                                                        finetune="head", name="teacher", **common))
        t = teacher.evaluate(log=None, progress=False)
        say(f"teacher: test {t.accuracy:.3f} ({teacher_s:.0f} s)")
        modes = args.modes.split(",")
        rows = {"scratch": ([], []), **{f"distilled ({mode})": ([], []) for mode in modes}}
        for seed in range(args.seeds):
            for kind in rows:
                extra = ({"teacher": str(teacher.folder), "distill_weight": args.weight,
                          "distill_temperature": args.temperature, "distill_mode": kind[11:-1]}
                         if kind != "scratch" else {})
                run, seconds = timed(lambda: cnnlab.train(image_size=args.image_size, epochs=args.epochs, seed=seed,
                                                          name=f"{kind[:9]}-{extra.get('distill_mode', '')}-{seed}",
                                                          **common, **extra))
                e = run.evaluate(log=None, progress=False)
                rows[kind][0].append(e.accuracy)
                rows[kind][1].append(seconds)
                say(f"  {kind} seed {seed}: test {e.accuracy:.3f}, balanced {e['balanced_accuracy']:.3f}, {seconds:.0f} s")
        student = create_model(make_config({"image_size": args.image_size}), 10).module
        teacher_net = create_model(make_config({"model": "timm/tf_efficientnet_lite0", "weights": "random"}), 10).module
        flops = measured_cost(student, args.image_size).flops, measured_cost(teacher_net, 224).flops
    say("| model | test accuracy | FLOPs per image | wall time per run |")
    say("|---|---|---|---|")
    say(f"| EfficientNet-Lite0, head only (the teacher) | {t.accuracy:.3f} | {flops[1] / 1e9:.2f} G | {teacher_s:.0f} s |")
    for kind, (acc, seconds) in rows.items():
        extra = f" + the teacher's {teacher_s:.0f} s once" if kind != "scratch" else ""
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0  # one seed: no spread to give
        say(f"| small CNN, {kind} | {statistics.mean(acc):.3f} +- {spread:.3f} | {flops[0] / 1e9:.2f} G | "
            f"{statistics.mean(seconds):.0f} s{extra} |")
    scratch = statistics.mean(rows["scratch"][0])
    closed = {kind: (statistics.mean(acc) - scratch) / (t.accuracy - scratch) for kind, (acc, _) in rows.items()
              if kind != "scratch"}
    for kind, share in closed.items():
        say(f"{kind}: {share:.0%} of the gap closed")
    say(f"ratio: {max(closed.values()):.2f}")


if __name__ == "__main__":
    main()
