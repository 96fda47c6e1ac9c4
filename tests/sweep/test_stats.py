"""Bootstrap intervals against answers worked out by hand, and mean ± std."""
import itertools

import numpy as np
import pytest

from lamscale.sweep.stats import bootstrap_ci, mean_std


def test_two_values_resample_to_their_extremes():
    # resamples of [0, 1]: means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 → the 2.5 % and 97.5 % points are 0 and 1
    assert bootstrap_ci([0.0, 1.0]) == (0.0, 1.0)


def test_three_values_by_hand():
    # 27 equally likely resamples of [1, 2, 3]; P(mean = 1) = P(mean = 3) = 1/27 > 2.5 %: the interval is [1, 3];
    # at 80 % (10 % each side): P(mean ≤ 4/3) = 1/27 + 3/27 = 4/27 ≥ 0.1 > 1/27, so the lower end is 4/3
    assert bootstrap_ci([1.0, 2.0, 3.0]) == (1.0, 3.0)
    lo, hi = bootstrap_ci([1.0, 2.0, 3.0], level=0.8)
    assert lo == pytest.approx(4 / 3) and hi == pytest.approx(8 / 3)


def test_equal_values_have_no_width_and_the_exact_path_matches_brute_force():
    assert bootstrap_ci([2.5, 2.5, 2.5, 2.5]) == (2.5, 2.5)
    values = [0.3, -1.2, 2.0, 0.7, 1.1]
    means = sorted(np.mean(c) for c in itertools.product(values, repeat=5))  # all 3,125 resamples
    want = np.quantile(means, [0.025, 0.975], method="inverted_cdf")
    assert bootstrap_ci(values) == pytest.approx(tuple(want), abs=1e-12)


def test_many_values_monte_carlo_is_close_to_the_normal_interval():
    rng = np.random.default_rng(0)
    values = rng.normal(1.0, 2.0, 400)
    lo, hi = bootstrap_ci(list(values))
    se = values.std(ddof=1) / np.sqrt(len(values))
    assert lo == pytest.approx(values.mean() - 1.96 * se, abs=0.03) and hi == pytest.approx(values.mean() + 1.96 * se, abs=0.03)


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert mean_std([4.0]) == (4.0, 0.0)
    with pytest.raises(ValueError, match="no values"):
        bootstrap_ci([])
