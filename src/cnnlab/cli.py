"""The `cnnlab` command. Every config field is a flag, accepted as `--key value` and `--key=value`
(booleans also as `--key`, `--key=True`, `--key false`), so a W&B agent can drive `cnnlab train`."""

from __future__ import annotations

import argparse
import difflib
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import FIELDS, Config, describe, load_yaml, make_config
from .errors import CnnlabError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("config (YAML keys and sweep parameters have the same names)")
    for name, f in FIELDS.items():
        default = f.default
        help_text = f"{f.metadata['help']} [{describe(name)}; default {default!r}]".replace("%", "%%")
        if isinstance(default, bool) or "true" in f.metadata.get("aliases", {}):  # `--compile` alone: true
            metavar = "BOOL" if isinstance(default, bool) else "MODE"
            g.add_argument(f"--{name}", nargs="?", const="true", default=None, metavar=metavar, help=help_text)
        else:
            g.add_argument(f"--{name}", default=None, metavar=type(default).__name__.upper(), help=help_text)


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k in FIELDS and v is not None}


def config_from_args(args: argparse.Namespace) -> Config:
    sources = []
    if getattr(args, "config", None):
        sources.append(load_yaml(args.config))
    sources.append(_overrides(args))
    return make_config(*sources)


# ---- commands ------------------------------------------------------------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from .train import fit

    if args.resume:
        run = Path(args.resume)
        saved = run / "config.yaml"
        if not saved.exists():
            raise CnnlabError(f"{run} is not a run folder (no config.yaml); expected runs/<name>")
        cfg = make_config(load_yaml(saved), _overrides(args), {"out": str(run.parent), "name": run.name})
        result = fit(cfg, resume=True, progress=not args.quiet)
    else:
        result = fit(config_from_args(args), progress=not args.quiet)
    print(f"best val_acc {result.best_val_acc:.4f} at epoch {result.best_epoch}; run folder {result.run_dir}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .models import create_model, measured_cost, smallcnn_cost

    cfg = config_from_args(args)
    n = args.num_classes
    model = create_model(cfg, n)
    size = getattr(model, "cnnlab_preprocess", None)
    size = size.image_size if size else cfg.image_size
    measured = measured_cost(model, size)
    print(f"model {cfg.model}, {n} classes, {size}x{size} input")
    if cfg.model == "smallcnn":
        formula = smallcnn_cost(cfg, n)
        print(f"filters {cfg.filter_counts()}, kernels {cfg.kernel_sizes()}, dense {cfg.dense_units}, "
              f"batch_norm {cfg.batch_norm}")
        print(f"parameters: {formula.params:,} (formula)  {measured.params:,} (sum of p.numel())")
        print(f"forward FLOPs per image: {formula.flops:,} = {formula.gflops:.3f} GFLOP (formula)  "
              f"{measured.flops:,} (torch.utils.flop_counter)")
    else:
        print(f"parameters: {measured.params:,}")
        print(f"forward FLOPs per image: {measured.flops:,} = {measured.gflops:.3f} GFLOP (torch.utils.flop_counter)")
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .demo import make_demo_data

    root = make_demo_data(args.root, args.train_per_class, args.val_per_class, args.seed)
    print(f"wrote {root}/train and {root}/val: 10 classes, {args.train_per_class} + {args.val_per_class} images each")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from .download import DATASETS, fetch_dataset

    if args.dataset not in DATASETS:
        raise CnnlabError(f"unknown data set {args.dataset!r}: expected one of {', '.join(DATASETS)}")
    root = fetch_dataset(args.dataset, args.dest, url=args.url, sha256=args.sha256)
    print(f"data ready: {root} (train with: cnnlab train --data {root})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models import model_names

    print("\n".join(model_names()))
    return 0


def _device(name: str):
    from .hardware import resolve_device

    return resolve_device(name)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import Config
    from .evaluate import evaluate_checkpoint, format_metrics

    cache = args.cache_dir or Config().resolved_cache_dir()
    metrics = evaluate_checkpoint(args.checkpoint, args.data, _device(args.device), cache, args.out, args.top,
                                  args.seed, progress=not args.quiet)
    print(format_metrics(metrics))
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "eval"
    print(f"wrote {out}/metrics.json, confusion.png, predictions.png")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import json

    from .evaluate import load_model, predict_files

    device = _device(args.device)
    results = predict_files(load_model(args.checkpoint, device), args.images, device, args.top)
    if args.json:
        print(json.dumps(results, indent=2))
    for r in results:
        if "error" in r:
            print(f"cnnlab predict: {r['file']}: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(f"{r['file']}: " + ", ".join(f"{t['class']} {t['prob']:.1%}" for t in r["top"]))
    return 1 if any("error" in r for r in results) else 0


def cmd_explain(args: argparse.Namespace) -> int:
    from .config import Config
    from .data import BatchPrep
    from .evaluate import load_model, load_test_images
    from .explain import explain

    loaded = load_model(args.checkpoint, _device("cpu"))
    cache = args.cache_dir or Config().resolved_cache_dir()
    test = load_test_images(loaded, args.data, cache, progress=not args.quiet)
    out = Path(args.out) if args.out else Path(args.checkpoint).parent / "explain"
    paths = explain(loaded.model, test, test.valid, BatchPrep(loaded.pre, loaded.cfg.channels_last), loaded.classes,
                    out, args.neurons, args.per_neuron, seed=args.seed)
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import load_sweep, make_storage, open_study, run_sweep, spawn_workers

    sweep = load_sweep(args.sweep_file)
    base = {**(load_yaml(args.config) if args.config else {}), **_overrides(args)}
    config = make_config(base)  # refuse bad base flags before anything starts
    folder = Path(args.out_root) / sweep.name
    if args.workers > 1:
        folder.mkdir(parents=True, exist_ok=True)
        open_study(sweep, make_storage(args.storage, folder), args.seed, config.epochs)  # created once, then shared
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
    result = run_sweep(sweep, base, folder, args.storage, args.count, args.seed, progress=not args.quiet)
    best = (f"best {sweep.metric} {result.best_value:.4f} (trial {result.best_trial})"
            if result.best_value is not None else "no complete trial")
    print(f"sweep {sweep.name}: {result.ran} trials in {result.seconds:.0f}s ({result.complete} complete, "
          f"{result.pruned} pruned, {result.failed} failed); {best}; report: cnnlab sweep-report {folder}")
    return 0


def cmd_sweep_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(Path(args.folder), args.storage)
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnnlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help=COMMANDS["train"][1], allow_abbrev=False)
    p.add_argument("--config", help="YAML file of config keys; flags given here win")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(p)

    p = sub.add_parser("info", help=COMMANDS["info"][1], allow_abbrev=False)
    p.add_argument("--config")
    p.add_argument("--num_classes", type=int, default=10)
    _add_config_flags(p)

    p = sub.add_parser("demo-data", help=COMMANDS["demo-data"][1], allow_abbrev=False)
    p.add_argument("root", nargs="?", default="data/demo")
    p.add_argument("--train_per_class", type=int, default=100)
    p.add_argument("--val_per_class", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("download", help=COMMANDS["download"][1], allow_abbrev=False)
    p.add_argument("dataset", help="inaturalist-12k")
    p.add_argument("dest", nargs="?", default="data")
    p.add_argument("--url", help="download from here instead of the data set's usual address")
    p.add_argument("--sha256", help="expected SHA-256 of the archive")

    sub.add_parser("models", help=COMMANDS["models"][1])

    p = sub.add_parser("sweep", help=COMMANDS["sweep"][1], allow_abbrev=False)
    p.add_argument("sweep_file", help="a W&B sweep YAML (method, metric, parameters, early_terminate, run_cap)")
    p.add_argument("--count", type=int, help="trials this process runs (default: until run_cap or the grid is done)")
    p.add_argument("--workers", type=int, default=1, help="processes on this machine sharing the study")
    p.add_argument("--storage", help="Optuna RDB URL shared by many machines (default: a journal file in the sweep folder)")
    p.add_argument("--sweeps_dir", dest="out_root", default="sweeps", help="where sweep folders go")
    p.add_argument("--sampler_seed", dest="seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--config", help="YAML of base config keys for every trial")
    p.add_argument("--quiet", action="store_true")
    _add_config_flags(p)

    p = sub.add_parser("sweep-report", help=COMMANDS["sweep-report"][1], allow_abbrev=False)
    p.add_argument("folder", help="the sweep folder, sweeps/<name>")
    p.add_argument("--storage", help="the RDB URL the sweep used, if it used one")

    p = sub.add_parser("compare", help=COMMANDS["compare"][1], allow_abbrev=False)
    p.add_argument("runs", nargs="+", help="run folders")
    p.add_argument("--out", default="compare", help="folder for compare.md and compare.png")

    p = sub.add_parser("evaluate", help=COMMANDS["evaluate"][1], allow_abbrev=False)
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True, help="data root; its val/ folder is the test set")
    p.add_argument("--top", type=int, default=3, help="k of the top-k accuracy")
    p.add_argument("--out", help="output folder (default: next to the checkpoint, eval/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prediction grid's sample")
    p.add_argument("--device", default="auto")
    p.add_argument("--cache_dir", default="")
    p.add_argument("--quiet", action="store_true")

    p = sub.add_parser("predict", help=COMMANDS["predict"][1], allow_abbrev=False)
    p.add_argument("checkpoint")
    p.add_argument("images", nargs="+")
    p.add_argument("--top", type=int, default=3)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", default="auto")

    p = sub.add_parser("explain", help=COMMANDS["explain"][1], allow_abbrev=False)
    p.add_argument("checkpoint")
    p.add_argument("--data", required=True)
    p.add_argument("--neurons", type=int, default=10, help="last-conv channels to show")
    p.add_argument("--per_neuron", type=int, default=3, help="top-exciting test images per neuron")
    p.add_argument("--out", help="output folder (default: next to the checkpoint, explain/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default="")
    p.add_argument("--quiet", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = None if argv is None else list(argv)
    threads = os.environ.get("CNNLAB_THREADS")
    if threads:  # set by a parent that runs several sweep processes on one machine
        import torch

        torch.set_num_threads(int(threads))
    if unknown:
        flag = unknown[0].split("=")[0]
        close = difflib.get_close_matches(flag.lstrip("-"), list(FIELDS), n=1)
        hint = f"; did you mean --{close[0]}?" if close else f"; see cnnlab {args.command} --help"
        print(f"cnnlab {args.command}: error: unknown option {flag}{hint}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[args.command][0](args)
    except CnnlabError as e:
        print(f"cnnlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ncnnlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
