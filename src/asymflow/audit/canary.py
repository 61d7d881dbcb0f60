"""Empirical lower bound on the epsilon of one DP-SGD pass, with a Dirac gradient canary.

The audit runs the real pieces of private training: the batch samplers of
:mod:`asymflow.sampling` (:class:`PoissonSampler`, :class:`BalancedIterationSampler`) and
the noisy aggregation :func:`asymflow.dpsgd.aggregate.noisy_gradient_sum` (mask, clip to C,
sum, add N(0, sigma^2 C^2) to every coordinate). The canary record's gradient is C e_j, a
Dirac in coordinate j, at every step where the sampler picks it; every other record's gradient
is zero in coordinate j (the "background" records have gradients of norm ~2C drawn once from
a fixed Gaussian in other coordinates, and are clipped). This is the strongest gradient-space
canary for add/remove adjacency (Nasr, Hayes, Steinke, Balle, Tramer, Jagielski, Carlini,
Terzis, USENIX Security 2023, Sec. 4, "Dirac canary"; Jagielski et al., NeurIPS 2020).
The attacker observes the coordinate-j sums of all steps of a pass, divided by C:

    y_t = b_t + sigma z_t,  z_t ~ N(0, 1) i.i.d.,  b_t = 1[canary in batch t] (0 without it),

and computes the exact log-likelihood ratio of "canary" against "no canary":

- Poisson(q), T steps: sum_t log(1 - q + q exp((2 y_t - 1) / (2 sigma^2))) (steps independent);
- BIS(k, T): log e_k(w) - log C(T, k), w_t = exp((2 y_t - 1) / (2 sigma^2)), per pass, passes
  summed (ACCOUNTING.md sec. 2; :func:`asymflow.accounting.montecarlo.log_likelihood_ratio`);
  for k = 1 a log-sum-exp over the steps.

A threshold test on this score gives (TPR, FPR); :mod:`asymflow.audit.bounds` turns them into
epsilon >= log((TPR_lo - delta) / FPR_hi) at the chosen confidence, in both directions of the
pair (guess "canary" above the threshold, or "no canary" below it). The threshold and direction
are chosen on an independent calibration run, and the bound is computed on fresh trials, so
the reported number needs no correction for the choice (Jagielski et al. 2020, Alg. 2).

Vectorization: trials are independent copies of the experiment, and both samplers include
every record independently of the others, so trial i's canary is record i of one sampler over
``trials + background`` records, and its coordinate j is coordinate i of one aggregated
parameter. One :func:`noisy_gradient_sum` call per step thus runs a step of every trial of a
chunk at once; no trial's clip norm or noise involves another trial's coordinates.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from numpy.typing import NDArray

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import Event, Gaussian
from asymflow.accounting.montecarlo import log_likelihood_ratio
from asymflow.audit.bounds import clopper_pearson, epsilon_lower_bound
from asymflow.dpsgd.aggregate import noisy_gradient_sum
from asymflow.dpsgd.partition import PartitionPlan, PartitionSpec
from asymflow.runfiles import JsonFields
from asymflow.sampling import BalancedIterationSampler, PoissonSampler

__all__ = [
    "CanaryAudit",
    "SamplerSetting",
    "audit_canary",
    "canary_scores",
    "choose_test",
    "simulate_canary_sums",
]

Direction = Literal["remove", "add"]
FloatArray = NDArray[np.float64]

_ENTRIES_PER_CALL = 1 << 18
"""Target (expected batch x coordinates) entries of one aggregation call. The dense per-sample
gradients cost ~ rate * chunk^2 per call and the calls ~ 1/chunk per trial, so a chunk of
sqrt(entries / rate) trials balances work against per-call overhead."""
_SMALL_COUNTS = 64
"""Error counts 0..63 are all tried as operating points; above, a geometric grid."""


@dataclass(frozen=True)
class SamplerSetting:
    """The sampler of the audited pass: ``poisson`` (rate ``q``, ``steps`` steps) or
    ``balanced`` (k of ``steps`` steps, ``passes`` passes)."""

    kind: Literal["poisson", "balanced"]
    steps: int
    q: float | None = None
    k: int | None = None
    passes: int = 1

    def __post_init__(self) -> None:
        if self.kind == "poisson":
            if self.q is None or self.k is not None or self.passes != 1:
                raise ValueError("a poisson setting needs q (and no k, passes=1)")
        elif self.kind == "balanced":
            if self.k is None or self.q is not None:
                raise ValueError("a balanced setting needs k (and no q)")
        else:
            raise ValueError(f"kind must be 'poisson' or 'balanced', got kind={self.kind!r}")
        self.build(1, seed=0)  # validates the numbers with the samplers' own checks

    def build(self, num_samples: int, *, seed: int) -> PoissonSampler | BalancedIterationSampler:
        """The sampler over ``num_samples`` records."""
        if self.kind == "poisson":
            assert self.q is not None
            return PoissonSampler(num_samples, self.q, self.steps, seed=seed)
        assert self.k is not None
        return BalancedIterationSampler(
            num_samples, self.k, self.steps, seed=seed, passes=self.passes
        )

    @property
    def rate(self) -> float:
        """Probability that a given record is in a given batch (q, or k/T)."""
        return float(self.q) if self.kind == "poisson" else float(self.k) / self.steps  # type: ignore[arg-type]

    @property
    def observed_steps(self) -> int:
        """Steps per audited run (T, or passes * T)."""
        return self.steps * self.passes

    def privacy_event(self, sigma: float) -> Event:
        """The sampler's own event around ``Gaussian(sigma)``."""
        return self.build(1, seed=0).privacy_event(Gaussian(sigma))

    @property
    def label(self) -> str:
        if self.kind == "poisson":
            return f"Poisson(q={self.q:g}, T={self.steps})"
        extra = f", passes={self.passes}" if self.passes > 1 else ""
        return f"BIS(k={self.k}, T={self.steps}{extra})"


