"""Privacy-loss-distribution accountant with pessimistic (certified) discretization.

- Gaussian, Laplace and their Poisson-subsampled versions: dp_accounting's PLDs
  (Koskela et al. 2020; Doroshenko et al. 2022 "connect the dots"), pessimistic.
- Balanced (k of T): k compositions of the 1-of-floor(T/k) allocation pair
  (Feldman & Shenfeld 2502.08202, Lemma 3.2), whose discrete dominating pair comes from
  :func:`allocation.ratio_atoms`; privacy losses are rounded up to the grid.
- Randomized response: dp_accounting's exact PLD (replace-one).
- A joint step ``Composed(parts)`` under one Poisson decision (partial splitting): the product
  pair of the parts' discrete pairs, re-binned.
- Model partitioning (1 of d blocks), also under Poisson subsampling: the mixture
  (q P + (1-q) Q, Q) of a dominating pair dominates the subsampled pair (post-processing).

With ``pessimistic=False`` every piece is rounded the other way, which gives a lower estimate
(used to report lower bounds, never as a run's epsilon).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from dp_accounting.pld import pld_pmf
from dp_accounting.pld import privacy_loss_distribution as dp_pld

from asymflow.accounting import allocation
from asymflow.accounting.accountant import Accountant
from asymflow.accounting.allocation import MIN_SIGMA, RatioAtoms
from asymflow.accounting.events import (
    BalancedSampled,
    Event,
    Gaussian,
    Laplace,
    PoissonSampled,
    RandomizedResponse,
)
from asymflow.accounting.partition import allocation_of, joint_parts

Pld = dp_pld.PrivacyLossDistribution


def subsample(atoms: RatioAtoms, q: float) -> RatioAtoms:
    """Poisson(q) subsampling of a pair: ratio q l + 1 - q; the Q-only outcome becomes an atom."""
    ratio = np.append(q * atoms.ratio + (1 - q), 1 - q)
    mass = np.append(atoms.mass, atoms.q_bad)
    return replace(atoms, ratio=ratio, mass=mass, q_bad=0.0, p_bad=q * atoms.p_bad)


def joint_atoms(a: RatioAtoms, b: RatioAtoms, points: int, upper: bool) -> RatioAtoms:
    """The product pair of two independent pairs: ratios multiply, masses multiply; the joint
    bad event is the union. Re-binned onto a grid like :func:`allocation.ratio_atoms` (a
    spread when ``upper``, a merge otherwise), which keeps the bound's direction."""
    ratio = (a.ratio[:, None] * b.ratio[None, :]).ravel()
    mass = (a.mass[:, None] * b.mass[None, :]).ravel()
    keep = mass > 0
    ratio, mass = allocation.rebin_atoms(ratio[keep], mass[keep], points, upper)
    q_good = (1 - a.q_bad) * (1 - b.q_bad)
    p_good = (1 - a.p_bad) * (1 - b.p_bad)
    return RatioAtoms(ratio=ratio, mass=mass, q_bad=1 - q_good, p_bad=1 - p_good)


# dp_accounting keeps PMFs with at most this many losses sparse (pld_pmf._MAX_PMF_SPARSE_SIZE).
_SPARSE_MAX = 1000


def pld_from_atoms(
    atoms: RatioAtoms, interval: float, pessimistic: bool, *, dense: bool = False
) -> Pld:
    """PLD (remove: P over Q, add: Q over P) of a ratio-atom pair, losses rounded to the grid.

    The PMFs are those of ``Pld.create_from_rounded_probability``; dense ones (more than
    ``_SPARSE_MAX`` losses, or ``dense``) are built from arrays directly, without the
    dictionary round trip (same values). ``dense`` suits a PMF that will be composed with a
    dense one, which dp_accounting would convert anyway."""
    rnd = np.ceil if pessimistic else np.floor
    pos = atoms.ratio > 0

    def pmf(loss: np.ndarray, mass: np.ndarray, infinity: float) -> pld_pmf.PLDPmf:
        keys = rnd(loss / interval).astype(np.int64)
        uniq, inv = np.unique(keys, return_inverse=True)
        probs = np.bincount(inv, weights=mass)
        nz = probs > 0
        uniq, probs = uniq[nz], probs[nz]
        if dense or uniq.size > _SPARSE_MAX:
            values = np.zeros(int(uniq[-1] - uniq[0]) + 1)
            values[uniq - uniq[0]] = probs
            return pld_pmf.DensePLDPmf(interval, int(uniq[0]), values, infinity, pessimistic)
        loss_probs = {int(k): float(p) for k, p in zip(uniq, probs, strict=True)}
        return pld_pmf.create_pmf(loss_probs, interval, infinity, pessimistic)

    log_ratio = np.log(atoms.ratio[pos])
    remove = pmf(log_ratio, atoms.ratio[pos] * atoms.mass[pos], atoms.p_bad)
    add = pmf(-log_ratio, atoms.mass[pos], atoms.q_bad + float(atoms.mass[~pos].sum()))
    return Pld(remove, add)


