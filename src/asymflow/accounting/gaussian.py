"""The exact (analytic) Gaussian mechanism and noise calibration for single releases.

delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2), mu = sqrt(count)/sigma
(Balle & Wang 2018, Thm 8), for ``count`` compositions of N(0, sigma^2) at sensitivity 1.
"""

from __future__ import annotations

import math

from scipy import optimize, stats

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.calibrate import bisect_sigma
from asymflow.accounting.events import Gaussian, SelfComposed, check_epsilon
from asymflow.checks import check_delta


def gaussian_delta(sigma: float, epsilon: float, count: int = 1) -> float:
    """Exact delta(epsilon) of ``count`` Gaussian releases with noise multiplier sigma; the
    second term as exp(eps + log Phi(.)), finite for every epsilon (e^eps alone overflows
    above 709, which small sigmas reach while calibrating)."""
    check_epsilon(epsilon)
    mu = math.sqrt(count) / sigma
    return float(
        stats.norm.cdf(-epsilon / mu + mu / 2)
        - math.exp(epsilon + stats.norm.logcdf(-epsilon / mu - mu / 2))
    )


def gaussian_epsilon(sigma: float, delta: float, count: int = 1) -> float:
    """Exact epsilon(delta), the root of :func:`gaussian_delta`."""
    check_delta("delta", delta)
    if gaussian_delta(sigma, 0.0, count) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(sigma, hi, count) > delta:
        hi *= 2
    return float(optimize.brentq(lambda e: gaussian_delta(sigma, e, count) - delta, 0, hi))


def gaussian_sigma_for_epsilon(
    target_epsilon: float, delta: float, count: int = 1, rel_tol: float = 1e-4
) -> float:
    """Smallest sigma (to ``rel_tol``) whose *certified* epsilon for ``count`` releases, by the
    ledger's method (:func:`best_epsilon`), is <= target: the ledger never reports above it.

    Starts from the exact analytic sigma and raises it by factors of (1 + rel_tol) until the
    certified bound, which sits just above the exact value, meets the target.
    """
    check_delta("delta", delta)
    check_epsilon(target_epsilon)
    if target_epsilon == 0:
        raise ValueError("target_epsilon must be > 0 for a Gaussian release")
    sigma = bisect_sigma(
        lambda s: gaussian_epsilon(s, delta, count), target_epsilon, rel_tol=rel_tol / 10
    )[0]
    for _ in range(10_000):
        if best_epsilon(SelfComposed(Gaussian(sigma), count), delta).epsilon <= target_epsilon:
            return sigma
        sigma *= 1 + rel_tol
    raise ArithmeticError("certified Gaussian epsilon did not meet the target")
