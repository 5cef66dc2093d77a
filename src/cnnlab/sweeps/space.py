"""A sweep's search space: a trial's values drawn from the sweep file's distributions through Optuna, and whether
the config can run them (known before any training). What the engine asks before each trial, and what a budget's
planner draws to know the space's costs."""

from __future__ import annotations

import itertools
import math
import statistics
from typing import Any

from ..config import FIELDS, Config, applicable, coerce, make_config
from ..errors import ConfigError
from ..models import check_config
from .schema import Sweep


def suggest(trial: Any, sweep: Sweep) -> dict[str, Any]:
    """The trial's config values. Distributions Optuna lacks (normal, weighted categorical, quantised log)
    are drawn as a uniform `NAME__u` that Optuna models, then transformed; the real value is what is logged."""
    out: dict[str, Any] = {}
    for p in sweep.params.values():
        d = p.distribution
        if d == "constant":
            out[p.name] = p.values[0]
        elif d == "categorical":
            out[p.name] = trial.suggest_categorical(p.name, p.values)
        elif d == "categorical_w_probabilities":
            u = trial.suggest_float(p.name + "__u", 0.0, 1.0)
            cum = list(itertools.accumulate(p.probabilities))
            out[p.name] = p.values[next((i for i, c in enumerate(cum) if u <= c), len(cum) - 1)]
        elif d == "int_uniform":
            out[p.name] = trial.suggest_int(p.name, int(p.min), int(p.max))
        elif d == "uniform":
            out[p.name] = trial.suggest_float(p.name, p.min, p.max)
        elif d == "q_uniform":
            out[p.name] = _quantise(trial.suggest_float(p.name + "__u", p.min, p.max), p.q or 1.0)
        elif d in ("log_uniform", "q_log_uniform"):  # min/max are natural logs of the bounds
            v = trial.suggest_float(p.name, math.exp(p.min), math.exp(p.max), log=True)
            out[p.name] = _quantise(v, p.q) if d.startswith("q_") else v
        elif d in ("log_uniform_values", "inv_log_uniform_values"):
            out[p.name] = trial.suggest_float(p.name, p.min, p.max, log=True)  # 1/x of log-uniform is log-uniform
        elif d == "inv_log_uniform":
            out[p.name] = 1.0 / trial.suggest_float(p.name + "__inv", math.exp(p.min), math.exp(p.max), log=True)
        elif d == "q_log_uniform_values":
            out[p.name] = _quantise(trial.suggest_float(p.name + "__u", p.min, p.max, log=True), p.q or 1.0)
        else:  # normal family via the inverse CDF of a uniform draw
            u = trial.suggest_float(p.name + "__u", 1e-6, 1 - 1e-6)
            v = statistics.NormalDist(p.mu, p.sigma).inv_cdf(u)
            v = math.exp(v) if "log" in d else v
            out[p.name] = _quantise(v, p.q or 1.0) if d.startswith("q_") else v
        out[p.name] = _native(p.name, out[p.name])
    return out


def _quantise(v: float, q: float | None) -> float:
    return v if not q else round(round(v / q) * q, 10)


def _native(name: str, v: Any) -> Any:
    """Integers for integer fields (a quantised float 64.0 becomes 64)."""
    return coerce(name, v) if FIELDS[name].type in ("int", int) else v


def trial_config(base: dict[str, Any], values: dict[str, Any], **extra: Any) -> Config:
    """A trial's config: the base flags, then the sweep's values without the knobs its strategy does not use."""
    return make_config(base, trial_values(base, values), extra)


def trial_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """The sweep's values a trial uses: without the knobs its strategy (its own, or the base's) does not use."""
    return applicable(values, str(values.get("finetune", base.get("finetune", FIELDS["finetune"].default))))


def known_problem(base: dict[str, Any], values: dict[str, Any]) -> str | None:
    """Why the config refuses this combination (images too small for a stride-2 first conv, ...), known before any
    training; None when it is a config that may train."""
    try:
        check_config(trial_config(base, values))
    except ConfigError as e:
        return str(e)
    return None
