"""The Weights & Biases sweep schema, read and checked: method, metric, parameters (value / values /
distribution, nested parameter blocks), early_terminate (hyperband), run_cap; program/command are kept for
wandb and ignored. A malformed file is refused before any trial starts, naming the parameter."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FIELDS, SAFE_NAME, check_value, read_yaml
from ..errors import ConfigError, quote

METRICS = ("val_acc", "val_balanced_acc", "val_loss", "train_acc", "train_loss")
METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "int_uniform", "uniform", "q_uniform", "log_uniform",
                 "log_uniform_values", "q_log_uniform", "q_log_uniform_values", "inv_log_uniform",
                 "inv_log_uniform_values", "normal", "q_normal", "log_normal", "q_log_normal",
                 "categorical_w_probabilities")
IGNORED_KEYS = ("program", "command", "name", "description", "project", "entity", "controller")
SEARCH_KEYS = ("method", "metric", "parameters", "early_terminate", "run_cap", "budget")  # validated and stored
MAX_GRID_POINTS = 10_000  # queued at creation in about 4 s; a larger grid would run for years on any machine


class SweepError(ConfigError):
    """A malformed sweep file: the message names the parameter, like wandb's own validation."""


@dataclass
class Param:
    name: str
    distribution: str
    values: list[Any] = field(default_factory=list)
    probabilities: list[float] | None = None
    min: float = 0.0
    max: float = 0.0
    q: float | None = None
    mu: float = 0.0
    sigma: float = 1.0


@dataclass
class Sweep:
    name: str
    method: str
    metric: str
    goal: str
    params: dict[str, Param]
    hyperband: dict[str, int] | None
    run_cap: int | None
    raw: dict[str, Any]
    warnings: list[str] = field(default_factory=list)  # legal but probably not meant
    budget: float | None = None  # seconds: the sweep planned to end by then (`budget: 2h`; --budget overrides it)

    @property
    def validated(self) -> dict[str, Any]:
        """The part of the sweep file that was checked (search space, metric, pruning, cap) and the name: what a
        study stores, never the ignored keys, which may hold anything."""
        return {k: self.raw[k] for k in SEARCH_KEYS if k in self.raw} | {"name": self.name}

    @property
    def grid_points(self) -> int:
        return math.prod(len(p.values) for p in self.params.values()) if self.method == "grid" else 0

    @property
    def direction(self) -> str:
        return "maximize" if self.goal == "maximize" else "minimize"


def _bad(name: str, why: str) -> SweepError:
    return SweepError(f"invalid sweep config: parameter {quote(name)}: {why}")


