"""What each `cnnlab` subcommand does, given its parsed arguments; `cli` builds the parser and dispatches here.
Heavy modules (torch, optuna, matplotlib) are imported inside each command, so `cnnlab --help` is instant."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .config import FIELDS, Config, load_yaml, make_config
from .errors import CnnlabError, ConfigError
from .options import Common


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config flags given on the command line."""
    return {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    from .api import make_run_config

    return make_run_config(getattr(args, "config", None), **config_overrides(args))


def cmd_train(args: argparse.Namespace, common: Common) -> int:
    from .api import train

    run = train(args.config, resume=args.resume, progress=common.progress, raise_interrupt=True,
                **config_overrides(args))
    print(f"best val_acc {run.best_val_acc:.4f} at epoch {run.best_epoch}; run folder {run.folder}")
    return 0


def cmd_lr_find(args: argparse.Namespace, common: Common) -> int:
    from .api import lr_find

    lr_find(args.config, start=args.start, end=args.end, steps=args.steps, progress=common.progress,
            **config_overrides(args))
    return 0


def cmd_info(args: argparse.Namespace, common: Common) -> int:
    from .data import list_classes
    from .models import check_config, create_model, measured_cost, smallcnn_cost

    cfg = check_config(config_from_args(args))
    if args.num_classes is not None:
        n = args.num_classes
    else:
        n = len(list_classes(Path(args.data) / "train")) if args.data else 10
    parts = create_model(cfg, n)
    size = parts.preprocess.image_size
    measured = measured_cost(parts.module, size)
    print(f"model {cfg.model}, {n} classes, {size}x{size} input")
    if cfg.model == "smallcnn":
        formula = smallcnn_cost(cfg, n)
        print(f"filters {cfg.filter_counts()}, kernels {cfg.kernel_sizes()}, first conv stride {cfg.first_stride()}"
              f"{' (auto)' if cfg.conv1_stride == 0 else ''}, first conv init {cfg.conv1_init}, "
              f"other convs' init {cfg.conv_init}, "
              f"dense {cfg.dense_units}, batch_norm {cfg.batch_norm}, "
              f"{'global average pool' if cfg.global_pool else 'flatten'}")
        print(f"parameters: {formula.params:,} (formula)  {measured.params:,} (sum of p.numel())")
        print(f"forward FLOPs per image: {formula.flops:,} = {formula.gflops:.3f} GFLOP (formula)  "
              f"{measured.flops:,} (torch.utils.flop_counter)")
    else:
        print(f"parameters: {measured.params:,}")
        print(f"forward FLOPs per image: {measured.flops:,} = {measured.gflops:.3f} GFLOP (torch.utils.flop_counter)")
    return 0


def cmd_env(args: argparse.Namespace, common: Common) -> int:
    import json

    from .environment import environment, environment_text
    from .hardware import resolve_device

    info = environment(resolve_device(common.device), args.precision, cache_dir=Config(cache_dir=common.cache_dir or "")
                       .resolved_cache_dir())
    print(json.dumps(info, indent=2) if args.json else environment_text(info))
    return 0


def cmd_demo_data(args: argparse.Namespace, common: Common) -> int:
    from .data.demo import make_demo_data

    root = make_demo_data(args.root, args.train_per_class, args.val_per_class, args.seed)
    print(f"wrote {root}/train and {root}/val: 10 classes, {args.train_per_class} + {args.val_per_class} images each")
    return 0


def cmd_download(args: argparse.Namespace, common: Common) -> int:
    from .data.download import DATASETS, fetch_dataset

    if args.dataset not in DATASETS:
        raise CnnlabError(f"unknown data set {args.dataset!r}: expected one of {', '.join(DATASETS)}")
    root = fetch_dataset(args.dataset, args.dest, url=args.url, sha256=args.sha256)
    print(f"data ready: {root} (train with: cnnlab train --data {root})")
    return 0


def cmd_check(args: argparse.Namespace, common: Common) -> int:
    from .api import check

    checked = check(args.root, out=args.out, cache_dir=common.cache_dir, progress=common.progress)
    r = checked.report
    print(f"{r.root}: " + ", ".join(f"{s} {sum(c.values())} images" for s, c in r.counts.items())
          + f" in {len(r.classes)} classes; imbalance {r.imbalance:.1f}; unreadable "
          + ", ".join(f"{s} {len(v)}" for s, v in r.unreadable.items()) + f"; EXIF-rotated {r.rotated}")
    for kind, groups in (("exact duplicates", r.exact), ("near-duplicate clusters", r.near)):
        print(f"{kind}: " + ", ".join(f"{k.replace('_', ' ')} {len(v)}" for k, v in groups.items()))
    if r.leaked:
        print(f"warning: {r.leaked} test image(s) in val/ copy a training image: test accuracy on them is inflated")
    print(f"checked in {r.seconds:.1f} s; wrote " + ", ".join(str(p) for p in checked.files.values()))
    return 0


def cmd_models(args: argparse.Namespace, common: Common) -> int:
    from .models import model_names

    names = [n for n in model_names() if not args.grep or args.grep.lower() in n.lower()]
    if not names:
        raise CnnlabError(f"no model name contains {args.grep!r}: try a shorter word, or `cnnlab models` for all")
    print("\n".join(names))
    return 0


def cmd_evaluate(args: argparse.Namespace, common: Common) -> int:
    from .api import load

    evaluation = load(args.checkpoint).evaluate(args.data, top=args.top, out=args.out, seed=args.seed,
                                                **common.for_model())
    print(evaluation)
    print(f"wrote {evaluation.folder}/metrics.json, confusion.png, predictions.png, mistakes.csv "
          f"({evaluation['mistakes']} mistakes), top_losses.png, reliability.png")
    return 0


def cmd_predict(args: argparse.Namespace, common: Common) -> int:
    import json

    from .api import Run, load
    from .evaluate import expand_paths

    paths = expand_paths(args.images)
    if not paths:
        raise CnnlabError(f"no files in {', '.join(args.images)}: give image files or folders holding them")
    results, failed = [], 0
    model = load(args.checkpoint)
    predictions = (model.predict_iter(paths, top=args.top, device=args.device) if isinstance(model, Run)
                   else model.predict_iter(paths, top=args.top))  # an exported .onnx: onnxruntime on the CPU
    for r in predictions:
        if "error" in r:
            failed += 1
            print(f"cnnlab predict: {r['file']}: {r['error']}", file=sys.stderr)
        if args.json:
            results.append(r)
        elif "error" not in r:
            print(f"{r['file']}: " + ", ".join(f"{t['class']} {t['prob']:.1%}" for t in r["top"]), flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


def cmd_export(args: argparse.Namespace, common: Common) -> int:
    from .api import load

    path = load(args.checkpoint).export(args.format, args.out, device=common.device)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB): {args.format}, uint8 RGB input of any batch size, "
          "class names and preprocessing inside")
    return 0


