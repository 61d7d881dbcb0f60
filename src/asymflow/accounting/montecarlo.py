"""Monte Carlo estimate of δ(ε) for Balanced Iteration Subsampling with the Gaussian mechanism.

One pass of BIS(k, T) with noise multiplier σ is dominated by the pair (ACCOUNTING.md sec. 2)

    P = C(T,k)⁻¹ Σ_{|S|=k} N(1_S, σ² I_T),   Q = N(0, σ² I_T),

whose likelihood ratio is exact and cheap (Dong & Özgür, "Less Random, More Private",
arXiv 2605.07072):

    P(y)/Q(y) = e_k(w) / C(T,k),   w_i = exp((2 y_i − 1) / (2σ²)),

with e_k the k-th elementary symmetric polynomial. Model partitioning into d blocks with noise on
all blocks is the same pair with T = d, k = 1 (Dong, Chen, Özgür 2025, Sec. 3). Passes compose as
product pairs, so their privacy losses add.

For either direction the hockey-stick divergence is an expectation of a [0, 1]-valued variable,

    δ_remove(ε) = E_{y~P}[(1 − e^{ε − ℓ(y)})_+],  ℓ = log P/Q,
    δ_add(ε)    = E_{y~Q}[(1 − e^{ε − ℓ'(y)})_+], ℓ' = log Q/P,

which is estimated from i.i.d. samples and bounded with Hoeffding's relative-entropy inequality
(Hoeffding 1963, Thm 1, eq. 2.1). The output is an *estimate with a confidence level*, not a
certified bound: "δ ≤ value with probability ≥ confidence over the sampling".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Self

import numpy as np
from numpy.typing import NDArray

from asymflow.accounting.accountant import Accountant
from asymflow.accounting.events import (
    BalancedSampled,
    Event,
    Gaussian,
    ModelPartitioned,
    check_epsilon,
)
from asymflow.checks import check_delta

Direction = Literal["remove", "add"]
FloatArray = NDArray[np.float64]

# Upper limit on the float64 entries of one (rows, T) working array: 2**24 entries = 128 MiB.
_MAX_CHUNK_ENTRIES = 1 << 24
_BISECTION_STEPS = 200


# --------------------------------------------------------------------------- likelihood ratio


def _logsumexp_rows(x: FloatArray) -> FloatArray:
    """log Σ_j exp(x[:, j]) per row, shifted by the row maximum for stability."""
    m = np.max(x, axis=1)
    m = np.where(np.isfinite(m), m, 0.0)
    return m + np.log(np.sum(np.exp(x - m[:, None]), axis=1))


def log_elementary_symmetric(logw: FloatArray, k: int) -> FloatArray:
    """log e_k(w) for every row of ``logw = log w`` (shape (batch, T)), in O(T·min(k, T−k)).

    Dynamic program over the coordinates (Dong & Özgür, arXiv 2605.07072): after coordinate i,
    E_j ← E_j + w_i E_{j−1}, carried in the log domain with ``np.logaddexp``. For k > T/2 the
    identity e_k(w) = (Π_i w_i) · e_{T−k}(1/w) is used; k = 1 is a plain logsumexp.
    """
    logw = np.asarray(logw, dtype=np.float64)
    if logw.ndim != 2:
        raise ValueError(f"logw must have shape (batch, T), got shape {logw.shape}")
    T = logw.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= T:
        raise ValueError(f"k must be an integer with 0 <= k <= T, got k={k!r}, T={T}")
    if k > T - k:
        return np.sum(logw, axis=1) + log_elementary_symmetric(-logw, T - k)
    if k == 0:
        return np.zeros(logw.shape[0])
    if k == 1:
        return _logsumexp_rows(logw)
    E = np.full((logw.shape[0], k + 1), -np.inf)
    E[:, 0] = 0.0
    for i in range(T):
        # Only E_j with k − (T − 1 − i) <= j <= i + 1 can still reach e_k; update those in place.
        lo = max(1, k - (T - 1 - i))
        hi = min(i + 1, k)
        np.logaddexp(
            E[:, lo : hi + 1], logw[:, i : i + 1] + E[:, lo - 1 : hi], out=E[:, lo : hi + 1]
        )
    return E[:, k]


def log_likelihood_ratio(y: FloatArray, k: int, sigma: float) -> FloatArray:
    """log P(y)/Q(y) = log e_k(w) − log C(T,k), w_i = exp((2y_i − 1)/(2σ²)), per row of y.

    P, Q are the one-pass BIS(k, T) dominating pair of ACCOUNTING.md sec. 2, T = y.shape[1].
    """
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2:
        raise ValueError(f"y must have shape (batch, T), got shape {y.shape}")
    if not (isinstance(sigma, int | float) and math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be finite and > 0, got sigma={sigma!r}")
    T = y.shape[1]
    log_binom = math.lgamma(T + 1) - math.lgamma(k + 1) - math.lgamma(T - k + 1)
    logw = (2.0 * y - 1.0) / (2.0 * sigma * sigma)
    return log_elementary_symmetric(logw, k) - log_binom


def sample_privacy_losses(
    steps: int,
    k: int,
    sigma: float,
    size: int,
    direction: Direction,
    rng: np.random.Generator,
    batch: int = 4096,
) -> FloatArray:
    """``size`` i.i.d. privacy losses of one BIS(k, steps) pass with the Gaussian mechanism.

    remove: ℓ = log P/Q(y), y ~ P, drawn with S = the first k coordinates (P is a uniform mixture
    over S and the ratio is symmetric in the coordinates). add: ℓ' = log Q/P(y), y ~ Q.
    Draws are made in chunks of at most ``batch`` rows; the result does not depend on ``batch``.
    """
    if direction not in ("remove", "add"):
        raise ValueError(f"direction must be 'remove' or 'add', got direction={direction!r}")
    for name, value, low in (("steps", steps, 1), ("size", size, 0), ("batch", batch, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= steps:
        raise ValueError(f"k must satisfy 1 <= k <= steps, got k={k!r}, steps={steps}")
    rows = max(1, min(batch, _MAX_CHUNK_ENTRIES // steps))
    out = np.empty(size)
    for start in range(0, size, rows):
        m = min(rows, size - start)
        y = rng.standard_normal((m, steps))
        y *= sigma
        if direction == "remove":
            y[:, :k] += 1.0
            out[start : start + m] = log_likelihood_ratio(y, k, sigma)
        else:
            out[start : start + m] = -log_likelihood_ratio(y, k, sigma)
    return out


# --------------------------------------------------------------------------- confidence bounds


def bernoulli_kl(p: float, q: float) -> float:
    """kl(p‖q) = p log(p/q) + (1−p) log((1−p)/(1−q)), with 0 log 0 = 0 (+inf off the support)."""
    out = 0.0
    if p > 0:
        if q <= 0:
            return math.inf
        out += p * math.log(p / q)
    if p < 1:
        if q >= 1:
            return math.inf
        out += (1 - p) * (math.log1p(-p) - math.log1p(-q))
    return out


def _check_bound_args(mean: float, n: int, beta: float) -> None:
    if not 0 <= mean <= 1:
        raise ValueError(f"mean must satisfy 0 <= mean <= 1, got mean={mean}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got n={n!r}")
    if not 0 < beta < 1:
        raise ValueError(f"beta must satisfy 0 < beta < 1, got beta={beta}")


def hoeffding_upper(mean: float, n: int, beta: float) -> float:
    """Upper confidence bound max{p >= mean : n·kl(mean‖p) <= log(1/β)} for the mean of [0,1]
    variables; P(true mean > bound) <= β by Hoeffding (1963, Thm 1, eq. 2.1) applied to 1 − X.

    Solved by bisection; the end of the bracket that is returned is the conservative one.
    """
    _check_bound_args(mean, n, beta)
    if mean >= 1:
        return 1.0
    level = math.log(1 / beta) / n
    lo, hi = mean, 1.0
    for _ in range(_BISECTION_STEPS * 6):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if bernoulli_kl(mean, mid) <= level:
            lo = mid
        else:
            hi = mid
    return hi


def hoeffding_lower(mean: float, n: int, beta: float) -> float:
    """Lower confidence bound min{p <= mean : n·kl(mean‖p) <= log(1/β)} for the mean of [0,1]
    variables; P(true mean < bound) <= β by Hoeffding (1963, Thm 1, eq. 2.1)."""
    _check_bound_args(mean, n, beta)
    if mean <= 0:
        return 0.0
    level = math.log(1 / beta) / n
    lo, hi = 0.0, mean
    for _ in range(_BISECTION_STEPS * 6):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if bernoulli_kl(mean, mid) <= level:
            hi = mid
        else:
            lo = mid
    return lo


# --------------------------------------------------------------------------- the accountant


@dataclass(frozen=True, slots=True)
class MonteCarloEstimate:
    """δ(ε) estimated from ``samples`` draws per direction.

    ``delta_upper`` / ``delta_lower`` bound δ(ε) = max(δ_remove, δ_add) from above / below, each
    with probability >= ``confidence`` (each direction's bound is taken at level β/2, β =
    1 − confidence, and joined by a union bound; the two-sided interval holds with probability
    >= 1 − 2β). The per-direction bounds each hold with probability >= 1 − β/2.
    """

    epsilon: float
    delta_mean: float
    delta_upper: float
    delta_lower: float
    confidence: float
    samples: int
    remove_mean: float
    add_mean: float
    remove_upper: float
    remove_lower: float
    add_upper: float
    add_lower: float


def _hockey_stick_mean(sorted_losses: FloatArray, epsilon: float) -> float:
    """(1/n) Σ_i (1 − e^{ε − ℓ_i})_+ from ascending losses; only the tail ℓ_i > ε is touched."""
    n = sorted_losses.shape[0]
    tail = sorted_losses[np.searchsorted(sorted_losses, epsilon, side="right") :]
    if tail.size == 0:
        return 0.0
    return min(1.0, max(0.0, float(-np.sum(np.expm1(epsilon - tail))) / n))


class MonteCarloAccountant(Accountant):
    """Monte Carlo δ(ε) for compositions of BIS passes and model-partitioned steps (Gaussian).

    Each sample draws every composed pass independently and sums the per-pass privacy losses
    (a leaf composed c times contributes c independent losses). Both directions are sampled; the
    reported δ is the max. ``delta`` returns the upper confidence bound ("δ <= value with
    probability >= confidence"), ``epsilon`` the smallest ε whose upper bound is <= δ. Since the
    empirical δ(ε) is nonincreasing in ε, that ε is >= the true ε(δ) with probability
    >= confidence (apply the fixed-ε bound at any ε' < ε(δ)). Not certified: an estimate.

    Samples are drawn once per composed state and cached; ``compose`` invalidates the cache.
    Cost is about 2·samples·Σ_leaves count·T·min(k, T−k) operations; ``batch`` caps the rows
    held in memory at once (each row has T float64 entries).
    """

    name = "mc"
    certified = False

    def __init__(
        self,
        *,
        samples: int = 100_000,
        confidence: float = 0.95,
        seed: int | None = 0,
        batch: int = 4096,
    ) -> None:
        super().__init__()
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 100:
            raise ValueError(f"samples must be an integer >= 100, got samples={samples!r}")
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, int | float)
            or not 0 < confidence < 1
        ):
            raise ValueError(
                f"confidence must satisfy 0 < confidence < 1, got confidence={confidence!r}"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got seed={seed!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be an integer >= 1, got batch={batch!r}")
        self.samples = samples
        self.confidence = float(confidence)
        self.seed = seed
        self.batch = batch
        self._losses: dict[Direction, FloatArray] | None = None

    # ----------------------------------------------------------------- events

    @staticmethod
    def _pair(event: Event) -> tuple[int, int, float] | None:
        """(T, k, σ) of the random-allocation pair dominating ``event``, or None if unsupported."""
        if isinstance(event, BalancedSampled) and isinstance(event.event, Gaussian):
            return event.steps, event.k, float(event.event.sigma)
        if (
            isinstance(event, ModelPartitioned)
            and event.noise_on_all_blocks
            and isinstance(event.event, Gaussian)
        ):
            return event.parts, 1, float(event.event.sigma)
        return None

    def _supports_leaf(self, event: Event) -> bool:
        return self._pair(event) is not None

    def compose(self, event: Event, count: int = 1) -> Self:
        """Add ``count`` repetitions of ``event`` and drop the cached samples."""
        super().compose(event, count)
        self._losses = None
        return self

    # ----------------------------------------------------------------- sampling

    def _sampled_losses(self) -> dict[Direction, FloatArray]:
        """Ascending total privacy losses per direction, drawn on first use and cached."""
        if self._losses is not None:
            return self._losses
        counts: dict[tuple[int, int, float], int] = {}
        for event, count in self._leaves:
            pair = self._pair(event)
            if pair is None:  # unreachable: compose() refuses unsupported events
                raise ValueError(f"mc accountant cannot bound {event!r}")
            counts[pair] = counts.get(pair, 0) + count
        remove_rng, add_rng = np.random.default_rng(self.seed).spawn(2)
        losses: dict[Direction, FloatArray] = {}
        directions: tuple[tuple[Direction, np.random.Generator], ...] = (
            ("remove", remove_rng),
            ("add", add_rng),
        )
        for direction, rng in directions:
            total = np.zeros(self.samples)
            for (steps, k, sigma), count in counts.items():
                for _ in range(count):
                    total += sample_privacy_losses(
                        steps, k, sigma, self.samples, direction, rng, self.batch
                    )
            losses[direction] = np.sort(total)
        self._losses = losses
        return losses

    # ----------------------------------------------------------------- queries

    @property
    def _beta_per_direction(self) -> float:
        return (1.0 - self.confidence) / 2.0

    def _means(self, epsilon: float) -> tuple[float, float]:
        losses = self._sampled_losses()
        return (
            _hockey_stick_mean(losses["remove"], epsilon),
            _hockey_stick_mean(losses["add"], epsilon),
        )

    def _upper(self, epsilon: float) -> float:
        beta = self._beta_per_direction
        return max(hoeffding_upper(m, self.samples, beta) for m in self._means(epsilon))

    def _lower(self, epsilon: float) -> float:
        beta = self._beta_per_direction
        return max(hoeffding_lower(m, self.samples, beta) for m in self._means(epsilon))

    def _max_loss(self) -> float:
        losses = self._sampled_losses()
        return max(0.0, float(losses["remove"][-1]), float(losses["add"][-1]))

    def estimate(self, epsilon: float) -> MonteCarloEstimate:
        """Mean and confidence bounds of δ(ε) = max(δ_remove, δ_add); see MonteCarloEstimate."""
        check_epsilon(epsilon)
        n = self.samples
        if not self._leaves:
            return MonteCarloEstimate(
                float(epsilon), 0.0, 0.0, 0.0, self.confidence, n, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
            )
        beta = self._beta_per_direction
        remove, add = self._means(epsilon)
        r_up, r_lo = hoeffding_upper(remove, n, beta), hoeffding_lower(remove, n, beta)
        a_up, a_lo = hoeffding_upper(add, n, beta), hoeffding_lower(add, n, beta)
        return MonteCarloEstimate(
            epsilon=float(epsilon),
            delta_mean=max(remove, add),
            delta_upper=max(r_up, a_up),
            delta_lower=max(r_lo, a_lo),
            confidence=self.confidence,
            samples=n,
            remove_mean=remove,
            add_mean=add,
            remove_upper=r_up,
            remove_lower=r_lo,
            add_upper=a_up,
            add_lower=a_lo,
        )

    def _delta(self, epsilon: float) -> float:
        """Upper confidence bound on δ(ε): δ <= value with probability >= confidence."""
        return self._upper(epsilon)

    def _epsilon(self, delta: float) -> float:
        """Smallest ε with upper-confidence δ(ε) <= δ (bisection on the cached samples).

        Returns ``math.inf`` when δ is below the resolution of the sample size, i.e. below
        1 − (β/2)^{1/samples}, the upper bound when no sample exceeds ε.
        """
        if self._upper(0.0) <= delta:
            return 0.0
        hi = self._max_loss()
        if self._upper(hi) > delta:
            return math.inf
        lo = 0.0
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi) or hi - lo <= 1e-12 * max(1.0, hi):
                break
            if self._upper(mid) <= delta:
                hi = mid
            else:
                lo = mid
        return hi

    def epsilon_lower(self, delta: float) -> float:
        """Largest ε with lower-confidence δ(ε) >= δ: a lower confidence bound on the true ε(δ),
        holding with probability >= confidence (0 when no ε qualifies or nothing was composed)."""
        check_delta("delta", delta)
        if not self._leaves or self._lower(0.0) < delta:
            return 0.0
        lo, hi = 0.0, self._max_loss()  # every sample is <= hi, so the lower bound is 0 there
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi) or hi - lo <= 1e-12 * max(1.0, hi):
                break
            if self._lower(mid) >= delta:
                lo = mid
            else:
                hi = mid
        return lo