def _parse_param(name: str, spec: Any) -> Param:
    if name not in FIELDS:
        raise _bad(name, f"not a cnnlab config key (known: {', '.join(FIELDS)})")
    if not isinstance(spec, dict):
        raise _bad(name, "expected a mapping with value, values or distribution")
    unknown = set(spec) - {"value", "values", "distribution", "min", "max", "q", "mu", "sigma", "probabilities"}
    if unknown:
        raise _bad(name, f"unknown field(s) {', '.join(sorted(unknown))}")

    def checked(v: Any) -> Any:  # a value the config refuses is refused now, not in trial 17
        try:
            check_value(name, v)
            if name == "model":
                from ..models import check_model_name  # the registry (torch) only for a file that names models

                check_model_name(str(v))
        except ConfigError as e:
            raise _bad(name, str(e)) from None
        return v

    dist = spec.get("distribution")
    if dist is not None and dist not in DISTRIBUTIONS:
        raise _bad(name, f"unknown distribution '{dist}' (expected one of {', '.join(DISTRIBUTIONS)})")
    if "value" in spec:
        return Param(name, "constant", [checked(spec["value"])])
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            raise _bad(name, "values must be a non-empty list")
        values = [checked(v) for v in values]
        probs = spec.get("probabilities")
        if probs is not None:
            if not isinstance(probs, list) or not all(isinstance(p, (int, float)) and not isinstance(p, bool)
                                                      for p in probs) \
                    or len(probs) != len(values) or any(p < 0 for p in probs) or abs(sum(probs) - 1) > 1e-6:
                raise _bad(name, "probabilities must be one non-negative number per value, summing to 1")
            return Param(name, "categorical_w_probabilities", values, list(map(float, probs)))
        return Param(name, "categorical", values)
    for key in ("mu", "sigma", "q"):
        v = spec.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or (key != "mu" and v <= 0)):
            raise _bad(name, f"{key} {quote(v)}: expected a {'positive ' if key != 'mu' else ''}number")
    if dist in ("normal", "q_normal", "log_normal", "q_log_normal"):
        return Param(name, dist, mu=float(spec.get("mu", 0.0)), sigma=float(spec.get("sigma", 1.0)), q=spec.get("q"))
    if "min" not in spec or "max" not in spec:
        raise _bad(name, "needs value, values, or min and max")
    lo, hi = spec["min"], spec["max"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise _bad(name, "min and max must be numbers")
    if lo >= hi:
        raise _bad(name, f"min ({lo}) must be less than max ({hi})")
    if dist is None:
        dist = "int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform"
    if dist in ("log_uniform_values", "q_log_uniform_values", "inv_log_uniform_values") and lo <= 0:
        raise _bad(name, f"{dist} needs min > 0")
    q = spec.get("q")
    if dist == "int_uniform" and not (isinstance(lo, int) and isinstance(hi, int)):
        raise _bad(name, "int_uniform needs integer min and max")
    for edge in (lo, hi):
        if dist in ("int_uniform", "uniform", "q_uniform"):
            checked(edge)
    return Param(name, dist, min=float(lo), max=float(hi), q=None if q is None else float(q))


def _flatten(params: dict[str, Any], into: dict[str, Param]) -> None:
    """W&B nested `parameters` blocks group keys; their leaves are config keys themselves."""
    for name, spec in params.items():
        if isinstance(spec, dict) and "parameters" in spec:
            if not isinstance(spec["parameters"], dict):
                raise _bad(name, "nested parameters must be a mapping")
            _flatten(spec["parameters"], into)
        else:
            if name in into:
                raise _bad(name, "given twice")
            into[name] = _parse_param(name, spec)


def parse_sweep(raw: Any, name: str = "sweep") -> Sweep:
    if not isinstance(raw, dict):
        raise SweepError("invalid sweep config: expected a mapping at the top level")
    unknown = set(raw) - {*SEARCH_KEYS, *IGNORED_KEYS}
    if unknown:
        raise SweepError(f"invalid sweep config: unknown top-level key(s) {', '.join(sorted(unknown))}")
    method = raw.get("method")
    if method not in METHODS:
        raise SweepError(f"invalid sweep config: method '{method}' is not one of {', '.join(METHODS)}")
    metric = raw.get("metric") or {"name": "val_acc", "goal": "maximize"}
    if not isinstance(metric, dict):
        raise SweepError(f"invalid sweep config: metric {quote(metric)}: expected a mapping like "
                         "{name: val_acc, goal: maximize}")
    if metric.get("name") not in METRICS:
        raise SweepError(f"invalid sweep config: metric name '{metric.get('name')}': cnnlab logs {', '.join(METRICS)}")
    goal = metric.get("goal", "minimize")
    if goal not in ("maximize", "minimize"):
        raise SweepError(f"invalid sweep config: metric goal '{goal}' is not maximize or minimize")
    if not isinstance(raw.get("parameters"), dict) or not raw["parameters"]:
        raise SweepError("invalid sweep config: 'parameters' must be a non-empty mapping")
    params: dict[str, Param] = {}
    _flatten(raw["parameters"], params)
    if method == "grid":
        for p in params.values():
            if p.distribution not in ("constant", "categorical"):
                raise _bad(p.name, "grid search needs value or values, not a distribution")
        points = math.prod(len(p.values) for p in params.values())
        if points > MAX_GRID_POINTS:
            raise SweepError(f"invalid sweep config: the grid has {points:,} points, more than the {MAX_GRID_POINTS:,} "
                             "cnnlab runs: give fewer values, or use method: random or bayes with a run_cap")
    hyperband = _hyperband(raw.get("early_terminate"))
    run_cap = raw.get("run_cap")
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise SweepError("invalid sweep config: run_cap must be a positive integer")
    budget = None
    if raw.get("budget") is not None:  # cnnlab's own key (wandb sweep warns of it and goes on): `--budget` in the file
        from ..budget import parse_duration

        try:
            budget = parse_duration(raw["budget"])
        except ConfigError as e:
            raise SweepError(f"invalid sweep config: {e}") from None
    sweep_name = str(raw.get("name") or name)
    if not re.fullmatch(SAFE_NAME, sweep_name):
        raise SweepError(f"invalid sweep config: name {quote(sweep_name)}: a sweep's name is its folder's, so use letters, "
                         "digits, '.', '_' and '-' only (no '/', no leading dot)")
    return Sweep(sweep_name, method, metric["name"], goal, params, hyperband, run_cap, raw,
                 [w for p in params.values() if (w := _hint(p))], budget)


def _hint(p: Param) -> str | None:
    """W&B's log_uniform takes natural-log bounds: bounds that look like values (1e-4 to 1e-2) are almost
    always meant as log_uniform_values. The schema is followed; the user is told."""
    if p.distribution in ("log_uniform", "q_log_uniform", "inv_log_uniform") and 0 <= p.min < p.max <= 1:
        return (f"parameter '{p.name}': {p.distribution} takes min/max as natural logs, so it samples "
                f"e^{p.min:g} to e^{p.max:g} ({math.exp(p.min):.4g} to {math.exp(p.max):.4g}); for bounds given as "
                f"values write distribution: {p.distribution}_values")
    return None


def _positive_int(et: dict[str, Any], key: str, default: int | None, least: int) -> int | None:
    value = et.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise SweepError(f"invalid sweep config: early_terminate {key} {quote(value)}: expected a whole number of at "
                         f"least {least}")
    return value


def _hyperband(et: Any) -> dict[str, int] | None:
    """W&B's early_terminate (hyperband with min_iter, or max_iter and s; eta) as Optuna's hyperband settings."""
    if et is None:
        return None
    if not isinstance(et, dict) or et.get("type") != "hyperband":
        raise SweepError("invalid sweep config: early_terminate: expected a mapping with type: hyperband")
    unknown = set(et) - {"type", "min_iter", "max_iter", "s", "eta", "strict"}
    if unknown:
        raise SweepError(f"invalid sweep config: early_terminate: unknown field(s) {', '.join(sorted(unknown))} "
                         "(accepted: type, min_iter, max_iter, s, eta)")
    eta = _positive_int(et, "eta", 3, 2)
    min_iter, max_iter = _positive_int(et, "min_iter", None, 1), _positive_int(et, "max_iter", None, 1)
    if min_iter is not None:
        return {"min_iter": min_iter, "eta": eta} | ({"max_iter": max_iter} if max_iter else {})
    if max_iter is None:
        raise SweepError("invalid sweep config: early_terminate needs min_iter, or max_iter and s")
    s = _positive_int(et, "s", None, 1)
    if s is None:
        raise SweepError("invalid sweep config: early_terminate with max_iter needs s (the number of brackets)")
    return {"min_iter": max(1, int(max_iter / eta ** (s - 1))), "max_iter": max_iter, "eta": eta}


def shipped_sweep(name: str) -> Path | None:
    """One of the sweep files cnnlab ships (partA, partB: package data, so an installed wheel has them too), by its
    name with or without .yaml; None when there is no such file."""
    from importlib import resources

    stem = Path(name).name.removesuffix(".yaml")
    path = Path(str(resources.files("cnnlab.shipped_sweeps").joinpath(f"{stem}.yaml")))
    return path if stem and path.is_file() else None


def sweep_path(given: str | Path) -> Path:
    """A sweep file as given, or, where no file has that path, the shipped one of that name: `cnnlab sweep partA`
    and `cnnlab sweep sweeps/partA.yaml` work in an installed cnnlab as in a checkout."""
    given = Path(given)
    if given.exists():
        return given
    return shipped_sweep(given.name) or given


def load_sweep(path: str | Path) -> Sweep:
    path = sweep_path(path)
    if not path.exists():
        raise SweepError(f"sweep file {path} not found: give a W&B sweep file, or the name of one cnnlab ships "
                         "(partA, partB)")
    return parse_sweep(read_yaml(path, "sweep", SweepError), path.stem)