def _plan(size: int) -> PartitionPlan:
    """One parameter of ``size`` coordinates, no partitioning (plain DP-SGD)."""
    return PartitionPlan(PartitionSpec(), "tensor", ("canary",), (size,), (0,))


def _seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (distinct streams per world, phase and chunk)."""
    digest = np.random.SeedSequence(list(parts)).generate_state(2, dtype=np.uint32)
    return int(digest[0]) << 31 ^ int(digest[1])


def simulate_canary_sums(
    setting: SamplerSetting,
    *,
    trials: int,
    sigma: float,
    clip: float = 1.0,
    canary: bool,
    seed: int,
    background: int = 16,
    background_dims: int = 4,
) -> FloatArray:
    """y (trials, observed_steps): the canary coordinate's noisy sums of every step, over C.

    With ``canary=False`` the canary records are removed (add/remove adjacency); the sampler
    still runs over the same records, which changes nothing for the others (independent
    inclusion). See the module docstring for the vectorization.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise ValueError(f"trials must be an integer >= 1, got trials={trials!r}")
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got sigma={sigma}")
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be a finite number > 0, got clip={clip}")
    if background < 0 or background_dims < 0 or (background > 0) != (background_dims > 0):
        raise ValueError(
            "background and background_dims must be >= 0 and both zero or both positive, got "
            f"background={background}, background_dims={background_dims}"
        )
    chunk = int(min(trials, max(256, math.isqrt(int(_ENTRIES_PER_CALL / setting.rate)))))
    out = np.empty((trials, setting.observed_steps), dtype=np.float64)
    world = 1 if canary else 0
    for c_index, start in enumerate(range(0, trials, chunk)):
        n = min(chunk, trials - start)
        gen = torch.Generator().manual_seed(_seed(seed, world, c_index, 1))
        bg = torch.randn(background, background_dims, generator=gen)
        bg = bg * (2.0 * clip / math.sqrt(max(background_dims, 1)))
        plan = _plan(n + background_dims)
        sampler = setting.build(n + background, seed=_seed(seed, world, c_index, 2))
        sums = torch.empty(setting.observed_steps, n)
        for t, batch in enumerate(sampler):
            idx = torch.as_tensor(batch, dtype=torch.int64)
            can = idx[idx < n] if canary else idx[:0]
            other = idx[idx >= n] - n
            grads = torch.zeros(len(can) + len(other), n + background_dims)
            grads[torch.arange(len(can)), can] = clip
            grads[len(can) :, n:] = bg[other]
            (total,) = noisy_gradient_sum([grads], plan, clip=clip, sigma=sigma, generator=gen)
            sums[t] = total[:n]
        out[start : start + n] = sums.T.double().numpy() / clip
    return out


