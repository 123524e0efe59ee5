"""Summary statistics for latency samples.

Percentiles use linear interpolation between closest ranks (the definition numpy calls "linear"
and most load tools report), implemented here without numpy so the tests can check it against
hand-computed values rather than against the library that produced it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``; NaN for an empty sample.

    With sorted values v[0..n-1], the rank is r = q/100 * (n-1) and the result interpolates
    linearly between v[floor(r)] and v[ceil(r)]. A p99 from fewer than ~100 samples is therefore
    mostly the max; callers print the sample count beside it.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    frac = rank - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * frac)


def summarize(
    values: Iterable[float], qs: Sequence[float] = DEFAULT_PERCENTILES
) -> dict[str, float]:
    """count, mean, min, max and the requested percentiles (keys ``p50`` ...) of one sample."""
    data = [float(v) for v in values]
    out: dict[str, float] = {"count": float(len(data))}
    if not data:
        out.update({"mean": math.nan, "min": math.nan, "max": math.nan})
        out.update({_pkey(q): math.nan for q in qs})
        return out
    out["mean"] = sum(data) / len(data)
    out["min"] = min(data)
    out["max"] = max(data)
    for q in qs:
        out[_pkey(q)] = percentile(data, q)
    return out


def mean_or_nan(values: Iterable[float]) -> float:
    data = [float(v) for v in values]
    return sum(data) / len(data) if data else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when either side is missing or the denominator is zero."""
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def _pkey(q: float) -> str:
    return f"p{q:g}".replace(".", "_")