class PldAccountant(Accountant):
    """PLD accountant; composition is dp_accounting's FFT convolution with tail truncation."""

    name = "pld"

    def __init__(
        self, *, value_discretization: float = 1e-4, points: int = 900, pessimistic: bool = True
    ) -> None:
        super().__init__()
        if not 0 < value_discretization <= 0.1:
            raise ValueError(
                "value_discretization must satisfy 0 < value_discretization <= 0.1, "
                f"got {value_discretization}"
            )
        self.interval = value_discretization
        self.points = points
        self.pessimistic = pessimistic
        self.certified = pessimistic
        self._pld: Pld | None = None

    def _supports_leaf(self, event: Event) -> bool:
        if isinstance(event, Gaussian | Laplace | RandomizedResponse):
            return True
        if isinstance(event, PoissonSampled):
            inner = event.event
            if isinstance(inner, Gaussian | Laplace):
                return True
            parts = joint_parts(inner)
            return parts is not None and all(s >= MIN_SIGMA for _, s in parts)
        if isinstance(event, BalancedSampled):
            return isinstance(event.event, Gaussian) and event.event.sigma >= MIN_SIGMA
        parts = allocation_of(event)
        return parts is not None and parts[1] >= MIN_SIGMA

    def _atoms(self, n: int, sigma: float) -> RatioAtoms:
        return allocation.ratio_atoms(n, sigma, upper=self.pessimistic, points=self.points)

    def _leaf_pld(self, event: Event) -> Pld:
        common = {
            "pessimistic_estimate": self.pessimistic,
            "value_discretization_interval": self.interval,
        }
        if isinstance(event, RandomizedResponse):
            # keep probability e^eps/(e^eps + K - 1) = 1 - p + p/K  <=>  p = K/(e^eps + K - 1);
            # replace-one adjacency, which also covers replacing the value by a null one.
            p = event.classes / (math.exp(event.epsilon) + event.classes - 1)
            return dp_pld.from_randomized_response(p, event.classes, **common)
        q, inner = (event.q, event.event) if isinstance(event, PoissonSampled) else (1.0, event)
        if isinstance(inner, Gaussian):
            return dp_pld.from_gaussian_mechanism(inner.sigma, sampling_prob=q, **common)
        if isinstance(inner, Laplace):
            return dp_pld.from_laplace_mechanism(inner.b, sampling_prob=q, **common)
        if isinstance(inner, BalancedSampled):
            assert isinstance(inner.event, Gaussian)
            atoms = self._atoms(inner.steps // inner.k, inner.event.sigma)
            single = pld_from_atoms(atoms, self.interval, self.pessimistic)
            return single.self_compose(inner.k) if inner.k > 1 else single
        parts = joint_parts(inner)
        assert parts is not None
        atoms = self._atoms(*parts[0])
        for n, sigma in parts[1:]:
            atoms = joint_atoms(atoms, self._atoms(n, sigma), self.points, self.pessimistic)
        if q < 1:
            atoms = subsample(atoms, q)
        return pld_from_atoms(atoms, self.interval, self.pessimistic)

    def _add(self, event: Event, count: int) -> None:
        super()._add(event, count)
        self._pld = None

    def distribution(self) -> Pld:
        """The composed PLD of everything added so far."""
        if self._pld is None:
            total: Pld | None = None
            for event, count in self._leaves:
                if isinstance(event, PoissonSampled) and event.q == 0:
                    continue
                leaf = self._leaf_pld(event)
                if count > 1:
                    leaf = leaf.self_compose(count)
                total = leaf if total is None else total.compose(leaf)
            self._pld = total if total is not None else dp_pld.identity(self.interval)
        return self._pld

    def _epsilon(self, delta: float) -> float:
        eps = float(self.distribution().get_epsilon_for_delta(delta))
        return max(eps, 0.0) if math.isfinite(eps) else math.inf

    def _delta(self, epsilon: float) -> float:
        return float(self.distribution().get_delta_for_epsilon(epsilon))
