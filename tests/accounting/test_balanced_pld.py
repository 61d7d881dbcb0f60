"""Block PLD for k-of-T balanced sampling (balanced_pld): 2-of-m pairs through g-part
partitions. Every check is one the bound must pass if it is valid: moments above the exact
2-of-m moments, hockey-sticks above a Monte Carlo lower confidence limit in both directions,
epsilon between the certified lower bound and the k-fold reduction."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy.special import gammaln

from asymflow.accounting import balanced_lower, balanced_pld, balanced_rdp
from asymflow.accounting.allocation import remove_log_moments
from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import BalancedSampled, Gaussian
from asymflow.accounting.montecarlo import hoeffding_lower, sample_privacy_losses
from asymflow.accounting.pld import PldAccountant


def parts_log_moment(m: int, parts: int, sigma: float, alpha: int) -> float:
    """Exact log E[R^alpha], R = e_2(a_1..a_g)/C(g,2), a_j iid 1-of-floor(m/g) ratios:
    multinomial expansion over the C(g,2) pair terms with exact 1-of-n moments."""
    lm = remove_log_moments(m // parts, sigma, 2 * alpha)
    pairs = list(itertools.combinations(range(parts), 2))
    terms = []
    for head in itertools.product(range(alpha + 1), repeat=len(pairs) - 1):
        if sum(head) > alpha:
            continue
        ks = (*head, alpha - sum(head))
        deg = [0] * parts
        for (i, j), c in zip(pairs, ks, strict=True):
            deg[i] += c
            deg[j] += c
        log_mult = gammaln(alpha + 1) - sum(gammaln(c + 1) for c in ks)
        terms.append(log_mult + sum(lm[d] for d in deg))
    return float(np.logaddexp.reduce(terms)) - alpha * math.log(len(pairs))


def atoms_log_moment(atoms, alpha: float) -> float:
    pos = atoms.ratio > 0
    return math.log(float((atoms.mass[pos] * atoms.ratio[pos] ** alpha).sum()))


@pytest.mark.parametrize(("m", "sigma", "parts"), [(16, 1.0, 4), (24, 0.8, 3), (40, 0.6, 4)])
def test_pair_moments_dominate_exact_two_of_m_and_the_parts_relaxation(m, sigma, parts):
    """Convex order => E R'^alpha >= E R_g^alpha >= E L^alpha (exact 2-of-m, overlap profiles)."""
    atoms = balanced_pld.pair_atoms(m, sigma, parts)
    exact = balanced_rdp.profile_log_moments(m, 2, sigma, 5, 10**6)
    for alpha in range(2, 6):
        relaxed = parts_log_moment(m, parts, sigma, alpha)
        got = atoms_log_moment(atoms, alpha)
        assert relaxed >= exact[alpha] - 1e-9
        assert got >= relaxed - 1e-9
    # Tight at alpha = 2: the discretization adds little.
    assert atoms_log_moment(atoms, 2) <= parts_log_moment(m, parts, sigma, 2) * 1.05 + 1e-3


def test_pair_is_a_probability_pair_with_mean_one():
    atoms = balanced_pld.pair_atoms(40, 0.6, 4)
    assert abs(atoms.mass.sum() - 1) < 1e-12
    assert abs(float((atoms.mass * atoms.ratio).sum()) + atoms.p_bad - 1) < 1e-12


@pytest.mark.parametrize(("m", "sigma"), [(8, 1.0), (12, 0.7)])
def test_pair_hockey_sticks_above_monte_carlo_lower_limit_both_directions(m, sigma):
    """delta_upper(eps) of the discrete pair >= Hoeffding lower limit (beta=1e-6) of the exact
    2-of-m pair's delta, estimated with the exact log-ratio (montecarlo), both directions."""
    atoms = balanced_pld.pair_atoms(m, sigma, 4)
    rng = np.random.default_rng(11)
    n = 40_000
    for direction in ("remove", "add"):
        losses = sample_privacy_losses(m, 2, sigma, n, direction, rng)
        for eps in (0.0, 0.25, 0.5, 1.0):
            c = math.exp(eps)
            mc = float(np.clip(1 - np.exp(eps - losses), 0, None).mean())
            if direction == "remove":
                bound = float((atoms.mass * np.clip(atoms.ratio - c, 0, None)).sum()) + atoms.p_bad
            else:
                bound = float((atoms.mass * np.clip(1 - c * atoms.ratio, 0, None)).sum())
            assert bound >= hoeffding_lower(mc, n, 1e-6), (direction, eps, bound, mc)


