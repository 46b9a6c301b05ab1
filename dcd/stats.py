"""Confidence intervals for paired seed differences: what says whether a gain is separable from seed noise.

The compression experiment pairs runs by seed (same start, same batches), so a method's effect is the mean of
its per-seed differences; with a handful of seeds the interval is Student's t, not the normal one. The t
quantiles are tabulated here (exact to three decimals) rather than pulled from scipy for one function.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence, Tuple

__all__ = ["t_quantile_975", "mean_interval"]

#: Student's t, 97.5th percentile, by degrees of freedom 1..30 (two-sided 95 %)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_quantile_975(df: int) -> float:
    """The two-sided 95 % t quantile for ``df`` degrees of freedom (the normal 1.960 past 30 is within 2 %)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.960


def mean_interval(values: Sequence[float]) -> Optional[Tuple[float, float]]:
    """The 95 % confidence interval of the mean of ``values`` (t over ``len(values) - 1`` degrees of freedom);
    None for fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean - half, mean + half
