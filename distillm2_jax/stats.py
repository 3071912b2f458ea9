"""Small-sample statistics for comparing training runs over seeds: mean, t-interval, paired difference.

An experiment here has a handful of seeds (3-10), so the intervals use Student's t with n - 1
degrees of freedom, not the normal 1.96 (quantiles from scipy.stats).

Paired differences are the right comparison when every method of a seed starts from the same
warmed-up student and data: the seed's strength then moves both methods together and cancels
in the difference, while it inflates the spread of each method's own mean.

With one value (n = 1) there is no spread: sd, se and the interval are NaN (not an error), so a
one-seed smoke run still reports its means. An empty input or unequal lengths raise ValueError.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np
from scipy import stats as _scipy_stats


def t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with `df` (a positive integer) degrees of freedom."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p}: must be in (0, 1)")
    if int(df) != df or df < 1:
        raise ValueError(f"df={df}: must be a positive integer")
    return float(_scipy_stats.t.ppf(p, int(df)))


@dataclasses.dataclass(frozen=True)
class Interval:
    """A mean over n values with its spread and a two-sided t confidence interval.

    sd: sample standard deviation (n - 1 in the denominator); se = sd / sqrt(n);
    [low, high] = mean -/+ t_{(1+level)/2, n-1} * se. NaN spread and interval when n == 1.
    """
    mean: float
    sd: float
    se: float
    low: float
    high: float
    n: int
    level: float = 0.95

    def excludes_zero(self) -> bool:
        """True when the whole interval is on one side of 0 (False for a NaN interval)."""
        return bool(self.low > 0 or self.high < 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _as_array(values: Sequence[float], what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).reshape(-1)
    if x.size == 0:
        raise ValueError(f"{what}: no values")
    return x


def _interval(x: np.ndarray, level: float) -> Interval:
    n = int(x.size)
    mean = float(np.mean(x))
    if n == 1:
        nan = float("nan")
        return Interval(mean, nan, nan, nan, nan, 1, level)
    sd = float(np.std(x, ddof=1))
    se = sd / math.sqrt(n)
    half = t_quantile(0.5 + level / 2.0, n - 1) * se
    return Interval(mean, sd, se, mean - half, mean + half, n, level)


def mean_ci(values: Sequence[float], *, level: float = 0.95) -> Interval:
    """Mean of `values` with the t-interval for the population mean (level 95% by default)."""
    return _interval(_as_array(values, "mean_ci"), level)


def paired_difference(a: Sequence[float], b: Sequence[float], *, level: float = 0.95) -> Interval:
    """The mean of a[i] - b[i] over paired values (one pair per seed) with its t-interval.

    A paired t-interval: the per-seed differences are treated as n independent draws, so the
    interval is mean(d) -/+ t_{0.975, n-1} * sd(d) / sqrt(n) at level 0.95.
    """
    x, y = _as_array(a, "paired_difference a"), _as_array(b, "paired_difference b")
    if x.shape != y.shape:
        raise ValueError(f"paired_difference: {x.size} values against {y.size}; pairs need equal lengths")
    return _interval(x - y, level)


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                     seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a - b): resample the seeds (pairs) with replacement.

    Makes no normality assumption, but with few seeds it is too narrow (it cannot see spread the
    n values do not show; with n = 5 there are only 126 distinct resamples): report it next to the
    t-interval, not instead of it. NaN interval for n == 1.
    """
    x, y = _as_array(a, "paired_bootstrap a"), _as_array(b, "paired_bootstrap b")
    if x.shape != y.shape:
        raise ValueError(f"paired_bootstrap: {x.size} values against {y.size}; pairs need equal lengths")
    if x.size == 1:
        return float("nan"), float("nan")
    d = x - y
    idx = np.random.default_rng(seed).integers(0, d.size, size=(resamples, d.size))
    means = d[idx].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def bootstrap_ratio(numerators: Sequence[float], denominators: Sequence[float], *, level: float = 0.95,
                    resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of sum(numerators) / sum(denominators), resampling the units
    (index i: e.g. one judged question, with its score total and its count of judgments) with
    replacement; seeded, so the same call gives the same interval. NaN interval for one unit.

    Used for win rates, where a question's two order-swapped judgments are not independent and
    must be resampled together.
    """
    x, y = _as_array(numerators, "bootstrap_ratio numerators"), _as_array(denominators, "bootstrap_ratio denominators")
    if x.shape != y.shape:
        raise ValueError(f"bootstrap_ratio: {x.size} numerators against {y.size} denominators")
    if np.any(y <= 0):
        raise ValueError("bootstrap_ratio: every denominator must be positive")
    if x.size == 1:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))
    ratios = x[idx].sum(axis=1) / y[idx].sum(axis=1)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
