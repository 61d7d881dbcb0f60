"""Property-based checks (hypothesis): monotonicity, and certified >= Monte Carlo lower bound."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asymflow.accounting import (
    BalancedSampled,
    Gaussian,
    PldAccountant,
    RdpAccountant,
    SelfComposed,
    balanced_rdp,
    best_epsilon,
)
from asymflow.accounting.montecarlo import MonteCarloAccountant

FAST = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])

sigmas = st.floats(min_value=0.5, max_value=4.0)
steps = st.integers(min_value=2, max_value=2000)


def bis(k: int, T: int, sigma: float, epochs: int = 1):
    return SelfComposed(BalancedSampled(k, T, Gaussian(sigma)), epochs)


@FAST
@given(sigma=sigmas, T=steps, data=st.data())
def test_rdp_epsilon_rises_with_epochs_and_falls_with_sigma(sigma, T, data):
    # Not asserted in k: for k > 1 the remove direction is exact where the profile program
    # finishes and a block relaxation elsewhere, so the *bound* at k + 1 may come from a finer
    # structure than the one at k and sit below it (both are valid upper bounds; the exact
    # moments themselves rise with k, see test_exact_remove_moments_rise_with_k).
    k = data.draw(st.integers(min_value=1, max_value=T - 1))
    epochs = data.draw(st.integers(min_value=1, max_value=20))

    def eps(k_, sigma_, epochs_):
        return RdpAccountant().compose(bis(k_, T, sigma_, epochs_)).epsilon(1e-5)

    base = eps(k, sigma, epochs)
    assert eps(k, sigma, epochs + 1) >= base - 1e-12
    assert eps(k, sigma * 1.1, epochs) <= base + 1e-12


@FAST
@given(sigma=sigmas, T=st.integers(min_value=3, max_value=60), data=st.data())
def test_exact_remove_moments_rise_with_k(sigma, T, data):
    # Coupling: add one more uniform element to each subset; pairwise overlaps only grow.
    k = data.draw(st.integers(min_value=1, max_value=T - 1))
    low = balanced_rdp.profile_log_moments(T, k, sigma, 4)
    high = balanced_rdp.profile_log_moments(T, k + 1, sigma, 4)
    for a in range(2, min(len(low), len(high))):
        assert high[a] >= low[a] - 1e-12


@SLOW
@given(sigma=sigmas, T=st.integers(min_value=2, max_value=300), data=st.data())
def test_pld_epsilon_rises_with_k_and_epochs_and_falls_with_sigma(sigma, T, data):
    k = data.draw(st.integers(min_value=1, max_value=min(T - 1, 8)))

    def eps(k_, sigma_, epochs_):
        return PldAccountant(points=400).compose(bis(k_, T, sigma_, epochs_)).epsilon(1e-5)

    base = eps(k, sigma, 1)
    # Slack 1e-3 covers the discretization of two separately rounded upper bounds.
    assert eps(min(2 * k, T), sigma, 1) >= base - 1e-3
    assert eps(k, sigma, 2) >= base - 1e-3
    assert eps(k, sigma * 1.2, 1) <= base + 1e-3


@SLOW
@given(
    sigma=st.floats(min_value=0.6, max_value=2.0),
    T=st.integers(min_value=2, max_value=12),
    data=st.data(),
)
def test_certified_epsilon_never_below_monte_carlo_lower_bound(sigma, T, data):
    k = data.draw(st.integers(min_value=1, max_value=T))
    event = bis(k, T, sigma)
    delta = 1e-2
    mc = MonteCarloAccountant(samples=20_000, confidence=0.99, seed=7).compose(event)
    lower = mc.epsilon_lower(delta)
    for name, eps in best_epsilon(event, delta).by_method.items():
        assert eps >= lower, f"{name} certified {eps} below Monte Carlo lower bound {lower}"