def canary_scores(y: FloatArray, setting: SamplerSetting, sigma: float) -> FloatArray:
    """The exact log-likelihood ratio log P_canary(y) / P_none(y) per row (module docstring)."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] != setting.observed_steps:
        raise ValueError(
            f"y must have shape (trials, {setting.observed_steps}), got {tuple(y.shape)}"
        )
    logw = (2.0 * y - 1.0) / (2.0 * sigma * sigma)
    if setting.kind == "poisson":
        q = float(setting.q)  # type: ignore[arg-type]
        if q == 1.0:
            return logw.sum(1)
        return np.logaddexp(math.log1p(-q), math.log(q) + logw).sum(1)
    k, t = int(setting.k), setting.steps  # type: ignore[arg-type]
    return sum(
        log_likelihood_ratio(y[:, p * t : (p + 1) * t], k, sigma) for p in range(setting.passes)
    )


def _counts(
    with_canary: FloatArray, without: FloatArray, thresholds: FloatArray, direction: Direction
) -> tuple[NDArray[np.int64], int, NDArray[np.int64], int]:
    """(true positives, positives, false positives, negatives) of the test at each threshold.

    remove: guess "canary" iff score > tau (positives: canary trials);
    add: guess "no canary" iff score <= tau (positives: trials without the canary).
    """
    s1, s0 = np.sort(with_canary), np.sort(without)
    above1 = len(s1) - np.searchsorted(s1, thresholds, side="right")
    above0 = len(s0) - np.searchsorted(s0, thresholds, side="right")
    if direction == "remove":
        return above1, len(s1), above0, len(s0)
    return len(s0) - above0, len(s0), len(s1) - above1, len(s1)


def _error_counts(n: int) -> NDArray[np.int64]:
    """Numbers of false positives to try: 0..63, then a geometric grid (ratio 1.05) to n."""
    small = np.arange(min(n, _SMALL_COUNTS) + 1)
    large = np.geomspace(_SMALL_COUNTS, max(n, _SMALL_COUNTS), 200).astype(np.int64)
    return np.unique(np.concatenate([small, large[large <= n]]))


def _candidates(with_canary: FloatArray, without: FloatArray, direction: Direction) -> FloatArray:
    """Thresholds at which the test makes exactly m false positives, m on
    :func:`_error_counts`. For a given false-positive count the bound only grows with the
    true positives, so the best threshold of a plateau is its most permissive end, which is
    where the negatives' order statistics sit."""
    if direction == "remove":  # false positive: no-canary score > tau
        s0 = np.sort(without)
        m = _error_counts(len(s0) - 1)
        return s0[len(s0) - 1 - m]
    s1 = np.sort(with_canary)  # add: false positive = canary score <= tau
    m = _error_counts(len(s1) - 1)
    return np.nextafter(s1[m], -np.inf)


def choose_test(
    with_canary: FloatArray, without: FloatArray, *, delta: float, confidence: float
) -> tuple[Direction, float, float]:
    """The (direction, threshold) whose Clopper-Pearson epsilon bound is largest on these
    scores, and that bound, over the operating points of :func:`_candidates`."""
    best: tuple[Direction, float, float] = ("remove", math.inf, 0.0)
    directions: tuple[Direction, ...] = ("remove", "add")
    for direction in directions:
        thresholds = _candidates(with_canary, without, direction)
        tp, pos, fp, neg = _counts(with_canary, without, thresholds, direction)
        eps = epsilon_lower_bound(tp, pos, fp, neg, delta, confidence)
        i = int(np.argmax(eps))
        if eps[i] > best[2]:
            best = (direction, float(thresholds[i]), float(eps[i]))
    return best


