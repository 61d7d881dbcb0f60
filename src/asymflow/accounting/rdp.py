"""Renyi-DP accountant, both adjacency directions kept separately.

- Gaussian: alpha/(2 sigma^2). Laplace: Mironov 2017, Prop. 6 (via dp_accounting).
- Randomized response (pure eps-DP): min(eps, alpha eps^2/2), Bun & Steinke 2016, Prop. 3.3.
- Poisson-subsampled Gaussian: Mironov, Talwar, Zhang 2019 (via dp_accounting); it bounds both
  directions.
- Balanced (k of T), remove direction: exact integer-order moments by the overlap-profile
  program of :mod:`balanced_rdp` where it finishes, else a block relaxation that is never above
  the k-fold reduction. Add direction: the reduction over all T steps (blocks of floor(T/k)
  and floor(T/k) + 1) and, for k > T/2, the exact complement identity
  (:func:`balanced_rdp.log_moments_add`; exact for k = T - 1). Model partitioning: k
  compositions of 1-of-floor(T/k) allocation (Feldman & Shenfeld 2502.08202, Lemma 3.2); 1-of-n
  remove direction exact (:func:`allocation.remove_rdp`), add direction by quadrature
  (:func:`allocation.add_rdp`).
- Poisson-subsampled partitioned step: remove direction exact by the binomial expansion
  E_Q[(1 - q + qL)^alpha] = sum_l C(alpha, l) (1-q)^(alpha-l) q^l E_Q[L^l]; add direction by
  quadrature of E_Q[(1 - q + qL)^(1-alpha)].
- Poisson-subsampled joint step ``PoissonSampled(q, Composed(parts))`` (partial splitting: a
  shared Gaussian part and a split part released for the same sampled record): likelihood
  ratios multiply, so the remove direction is again an exact binomial expansion; the add
  direction is bounded by convexity. Adding the parts' separately subsampled RDP would
  under-report, because they share one sampling decision.
- Allocation curves are computed at integer orders and interpolated in between through the
  convexity of the cumulant generating function (alpha - 1) D_alpha.

epsilon(delta) converts each direction with dp_accounting's RDP-to-DP conversion (Canonne,
Kamath, Steinke 2020) and reports the larger.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp
from scipy import special

from asymflow.accounting import allocation, balanced_rdp
from asymflow.accounting.accountant import Accountant
from asymflow.accounting.events import (
    BalancedSampled,
    Event,
    Gaussian,
    Laplace,
    PoissonSampled,
    RandomizedResponse,
)
from asymflow.accounting.partition import allocation_of, joint_parts

DEFAULT_ORDERS = np.concatenate(
    [[1.1, 1.25, 1.5, 1.75], np.arange(2.0, 12.0, 0.25), np.arange(12, 65), [80, 96, 128, 256]]
)


def _rdp_from_cumulants(cumulants: np.ndarray, orders: np.ndarray) -> np.ndarray:
    """RDP at real orders from log-moments c(a) = (a-1) D_a given at integers a = 0..A.

    c is a cumulant generating function, hence convex in the order, so linear interpolation
    between the neighbouring integers bounds it from above (and is exact at integers).
    """
    lo = np.floor(orders).astype(int)
    hi = np.minimum(lo + 1, cumulants.size - 1)
    frac = orders - lo
    return ((1 - frac) * cumulants[lo] + frac * cumulants[hi]) / (orders - 1)


def _allocation_rdp(
    n: int, sigma: float, q: float, orders: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(remove, add) RDP of a Poisson(q)-subsampled 1-of-n allocated Gaussian step (q=1: none).

    Remove: E_Q[(1-q+qL)^a] = sum_l C(a, l) (1-q)^(a-l) q^l E_Q[L^l], exact at integers.
    Add: quadrature of E_Q[(1-q+qL)^(1-a)] (:func:`allocation.add_log_moments`).
    """
    if n == 1 and q == 1:  # the allocation is the Gaussian mechanism itself
        gaussian = orders / (2 * sigma**2)
        return gaussian, gaussian
    top = int(np.ceil(orders.max()))
    remove = _subsampled_log_moments(allocation.remove_log_moments(n, sigma, top), q)
    log_add = allocation.add_log_moments(n, sigma, top, q)
    return _rdp_from_cumulants(remove, orders), _rdp_from_cumulants(log_add, orders)


def _subsampled_log_moments(log_moments: np.ndarray, q: float) -> np.ndarray:
    """log E_Q[(1-q+qL)^a], a = 0..A, from log E_Q[L^l] by the binomial expansion (exact)."""
    if q == 1:
        return log_moments
    top = log_moments.size - 1
    a = np.arange(top + 1)[:, None]
    ell = np.arange(top + 1)[None, :]
    log_binom = special.gammaln(a + 1) - special.gammaln(ell + 1) - special.gammaln(a - ell + 1)
    with np.errstate(invalid="ignore"):
        terms = log_binom + (a - ell) * math.log1p(-q) + ell * math.log(q) + log_moments[None, :]
    return special.logsumexp(np.where(ell <= a, terms, -np.inf), axis=1)


