"""Paired-seed statistics of a study: 95 % Student-t intervals, verdicts, steps to reach a target."""

from __future__ import annotations

import math

import numpy as np


def t_critical(df: int) -> float:
    """Two-sided 95 % Student-t quantile."""
    try:
        from scipy.stats import t

        return float(t.ppf(0.975, df))
    except ImportError:
        table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
        return table.get(df, 1.96 + 2.4 / df)


def mean_ci(values) -> tuple[float, float]:
    """Mean and half-width of the 95 % interval (nan half-width for one value)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    return float(v.mean()), t_critical(len(v) - 1) * float(v.std(ddof=1)) / math.sqrt(len(v))


def ratio_ci(ratios) -> tuple[float, float, float]:
    """Geometric mean of positive ratios and its 95 % interval, taken on their logarithms (a ratio's
    interval on its own scale would cross zero); nan bounds for one value."""
    mean, half = mean_ci(np.log(np.asarray(ratios, dtype=float)))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


HIGHER_IS_BETTER = ("ra", "cknna", "probe", "transfer_", "ra_retention")


def verdict(key: str, mean: float, half: float, n: int) -> str:
    """Whether a paired difference is resolved by its 95 % interval, and in which direction."""
    if n < 2 or not abs(mean) > half:
        return "not resolved"
    better = (mean > 0) == key.startswith(HIGHER_IS_BETTER)
    return "better" if better else "worse"


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """First step where a lower-is-better curve reaches ``target`` (linear between evaluations)."""
    prev = None
    for step, value in curve:
        if value <= target:
            if prev is None:
                return float(step)
            (s0, v0) = prev
            return s0 + (step - s0) * (v0 - target) / (v0 - value) if v0 != value else float(step)
        prev = (step, value)
    return None
