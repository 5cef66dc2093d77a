"""`cnnlab sweep-report`: figures and tables of a sweep, from its study storage and run folders alone.

Writes into sweeps/<name>/report/: accuracy_vs_created.png, parallel_coordinates.png, importance.png,
correlations.md, best_trials.md and best.yaml (a config `cnnlab train --config` accepts); the API adds index.html,
the offline page of `cnnlab report` (interactive parallel coordinates, observations, the best trial).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import yaml

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from ..config import saved_values  # noqa: E402
from ..errors import CnnlabError  # noqa: E402
from ..io import atomic_write_text  # noqa: E402
from ..run_folder import CONFIG, inside  # noqa: E402
from ..visualise import save_figure  # noqa: E402
from .schema import Sweep, parse_sweep  # noqa: E402
from .storage import make_storage  # noqa: E402


def load_sweep_folder(folder: Path, storage_url: str | None = None) -> tuple[Any, Sweep, dict[str, Any]]:
    """(the Optuna study, the parsed sweep file, sweep_info.json) of a sweep folder."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    info_path = folder / "sweep_info.json"
    if not info_path.exists():
        raise CnnlabError(f"{folder} is not a sweep folder (no sweep_info.json): expected sweeps/<name>")
    info = json.loads(info_path.read_text())
    if info.get("storage") and not storage_url:
        if "***" in info["storage"]:
            raise CnnlabError(f"this sweep used {info['storage']}: pass the full URL with --storage")
        storage_url = info["storage"]
    study = optuna.load_study(study_name=info["name"], storage=make_storage(storage_url, folder))
    sweep = parse_sweep(yaml.safe_load((folder / "sweep.yaml").read_text()), info["name"])
    return study, sweep, info


def load_study(folder: Path, storage_url: str | None = None) -> Any:
    """The Optuna study of a sweep folder (its journal, or the RDB URL it used)."""
    return load_sweep_folder(Path(folder), storage_url)[0]


def finished_trials(study: Any) -> list[Any]:
    """Complete and pruned trials that trained (a skipped combination has no config)."""
    return [t for t in study.get_trials(deepcopy=False) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and "config" in t.user_attrs]


def _numeric(values: list[Any]) -> tuple[np.ndarray, list[str] | None]:
    """Numbers as they are; booleans as 0/1; anything else as the index of its sorted category."""
    if all(isinstance(v, bool) for v in values):
        return np.array(values, dtype=float), ["False", "True"]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=float), None
    cats = sorted({str(v) for v in values})
    return np.array([cats.index(str(v)) for v in values], dtype=float), cats


def spans_decades(x: np.ndarray, cats: list[str] | None = None) -> bool:
    """A positive number range of 100x or more (a learning rate) reads better on a log10 axis."""
    return cats is None and x.min() > 0 and x.max() / x.min() >= 100


