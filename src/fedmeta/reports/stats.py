"""Means over seeds with Student-t intervals, and paired differences.

Seeds are few (3-10), so the 95% interval of a mean uses the t quantile with n - 1 degrees of
freedom, not 1.96: ``mean ± t(0.975, n-1) · s / √n`` with ``s`` the sample standard deviation.
Two rows that share seeds (and so their data split, initial weights and evaluation episodes) are
compared by the interval of their per-seed differences, which removes the seed-to-seed variation
they share and is much narrower than comparing two separate intervals.

The t quantile is computed here (regularised incomplete beta by its continued fraction, inverted
by bisection) so the report needs no SciPy; it matches ``scipy.stats.t.ppf`` to 1e-9.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CONFIDENCE = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t (``p`` in (0.5, 1)), by bisection on ``t_cdf``."""
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2.0


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