def cmd_explain(args: argparse.Namespace, common: Common) -> int:
    from .api import load

    explanation = load(args.checkpoint).explain(args.data, neurons=args.neurons, per_neuron=args.per_neuron,
                                                out=args.out, seed=args.seed, **common.for_model())
    print("wrote " + ", ".join(str(p) for p in explanation.figures.values()))
    return 0


def cmd_sweep(args: argparse.Namespace, common: Common) -> int:
    from .api import sweep as run_the_sweep

    check_workers(args.workers)
    if args.workers > 1:
        code = spawn_sweep_workers(args, common)
        if code == 0 and args.verify:  # after every worker's trials, in this process
            from .api import SweepRun
            from .sweeps import load_sweep

            overrides = config_overrides(args)
            SweepRun(Path(args.sweeps_dir) / load_sweep(args.sweep_file).name, storage=args.storage).verify(
                args.verify, device=overrides.get("device"), cache_dir=overrides.get("cache_dir"),
                progress=common.progress)
        return code
    swept = run_the_sweep(args.sweep_file, count=args.count, storage=args.storage, sweeps_dir=args.sweeps_dir,
                          sampler_seed=args.sampler_seed, config=args.config, verify=args.verify, budget=args.budget,
                          progress=common.progress, log=print,
                          warn=lambda m: print(f"cnnlab sweep: {m}", file=sys.stderr), **config_overrides(args))
    print(sweep_line(swept))
    return 0


def cmd_sweep_worker(args: argparse.Namespace, common: Common) -> int:
    """One worker process of `launch_workers`: its job (sweep, base config, trials) is read from stdin, as data."""
    from .api import SweepRun
    from .sweeps import WorkerJob, parse_sweep
    from .sweeps.engine import Budget, run_sweep

    job = WorkerJob.from_json(sys.stdin.read())
    sweep = parse_sweep(job.sweep, job.sweep["name"])  # checked by the launcher, which warned once
    folder = Path(job.sweeps_dir) / sweep.name
    seconds = job.budget or sweep.budget
    budget = Budget(seconds, job.workers, 3 * job.verify) if seconds else None  # the launcher verifies, after
    result = run_sweep(sweep, job.base, folder, None, job.count, job.seed, progress=False, log=print, budget=budget)
    print(sweep_line(SweepRun(folder, result)))
    return 0


def sweep_line(swept: Any) -> str:
    """The line a sweep process ends with: how many trials it ran, how they ended, the best so far."""
    result, name = swept.result, swept.folder.name
    best = (f"best {result.metric} {result.best_value:.4f} (trial {result.best_trial})"
            if result.best_value is not None else "no complete trial")
    return (f"sweep {name}: {result.ran} trials in {result.seconds:.0f}s ({result.complete} complete, "
            f"{result.pruned} pruned, {result.failed} failed); {best}; report: cnnlab sweep-report {swept.folder}")