def _poisson_joint_rdp(
    parts: list[tuple[int, float]], q: float, orders: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(remove, add) RDP of one Poisson(q) decision over independent parts with likelihood
    ratios L_1..L_m (L = prod L_i, so E_Q[L^l] = prod E_Q[L_i^l]).

    Remove: exact binomial expansion of E_Q[(1-q+qL)^a]. Add: convexity of x^(1-a) on the
    points 1 and L, E_Q[(1-q+qL)^(1-a)] <= 1 - q + q prod_i E_Q[L_i^(1-a)].
    """
    top = int(np.ceil(orders.max()))
    log_rem = sum(allocation.remove_log_moments(n, s, top) for n, s in parts)
    log_add = sum(allocation.add_log_moments(n, s, top) for n, s in parts)
    remove = _subsampled_log_moments(log_rem, q)
    add = np.logaddexp(math.log1p(-q), math.log(q) + log_add) if q < 1 else log_add
    add[:2] = 0.0
    return _rdp_from_cumulants(remove, orders), _rdp_from_cumulants(add, orders)


def _balanced_rdp(
    steps: int, k: int, sigma: float, orders: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(remove, add) RDP of one k-of-T pass, k > 1.

    Remove: the exact integer-order moments of :mod:`balanced_rdp` where its profile program
    finishes, else its best block relaxation, never above the k-fold reduction. Add:
    :func:`balanced_rdp.log_moments_add` (certified, never above the reduction; exact for
    k = T - 1, no exact add-direction form for 2 <= k <= T - 2 is known to us).
    """
    top = int(np.ceil(orders.max()))
    if steps == k:
        gaussian = orders * k / (2 * sigma**2)
        return gaussian, gaussian
    remove, _ = balanced_rdp.log_moments_remove(steps, k, sigma, top)
    add = balanced_rdp.log_moments_add(steps, k, sigma, top)
    return _rdp_from_cumulants(remove, orders), _rdp_from_cumulants(add, orders)


class RdpAccountant(Accountant):
    """RDP accountant; each leaf contributes a (remove, add) pair of RDP curves."""

    name = "rdp"

    def __init__(self, orders: np.ndarray | None = None) -> None:
        super().__init__()
        self.orders = np.asarray(DEFAULT_ORDERS if orders is None else orders, dtype=float)
        if self.orders.size == 0 or not np.all(self.orders > 1) or not np.all(self.orders < 1e4):
            raise ValueError("orders must be real numbers with 1 < order < 1e4")

    def _supports_leaf(self, event: Event) -> bool:
        if isinstance(event, Gaussian | Laplace | RandomizedResponse):
            return True
        if isinstance(event, PoissonSampled):
            return joint_parts(event.event) is not None
        if isinstance(event, BalancedSampled):
            return isinstance(event.event, Gaussian)
        return allocation_of(event) is not None

    def _leaf_rdp(self, event: Event) -> tuple[np.ndarray, np.ndarray]:
        orders = self.orders
        if isinstance(event, Gaussian):
            curve = orders / (2 * event.sigma**2)
            return curve, curve
        if isinstance(event, Laplace):
            curve = np.array([dp_rdp._laplace_rdp(1 / event.b, float(a)) for a in orders])
            return curve, curve
        if isinstance(event, RandomizedResponse):
            # Pure eps-DP implies RDP <= min(eps, alpha eps^2 / 2) (Bun & Steinke 2016, Prop. 3.3).
            curve = np.minimum(event.epsilon, orders * event.epsilon**2 / 2)
            return curve, curve
        if isinstance(event, PoissonSampled):
            if event.q == 0:
                zero = np.zeros(orders.size)
                return zero, zero
            if isinstance(event.event, Gaussian):
                acc = dp_rdp.RdpAccountant(orders=[float(a) for a in orders])
                acc.compose(
                    dpe.PoissonSampledDpEvent(event.q, dpe.GaussianDpEvent(event.event.sigma))
                )
                curve = np.asarray(acc.rdp)
                return curve, curve
            parts = joint_parts(event.event)
            assert parts is not None
            if len(parts) == 1:
                return _allocation_rdp(*parts[0], event.q, orders)
            return _poisson_joint_rdp(parts, event.q, orders)
        if isinstance(event, BalancedSampled):
            assert isinstance(event.event, Gaussian)
            n, k, sigma = event.steps // event.k, event.k, event.event.sigma
            if k > 1:
                return _balanced_rdp(event.steps, k, sigma, orders)
        else:
            (n, sigma), k = allocation_of(event), 1  # type: ignore[misc]
        remove, add = _allocation_rdp(n, sigma, 1.0, orders)
        return k * remove, k * add

    def curves(self) -> tuple[np.ndarray, np.ndarray]:
        """Total (remove, add) RDP at ``self.orders`` over everything composed."""
        if self.leaks:
            return np.full(self.orders.size, np.inf), np.full(self.orders.size, np.inf)
        remove = np.zeros(self.orders.size)
        add = np.zeros(self.orders.size)
        for event, count in self._leaves:
            r, a = self._leaf_rdp(event)
            remove += count * r
            add += count * a
        return remove, add

    def _epsilon(self, delta: float) -> float:
        orders = [float(a) for a in self.orders]
        return max(dp_rdp.compute_epsilon(orders, list(c), delta)[0] for c in self.curves())

    def _delta(self, epsilon: float) -> float:
        orders = [float(a) for a in self.orders]
        return max(dp_rdp.compute_delta(orders, list(c), epsilon)[0] for c in self.curves())
