"""Paired statistics over seeds: a method's difference to another on the same seeds, with a 95% interval.

Two methods run with the same seed see the same training subset, the same STAMP sample and the same
fine-tune shuffling, so the per-seed difference removes most of the data's variance; the interval is
Student's t over those differences (n - 1 degrees of freedom).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a - b`` over the seeds both have, with its confidence interval."""

    n: int
    mean: float
    std: float
    low: float  #: lower end of the interval (nan below two seeds)
    high: float

    @property
    def significant(self) -> bool:
        """The interval excludes zero."""
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def format(self, scale: float = 100.0) -> str:
        """``+1.2 [-0.3, +2.7]`` in points (bold when significant); ``+1.2 (n=1)`` without an interval."""
        if self.n < 2:
            return f"{scale * self.mean:+.1f} (n={self.n})"
        text = f"{scale * self.mean:+.1f} [{scale * self.low:+.1f}, {scale * self.high:+.1f}]"
        return f"**{text}**" if self.significant else text


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (scipy's, which ships with scikit-learn)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], confidence: float = 0.95) -> PairedDifference | None:
    """``a - b`` paired by seed; None when the two share no seed.

    Args:
        a, b: a value (e.g. accuracy) per seed for each method.
        confidence: coverage of the two-sided t interval.
    """
    seeds = sorted(set(a) & set(b))
    diffs = [float(a[s]) - float(b[s]) for s in seeds if not (math.isnan(a[s]) or math.isnan(b[s]))]
    if not diffs:
        return None
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(1, mean, math.nan, math.nan, math.nan)
    std = statistics.stdev(diffs)
    half = t_quantile(0.5 + confidence / 2, len(diffs) - 1) * std / math.sqrt(len(diffs))
    return PairedDifference(len(diffs), mean, std, mean - half, mean + half)
