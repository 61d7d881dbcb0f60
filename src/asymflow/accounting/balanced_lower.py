"""A certified lower bound on the epsilon of k-of-T balanced sampling: one fixed test.

For any event E of the output, delta_remove(eps) >= P(E) - e^eps Q(E) and
delta_add(eps) >= Q(E) - e^eps P(E) (the hockey-stick divergence is a supremum over events),
so a lower bound on P(E) and an upper bound on Q(E) for a family of events give a lower bound on
delta(eps) of the true pair, hence on epsilon(delta). Nothing here is an estimate.

The events are thresholds of the statistic U = sum_t floor_h(g(y_t)), with
g(y) = log(1 - c + c w(y)), w(y) = exp((2y - 1)/(2 sigma^2)), c = k/T: the log-likelihood ratio of
Poisson(c) subsampling, which approximates the balanced log-ratio log(e_k(w)/C(T,k)) (the two
agree on every term with at most one selected coordinate, and differ on j-fold terms by the
factor prod_{i<j}(1 - i/k) of sampling without replacement). The flooring to the lattice hZ
makes U exactly computable: under Q the T terms are iid, under P (S = the first k coordinates,
by symmetry) k terms have y_t ~ N(1, sigma^2); each term's lattice law is a difference of
normal CDFs (g is increasing in y), and the T-fold sum is a circular FFT convolution.

Every numerical loss is charged in the direction that lowers the bound: mass of a term with
|y_t - mean| > 12 sigma is dropped (its probability, times T, is added to the upper bounds),
mass the circular convolution folds into the window is bounded by Chernoff bounds on the exact
lattice laws, and a 1e-12 allowance covers floating-point error of the FFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import special

_FFT_SIZE = 1 << 18
_TAIL_SD = 12.0
_FLOAT_SLACK = 1e-12


@dataclass(frozen=True)
class TestLaws:
    """Lattice laws of U under P and Q on the window start + h * (0..N-1), and the slack to
    charge: ``q_slack`` bounds the Q mass the window may misplace (dropped tails, mass folded
    in by the circular convolution, floating point), ``p_slack`` the same for P."""

    start: float
    h: float
    p: np.ndarray
    q: np.ndarray
    p_slack: float
    q_slack: float


def _term_law(sigma: float, c: float, h: float, mean: float, y_lo: float, y_hi: float):
    """Lattice law of floor_h(g(y)), y ~ N(mean, sigma^2), restricted to y in [y_lo, y_hi].

    Returns (first index j0, masses for j0, j0+1, ...). Mass outside [y_lo, y_hi] is dropped.
    """

    def g(y: np.ndarray | float) -> np.ndarray:
        log_w = (2 * np.asarray(y) - 1) / (2 * sigma**2)
        return np.logaddexp(math.log1p(-c) if c < 1 else -np.inf, math.log(c) + log_w)

    j0 = math.floor(float(g(y_lo)) / h)
    j1 = math.floor(float(g(y_hi)) / h)
    edges_g = np.arange(j0, j1 + 2) * h
    # y at which g(y) = edge: log w = log((e^g - (1 - c)) / c).
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = np.expm1(edges_g) + c  # e^g - (1 - c)
        log_w = np.log(inner / c)
    y = sigma**2 * log_w + 0.5
    y = np.where(inner > 0, y, -np.inf)
    y = np.clip(y, y_lo, y_hi)
    z = (y - mean) / sigma
    upper = special.ndtr(-z[:-1]) - special.ndtr(-z[1:])
    lower = special.ndtr(z[1:]) - special.ndtr(z[:-1])
    mass = np.where(z[:-1] > 0, upper, lower)
    return j0, np.clip(mass, 0.0, None)


def _log_mgf(j0: int, mass: np.ndarray, h: float, lam: float) -> float:
    x = lam * (j0 + np.arange(mass.size)) * h
    with np.errstate(divide="ignore"):
        return float(special.logsumexp(x, b=mass))


@lru_cache(maxsize=64)
def test_laws(steps: int, k: int, sigma: float, c: float) -> TestLaws:
    """Laws of U under P and Q (see module docstring), with their slacks.

    ``steps`` terms in all, ``k`` of them selected; E passes of k of T are the same computation
    with E T terms and E k selected ones (passes are independent, the statistic is the sum).
    """
    T = steps
    y_lo_q, y_hi_q = -_TAIL_SD * sigma, _TAIL_SD * sigma
    y_lo_p, y_hi_p = 1 - _TAIL_SD * sigma, 1 + _TAIL_SD * sigma
    # A coarse pass for the range of U.
    probe = 1e-3
    jq, mq = _term_law(sigma, c, probe, 0.0, y_lo_q, y_hi_q)
    jp, mp = _term_law(sigma, c, probe, 1.0, y_lo_p, y_hi_p)

    def moments(j0: int, m: np.ndarray) -> tuple[float, float]:
        x = (j0 + np.arange(m.size) + 0.5) * probe
        mean = float((x * m).sum() / m.sum())
        return mean, float(((x - mean) ** 2 * m).sum() / m.sum())

    (mq_mean, mq_var), (mp_mean, mp_var) = moments(jq, mq), moments(jp, mp)
    centre_q = T * mq_mean
    spread = math.sqrt(T * mq_var + k * mp_var)
    lo = centre_q - 14 * spread - 2
    hi = centre_q + k * (mp_mean - mq_mean) + 14 * spread + 60
    h = (hi - lo) / _FFT_SIZE
    shift = math.floor(lo / (h * T))
    start = shift * h * T
    h = (hi - start) / _FFT_SIZE  # stretch h so the window still reaches hi
    shift = math.floor(start / (h * T))
    start = shift * h * T
    end = start + _FFT_SIZE * h

    def placed(j0: int, m: np.ndarray) -> np.ndarray:
        arr = np.zeros(_FFT_SIZE)
        np.add.at(arr, (j0 + np.arange(m.size) - shift) % _FFT_SIZE, m)
        return arr

    jq, mq = _term_law(sigma, c, h, 0.0, y_lo_q, y_hi_q)
    jp, mp = _term_law(sigma, c, h, 1.0, y_lo_p, y_hi_p)
    fq, fp = np.fft.rfft(placed(jq, mq)), np.fft.rfft(placed(jp, mp))
    q = np.clip(np.fft.irfft(fq**T, _FFT_SIZE), 0.0, None)
    p = np.clip(np.fft.irfft(fq ** (T - k) * fp**k, _FFT_SIZE), 0.0, None)
    # Dropped tails of single terms (both distributions of a Q-term, P-terms for P).
    tail_q = special.ndtr(-_TAIL_SD) * 2
    q_tails = T * tail_q
    p_tails = (T - k) * tail_q + k * tail_q

    # Chernoff bounds on the exact lattice sums outside [start, end): folded-in mass.
    def outside(n_q: int, n_p: int) -> float:
        best_hi, best_lo = math.inf, math.inf
        for lam in (0.25, 0.5, 1.0, 2.0, 4.0):
            up = n_q * _log_mgf(jq, mq, h, lam) + n_p * _log_mgf(jp, mp, h, lam) - lam * end
            dn = n_q * _log_mgf(jq, mq, h, -lam) + n_p * _log_mgf(jp, mp, h, -lam) + lam * start
            best_hi, best_lo = min(best_hi, up), min(best_lo, dn)
        return math.exp(min(best_hi, 0.0)) + math.exp(min(best_lo, 0.0))

    q_out = outside(T, 0)
    p_out = outside(T - k, k)
    return TestLaws(
        start=start,
        h=h,
        p=p,
        q=q,
        p_slack=p_out + p_tails + _FLOAT_SLACK,
        q_slack=q_out + q_tails + _FLOAT_SLACK,
    )


def delta_lower(laws: TestLaws, epsilon: float) -> tuple[float, float]:
    """Certified lower bounds (remove, add) on delta(epsilon) of the true pair."""
    # Remove: E = {U >= t}: P(E) >= tail_p - (folded mass of P), Q(E) <= tail_q + q slack.
    tail_p = np.cumsum(laws.p[::-1])[::-1]
    tail_q = np.cumsum(laws.q[::-1])[::-1]
    e = math.exp(epsilon)
    remove = float(np.max((tail_p - laws.p_slack) - e * (tail_q + laws.q_slack)))
    # Add: E = {U < t}: Q(E) >= head_q - q slack, P(E) <= head_p + p slack.
    head_q = np.cumsum(laws.q)
    head_p = np.cumsum(laws.p)
    add = float(np.max((head_q - laws.q_slack) - e * (head_p + laws.p_slack)))
    return max(remove, 0.0), max(add, 0.0)


def _c_values(steps: int, k: int) -> tuple[float, ...]:
    base = k / steps
    return tuple(sorted({min(1.0, base * f) for f in (0.7, 1.0, 1.4)}))


def epsilon_lower(steps: int, k: int, sigma: float, delta: float, epochs: int = 1) -> float:
    """A certified lower bound on epsilon(delta) of ``epochs`` k-of-T passes (the largest over
    a few c). epsilon(delta) >= eps whenever delta_lower(eps) > delta, in either direction.
    """
    if not 1 <= k <= steps:
        raise ValueError(f"k must satisfy 1 <= k <= steps, got k={k}, steps={steps}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got epochs={epochs}")
    best = 0.0
    for c in _c_values(steps, k):
        laws = test_laws(steps * epochs, k * epochs, float(sigma), c)
        if max(delta_lower(laws, best)) <= delta:
            continue
        lo, hi = best, 1.0
        while max(delta_lower(laws, hi)) > delta:
            lo, hi = hi, hi * 2
        for _ in range(40):
            mid = (lo + hi) / 2
            if max(delta_lower(laws, mid)) > delta:
                lo = mid
            else:
                hi = mid
        best = max(best, lo)
    return best
