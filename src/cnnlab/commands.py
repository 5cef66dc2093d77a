"""What each `cnnlab` subcommand does, given its parsed arguments; `cli` builds the parser and dispatches here.
Heavy modules (torch, optuna, matplotlib) are imported inside each command, so `cnnlab --help` is instant."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable

from .config import FIELDS, Config, load_yaml, make_config, saved_config
from .errors import CnnlabError, ConfigError

RESUME_MAY_CHANGE = ("epochs", "early_stop", "device", "decode_workers", "cache_dir", "wandb", "wandb_project")


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars go to a terminal only: redirected to a file, a run writes one line per epoch instead."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


def checkpoint_path(path: str) -> Path:
    """A checkpoint file, or a run folder (its best.pt)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "best.pt").is_file():
            raise CnnlabError(f"{p} is a folder without best.pt: give a run folder (runs/<name>) or a checkpoint file")
        return p / "best.pt"
    return p


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config flags given on the command line."""
    return {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    sources = []
    if getattr(args, "config", None):
        sources.append(load_yaml(args.config))
    sources.append(config_overrides(args))
    return make_config(*sources)


def cmd_train(args: argparse.Namespace) -> int:
    from .train import fit

    if args.resume:
        run = Path(args.resume)
        if run.is_file():
            raise CnnlabError(f"--resume takes the run folder, not a file: cnnlab train --resume {run.parent}")
        saved = run / "config.yaml"
        if not saved.exists():
            raise CnnlabError(f"{run} is not a run folder (no config.yaml); expected runs/<name>")
        before = saved_config(load_yaml(saved))
        cfg = make_config(before.to_dict(), config_overrides(args), {"out": str(run.parent), "name": run.name})
        changed = [k for k in FIELDS if k not in RESUME_MAY_CHANGE + ("out", "name")
                   and getattr(cfg, k) != getattr(before, k)]
        if changed:
            k = changed[0]
            raise CnnlabError(f"--resume continues {run} as it was trained: {k}={getattr(cfg, k)!r} differs from its "
                              f"{getattr(before, k)!r}; only {', '.join(RESUME_MAY_CHANGE)} may change (for other "
                              f"settings start a new run with --name)")
        result = fit(cfg, resume=True, progress=show_progress(args))
    else:
        result = fit(config_from_args(args), progress=show_progress(args))
    print(f"best val_acc {result.best_val_acc:.4f} at epoch {result.best_epoch}; run folder {result.run_dir}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .data import list_classes
    from .models import create_model, measured_cost, smallcnn_cost

    cfg = config_from_args(args)
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


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .data.demo import make_demo_data

    root = make_demo_data(args.root, args.train_per_class, args.val_per_class, args.seed)
    print(f"wrote {root}/train and {root}/val: 10 classes, {args.train_per_class} + {args.val_per_class} images each")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .data.download import DATASETS, fetch_dataset

    if args.dataset not in DATASETS:
        raise CnnlabError(f"unknown data set {args.dataset!r}: expected one of {', '.join(DATASETS)}")
    root = fetch_dataset(args.dataset, args.dest, url=args.url, sha256=args.sha256)
    print(f"data ready: {root} (train with: cnnlab train --data {root})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import model_names

    names = [n for n in model_names() if not args.grep or args.grep.lower() in n.lower()]
    if not names:
        raise CnnlabError(f"no model name contains {args.grep!r}: try a shorter word, or `cnnlab models` for all")
    print("\n".join(names))
    return 0


def _device(name: str):
    from .hardware import resolve_device

    return resolve_device(name)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_checkpoint, format_metrics

    cache = args.cache_dir or Config().resolved_cache_dir()
    args.checkpoint = checkpoint_path(args.checkpoint)
    metrics = evaluate_checkpoint(args.checkpoint, args.data, _device(args.device), cache, args.out, args.top,
                                  args.seed, progress=show_progress(args))
    print(format_metrics(metrics))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    print(f"wrote {out}/metrics.json, confusion.png, predictions.png")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .evaluate import expand_paths, load_model, predict_files

    device = _device(args.device)
    paths = expand_paths(args.images)
    if not paths:
        raise CnnlabError(f"no files in {', '.join(args.images)}: give image files or folders holding them")
    results, failed = [], 0
    for r in predict_files(load_model(checkpoint_path(args.checkpoint), device), paths, device, args.top):
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


def cmd_explain(args: argparse.Namespace) -> int:
    from .data import ImageTransform
    from .evaluate import load_model, load_test_images
    from .explain import explain

    args.checkpoint = checkpoint_path(args.checkpoint)
    loaded = load_model(args.checkpoint, _device("cpu"))
    cache = args.cache_dir or Config().resolved_cache_dir()
    test = load_test_images(loaded, args.data, cache, progress=show_progress(args))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "explain"
    paths = explain(loaded.model, test, test.valid, ImageTransform(loaded.pre, loaded.cfg.channels_last), loaded.classes,
                    out, args.neurons, args.per_neuron, seed=args.seed)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .models import check_config
    from .sweep import load_sweep, make_storage, open_study, run_sweep, spawn_workers

    args.storage = args.storage or os.environ.get("CNNLAB_STORAGE")  # keeps a password out of `ps`
    cores = os.cpu_count() or 1
    if not 1 <= args.workers <= cores:  # each worker trains with cores/workers threads: more only cost memory
        raise ConfigError(f"--workers {args.workers}: this machine has {cores} cores; use 1 to {cores} worker "
                          "processes (more machines can join the same --storage)")
    sweep = load_sweep(args.sweep_file)
    for warning in sweep.warnings:
        print(f"cnnlab sweep: warning: {warning}", file=sys.stderr)
    base = {**(load_yaml(args.config) if args.config else {}), **config_overrides(args)}
    if "data" in base:  # the same data wherever the command is run from
        base["data"] = str(Path(base["data"]).resolve())
    config = check_config(make_config(base))  # refuse bad base flags before anything starts
    folder = Path(args.out_root) / sweep.name
    if args.workers > 1:
        folder.mkdir(parents=True, exist_ok=True)
        open_study(sweep, make_storage(args.storage, folder), args.seed, config.epochs, folder,  # created once, then
                   show_progress(args))  # shared
        argv = [a for a in (sys.argv[1:] if args.argv is None else args.argv)]
        cleaned, skip = [], False
        for a in argv:  # drop --workers N / --workers=N: each child runs one process's worth
            if skip:
                skip = False
                continue
            if a == "--workers":
                skip = True
                continue
            if not a.startswith("--workers="):
                cleaned.append(a)
        print(f"sweep {sweep.name}: {args.workers} worker processes, {args.count or 'all'} trials each")
        return spawn_workers(cleaned, args.workers)
    result = run_sweep(sweep, base, folder, args.storage, args.count, args.seed, progress=show_progress(args))
    best = (f"best {sweep.metric} {result.best_value:.4f} (trial {result.best_trial})"
            if result.best_value is not None else "no complete trial")
    print(f"sweep {sweep.name}: {result.ran} trials in {result.seconds:.0f}s ({result.complete} complete, "
          f"{result.pruned} pruned, {result.failed} failed); {best}; report: cnnlab sweep-report {folder}")
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from .sweep.report import write_report

    out = write_report(Path(args.folder), args.storage or os.environ.get("CNNLAB_STORAGE"))
    print(f"wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare

    table, plot = compare([Path(r) for r in args.runs], Path(args.out))
    print(table.read_text(), end="")
    print(f"wrote {table} and {plot}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "train": (cmd_train, "train a model (scratch CNN or fine-tuned torchvision model) on ROOT/train"),
    "info": (cmd_info, "parameter count and FLOPs of a config"),
    "demo-data": (cmd_demo_data, "write a small synthetic 10-class data set"),
    "download": (cmd_download, "download and unpack a data set (resumable, checksummed)"),
    "models": (cmd_models, "list the model names --model accepts"),
    "evaluate": (cmd_evaluate, "test accuracy, per-class metrics, confusion matrix and prediction grid on ROOT/val"),
    "sweep": (cmd_sweep, "run a W&B-schema sweep file on the embedded Optuna engine"),
    "sweep-report": (cmd_sweep_report, "plots and tables of a sweep, offline"),
    "compare": (cmd_compare, "runs side by side: a table and a plot of validation accuracy"),
    "predict": (cmd_predict, "top-k classes of image files"),
    "explain": (cmd_explain, "first-layer filters, guided back-propagation of last-conv neurons, Grad-CAM"),
}
