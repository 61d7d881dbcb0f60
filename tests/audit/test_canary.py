"""Canary audit of one DP-SGD pass: the simulation runs the real samplers and aggregation, the
score is the exact likelihood ratio, and the lower bound has power yet never exceeds the
accountant's certified epsilon."""

from __future__ import annotations

import math
from functools import cache

import numpy as np
import pytest
from scipy import stats

import asymflow.dpsgd.aggregate
from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import Gaussian
from asymflow.audit import canary
from asymflow.audit.canary import SamplerSetting, audit_canary, canary_scores, simulate_canary_sums

DELTA = 1e-5


@cache
def certified(setting: SamplerSetting, sigma: float) -> float:
    """best_epsilon of the sampler's own privacy event (cached: PLD takes a second or two)."""
    return best_epsilon(setting.privacy_event(sigma), DELTA).epsilon


def test_audit_uses_the_training_aggregation_and_samplers() -> None:
    assert canary.noisy_gradient_sum is asymflow.dpsgd.aggregate.noisy_gradient_sum
    built = SamplerSetting("balanced", steps=4, k=2).build(10, seed=0)
    assert type(built) is canary.BalancedIterationSampler
    assert type(SamplerSetting("poisson", steps=3, q=0.2).build(10, seed=0)) is (
        canary.PoissonSampler
    )


def test_bis_canary_appears_in_exactly_k_steps_and_vanishes_when_removed() -> None:
    """With sigma tiny, y rounds to the inclusion pattern: each row has exactly k ones under
    BIS(k, T); without the canary every coordinate sum is 0 although background records
    (clipped, in other coordinates) are present."""
    setting = SamplerSetting("balanced", steps=5, k=2)
    y = simulate_canary_sums(setting, trials=3000, sigma=1e-4, canary=True, seed=1)
    pattern = np.rint(y)
    assert np.abs(y - pattern).max() < 1e-2
    assert set(np.unique(pattern)) == {0.0, 1.0}
    assert (pattern.sum(1) == 2).all()
    # uniform k-subsets: every step holds the canary with probability k/T = 0.4
    assert np.abs(pattern.mean(0) - 0.4).max() < 0.04
    y0 = simulate_canary_sums(setting, trials=3000, sigma=1e-4, canary=False, seed=1)
    assert np.abs(y0).max() < 1e-2


def test_poisson_sums_have_the_subsampled_gaussian_moments() -> None:
    """y_t = Bernoulli(q) + sigma z: mean q, variance q(1-q) + sigma^2, steps independent."""
    q, sigma = 0.3, 0.8
    setting = SamplerSetting("poisson", steps=4, q=q)
    y = simulate_canary_sums(setting, trials=20000, sigma=sigma, clip=2.5, canary=True, seed=2)
    assert np.abs(y.mean(0) - q).max() < 0.03
    assert np.abs(y.var(0) - (q * (1 - q) + sigma**2)).max() < 0.04
    assert abs(np.corrcoef(y[:, 0], y[:, 1])[0, 1]) < 0.03


def test_scores_are_the_exact_log_likelihood_ratio() -> None:
    """Against the mixture densities written out term by term."""
    sigma = 0.9
    y = np.random.default_rng(0).normal(0.3, 1.0, size=(5, 3))
    pdf = stats.norm.pdf
    ratio = pdf(y, 1, sigma) / pdf(y, 0, sigma)  # per step N(1, s^2) / N(0, s^2)
    poisson = canary_scores(y, SamplerSetting("poisson", steps=3, q=0.2), sigma)
    assert np.allclose(poisson, np.log(0.8 + 0.2 * ratio).sum(1))
    one_of_three = canary_scores(y, SamplerSetting("balanced", steps=3, k=1), sigma)
    assert np.allclose(one_of_three, np.log(ratio.mean(1)))
    pairs = [(0, 1), (0, 2), (1, 2)]
    two_of_three = canary_scores(y, SamplerSetting("balanced", steps=3, k=2), sigma)
    expected = np.log(np.mean([ratio[:, i] * ratio[:, j] for i, j in pairs], axis=0))
    assert np.allclose(two_of_three, expected)


@pytest.mark.parametrize(
    "setting",
    [SamplerSetting("poisson", steps=1, q=1.0), SamplerSetting("balanced", steps=1, k=1)],
    ids=["poisson", "bis"],
)
def test_audit_finds_a_large_lower_bound_without_subsampling(setting: SamplerSetting) -> None:
    """sigma = 0.5, one step with the canary always present: the Gaussian mechanism at
    mu = 2, certified epsilon ~ 10 at delta = 1e-5; 10^4 trials prove epsilon > 1.5 (the test's
    power), and the bound stays below the certified value."""
    result = audit_canary(setting, sigma=0.5, delta=DELTA, trials=10_000, seed=0, certify=False)
    assert result.epsilon_lower > 1.5
    assert result.epsilon_lower <= certified(setting, 0.5)
    assert result.epsilon_lower <= result.epsilon_point


@pytest.mark.parametrize(
    ("setting", "sigma"),
    [
        (SamplerSetting("poisson", steps=10, q=0.1), 1.0),
        (SamplerSetting("balanced", steps=10, k=1), 1.0),
        (SamplerSetting("balanced", steps=6, k=2), 0.8),
        (SamplerSetting("poisson", steps=4, q=0.5), 0.7),
        (SamplerSetting("balanced", steps=3, k=1, passes=2), 0.7),
    ],
    ids=lambda v: v.label if isinstance(v, SamplerSetting) else f"sigma={v}",
)
def test_lower_bound_never_exceeds_the_certified_epsilon(
    setting: SamplerSetting, sigma: float
) -> None:
    result = audit_canary(setting, sigma=sigma, delta=DELTA, trials=10_000, seed=3, certify=False)
    bound = certified(setting, sigma)
    assert 0.0 < result.epsilon_lower <= bound, (result, bound)


def test_audit_reports_the_sampler_event_epsilon_and_is_reproducible() -> None:
    setting = SamplerSetting("balanced", steps=4, k=1)
    a = audit_canary(setting, sigma=1.0, trials=2000, seed=5)
    b = audit_canary(setting, sigma=1.0, trials=2000, seed=5)
    assert a.epsilon_lower == b.epsilon_lower and a.threshold == b.threshold
    expected = best_epsilon(setting.build(1, seed=0).privacy_event(Gaussian(1.0)), DELTA).epsilon
    assert a.certified_epsilon == pytest.approx(expected)
    assert a.to_dict()["sampler"] == "BIS(k=1, T=4)"
    assert math.isfinite(a.threshold)


def test_settings_refuse_inconsistent_parameters() -> None:
    with pytest.raises(ValueError, match="needs q"):
        SamplerSetting("poisson", steps=3)
    with pytest.raises(ValueError, match="k must satisfy"):
        SamplerSetting("balanced", steps=3, k=4)
    with pytest.raises(ValueError, match="sigma"):
        simulate_canary_sums(
            SamplerSetting("poisson", steps=1, q=1.0), trials=2, sigma=0.0, canary=True, seed=0
        )