def correlations(trials: list[Any], names: list[str], metric: str) -> list[dict[str, Any]]:
    """Per parameter: Pearson r and Spearman rho for numbers (log scale when the range spans decades), and for
    categories the correlation ratio eta (the share of the metric's spread that the category explains)."""
    from scipy import stats

    y = np.array([trial_value(t) for t in trials], dtype=float)
    rows: list[dict[str, Any]] = []
    if np.ptp(y) == 0:
        return rows
    for name in names:
        raw = [t.user_attrs["config"].get(name) for t in trials]
        x, cats = _numeric(raw)
        if len(set(raw)) < 2:
            continue
        row: dict[str, Any] = {"parameter": name}
        if (cats is None or cats == ["False", "True"]) and np.ptp(x) > 0:
            if spans_decades(x, cats):
                x = np.log10(x)
                row["scale"] = "log10"
            row["pearson_r"] = float(stats.pearsonr(x, y)[0])
            row["spearman_rho"] = float(stats.spearmanr(x, y)[0])
        if cats is None and len(np.unique(x)) > max(3, len(x) // 2):
            rows.append(row)  # a continuous parameter: eta would be 1 by construction
            continue
        groups = [y[x == v] for v in np.unique(x)]
        between = sum(len(g) * (g.mean() - y.mean()) ** 2 for g in groups)
        total = ((y - y.mean()) ** 2).sum()
        row["eta"] = float(math.sqrt(between / total)) if total > 0 else 0.0
        rows.append(row)
    return sorted(rows, key=lambda r: -abs(r.get("spearman_rho", r.get("eta", 0.0))))


def trial_value(t: Any) -> float:
    """A trial's metric: its value, or for a pruned one the best it reached before it was stopped."""
    return t.value if t.value is not None else t.user_attrs.get("pruned_value", float("nan"))


def write_sweep_figures(folder: Path, storage_url: str | None = None) -> Path:
    """The figures and tables of a sweep, in its report/ folder (returned); its index.html is cnnlab.report's page."""
    study, sweep, _ = load_sweep_folder(folder, storage_url)
    out = folder / "report"
    out.mkdir(parents=True, exist_ok=True)
    trials = finished_trials(study)
    if not trials:
        raise CnnlabError(f"{folder}: no finished trials to report yet")
    names = [n for n, p in sweep.params.items() if p.distribution != "constant"]
    figures = {"accuracy_vs_created": plot_over_time(trials, sweep, out / "accuracy_vs_created.png")}
    if names:
        figures["parallel_coordinates"] = plot_parallel_coordinates(trials, names, sweep,
                                                                    out / "parallel_coordinates.png")
    figures["importance"] = plot_importance(study, names, sweep, out / "importance.png")
    corr = correlations(trials, names, sweep.metric) if len(trials) >= 3 else []
    corr_md = "| parameter | Pearson r | Spearman rho | eta |\n|---|---|---|---|\n" + "".join(
        f"| {r['parameter']}{' (log10)' if r.get('scale') else ''} | {_cell(r, 'pearson_r')} | "
        f"{_cell(r, 'spearman_rho')} | {_cell(r, 'eta')} |\n" for r in corr)
    atomic_write_text(out / "correlations.md", corr_md)
    write_best(trials, names, sweep, out, folder)
    return out


def format_value(v: Any) -> str:
    """A parameter's value as a table shows it: floats to 3 significant digits (a learning rate, not 16 digits)."""
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _cell(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:.3f}" if key in r else "-"


def plot_over_time(trials: list[Any], sweep: Sweep, path: Path) -> Path:
    """The metric against creation time, best so far as a step line."""
    maximise = sweep.goal == "maximize"
    ordered = sorted(trials, key=lambda t: t.datetime_start)
    start = ordered[0].datetime_start

    def minutes(t: Any) -> float:  # elapsed time reads at any sweep length; clock labels did not
        return (t.datetime_start - start).total_seconds() / 60

    fig, ax = plt.subplots(figsize=(8, 4))
    for state, colour, label in ((TrialState.COMPLETE, "#1f77b4", "complete"), (TrialState.PRUNED, "#bbbbbb", "pruned")):
        pts = [t for t in ordered if t.state == state]
        if pts:  # no legend entry for a state no trial is in
            ax.scatter([minutes(t) for t in pts], [trial_value(t) for t in pts], c=colour, label=label, s=25, zorder=3)
    best, xs, ys = None, [], []
    for t in ordered:
        if t.state == TrialState.COMPLETE:
            best = t.value if best is None else (max if maximise else min)(best, t.value)
        if best is not None:
            xs.append(minutes(t))
            ys.append(best)
    ax.step(xs, ys, where="post", color="#d62728", label="best so far")
    ax.set_xlabel(f"minutes since the first trial started ({start:%Y-%m-%d %H:%M})")
    ax.set_ylabel(sweep.metric)
    ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"{sweep.name}: {sweep.metric} of each trial against its creation time")
    return save_figure(fig, path)


