"""k-of-T balanced sampling beyond the k-fold reduction: exact remove RDP (overlap profiles)
and the certified lower bound (a fixed Neyman-Pearson test)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asymflow.accounting import allocation, balanced_lower, balanced_rdp
from asymflow.accounting.events import BalancedSampled, Gaussian
from asymflow.accounting.montecarlo import MonteCarloAccountant
from asymflow.accounting.pld import PldAccountant
from asymflow.accounting.rdp import RdpAccountant
from tests.accounting.test_reference_values import (
    REMOVE_TABLE,
    analytic_gaussian_epsilon,
    brute_force_remove_rdp,
)


@pytest.mark.parametrize(("T", "k", "alpha", "sigma", "value"), REMOVE_TABLE)
def test_exact_remove_rdp_reproduces_every_enumerated_row(T, k, alpha, sigma, value):
    # Source: ACCOUNTING.md sec. 4 exact remove-direction table (enumeration), e.g.
    # T=4, k=2, alpha=3, sigma=1 -> 1.8048 (the reduction gives 1.954).
    log_m, exact = balanced_rdp.log_moments_remove(T, k, sigma, alpha)
    assert exact[alpha]
    assert log_m[alpha] / (alpha - 1) == pytest.approx(value, abs=1e-4)
    remove, _ = (
        RdpAccountant(orders=np.array([alpha]))
        .compose(BalancedSampled(k, T, Gaussian(sigma)))
        .curves()
    )
    assert remove[0] == pytest.approx(value, abs=1e-4)


@pytest.mark.parametrize(
    ("T", "k", "alpha", "sigma"),
    [(5, 2, 3, 0.9), (5, 3, 4, 1.1), (6, 4, 3, 0.7), (7, 3, 4, 1.2), (6, 2, 4, 0.8)],
)
def test_exact_remove_rdp_matches_brute_force_enumeration(T, k, alpha, sigma):
    log_m, exact = balanced_rdp.log_moments_remove(T, k, sigma, alpha)
    assert exact[alpha]
    assert log_m[alpha] / (alpha - 1) == pytest.approx(
        brute_force_remove_rdp(T, k, alpha, sigma), rel=1e-10
    )


@pytest.mark.parametrize(("T", "k", "sigma"), [(1024, 8, 0.6), (391, 5, 0.6), (300, 30, 1.0)])
def test_remove_moments_never_above_the_reduction(T, k, sigma):
    log_m, exact = balanced_rdp.log_moments_remove(T, k, sigma, 12)
    reduction = k * allocation.remove_log_moments(T // k, sigma, 12)
    assert np.all(log_m <= reduction + 1e-12)
    assert exact[2] and exact[3]  # alpha = 2, 3 are always within the budget here
    assert log_m[3] < reduction[3] - 1e-3  # and strictly tighter


def test_k_equal_to_steps_moments_are_gaussian():
    log_m, exact = balanced_rdp.log_moments_remove(6, 6, 1.3, 5)
    a = np.arange(6)
    np.testing.assert_allclose(log_m, a * (a - 1) * 6 / (2 * 1.3**2), rtol=1e-12)
    assert exact[2:].all()


def test_block_relaxations_are_ordered_finest_first():
    structures = balanced_rdp.block_structures(100, 7)
    assert structures[0] == ((7, 100, 1),)
    assert structures[-1] == ((1, 14, 7),)  # the k-fold reduction
    assert ((2, 28, 3), (1, 14, 1)) in structures


# ---------------------------------------------------------------------------------------------
# Certified lower bound (balanced_lower): never above the truth, close where the test is optimal.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("T", "sigma"), [(1, 1.0), (4, 2.0), (16, 3.0)])
def test_lower_bound_is_tight_when_k_equals_steps(T, sigma):
    # k = T: the pair is the Gaussian mechanism with mu = sqrt(T)/sigma (Balle & Wang 2018,
    # Thm 8) and the test statistic is its exact log-likelihood ratio, so the bound is tight.
    exact = analytic_gaussian_epsilon(math.sqrt(T) / sigma, 1e-5)
    lower = balanced_lower.epsilon_lower(T, T, sigma, 1e-5)
    assert exact * 0.995 <= lower <= exact + 1e-9


def test_lower_bound_below_published_certified_k1_bounds():
    # Source: ACCOUNTING.md sec. 4, moshenfeld/PLD_accounting 2.0: [2.0467, 2.0485] for
    # sigma=0.6, T=1024, k=1, delta=1e-6.
    assert 1.8 <= balanced_lower.epsilon_lower(1024, 1, 0.6, 1e-6) <= 2.0467


@pytest.mark.parametrize(("T", "k", "sigma"), [(6, 3, 1.0), (12, 4, 0.8), (10, 2, 1.5)])
def test_lower_bound_below_monte_carlo_upper_confidence(T, k, sigma):
    # Independent check: Monte Carlo with the exact O(Tk) log-ratio (Dong & Ozgur 2605.07072);
    # its upper confidence epsilon (0.999) must not be below a certified lower bound.
    event = BalancedSampled(k, T, Gaussian(sigma))
    mc = MonteCarloAccountant(samples=40_000, confidence=0.999, seed=3).compose(event)
    lower = balanced_lower.epsilon_lower(T, k, sigma, 1e-2)
    assert 0 < lower <= mc.epsilon(1e-2)


@pytest.mark.parametrize(
    ("T", "k", "sigma", "delta"),
    [(391, 5, 0.6, 1.25e-5), (100, 10, 2.0, 1e-6), (10_000, 205, 1.42, 1e-5)],
)
def test_lower_bound_below_certified_upper_bound(T, k, sigma, delta):
    event = BalancedSampled(k, T, Gaussian(sigma))
    upper = PldAccountant().compose(event).epsilon(delta)
    lower = balanced_lower.epsilon_lower(T, k, sigma, delta)
    assert 0.9 * upper <= lower <= upper


def test_lower_bound_of_epochs_rises_with_epochs():
    one = balanced_lower.epsilon_lower(200, 4, 1.0, 1e-5)
    two = balanced_lower.epsilon_lower(200, 4, 1.0, 1e-5, epochs=2)
    assert (
        one
        < two
        <= RdpAccountant().compose(BalancedSampled(4, 200, Gaussian(1.0)), 2).epsilon(1e-5)
    )
