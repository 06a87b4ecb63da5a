"""Means over seeds with Student-t intervals, and paired differences.

Seeds are few (3-10), so the 95% interval of a mean uses the t quantile with n - 1 degrees of
freedom, not 1.96: ``mean ± t(0.975, n-1) · s / √n`` with ``s`` the sample standard deviation.
Two rows that share seeds (and so their data split, initial weights and evaluation episodes) are
compared by the interval of their per-seed differences, which removes the seed-to-seed variation
they share and is much narrower than comparing two separate intervals.

The t quantile is SciPy's (``scipy.stats.t.ppf``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

CONFIDENCE = 0.95


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(stats.t.ppf(p, df))


@dataclass(frozen=True)
class Interval:
    """A mean over ``n`` values with the half-width of its 95% t-interval (``None`` for n = 1)."""

    mean: float
    half: float | None
    n: int
    sd: float | None

    @property
    def excludes_zero(self) -> bool:
        return self.half is not None and abs(self.mean) > self.half


def interval(values: list[float]) -> Interval:
    """Mean and 95% t-interval of ``values`` (one per seed)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, n, None)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n), n, sd)


def paired(values: dict[int, float], baseline: dict[int, float]) -> Interval | None:
    """The interval of ``values - baseline`` over the seeds both have (``None`` if they share none)."""
    shared = sorted(values.keys() & baseline.keys())
    return interval([values[s] - baseline[s] for s in shared]) if shared else None
