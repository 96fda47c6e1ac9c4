"""Summary statistics over seeds: mean ± sample std, and a percentile bootstrap interval of a mean.

With few seeds (the usual 3–6) the bootstrap distribution is enumerated exactly: every multiset of n draws
with its multinomial weight, so the interval does not depend on a random resampling; above EXACT_UP_TO
values it is Monte Carlo with a fixed seed.
"""
from __future__ import annotations

import itertools
import math

import numpy as np

EXACT_UP_TO = 8


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _weighted_quantile(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    """The smallest value whose cumulative weight reaches q (the inverse CDF, as np.percentile's 'inverted_cdf')."""
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(weights[order]) / weights.sum()
    return float(values[order][np.searchsorted(cumulative, q - 1e-12)])


def bootstrap_ci(values: list[float], level: float = 0.95, resamples: int = 20_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (e.g. paired differences to a baseline)."""
    a = np.asarray(values, dtype=np.float64)
    n = len(a)
    if n == 0:
        raise ValueError("bootstrap_ci: no values")
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    if n <= EXACT_UP_TO:  # every resample as a multiset of counts, weighted by its multinomial probability
        means, weights = [], []
        for counts in _compositions(n, n):
            means.append(float(np.dot(counts, a)) / n)
            weights.append(math.factorial(n) / math.prod(math.factorial(c) for c in counts) / n**n)
        m, w = np.asarray(means), np.asarray(weights)
        return _weighted_quantile(m, w, lo_q), _weighted_quantile(m, w, hi_q)
    rng = np.random.default_rng(seed)
    means = a[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    return float(np.quantile(means, lo_q, method="inverted_cdf")), float(np.quantile(means, hi_q, method="inverted_cdf"))


def _compositions(total: int, parts: int):
    """Every tuple of `parts` non-negative counts summing to `total` (stars and bars)."""
    for bars in itertools.combinations(range(total + parts - 1), parts - 1):
        edges = (-1, *bars, total + parts - 1)
        yield tuple(edges[i + 1] - edges[i] - 1 for i in range(parts))