def plot_parallel_coordinates(trials: list[Any], names: list[str], sweep: Sweep, path: Path) -> Path:
    """Every parameter scaled to [0, 1] (categories by index), lines coloured by the metric."""
    maximise = sweep.goal == "maximize"
    fig, ax = plt.subplots(figsize=(max(6.0, 0.95 * (len(names) + 1) + 1), 5))
    cols = []
    for name in names:
        x, cats = _numeric([t.user_attrs["config"].get(name) for t in trials])
        log = spans_decades(x, cats)
        if log:
            x = np.log10(x)
        span = x.max() - x.min()
        cols.append(((x - x.min()) / span if span else np.full_like(x, 0.5), cats, x.min(), x.max(), log))
    y = np.array([trial_value(t) for t in trials])
    yn = (y - np.nanmin(y)) / (np.nanmax(y) - np.nanmin(y) or 1)
    cmap = plt.get_cmap("viridis")
    for i in np.argsort(y if maximise else -y):
        pts = [c[0][i] for c in cols] + [yn[i]]
        ax.plot(range(len(pts)), pts, color=cmap(yn[i] if maximise else 1 - yn[i]), alpha=0.8, lw=1.2)
    for j, (_, cats, lo, hi, log) in enumerate(cols):
        ax.axvline(j, color="black", lw=0.6)
        if cats:  # each category written beside the axis at its height
            for k, c in enumerate(cats):
                ax.text(j + 0.04, k / (len(cats) - 1) if len(cats) > 1 else 0.5, c, fontsize=7, va="center")
        else:
            fmt = (lambda v: f"{10 ** v:.2g}") if log else (lambda v: f"{v:.3g}")
            ax.text(j + 0.04, 0, fmt(lo), fontsize=7, va="center")
            ax.text(j + 0.04, 1, fmt(hi), fontsize=7, va="center")
    ax.text(len(cols) + 0.04, 0, f"{np.nanmin(y):.3f}", fontsize=7, va="center")
    ax.text(len(cols) + 0.04, 1, f"{np.nanmax(y):.3f}", fontsize=7, va="center")
    ax.axvline(len(cols), color="black", lw=0.6)
    ax.set_xticks(range(len(names) + 1), names + [sweep.metric], rotation=35, ha="right", fontsize=8)
    ax.set_yticks([])
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(f"{sweep.name}: parallel coordinates (colour: {sweep.metric})")
    return save_figure(fig, path)


def parameter_importance(study: Any, names: list[str]) -> tuple[dict[str, float], str]:
    """fANOVA importance over complete trials, summed back onto config keys (Optuna sees `lr__u` for some
    transformed distributions); or {} and why it could not be computed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3 or not names:
        return {}, f"needs at least 3 complete trials (has {len(complete)})"
    try:
        raw = optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (RuntimeError, ValueError) as e:  # e.g. every complete trial has the same value
        return {}, str(e)
    importance: dict[str, float] = {}
    for k, v in raw.items():
        base = k.split("__")[0]
        importance[base] = importance.get(base, 0.0) + v
    return importance, "" if importance else "no parameter varied among the complete trials"


def plot_importance(study: Any, names: list[str], sweep: Sweep, path: Path) -> Path:
    importance, why = parameter_importance(study, names)
    if not importance:
        fig, ax = plt.subplots(figsize=(6, 1.5))
        ax.axis("off")
        ax.text(0.5, 0.5, f"parameter importance not computable:\n{why}", ha="center", va="center")
        return save_figure(fig, path)
    n = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    fig, ax = plt.subplots(figsize=(6, 0.4 * len(importance) + 1.2))
    items = sorted(importance.items(), key=lambda kv: kv[1])
    ax.barh([k for k, _ in items], [v for _, v in items], color="#1f77b4")
    ax.set_xlabel(f"importance for {sweep.metric} (fANOVA, {n} complete trials)")
    return save_figure(fig, path)


def write_best(trials: list[Any], names: list[str], sweep: Sweep, out: Path, folder: Path) -> str:
    """best_trials.md (the ten best complete trials) and best.yaml (the best one's full config); returns the table."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    ranked = sorted(complete, key=lambda t: t.value, reverse=sweep.goal == "maximize")[:10]
    best_md = f"| trial | {sweep.metric} | epochs | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 3) + "\n"
    best_md += "".join(f"| {t.number} | {t.value:.4f} | {t.user_attrs.get('epochs_run')} | " +
                       " | ".join(format_value(t.user_attrs['config'].get(n)) for n in names) + " |\n" for t in ranked)
    atomic_write_text(out / "best_trials.md", best_md)
    if ranked:
        best = ranked[0]
        run_config = inside(folder, best.user_attrs.get("run_dir", "")) / CONFIG
        cfg = yaml.safe_load(run_config.read_text()) if run_config.exists() else dict(best.user_attrs["config"])
        cfg = saved_values({k: v for k, v in cfg.items() if k != "name"}) | {"out": "runs"}
        atomic_write_text(out / "best.yaml", f"# best trial {best.number} of sweep {sweep.name}: "
                          f"{sweep.metric} {best.value:.4f}\n" + yaml.safe_dump(cfg, sort_keys=False))
    return best_md
