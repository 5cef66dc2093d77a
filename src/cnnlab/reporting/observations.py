"""Claims about a sweep that its numbers support, each with its n and a 95% interval or a p-value; what they do not
support is said too. Only complete trials count: a pruned trial's metric was taken at fewer epochs."""

from __future__ import annotations

from typing import Any

import numpy as np


def mean_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """Difference of the means of a and b with its 95% interval (Welch's t-test, unequal variances)."""
    from scipy import stats

    diff = float(a.mean() - b.mean())
    if a.var() == 0 and b.var() == 0:
        return diff, diff, diff
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    return diff, float(interval.low), float(interval.high)


MIN_GROUP = 3  # trials on each side of a comparison before a difference is claimed


def sweep_observations(rows: list[dict[str, Any]], kinds: dict[str, str], metric: str) -> tuple[list[str], list[str]]:
    """(supported claims, parameters whose effect the trials cannot tell from noise). `rows`: one per complete
    trial, its config values and `value`; `kinds`: parameter -> 'categorical' or 'numeric'. Parameters that split
    the trials the same way are one claim (the trials cannot say which of them it is)."""
    from scipy import stats

    from ..sweeps.report import spans_decades

    claims: dict[frozenset[int], list[Any]] = {}
    unclear = []
    y_all = np.array([r["value"] for r in rows], dtype=float)
    for name, kind in kinds.items():
        values = [r["config"].get(name) for r in rows]
        if len(set(map(str, values))) < 2:
            continue
        if kind == "numeric":
            x = np.array(values, dtype=float)
            rho, p = stats.spearmanr(np.log10(x) if spans_decades(x) else x, y_all)
            if p < 0.05:
                claims[frozenset([-len(claims) - 1])] = [f"{metric} {'rises' if rho > 0 else 'falls'} with {name} "
                                                         f"(Spearman ρ {rho:+.2f}, p = {p:.2g}, n = {len(rows)} complete trials)"]
            else:
                unclear.append(f"{name} (Spearman ρ {rho:+.2f}, p = {p:.2f}, n = {len(rows)})")
            continue
        found = level_claim(name, values, y_all, metric)
        if isinstance(found, str):
            unclear.append(found)
        elif found is not None:
            inside, text = found
            twin = next((k for k in claims if k == inside or k == frozenset(range(len(rows))) - inside), None)
            if twin is None:
                claims[inside] = [text]
            else:
                claims[twin].append(f"{name} = {text.split(' = ', 1)[1].split(':')[0]}")
    merged = [parts[0] + ("; the same trials also share " + ", ".join(parts[1:]) + ", so the sweep cannot say which "
                          "of these it is" if len(parts) > 1 else "") for parts in claims.values()]
    return merged, unclear


def level_claim(name: str, values: list[Any], y: np.ndarray, metric: str) -> tuple[frozenset[int], str] | str | None:
    """The first level (best mean first) whose trials differ from the others beyond noise, as (its trials, the
    claim); else why not (the largest gap and its interval), or None when no level has MIN_GROUP trials a side."""
    by_mean = {level: y[np.array([str(v) == level for v in values])].mean() for level in set(map(str, values))}
    largest = None
    for level in sorted(by_mean, key=lambda k: (-by_mean[k], k)):
        inside = np.array([str(v) == level for v in values])
        if inside.sum() < MIN_GROUP or (~inside).sum() < MIN_GROUP:
            continue
        diff, lo, hi = mean_difference(y[inside], y[~inside])
        if lo > 0 or hi < 0:
            return frozenset(np.flatnonzero(inside).tolist()), (
                f"{name} = {level}: {diff:+.3f} mean {metric} against the other trials (n = {int(inside.sum())} vs "
                f"{int((~inside).sum())}; 95% CI {lo:+.3f} to {hi:+.3f})")
        if largest is None or abs(diff) > abs(largest[0]):
            largest = (diff, f"{name} (largest gap {level}: {diff:+.3f}, 95% CI {lo:+.3f} to {hi:+.3f})")
    return largest[1] if largest else None


def interval_text(acc: float, ci: list[float]) -> str:
    return f"{acc:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def compare_claim(name_a: str, a: dict[str, Any], name_b: str, b: dict[str, Any]) -> str:
    """One sentence comparing two test accuracies, saying whether their 95% intervals overlap."""
    diff = a["accuracy"] - b["accuracy"]
    overlap = a["accuracy_ci95"][0] <= b["accuracy_ci95"][1] and b["accuracy_ci95"][0] <= a["accuracy_ci95"][1]
    verdict = ("the 95% intervals overlap, so this test set cannot tell them apart" if overlap else
               "the 95% intervals do not overlap")
    return (f"{name_a}: test accuracy {interval_text(a['accuracy'], a['accuracy_ci95'])} against {name_b}'s "
            f"{interval_text(b['accuracy'], b['accuracy_ci95'])}: {diff:+.3f}; {verdict}")
