"""Renyi-DP accountant over integer orders, both adjacency directions kept separately.

- Gaussian: alpha/(2 sigma^2). Laplace: Mironov 2017, Prop. 6 (via dp_accounting).
- Randomized response (pure eps-DP): min(eps, alpha eps^2/2), Bun & Steinke 2016, Prop. 3.3.
- Poisson-subsampled Gaussian: Mironov, Talwar, Zhang 2019 (via dp_accounting); it bounds both
  directions.
- Balanced (k of T) and model partitioning: k compositions of 1-of-floor(T/k) allocation
  (Feldman & Shenfeld 2502.08202, Lemma 3.2); 1-of-n remove direction exact
  (:func:`allocation.remove_rdp`), add direction by quadrature (:func:`allocation.add_rdp`).
- Poisson-subsampled partitioned step: remove direction exact by the binomial expansion
  E_Q[(1 - q + qL)^alpha] = sum_l C(alpha, l) (1-q)^(alpha-l) q^l E_Q[L^l]; add direction by
  convexity of x^(1-alpha): E_Q[(1 - q + qL)^(1-alpha)] <= 1 - q + q E_Q[L^(1-alpha)].

epsilon(delta) converts each direction with dp_accounting's RDP-to-DP conversion (Canonne,
Kamath, Steinke 2020) and reports the larger.
"""

from __future__ import annotations

import math

import numpy as np
from dp_accounting import dp_event as dpe
from dp_accounting.rdp import rdp_privacy_accountant as dp_rdp
from scipy import special

from asymflow.accounting import allocation
from asymflow.accounting.accountant import Accountant
from asymflow.accounting.events import (
    BalancedSampled,
    Event,
    Gaussian,
    Laplace,
    PoissonSampled,
    RandomizedResponse,
)
from asymflow.accounting.partition import allocation_of

DEFAULT_ORDERS = np.array([*range(2, 65), 80, 96, 128, 160, 192, 256])


def _poisson_allocation_rdp(
    q: float, n: int, sigma: float, orders: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(remove, add) RDP of a Poisson(q)-subsampled 1-of-n allocated Gaussian step."""
    top = int(orders.max())
    log_rem = allocation.remove_log_moments(n, sigma, top)
    log_add = allocation.add_log_moments(n, sigma, top)
    remove, add = [], []
    for a in orders:
        ell = np.arange(a + 1)
        log_terms = (
            special.gammaln(a + 1)
            - special.gammaln(ell + 1)
            - special.gammaln(a - ell + 1)
            + (a - ell) * math.log1p(-q)
            + ell * math.log(q)
            + log_rem[: a + 1]
        )
        remove.append(special.logsumexp(log_terms) / (a - 1))
        add.append(np.logaddexp(math.log1p(-q), math.log(q) + log_add[a]) / (a - 1))
    return np.array(remove), np.array(add)


class RdpAccountant(Accountant):
    """RDP accountant; each leaf contributes a (remove, add) pair of RDP curves."""

    name = "rdp"

    def __init__(self, orders: np.ndarray | None = None) -> None:
        super().__init__()
        self.orders = DEFAULT_ORDERS if orders is None else np.asarray(orders)
        if not np.issubdtype(self.orders.dtype, np.integer) or self.orders.min() < 2:
            raise ValueError("orders must be integers >= 2")

    def _supports_leaf(self, event: Event) -> bool:
        if isinstance(event, Gaussian | Laplace | RandomizedResponse):
            return True
        if isinstance(event, PoissonSampled):
            return isinstance(event.event, Gaussian) or allocation_of(event.event) is not None
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
            n, sigma = allocation_of(event.event)  # type: ignore[misc]
            if event.q == 1:
                return allocation.remove_rdp(n, sigma, orders), allocation.add_rdp(n, sigma, orders)
            return _poisson_allocation_rdp(event.q, n, sigma, orders)
        if isinstance(event, BalancedSampled):
            assert isinstance(event.event, Gaussian)
            n, k, sigma = event.steps // event.k, event.k, event.event.sigma
        else:
            (n, sigma), k = allocation_of(event), 1  # type: ignore[misc]
        return k * allocation.remove_rdp(n, sigma, orders), k * allocation.add_rdp(n, sigma, orders)

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
