"""The report's sections, each an HTML fragment built from what is on disk (never a retrained model): the data, Part
A's model and its cost, the sweep, the best model on the test folder, what it learned, Part B against scratch,
every run's learning curves and where the numbers came from. A section whose inputs are absent says which command
produces them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..run_folder import BEST, RunFolder, inside
from .observations import sweep_observations
from .page import claims_list, esc, figure, missing, parcoords, source, table


def run_source(run: RunFolder) -> str:
    prov = run.summary.get("provenance", {})
    command = prov.get("argv") or "not recorded (this run predates provenance in summary.json)"
    return f"run folder <code>{esc(run.path)}</code>; command: <code>{esc(command)}</code>"


def eval_source(run: RunFolder, metrics: dict[str, Any]) -> str:
    sha = metrics.get("checkpoint_sha256", "")
    checkpoint = run.path / Path(metrics.get("checkpoint", BEST)).name  # where the folder is now: its SHA-256 names it
    return (f"<code>{esc(checkpoint)}</code>, epoch "
            f"{esc(metrics.get('checkpoint_epoch', '?'))}, SHA-256 {esc(sha[:16]) + '…' if sha else 'not recorded'}; "
            f"tested on <code>{esc(metrics.get('data', '?'))}</code> ({metrics['images']} images) by "
            f"<code>cnnlab evaluate</code>")


# ---- data -----------------------------------------------------------------------------------------------------

def data_section(checks: list[Path]) -> str:
    if not checks:
        return missing("A check of the data folder", "cnnlab check ROOT")
    parts = []
    for folder in checks:
        c = json.loads((folder / "check.json").read_text())
        splits = list(c["counts"])
        rows = [[k] + [c["counts"][s].get(k, 0) for s in splits] for k in c["classes"]]
        rows.append(["all"] + [sum(c["counts"][s].values()) for s in splits])
        near = {k: len(v) for k, v in c.get("near_duplicates", {}).items()}  # the keys DataReport.to_dict writes
        parts.append(f"<h3>{esc(c.get('root', folder))}</h3>" + table(["class", *splits], rows, range(1, len(splits) + 1))
                     + f"<ul><li>imbalance (largest / smallest training class): {c['imbalance_ratio']:.1f}</li>"
                     f"<li>unreadable files: {esc(', '.join(f'{s} {len(v)}' for s, v in c.get('unreadable', {}).items()))}</li>"
                     f"<li>near-duplicate clusters: {esc(', '.join(f'{k} {v}' for k, v in near.items()) or 'none')}</li>"
                     f"<li>test images that copy a training image (leakage): {c['leaked_test_images']}</li></ul>"
                     + figure(folder / "counts.png", "images per class and split")
                     + source(f"<code>cnnlab check</code>, in <code>{esc(folder)}</code>"))
    return "".join(parts)


# ---- Part A: the model and its cost ---------------------------------------------------------------------------

def cost_section(best: RunFolder | None) -> str:
    """Parameters and FLOPs by formula and measured, for the assignment's network (cnnlab's defaults at the best
    run's image size and class count) and for the network trained."""
    from ..config import Config
    from ..models import create_model, measured_cost, smallcnn_cost

    if best is None:
        return missing("A trained small CNN", "cnnlab train --data ROOT (or cnnlab sweep sweeps/partA.yaml)")
    trained = best.config
    n = len(best.summary.get("classes") or (best.evaluation or {}).get("classes") or [0] * 10)
    same = Config(image_size=trained.image_size, filters=32, filter_org="same", kernel_size="3", dense_units=256,
                  batch_norm=False, conv1_stride=1, global_pool=False)
    rows = []
    for label, cfg in (("the assignment's: m = 32 filters in every layer, k = 3, n = 256", same),
                       ("cnnlab's default network", Config(image_size=trained.image_size)), (f"trained: {best.name}", trained)):
        formula, measured = smallcnn_cost(cfg, n), measured_cost(create_model(cfg, n).module, cfg.image_size)
        rows.append([label, ", ".join(map(str, cfg.filter_counts())), f"{cfg.kernel_sizes()[0]}", cfg.dense_units,
                     cfg.first_stride(), "yes" if cfg.batch_norm else "no", f"{formula.params:,}", f"{measured.params:,}",
                     f"{formula.flops / 1e6:,.1f}", f"{measured.flops / 1e6:,.1f}"])
    return (f"<p>{n} classes, {trained.image_size}×{trained.image_size} input. FLOPs are per image, 2 per multiply-add "
            "of the conv and dense layers; the formula is <code>smallcnn_cost</code>'s closed form, the measurement "
            "<code>torch.utils.flop_counter</code> on the built model.</p>"
            + table(["network", "filters", "kernel", "dense", "first stride", "batch norm", "params (formula)",
                     "params (measured)", "MFLOPs (formula)", "MFLOPs (measured)"], rows, range(6, 10))
            + source(run_source(best)))


