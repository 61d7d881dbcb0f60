"""Noise calibration: the smallest noise multiplier whose certified epsilon meets a target."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from asymflow.accounting.best import DEFAULT_METHODS, best_epsilon
from asymflow.accounting.schedule import training_event
from asymflow.checks import check_delta


@dataclass(frozen=True)
class Calibration:
    """``sigma`` certified to give ``epsilon`` <= target at ``delta`` by ``method``."""

    sigma: float
    epsilon: float
    target_epsilon: float
    delta: float
    method: str


def bisect_sigma(
    epsilon_of: Callable[[float], float],
    target_epsilon: float,
    *,
    sigma_min: float = 0.05,
    sigma_max: float = 1e4,
    rel_tol: float = 1e-3,
) -> tuple[float, float]:
    """Bisection in log sigma on a certified epsilon(sigma).

    Returns (sigma, epsilon(sigma)) with epsilon(sigma) <= target evaluated at the returned
    sigma itself, so the result never overshoots even where epsilon(sigma) is not monotone.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon}")
    hi = 1.0
    eps_hi = epsilon_of(hi)
    while eps_hi > target_epsilon:
        if hi >= sigma_max:
            raise ValueError(
                f"target_epsilon={target_epsilon} needs sigma > {sigma_max}; raise sigma_max"
            )
        hi = min(hi * 2, sigma_max)
        eps_hi = epsilon_of(hi)
    lo = hi / 2
    while epsilon_of(lo) <= target_epsilon:
        if lo <= sigma_min:
            return lo, epsilon_of(lo)
        hi, lo = lo, max(lo / 2, sigma_min)
        eps_hi = epsilon_of(hi)
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(hi * lo)
        eps_mid = epsilon_of(mid)
        if eps_mid <= target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi, eps_hi


def noise_for_epsilon(
    target_epsilon: float,
    delta: float,
    sampler: str,
    steps: int,
    *,
    k: int | None = None,
    q: float | None = None,
    epochs: int = 1,
    parts: int = 1,
    shared: bool = False,
    methods: tuple[str, ...] = DEFAULT_METHODS,
    rel_tol: float = 1e-3,
) -> Calibration:
    """Smallest sigma (to ``rel_tol``) with best certified epsilon <= ``target_epsilon``."""
    check_delta("delta", delta)
    schedule = {"k": k, "q": q, "epochs": epochs, "parts": parts, "shared": shared}
    training_event(sampler, 1.0, steps, **schedule)  # validate early
    chosen: dict[float, str] = {}

    def epsilon_of(sigma: float) -> float:
        event = training_event(sampler, sigma, steps, **schedule)
        report = best_epsilon(event, delta, methods)
        chosen[sigma] = report.method
        return report.epsilon

    sigma, eps = bisect_sigma(epsilon_of, target_epsilon, rel_tol=rel_tol)
    return Calibration(sigma, eps, target_epsilon, delta, chosen[sigma])