@pytest.mark.parametrize(("T", "k", "sigma", "delta"), [(200, 4, 0.8, 1e-5), (150, 3, 1.0, 1e-6)])
def test_block_epsilon_between_lower_bound_and_reduction(T, k, sigma, delta):
    event = BalancedSampled(k=k, steps=T, event=Gaussian(sigma))
    block = balanced_pld.BlockPldAccountant().compose(event).epsilon(delta)
    reduction = PldAccountant().compose(event).epsilon(delta)
    lower = balanced_lower.epsilon_lower(T, k, sigma, delta)
    assert lower <= block <= reduction


def test_best_takes_block_pld_by_name_and_never_reports_more_than_the_reduction():
    event = BalancedSampled(k=4, steps=200, event=Gaussian(0.8))
    report = best_epsilon(event, 1e-5, methods=("pld", "pld-blocks"))
    assert report.epsilon == min(report.by_method.values())
    assert report.by_method["pld-blocks"] <= report.by_method["pld"]


def test_block_structure_uses_at_most_the_steps():
    for T, k in [(391, 5), (1024, 8), (10_000, 205), (17, 3)]:
        b, m, single = balanced_pld.block_sizes(T, k)
        assert 2 * b + single == k
        assert b * m + single * (T // k) <= T
    assert not balanced_pld.applies(10, 5, 1.0)  # m = 4 < 2 * parts
    with pytest.raises(ValueError):
        balanced_pld.pair_atoms(40, 0.6, 5)


def test_trim_only_reveals_more_in_both_directions():
    """trim moves extreme atoms to the P-only/Q-only masses: every hockey-stick, both
    directions, can only grow, and the pair stays a probability pair."""
    from asymflow.accounting import allocation

    atoms = allocation.ratio_atoms(20, 0.6, upper=True)
    trimmed = balanced_pld.trim(atoms, 1e-9)
    assert trimmed.ratio.size < atoms.ratio.size
    assert trimmed.p_bad - atoms.p_bad <= 1e-9 + 1e-6 * 1e-9
    for a in (atoms, trimmed):
        assert abs(a.mass.sum() + a.q_bad - 1) < 1e-12
        assert abs(float((a.mass * a.ratio).sum()) + a.p_bad - 1) < 1e-12
    for eps in np.linspace(0, 12, 25):
        c = math.exp(eps)
        for direction in ("remove", "add"):
            values = []
            for a in (atoms, trimmed):
                if direction == "remove":
                    hs, bad = np.clip(a.ratio - c, 0, None), a.p_bad
                else:
                    hs, bad = np.clip(1 - c * a.ratio, 0, None), a.q_bad
                values.append(float((a.mass * hs).sum()) + bad)
            assert values[1] >= values[0] - 1e-15, (direction, eps, values)


def test_best_tries_block_pld_by_default_only_where_it_applies():
    from asymflow.accounting.best import DEFAULT_METHODS
    from asymflow.accounting.events import PoissonSampled, SelfComposed

    assert "pld-blocks" in DEFAULT_METHODS
    event = SelfComposed(BalancedSampled(k=4, steps=200, event=Gaussian(0.8)), 2)
    assert balanced_pld.uses_blocks(event)
    report = best_epsilon(event, 1e-5)
    assert {"rdp", "pld", "pld-blocks"} <= report.by_method.keys()
    assert report.epsilon == min(report.by_method.values())
    # k = 1 and Poisson: the blocks change nothing, so best does not run them twice.
    for other in (
        BalancedSampled(k=1, steps=200, event=Gaussian(0.8)),
        PoissonSampled(q=0.02, event=Gaussian(0.8)),
    ):
        assert not balanced_pld.uses_blocks(other)
        assert "pld-blocks" not in best_epsilon(other, 1e-5).by_method
