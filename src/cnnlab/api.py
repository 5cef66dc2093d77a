"""cnnlab from Python: the functions and objects a notebook or a script uses, and the one implementation the
`cnnlab` command calls (its subcommands are thin wrappers that parse flags and print).

    import cnnlab
    run = cnnlab.train(data="data/demo", image_size=64, epochs=15)   # keywords are Config fields
    run.history                      # per-epoch metrics, a list of dicts
    run.evaluate()                   # the test folder (data/val): accuracy with its CI, per class, figures
    run.predict(["photo.jpg", pil_image, array], top=3)
    run.explain()                    # first-layer filters, guided back-propagation, Grad-CAM
    run = cnnlab.load("runs/<name>")
    study = cnnlab.sweep("sweeps/partA.yaml", data="data/demo", count=20); study.best; study.report()
    cnnlab.compare(["runs/a", "runs/b"])

Bad keywords raise `cnnlab.ConfigError` (and bad data `cnnlab.DataError`), the same checks and messages as the CLI.
Progress bars render in Jupyter (tqdm.auto); every function takes `log=` (None: silent) for its messages.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from .arguments import optional_whole_number, path_like, real_number, whole_number
from .arguments import paths as path_list
from .config import FIELDS, Config, load_yaml, make_config, saved_config
from .errors import CnnlabError, ConfigError, DataError, quote
from .options import progress_bars, silent
from .run_folder import BEST, CONFIG, EVAL, EXPLAIN, RESUME_MAY_CHANGE, RunFolder, inside

__all__ = ["train", "load", "sweep", "compare", "check", "lr_find", "report",
           "Run", "Evaluation", "Explanation", "SweepRun", "DataCheck"]

Log = Callable[[str], None] | None


def make_run_config(config: str | Path | Config | dict[str, Any] | None = None, **overrides: Any) -> Config:
    """Defaults, then `config` (a YAML file, a dict or a Config), then the keywords: each checked, as the CLI does."""
    sources: list[dict[str, Any]] = []
    if config is not None and not isinstance(config, str | Path | Config | dict):
        raise ConfigError(f"config={quote(config)}: expected a YAML file's path, a dict of Config fields or a "
                          "cnnlab.Config (keywords such as epochs=7 go after it)")
    if isinstance(config, Config):
        sources.append(config.to_dict())
    elif isinstance(config, dict):
        sources.append(config)
    elif config is not None:
        sources.append(load_yaml(config))
    sources.append(overrides)
    cfg = make_config(*sources)
    if cfg.teacher and not any("epochs" in source for source in sources):
        # a student's default schedule is the patient one, sized on its training set once it is read (epochs 0)
        from dataclasses import replace

        cfg = replace(cfg, epochs=0)
    return cfg


def resume_config(folder: str | Path, **overrides: Any) -> Config:
    """The config a run folder was trained with, plus the few settings a resumed run may change."""
    run = Path(folder)
    if run.is_file():
        raise CnnlabError(f"--resume takes the run folder, not a file: cnnlab train --resume {run.parent}")
    saved = run / CONFIG
    if not saved.exists():
        raise CnnlabError(f"{run} is not a run folder (no config.yaml); expected runs/<name>")
    before = saved_config(load_yaml(saved))
    cfg = make_config(before.to_dict(), overrides, {"out": str(run.parent), "name": run.name})
    changed = [k for k in FIELDS if k not in RESUME_MAY_CHANGE + ("out", "name") and getattr(cfg, k) != getattr(before, k)]
    if changed:
        k = changed[0]
        raise CnnlabError(f"--resume continues {run} as it was trained: {k}={getattr(cfg, k)!r} differs from its "
                          f"{getattr(before, k)!r}; only {', '.join(RESUME_MAY_CHANGE)} may change (for other "
                          f"settings start a new run with --name)")
    return cfg


def train(config: str | Path | Config | dict[str, Any] | None = None, *, resume: str | Path | None = None,
          progress: bool | None = None, log: Log = print, callbacks: Sequence[Any] = (),
          raise_interrupt: bool = False, **overrides: Any) -> Run:
    """Train the model a config describes (scratch CNN or fine-tuned) on `data`/train and return its run folder.

    `config`: a YAML file, a dict or a `Config`; keywords (`epochs=7`, `activation="gelu"`, any Config field) win.
    `resume`: a run folder to continue from its last.pt (then only epochs, early_stop, device, ... may change).
    Ctrl-C, or a notebook's stop button, ends training after saving what the last finished epoch wrote and
    returns the run with `status` 'interrupted' (resumable); `raise_interrupt=True` re-raises instead (the CLI).
    """
    log = log or silent
    cfg = resume_config(resume, **overrides) if resume is not None else make_run_config(config, **overrides)
    from .trainer import Callback  # after the config's checks: a refused value never waits for torch
    from .training import fit

    class Where(Callback):  # the run folder, known once fit has opened it
        folder: Path | None = None

        def on_fit_start(self, run: Any) -> None:
            self.folder = run.run_dir

    try:
        result = fit(cfg, [where := Where(), *callbacks], resume=resume is not None, progress=progress_bars(progress),
                     log=log)
    except KeyboardInterrupt:
        folder = where.folder
        if raise_interrupt or folder is None:  # before the first epoch began there is no run to return
            raise
        epochs = len(RunFolder(folder).history)
        log(f"interrupted: {folder} holds {epochs} finished epoch(s)" + (
            f"; continue with cnnlab.train(resume={str(folder)!r})" if RunFolder(folder).resumable else ""))
        return Run(folder, status="interrupted")
    return Run(result.run_dir, status=result.status)


def load(path: str | Path) -> Run | Any:
    """A run folder (runs/<name>: its best.pt), or a checkpoint file (best.pt, last.pt) inside one; an exported
    .onnx file gives an `OnnxClassifier` (onnxruntime) with the same `predict`."""
    p = Path(path)
    if p.suffix == ".onnx":
        from .export import OnnxClassifier

        return OnnxClassifier(p)
    if p.is_dir():
        if not (p / BEST).is_file():
            raise CnnlabError(f"{p} is a folder without best.pt: give a run folder (runs/<name>) or a checkpoint file")
        return Run(p)
    if not p.is_file():
        raise CnnlabError(f"checkpoint {p} not found: expected runs/<name>/best.pt or last.pt, or the run folder")
    return Run(p.parent, checkpoint=p)


def _png_html(path: Path, width: int = 640) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" style="max-width:{width}px;width:100%">'


@dataclass
class Evaluation:
    """What `Run.evaluate` measured on the test folder; `metrics` is what metrics.json holds."""

    metrics: dict[str, Any]
    folder: Path

    @property
    def accuracy(self) -> float:
        return float(self.metrics["accuracy"])

    @property
    def figures(self) -> dict[str, Path]:
        return {k: self.folder / f"{k}.png" for k in ("confusion", "predictions", "top_losses", "reliability")
                if (self.folder / f"{k}.png").exists()}

    def __getitem__(self, key: str) -> Any:
        return self.metrics[key]

    def __str__(self) -> str:
        from .evaluate import format_metrics

        return format_metrics(self.metrics)

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(str(self))}</pre>" + "".join(_png_html(p) for p in self.figures.values())


@dataclass
class Explanation:
    """The figures `Run.explain` wrote: filters, guided back-propagation, Grad-CAM."""

    figures: dict[str, Path]

    def __getitem__(self, key: str) -> Path:
        return self.figures[key]

    def _repr_html_(self) -> str:
        return "".join(f"<h4>{html.escape(k)}</h4>" + _png_html(p) for k, p in self.figures.items())


@dataclass
class Run:
    """A run folder: what training wrote (config, metrics, checkpoints) and what can be done with the result."""

    folder: Path
    checkpoint: Path | None = None  # default: folder/best.pt
    status: str | None = None  # completed | early_stopped | stopped | interrupted, when this process trained it
    _model: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)

    @property
    def files(self) -> RunFolder:
        """The folder as written: every rule about a run (its best epoch, kind, stale evaluation) is read there."""
        return RunFolder(self.folder)

    @property
    def best_checkpoint(self) -> Path:
        return Path(self.checkpoint) if self.checkpoint else self.folder / BEST

    @property
    def config(self) -> Config:
        return self.files.config

    @property
    def history(self) -> list[dict[str, Any]]:
        """One dict per finished epoch: epoch, train_loss, train_acc, val_loss, val_acc, lr, epoch_time, ..."""
        return self.files.history

    @property
    def summary(self) -> dict[str, Any]:
        return self.files.summary

    @property
    def best_val_acc(self) -> float | None:
        """Of the epoch best.pt holds (training's rule: the best accuracy, ties broken by the lower loss)."""
        return self.files.best_val_acc

    @property
    def best_epoch(self) -> int | None:
        return self.files.best_epoch

    def _loaded(self, device: str) -> tuple[Any, Any]:
        """(the checkpoint's model, its device), loaded once per device and kept for later predictions."""
        from .evaluate import load_model
        from .hardware import resolve_device

        where = resolve_device(device)
        if self._model is None or self._model[1] != where:
            self._model = (load_model(self.best_checkpoint, where), where)
        return self._model

    def evaluate(self, data: str | Path | None = None, *, top: int = 3, out: str | Path | None = None,
                 device: str = "auto", cache_dir: str | Path | None = None, seed: int = 0,
                 progress: bool | None = None, log: Log = print) -> Evaluation:
        """The test folder `data`/val (default: the data this run trained on), once: accuracy with its 95% CI,
        top-k, per-class precision/recall/F1 and the confusion matrix, written to metrics.json with
        confusion.png and predictions.png (the 10x3 grid) in `out` (default: the run folder's eval/)."""
        from .evaluate import evaluate_checkpoint
        from .hardware import resolve_device

        whole_number("top", top, 1)
        whole_number("seed", seed)
        data = data if data is not None else self._own_data()
        out_dir = Path(out) if out else self.best_checkpoint.parent / EVAL
        metrics = evaluate_checkpoint(self.best_checkpoint, data, resolve_device(device), _cache(cache_dir), out_dir,
                                      top, seed, progress=progress_bars(progress), log=log or silent)
        if self._of_best():  # to the W&B run its training logged to, where there is one
            from .tracking import log_evaluation

            log_evaluation(self.files, metrics, out_dir, log or silent)
        return Evaluation(metrics, out_dir)

    def _own_data(self) -> str:
        """The data root this run trained on, where `evaluate` and `explain` are given none; refused in one line
        where its test folder is not here (the run was moved, or its data)."""
        root = self.config.data
        if not (Path(root) / "val").is_dir():
            raise DataError(f"{root}/val, the test folder of the data this run trained on, is not here: give the test "
                            "data with --data ROOT (Python: data=ROOT)")
        return root

    def _of_best(self) -> bool:
        """Whether this Run stands for its folder's best.pt (not another checkpoint file loaded from it)."""
        return self.best_checkpoint.resolve() == (self.folder / BEST).resolve()

    def predict_iter(self, images: Iterable[Any], *, top: int = 3, device: str = "auto", batch: int = 64
                     ) -> Iterator[dict[str, Any]]:
        """Top-k classes of each image, in order, `batch` at a time: file paths (any format PIL reads), PIL images
        or (H, W, 3) uint8 arrays; an unreadable one gets an `error` entry and the others are still predicted."""
        from .evaluate import predict_files

        whole_number("top", top, 1)  # top=0 would answer [] for every image, top=-1 crash in torch.topk
        whole_number("batch", batch, 1)
        loaded, where = self._loaded(device)
        yield from predict_files(loaded, list(images), where, top, batch)

    def predict(self, images: Any, *, top: int = 3, device: str = "auto") -> list[dict[str, Any]]:
        """`predict_iter` as a list; one image (a path, a PIL image or an array) may be given alone."""
        from .evaluate import as_image_list

        whole_number("top", top, 1)  # checked here too: predict_iter is a generator, which checks on first use
        return list(self.predict_iter(as_image_list(images), top=top, device=device))

    def explain(self, data: str | Path | None = None, *, neurons: int = 10, per_neuron: int = 3,
                out: str | Path | None = None, seed: int = 0, device: str = "auto", cache_dir: str | Path | None = None,
                progress: bool | None = None, log: Log = print) -> Explanation:
        """filters.png (first-layer filters), guided_backprop.png (`neurons` channels of the last conv layer, each
        on its `per_neuron` most exciting test images) and gradcam.png, in `out` (default: explain/), computed on
        `device`."""
        from .data import ImageTransform
        from .evaluate import load_model, load_test_images
        from .explain import explain
        from .hardware import resolve_device

        whole_number("neurons", neurons, 1)
        whole_number("per_neuron", per_neuron, 1)
        whole_number("seed", seed)
        data = data if data is not None else self._own_data()
        where = resolve_device(device)
        loaded = load_model(self.best_checkpoint, where)
        test = load_test_images(loaded, data, _cache(cache_dir), progress=progress_bars(progress))
        out_dir = Path(out) if out else self.best_checkpoint.parent / EXPLAIN
        paths = explain(loaded.model, test, test.valid, ImageTransform(loaded.pre, loaded.cfg.channels_last),
                        loaded.classes, out_dir, neurons, per_neuron, seed=seed, log=log or silent, device=where)
        if self._of_best():
            from .tracking import log_explanation

            log_explanation(self.files, paths, log or silent)
        return Explanation(paths)

    def export(self, format: str = "onnx", out: str | Path | None = None, *, device: str = "auto",
               log: Log = print) -> Path:
        """The trained model as a file that runs without cnnlab: ONNX (onnxruntime, dynamic batch) or TorchScript,
        with the class names and preprocessing inside; see cnnlab.export. Default: model.onnx in the run folder.
        The file is checked against the checkpoint in PyTorch on `device` (`export.check_parity`): its logits on
        seeded random images must agree to rounding, or the export is refused."""
        from .export import check_parity, export_model
        from .hardware import resolve_device

        where = resolve_device(device)
        path = export_model(self.best_checkpoint, out, format)
        difference = check_parity(path, self.best_checkpoint, where)
        (log or silent)(f"parity: {path.name}'s logits agree with PyTorch's on {where} to {difference:.1g}")
        if self._of_best():  # the exported model joins best.pt among the W&B run's model artifacts
            from .tracking import log_export

            log_export(self.files, path, format, log or silent)
        return path

    def plot(self, key: str = "val_acc") -> Any:
        """A matplotlib Figure of `key` (val_acc, val_loss, train_loss, ...) per epoch."""
        from .visualise import curves_figure

        return curves_figure({self.folder.name: self.history}, key)

    def _repr_html_(self) -> str:
        history, cfg = self.history, self.config
        rows = "".join(f"<tr><td>{r['epoch']}</td><td>{r['train_loss']:.4f}</td><td>{r['val_loss']:.4f}</td>"
                       f"<td>{r['val_acc']:.4f}</td></tr>" for r in history)
        best = f"best val_acc {self.best_val_acc:.4f} at epoch {self.best_epoch}" if history else "no finished epoch"
        knobs = ", ".join(f"{k}={getattr(cfg, k)}" for k in ("model", "image_size", "epochs", "lr", "batch_size"))
        return (f"<b>{html.escape(str(self.folder))}</b> ({html.escape(self.status or 'on disk')}): {best}<br>"
                f"<small>{html.escape(knobs)}</small><table><tr><th>epoch</th><th>train_loss</th><th>val_loss</th>"
                f"<th>val_acc</th></tr>{rows}</table>")


def _cache(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir else Config().resolved_cache_dir()


@dataclass
class SweepRun:
    """A sweep folder (sweeps/<name>) and its study: trials, the best one as a Run, the report."""

    folder: Path
    result: Any = None  # the SweepResult of the trials this process ran, when it ran some
    storage: str | None = None

    def _study(self) -> Any:
        from .sweeps.report import load_study

        return load_study(self.folder, self.storage)

    @property
    def trials(self) -> list[dict[str, Any]]:
        """Every trial: number, state, value (its metric at its best epoch), config values, run folder."""
        return [{"number": t.number, "state": t.state.name.lower(), "value": t.value,
                 "config": t.user_attrs.get("config", {}), "run_dir": str(inside(self.folder, t.user_attrs.get("run_dir", ""))),
                 "error": t.user_attrs.get("error")} for t in self._study().get_trials(deepcopy=False)]

    @property
    def verification(self) -> dict[str, Any] | None:
        """What `verify` found (verify.json): each of the top configurations' values over new seeds, the winner, the
        tests against it, and the model chosen for the test folder; None before any verification."""
        path = self.folder / "verify.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def verified(self) -> Run:
        """The verified winner's model (chosen by validation only), or the search's best where nothing was verified."""
        found = self.verification
        return Run(inside(self.folder, found["model"])) if found else self.best

    def verify(self, k: int = 3, *, seeds: int = 3, device: str | None = None, cache_dir: str | Path | None = None,
               progress: bool | None = None, log: Log = print) -> dict[str, Any]:
        """Train the top `k` configurations again with `seeds` new seeds each; the winner is the best mean, tested
        against each runner-up (see cnnlab.sweeps.verify). Resumes where it was cut; returns what verify.json holds."""
        from .sweeps.verify import verify_sweep

        whole_number("k", k, 1)
        whole_number("seeds", seeds, 2)
        machine = {key: value for key, value in (("device", device), ("cache_dir", str(cache_dir) if cache_dir else None))
                   if value and value != "auto"}
        return verify_sweep(self.folder, k, seeds, self.storage, machine, progress_bars(progress), log or silent)

    @property
    def best(self) -> Run:
        try:
            best = self._study().best_trial
        except ValueError:
            raise CnnlabError(f"{self.folder}: no complete trial yet") from None
        return Run(inside(self.folder, best.user_attrs["run_dir"]))

    def report(self) -> Path:
        """The offline report in the sweep folder's report/: figures, tables, best.yaml and index.html (the page
        `cnnlab report` writes: interactive parallel coordinates, observations, the best trial)."""
        from .reporting import write_report
        from .sweeps.report import write_sweep_figures

        return write_report([self.folder], write_sweep_figures(self.folder, self.storage), storage=self.storage)


def sweep(sweep_file: str | Path | dict[str, Any], *, count: int | None = None, storage: str | None = None,
          sweeps_dir: str | Path = "sweeps", sampler_seed: int = 0, config: str | Path | dict[str, Any] | None = None,
          verify: int = 0, budget: str | float | None = None, progress: bool | None = None, log: Log = print,
          warn: Log = None, **overrides: Any) -> SweepRun:
    """Run a Weights & Biases sweep file on the embedded Optuna engine in this process: `count` trials (None:
    until run_cap or the grid is done). Keywords are base config values for every trial (data=..., epochs=...).
    Running it again continues the sweep; other processes and machines join with the same file and storage.
    `verify` K > 0: then the top K configurations are trained again with 3 seeds each (`SweepRun.verify`).
    `budget` ("90s", "20m", "2h", or seconds; default: the sweep file's `budget`): the whole sweep, its
    verification included, planned to end by then (docs/budget.md); a rerun goes on with the time that remains."""
    from .sweeps.schema import load_sweep, parse_sweep

    optional_whole_number("count", count, 1)  # None: until run_cap or the grid is done
    whole_number("sampler_seed", sampler_seed)
    whole_number("verify", verify)
    from .budget import parse_duration

    asked = parse_duration(budget) if budget is not None else None  # a bad duration refused before anything
    log = log or silent
    warn = warn or log
    parsed = parse_sweep(sweep_file, sweep_file.get("name") or "sweep") if isinstance(sweep_file, dict) else \
        load_sweep(path_like("sweep_file", sweep_file))
    for warning in parsed.warnings:
        warn(f"warning: {warning}")
    base = {**(load_yaml(config) if isinstance(config, (str, Path)) else dict(config or {})), **overrides}
    if "data" in base:  # the same data wherever the command is run from
        base["data"] = str(Path(base["data"]).resolve())
    base_config = make_config(base)  # refuse bad base values before anything starts (the model's rules: torch)
    from .models import check_config
    from .sweeps.engine import Budget, run_sweep

    check_config(base_config)
    folder = Path(sweeps_dir) / parsed.name
    seconds = asked or parsed.budget
    planned = Budget(seconds, 1, 3 * verify) if seconds else None
    result = run_sweep(parsed, base, folder, storage, count, sampler_seed, progress=progress_bars(progress), log=log,
                       budget=planned)
    swept = SweepRun(folder, result, storage)
    if verify:
        swept.verify(verify, device=base.get("device"), cache_dir=base.get("cache_dir"), progress=progress, log=log)
    return swept


def compare(runs: Sequence[str | Path | Run], out: str | Path = "compare") -> dict[str, Any]:
    """Runs side by side: compare.md (strategy, trainable parameters, epochs, times, best validation and test
    accuracy) and compare.png (validation accuracy per epoch); returns their paths and the table's text."""
    from .comparison import compare as write_comparison

    if isinstance(runs, str | Path | Run) or not isinstance(runs, Sequence) or not runs:
        raise ConfigError(f"runs={quote(runs)}: expected a list of runs (cnnlab.Run objects or run folders)")
    table, plot = write_comparison([r.folder if isinstance(r, Run) else path_like("runs", r) for r in runs],
                                   path_like("out", out))
    return {"table": table, "plot": plot, "markdown": table.read_text()}


@dataclass
class DataCheck:
    """What `check` found in a data folder (`report`, a data.check.DataReport) and the files it wrote."""

    report: Any
    files: dict[str, Path]

    def __str__(self) -> str:
        return self.files["markdown"].read_text()

    def _repr_html_(self) -> str:
        return f"<pre>{html.escape(str(self))}</pre>" + _png_html(self.files["counts"]) + _png_html(self.files["sizes"])


def check(root: str | Path, *, out: str | Path | None = None, cache_dir: str | Path | None = None,
          progress: bool | None = None, log: Log = print) -> DataCheck:
    """What is in ROOT/train and ROOT/val: counts per class, imbalance, unreadable files, EXIF rotations, colour
    modes, sizes, exact and near-duplicates within and across the splits (leakage). Writes check.json, check.md,
    counts.png and sizes.png to `out` (default: check/<the folder's name>)."""
    from .data.check import check_data, write_check

    report = check_data(path_like("root", root), _cache(cache_dir), progress=progress_bars(progress), log=log or silent)
    out_dir = Path(out) if out else Path("check") / Path(root).resolve().name
    return DataCheck(report, write_check(report, out_dir))


def lr_find(config: str | Path | Config | dict[str, Any] | None = None, *, start: float = 1e-6, end: float = 1.0,
            steps: int = 200, progress: bool | None = None, log: Log = print, **overrides: Any) -> Any:
    """The learning-rate range test on a config (keywords as for `train`): loss against an exponentially rising
    learning rate over `steps` steps, a plot and a suggested lr (half the lr of the lowest smoothed loss; the steepest
    descent and min/10 too). The model and optimiser are restored after it. Returns the test (`.suggestion`,
    `.steepest`, `.min_over_10`, `.lrs`, `.losses`, `.figure`), written to lr_find.json and lr_find.png."""
    from .lr_range import range_test

    whole_number("steps", steps, 5)
    real_number("start", start, above=0)
    real_number("end", end, above=0)
    return range_test(make_run_config(config, **overrides), start, end, steps, progress_bars(progress), log or silent)


def report(paths: str | Path | Sequence[str | Path], out: str | Path = "report", *, argv: list[str] | None = None,
           storage: str | None = None) -> Path:
    """One offline report (out/index.html: figures, CSS and script inside, no network) of any mix of run, sweep,
    compare and check folders, or folders holding them (an `assignment` output): the sections of the assignment,
    each saying where its numbers came from. Re-rendered from what is on disk; nothing is retrained."""
    from .reporting import write_report

    return write_report(path_list("paths", paths), path_like("out", out), argv=argv, storage=storage)