# ---- Part A: the sweep ----------------------------------------------------------------------------------------

def trial_run(folder: Path, t: Any) -> RunFolder | None:
    """The run folder of a trial, in the sweep's folder as it is now (`run_folder.inside`)."""
    candidate = inside(folder, t.user_attrs.get("run_dir", ""))
    return RunFolder(candidate) if RunFolder.holds_a_run(candidate) else None


def space_rows(sweep: Any) -> list[list[str]]:
    from ..sweeps.report import format_value

    rows = []
    for name, p in sweep.params.items():
        if p.values:
            what = ", ".join(format_value(v) for v in p.values)
        elif p.distribution.startswith("normal") or "normal" in p.distribution:
            what = f"mu {p.mu}, sigma {p.sigma}"
        else:
            what = f"{format_value(p.min)} to {format_value(p.max)}"
        rows.append([name, p.distribution, what])
    return rows


def sweep_summary(study: Any, sweep: Any) -> tuple[str, dict[str, int]]:
    from optuna.trial import TrialState

    from ..sweeps.engine import GRID_DROPPED

    trials = study.get_trials(deepcopy=False)
    skipped: dict[str, int] = dict(study.user_attrs.get(GRID_DROPPED, {}))
    for t in trials:
        if t.user_attrs.get("infeasible") is not None:
            skipped[t.user_attrs["skipped"]] = skipped.get(t.user_attrs["skipped"], 0) + 1
    trained = [t for t in trials if "config" in t.user_attrs]
    states = {s: sum(1 for t in trained if t.state == getattr(TrialState, s.upper()))
              for s in ("complete", "pruned", "fail", "running")}
    errors: dict[str, int] = {}
    for t in trained:
        if t.state == TrialState.FAIL:
            why = t.user_attrs.get("error", "orphaned: its process died")
            errors[why] = errors.get(why, 0) + 1
    epochs_saved = sum(max(0, (t.user_attrs["config"].get("epochs") or 0) - t.user_attrs.get("epochs_run", 0))
                       for t in trained if t.state == TrialState.PRUNED)
    hb = sweep.hyperband
    kept_down = [f"{sweep.method} search" + (" (Optuna's TPE: each trial is proposed from the ones before it)"
                                              if sweep.method == "bayes" else "")]
    if sweep.run_cap:
        kept_down.append(f"the sweep file's run_cap {sweep.run_cap}")
    if hb:
        kept_down.append(f"hyperband pruning (min_iter {hb['min_iter']}, eta {hb['eta']}): {states['pruned']} trial(s) "
                         f"stopped early, {epochs_saved} epoch(s) not run")
    if skipped:
        kept_down.append(f"{sum(skipped.values())} combination(s) the config refuses skipped without training")
    lines = [f"<li>method <b>{esc(sweep.method)}</b>, metric <b>{esc(sweep.metric)}</b> ({esc(sweep.goal)}), "
             f"{len(trained)} trial(s) trained: " + ", ".join(f"{k} {v}" for k, v in states.items() if v) + "</li>",
             "<li>how the count was kept down: " + esc("; ".join(kept_down)) + "</li>"]
    lines += [f"<li>skipped {n}× without training: {esc(why)}</li>" for why, n in skipped.items()]
    lines += [f"<li>failed {n}×: <code>{esc(why)}</code> (tracebacks in <code>errors/</code>)</li>" for why, n in errors.items()]
    return "<ul>" + "".join(lines) + "</ul>", states