def check_workers(workers: int) -> None:
    cores = os.cpu_count() or 1
    if not 1 <= workers <= cores:  # each worker trains with cores/workers threads: more only cost memory
        raise ConfigError(f"--workers {workers}: this machine has {cores} cores; use 1 to {cores} worker "
                          "processes (more machines can join the same --storage)")


def spawn_sweep_workers(args: argparse.Namespace, common: Common) -> int:
    """`--workers N`: N processes share the sweep, each running --count trials (default: until it is done)."""
    from .budget import parse_duration
    from .models import check_config
    from .sweeps import launch_workers, load_sweep

    sweep = load_sweep(args.sweep_file)
    for warning in sweep.warnings:
        print(f"cnnlab sweep: warning: {warning}", file=sys.stderr)
    base = {**(load_yaml(args.config) if args.config else {}), **config_overrides(args)}
    if "data" in base:  # the same data wherever a worker runs from
        base["data"] = str(Path(base["data"]).resolve())
    check_config(make_config(base))  # refuse bad base flags before anything starts
    share = f"{args.count} trials each" if args.count else "sharing the trials until the sweep is done"
    print(f"sweep {sweep.name}: {args.workers} worker processes, {share}")
    return launch_workers(sweep, base, Path(args.sweeps_dir), args.workers, args.count, args.storage,
                          args.sampler_seed, common.bars, budget=parse_duration(args.budget) if args.budget else None,
                          verify=args.verify)


def cmd_sweep_report(args: argparse.Namespace, common: Common) -> int:
    from .api import SweepRun

    out = SweepRun(Path(args.folder), storage=args.storage).report()
    print(f"wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace, common: Common) -> int:
    from .api import compare

    written = compare(args.runs, args.out)
    print(written["markdown"], end="")
    print(f"wrote {written['table']} and {written['plot']}")
    return 0


def cmd_report(args: argparse.Namespace, common: Common) -> int:
    from .api import report

    index = report(args.paths, args.out, argv=["cnnlab", *sys.argv[1:]])
    print(f"wrote {index} ({index.stat().st_size / 1e6:.1f} MB, opens offline: file://{index.resolve()})")
    return 0


def cmd_assignment(args: argparse.Namespace, common: Common) -> int:
    from .whole_job import assignment

    check_workers(args.workers)
    index = assignment(args.data, args.out, quick=args.quick, sweep_file=args.sweep_file, trials=args.trials,
                       image_size=args.image_size, model=args.model, weights=args.weights, strategies=args.strategies,
                       workers=args.workers, verify=args.verify, budget=args.budget, **common.keywords(),
                       argv=["cnnlab", *sys.argv[1:]])
    print(f"the assignment's report: {index} (opens offline: file://{index.resolve()})")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace, Common], int], str]] = {
    "train": (cmd_train, "train a model (scratch CNN or fine-tuned torchvision model) on ROOT/train"),
    "lr-find": (cmd_lr_find, "the learning-rate range test: loss against a rising lr, a plot and a suggested lr"),
    "info": (cmd_info, "parameter count and FLOPs of a config"),
    "env": (cmd_env, "versions, device, precision, decoder and cache: what to paste into a question"),
    "demo-data": (cmd_demo_data, "write a small synthetic 10-class data set"),
    "download": (cmd_download, "download and unpack a data set (resumable, checksummed)"),
    "check": (cmd_check, "what is in a data folder: counts, imbalance, unreadable files, duplicates, leakage"),
    "models": (cmd_models, "list the model names --model accepts"),
    "evaluate": (cmd_evaluate, "test accuracy, per-class metrics, confusion matrix and prediction grid on ROOT/val"),
    "sweep-worker": (cmd_sweep_worker, ""),  # started by launch_workers, never by hand: not in --help
    "sweep": (cmd_sweep, "run a W&B-schema sweep file on the embedded Optuna engine"),
    "sweep-report": (cmd_sweep_report, "plots and tables of a sweep, offline"),
    "compare": (cmd_compare, "runs side by side: a table and a plot of validation accuracy"),
    "report": (cmd_report, "one offline HTML report of run, sweep, compare and check folders"),
    "assignment": (cmd_assignment, "the whole assignment (sweep, evaluate, explain, fine-tune, compare, report), resumable"),
    "predict": (cmd_predict, "top-k classes of image files"),
    "export": (cmd_export, "write a trained model as ONNX or TorchScript, class names and preprocessing inside"),
    "explain": (cmd_explain, "first-layer filters, guided back-propagation of last-conv neurons, Grad-CAM"),
}
