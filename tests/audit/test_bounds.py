"""Clopper-Pearson limits and the epsilon lower bound of a membership test."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asymflow.audit.bounds import clopper_pearson, epsilon_lower_bound


def test_clopper_pearson_closed_forms_at_the_extremes() -> None:
    """x = 0: upper = 1 - (alpha/2)^(1/n); x = n: lower = (alpha/2)^(1/n) (Clopper & Pearson
    1934: the beta quantiles have these closed forms when one parameter is 1)."""
    lo, hi = clopper_pearson([0, 10], [10, 10], 0.95)
    assert lo[0] == 0.0 and hi[1] == 1.0
    assert hi[0] == pytest.approx(1 - 0.025 ** (1 / 10), rel=1e-9)
    assert lo[1] == pytest.approx(0.025 ** (1 / 10), rel=1e-9)


def test_clopper_pearson_matches_the_tabulated_interval() -> None:
    """5 of 10 at 95%: [0.1871, 0.8129], the standard exact binomial interval."""
    lo, hi = clopper_pearson(5, 10, 0.95)
    assert float(lo) == pytest.approx(0.187086, abs=1e-6)
    assert float(hi) == pytest.approx(0.812914, abs=1e-6)


def test_epsilon_bound_is_log_of_rate_limits_and_never_negative() -> None:
    tp, fp, n = 900, 10, 1000
    lo, _ = clopper_pearson(tp, n)
    _, hi = clopper_pearson(fp, n)
    eps = epsilon_lower_bound(tp, n, fp, n, delta=1e-5)
    assert float(eps) == pytest.approx(math.log((float(lo) - 1e-5) / float(hi)))
    assert float(epsilon_lower_bound(500, 1000, 500, 1000, delta=1e-5)) == 0.0
    assert float(epsilon_lower_bound(0, 1000, 0, 1000, delta=1e-5)) == 0.0


def test_epsilon_bound_grows_with_trials_at_fixed_rates() -> None:
    small = epsilon_lower_bound(90, 100, 1, 100, delta=0.0)
    large = epsilon_lower_bound(9000, 10000, 100, 10000, delta=0.0)
    assert float(large) > float(small)
    assert float(large) < math.log(0.9 / 0.01)


def test_bounds_refuse_impossible_counts() -> None:
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson(np.array([11]), np.array([10]))
    with pytest.raises(ValueError, match="delta"):
        epsilon_lower_bound(1, 2, 1, 2, delta=1.0)
