"""The analytic Gaussian mechanism (Balle & Wang 2018, Thm 8) far out in epsilon.

Reference: the same closed form evaluated with mpmath at 60 significant digits, where
e^eps Phi(.) has no overflow and no cancellation.
"""

from __future__ import annotations

import math

import mpmath
import pytest

from asymflow.accounting.calibrate import bisect_sigma
from asymflow.accounting.gaussian import gaussian_delta, gaussian_epsilon


def reference_delta(sigma: float, epsilon: float, count: int = 1) -> float:
    with mpmath.workdps(60):
        mu = mpmath.sqrt(count) / mpmath.mpf(sigma)
        eps = mpmath.mpf(epsilon)
        return float(
            mpmath.ncdf(-eps / mu + mu / 2) - mpmath.exp(eps) * mpmath.ncdf(-eps / mu - mu / 2)
        )


@pytest.mark.parametrize(
    ("sigma", "epsilon", "count"),
    [(1.0, 1.0, 1), (0.5, 3.0, 4), (0.05, 600.0, 1), (0.04, 750.0, 1), (0.01, 5000.0, 1)],
)
def test_delta_matches_high_precision_including_beyond_exp_overflow(sigma, epsilon, count):
    got = gaussian_delta(sigma, epsilon, count)
    assert got == pytest.approx(reference_delta(sigma, epsilon, count), rel=1e-9, abs=1e-300)


def test_small_sigma_has_a_finite_epsilon_that_solves_delta():
    eps = gaussian_epsilon(0.02, 1e-5)
    assert 709 < eps < math.inf  # e^eps alone would overflow here
    assert reference_delta(0.02, eps) == pytest.approx(1e-5, rel=1e-6)


@pytest.mark.parametrize("count", [1, 6])
def test_calibrating_a_very_large_epsilon_has_no_overflow(count):
    """Calibrating sigma for epsilon = 1024 over 6 releases bisects down to sigma ~ 0.01, where
    e^eps overflowed before; the analytic sigma and its epsilon must come out finite."""
    assert reference_delta(0.01, gaussian_epsilon(0.01, 1e-5, count), count) == pytest.approx(
        1e-5, rel=1e-6
    )
    sigma = bisect_sigma(lambda s: gaussian_epsilon(s, 1e-5, count), 1024.0)[0]
    assert 0.01 < sigma < 0.2