@dataclass(frozen=True)
class CanaryAudit(JsonFields):
    """An empirical lower bound on epsilon (valid with probability >= ``confidence``), the
    test that gave it, and the accountant's certified epsilon for the same pass.

    ``tpr``/``fpr`` are the rates of the chosen test on the evaluation trials: for
    ``direction="remove"`` P(score > threshold) with and without the canary, for ``"add"``
    P(score <= threshold) without and with it. ``epsilon_point`` = log((tpr - delta)/fpr) is
    the plug-in estimate, not a bound; ``calibration_epsilon_lower`` is the bound the chosen
    test reached on the calibration trials it was selected on (optimistic)."""

    sampler: str
    sigma: float
    clip: float
    delta: float
    trials: int
    calibration_trials: int
    direction: Direction
    threshold: float
    tpr: float
    fpr: float
    tpr_lower: float
    fpr_upper: float
    epsilon_lower: float
    epsilon_point: float
    calibration_epsilon_lower: float
    certified_epsilon: float | None
    certified_method: str | None
    confidence: float
    seconds: float


def audit_canary(
    setting: SamplerSetting,
    *,
    sigma: float,
    clip: float = 1.0,
    delta: float = 1e-5,
    trials: int = 10_000,
    calibration_trials: int | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    certify: bool = True,
    background: int = 16,
) -> CanaryAudit:
    """Audit one pass of ``setting`` at noise multiplier ``sigma``: simulate ``trials`` runs
    with and without the canary (and as many again, or ``calibration_trials``, to choose the
    test), and return the lower bound with the certified epsilon (``best_epsilon`` of the
    sampler's ``privacy_event(Gaussian(sigma))``) when ``certify``."""
    began = time.perf_counter()
    n_cal = trials if calibration_trials is None else calibration_trials

    def scores(n: int, canary: bool, phase: int) -> FloatArray:
        y = simulate_canary_sums(
            setting,
            trials=n,
            sigma=sigma,
            clip=clip,
            canary=canary,
            seed=_seed(seed, phase),
            background=background,
            background_dims=4 if background else 0,
        )
        return canary_scores(y, setting, sigma)

    direction, threshold, cal_eps = choose_test(
        scores(n_cal, True, 0), scores(n_cal, False, 0), delta=delta, confidence=confidence
    )
    s1, s0 = scores(trials, True, 1), scores(trials, False, 1)
    tp, pos, fp, neg = _counts(s1, s0, np.array([threshold]), direction)
    eps = float(epsilon_lower_bound(tp, pos, fp, neg, delta, confidence)[0])
    tpr_lo, _ = clopper_pearson(tp, pos, confidence)
    _, fpr_hi = clopper_pearson(fp, neg, confidence)
    tpr, fpr = float(tp[0]) / pos, float(fp[0]) / neg
    point = math.log((tpr - delta) / fpr) if fpr > 0 and tpr > delta else math.inf
    if tpr <= delta:
        point = 0.0
    certified = method = None
    if certify:
        report = best_epsilon(setting.privacy_event(sigma), delta)
        certified, method = float(report.epsilon), report.method
    return CanaryAudit(
        sampler=setting.label,
        sigma=float(sigma),
        clip=float(clip),
        delta=float(delta),
        trials=trials,
        calibration_trials=n_cal,
        direction=direction,
        threshold=threshold,
        tpr=tpr,
        fpr=fpr,
        tpr_lower=float(tpr_lo[0]),
        fpr_upper=float(fpr_hi[0]),
        epsilon_lower=eps,
        epsilon_point=max(0.0, point),
        calibration_epsilon_lower=cal_eps,
        certified_epsilon=certified,
        certified_method=method,
        confidence=confidence,
        seconds=time.perf_counter() - began,
    )