def parcoords_data(trials: list[Any], names: list[str], sweep: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    import numpy as np

    from ..sweeps.report import spans_decades, trial_value

    dims = []
    for name in names:
        values = [t.user_attrs["config"].get(name) for t in trials]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        p = sweep.params[name]
        if numeric and not p.values:
            dims.append({"name": name, "kind": "log" if spans_decades(np.array(values, dtype=float)) else "num"})
        elif numeric:
            dims.append({"name": name, "kind": "cat", "cats": [str(v) for v in sorted(set(p.values) | set(values))]})
        else:  # a value the trial did not use (a knob its strategy drops) shows as None on the axis
            dims.append({"name": name, "kind": "cat", "cats": sorted({str(v) for v in [*p.values, *values]})})
    rows = []
    for t in trials:
        values = [t.user_attrs["config"].get(n) for n in names]
        rows.append({"id": t.number, "state": t.state.name.lower(), "metric": trial_value(t),
                     "values": [v if isinstance(v, (int, float)) and not isinstance(v, bool) and d["kind"] != "cat"
                                else str(v) for v, d in zip(values, dims)]})
    return dims, rows


def sweep_section(folder: Path, out: Path, storage: str | None = None) -> tuple[str, list[RunFolder]]:
    """The sweep's section, and the run folders of its trials (the best one first)."""
    from optuna.trial import TrialState

    from ..sweeps.report import (
        finished_trials,
        load_sweep_folder,
        plot_importance,
        plot_over_time,
        plot_parallel_coordinates,
    )

    study, sweep, _ = load_sweep_folder(folder, storage)
    trials = finished_trials(study)
    summary, _ = sweep_summary(study, sweep)
    head = f"<h3>sweep {esc(sweep.name)}</h3>" + summary
    head += ("<details><summary>search space</summary>" + table(["parameter", "distribution", "values"], space_rows(sweep))
             + "</details>")
    if not trials:
        return head + "<p class=missing>No trial has finished yet: run <code>cnnlab sweep</code> on.</p>", []
    names = [n for n, p in sweep.params.items() if p.distribution != "constant"]
    stem = out / f"sweep-{sweep.name}"
    parts = [head, figure(plot_over_time(trials, sweep, Path(f"{stem}-over-time.png")),
                          f"{esc(sweep.metric)} of every trial against the time it started; the red line is the best so far")]
    if names:
        dims, rows = parcoords_data(trials, names, sweep)
        png = plot_parallel_coordinates(trials, names, sweep, Path(f"{stem}-parallel-coordinates.png"))
        parts.append("<h3>parallel coordinates</h3><p class=muted>Each line is a trial (dashed: pruned), coloured by "
                     f"{esc(sweep.metric)} (yellow best). Drag along an axis to keep a range; ◀ ▶ move an axis; click a "
                     "name or a column head to sort the table.</p>" + parcoords(dims, rows, sweep.metric, sweep.goal)
                     + f"<details><summary>the same as a static image ({esc(png.name)})</summary>"
                     + figure(png, "parallel coordinates") + "</details>")
    parts.append("<h3>importance and correlation</h3><div class=grid2>" + figure(
        plot_importance(study, names, sweep, Path(f"{stem}-importance.png")),
        "fANOVA importance over complete trials") + correlation_table(trials, names, sweep) + "</div>")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    verified = read_verification(folder)
    parts.append(observations_block(complete, names, sweep, verified))
    parts.append(best_trials_table(complete, names, sweep))
    ranked = sorted(complete, key=lambda t: t.value, reverse=sweep.goal == "maximize")
    runs = [r for r in (trial_run(folder, t) for t in ranked) if r is not None]
    if verified is not None:  # the verified winner's model goes first: Part A's model
        parts.append(verification_block(verified))
        runs = [RunFolder(inside(folder, verified["model"])), *runs]
    parts.append(source(f"study and trials in <code>{esc(folder)}</code>; figures re-drawn from them"))
    return "".join(parts), runs


def read_verification(folder: Path) -> dict[str, Any] | None:
    """What `--verify` wrote in a sweep folder (verify.json), or None."""
    path = folder / "verify.json"
    return json.loads(path.read_text()) if path.is_file() else None


def verification_block(found: dict[str, Any]) -> str:
    """The top configurations trained again: each one's values over new seeds, mean and std, and the paired test of
    each runner-up against the winner; every number from verify.json."""
    metric, candidates = found["metric"], found["candidates"]
    rows = []
    for rank, c in enumerate(candidates, 1):
        versus = c.get("versus_winner")
        rows.append([rank, c["trial"], f"{c['search_value']:.4f}", ", ".join(f"{v:.4f}" for v in c["values"]),
                     f"{c['mean']:.4f} ± {c['std']:.4f}",
                     "the winner" if versus is None else
                     f"{versus['difference']:+.4f}, p = {versus['p_value']:.3f} ("
                     + ("distinguishable" if versus["distinguishable"] else "within seed noise") + ")"])
    winner = candidates[0]
    ties = [str(c["trial"]) for c in candidates[1:] if not c["versus_winner"]["distinguishable"]]
    text = (f"<p>The search's best single run is one noisy draw, so its top {len(candidates)} configurations were "
            f"trained again with {found['seeds']} new seeds each (the search's own run left out of the mean: it was "
            f"chosen for scoring high). Trial {esc(winner['trial'])} has the best mean {esc(metric)}, "
            f"{winner['mean']:.4f} ± {winner['std']:.4f}"
            + (f"; the search's best single run was trial {esc(found['search_best'])}" if found["changed"] else "")
            + ". " + (f"Against trial(s) {esc(', '.join(ties))} the difference is within seed noise (paired t-test over "
                      "the shared seeds, p ≥ 0.05): the data cannot tell them apart." if ties else
                      "Each runner-up is behind it by more than seed noise (paired t-test, p < 0.05).")
            + f" Part A's model is the winner's run with the best validation score: <code>{esc(found['model'])}</code>."
            + "</p>")
    return ("<h3>the winner, verified</h3>" + text
            + table(["rank", "trial", f"search {metric}", f"{metric} per new seed", "mean ± std", "against the winner"],
                    rows, (2, 3, 4)))


def correlation_table(trials: list[Any], names: list[str], sweep: Any) -> str:
    from ..sweeps.report import correlations

    rows = correlations(trials, names, sweep.metric) if len(trials) >= 3 else []
    if not rows:
        return "<p class=muted>Correlations need at least 3 finished trials with different values.</p>"

    def cell(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:+.2f}" if key in r else "-"

    return "<div>" + table(["parameter", "Pearson r", "Spearman ρ", "η (categories)"],
                           [[r["parameter"] + (" (log10)" if r.get("scale") else ""), cell(r, "pearson_r"),
                             cell(r, "spearman_rho"), cell(r, "eta")] for r in rows], (1, 2, 3)) + (
        f"<p class=muted>with {sweep.metric}, over {len(trials)} finished trials (pruned ones at the epoch they "
        "stopped)</p></div>")


def verified_claims(found: dict[str, Any] | None) -> list[str]:
    """What the verification (verify.json) says of the winner and of seed noise, for the observations."""
    if not found:
        return []
    metric, candidates = found["metric"], found["candidates"]
    winner = candidates[0]
    stds = [c["std"] for c in candidates]
    gap = round(winner["search_value"] - winner["mean"], 4) + 0.0  # + 0.0: no "-0.0000"
    return [f"The winning configuration, verified: trial {winner['trial']}, {metric} {winner['mean']:.4f} ± "
            f"{winner['std']:.4f} over {len(winner['values'])} new seeds; its run in the search scored "
            f"{winner['search_value']:.4f} ({gap:+.4f} against that mean"
            + (": the search's best single run was a lucky draw)" if gap > 0 else ")"),
            f"Seed noise, measured: the verified configurations' std over seeds is {min(stds):.4f} to {max(stds):.4f}, "
            f"so two single trials closer than about {2 * max(stds):.4f} in {metric} cannot be ranked by it"]


def observations_block(complete: list[Any], names: list[str], sweep: Any, verified: dict[str, Any] | None = None) -> str:
    kinds = {n: "numeric" if not sweep.params[n].values else "categorical" for n in names}
    rows = [{"config": t.user_attrs["config"], "value": t.value} for t in complete]
    cited = verified_claims(verified)
    if len(rows) < 4:
        return ("<h3>observations</h3>" + claims_list(cited)
                + f"<p class=muted>{len(rows)} complete trial(s): too few to support a claim about any parameter (at "
                "least 4 are needed).</p>")
    claims, unclear = sweep_observations(rows, kinds, sweep.metric)
    claims = cited + claims
    text = "<h3>observations</h3>"
    text += claims_list(claims) if claims else (
        f"<p>No parameter's effect on {esc(sweep.metric)} is distinguishable from noise over these "
        f"{len(rows)} complete trials.</p>")
    if unclear:
        text += "<p class=muted>Not distinguishable from noise: " + esc("; ".join(unclear)) + ".</p>"
    return text + (f"<p class=muted>Each claim is one test at the 5% level among {len(kinds)} parameters tested, so "
                   "about one in twenty such claims is expected by chance alone; complete trials only (a pruned "
                   "trial's metric was taken at fewer epochs).</p>")


def best_trials_table(complete: list[Any], names: list[str], sweep: Any) -> str:
    from ..sweeps.report import format_value

    ranked = sorted(complete, key=lambda t: t.value, reverse=sweep.goal == "maximize")[:10]
    return "<h3>best trials</h3>" + table(
        ["trial", sweep.metric, "epochs", *names],
        [[t.number, f"{t.value:.4f}", t.user_attrs.get("epochs_run", "")] +
         [format_value(t.user_attrs["config"].get(n)) for n in names] for t in ranked], (1, 2))


def budget_section(given: list[Path], sweeps: list[Path]) -> str:
    """The time planned to a deadline (`--budget`): the job's phases, planned against spent, and what was cut; each
    budgeted sweep's calibration, trials and cuts. Every number is read from a budget.json. '' without a budget."""
    from ..budget import say_duration
    from ..job_budget import RECORD

    def read(path: Path) -> dict[str, Any] | None:
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError):
            return None

    parts = []
    for folder in given:
        job = read(folder / RECORD)
        if job is None or "phases" not in job:
            continue
        rows = [[name, f"{p['planned_s']:.0f} s" if p.get("planned_s") is not None else "-", f"{p['spent_s']:.0f} s",
                 p["state"]] for name, p in job["phases"].items()]
        parts.append(f"<p>The job in <code>{esc(folder)}</code> was planned to a budget of "
                     f"{esc(say_duration(job['budget_s']))} and spent {esc(say_duration(job.get('spent_s', 0.0)))} "
                     f"over {len(job['sessions'])} session(s) (the time its processes ran, not the time between them).</p>"
                     + table(["phase", "planned", "spent", "state"], rows, numeric=(1, 2))
                     + claims_list([f"cut to fit: {c}" for c in job.get("cut", [])]))
    for folder in sweeps:
        record = read(folder / "budget.json")
        if record is None:
            continue
        trials = record["trials"]
        spent = record["spent"]
        plan = record.get("plan") or {}
        parts.append(f"<p>Sweep <code>{esc(folder.name)}</code>: budget {esc(say_duration(record['budget_s']))}, spent "
                     f"{esc(say_duration(record['spent_s']))} (calibration {esc(say_duration(spent['calibration_s']))}, "
                     f"trials {esc(say_duration(spent['trials_s']))}, the rest {esc(say_duration(spent['other_s']))}); "
                     f"{trials['complete']} trial(s) complete, {len(trials['shortened'])} started shorter, "
                     f"{len(trials['cut'])} stopped at the deadline, {trials['not_started']} not started for want of "
                     f"time" + (f"; the last plan: {esc(plan['trials'])} trial(s) of {esc(plan['epochs'])} epoch(s)"
                                if plan else "") + ".</p>")
    if not parts:
        return ""
    return "".join(parts) + source("budget.json in the job and sweep folders (docs/budget.md: how the plan is made)")
