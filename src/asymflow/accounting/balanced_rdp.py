"""Exact remove-direction RDP of k-of-T balanced sampling at integer orders.

For the pair P = C(T,k)^-1 sum_{|S|=k} N(1_S, sigma^2 I_T), Q = N(0, sigma^2 I_T) and integer
alpha >= 2 (ACCOUNTING.md sec. 2; Dong, Chen, Ozgur 2025, arXiv 2503.03043, Thm 3.1):

    E_Q[L^alpha] = E exp(sum_{i<j} |S_i & S_j| / sigma^2),   S_1..S_alpha iid uniform k-subsets,

and sum_{i<j} |S_i & S_j| = sum_t C(n_t, 2), n_t = #{i : t in S_i}. Adding the subsets one at a
time, the state that matters is the *profile* m = (m_0, m_1, ..., m_i): how many coordinates are
covered c times (the coordinates are exchangeable). A new subset takes j_c coordinates from
class c (multivariate hypergeometric, prob prod_c C(m_c, j_c) / C(T, k)) and multiplies the
weight by exp(sum_c c j_c / sigma^2), since C(c+1, 2) - C(c, 2) = c. The dynamic program over
profiles is exact (the generating-function form of Feldman & Shenfeld, arXiv 2502.08202,
Thm 4.4, is its k = 1 case) but its state space grows quickly with alpha and k, so it runs
under a work budget and stops at the last order it finished.

Where the exact program is out of reach, ``log_moments_remove`` also evaluates block
relaxations: ``k`` split into groups of c selections among ~c T/k coordinates (c = 2, 4; the
rest 1-of-floor(T/k)). Uniform k-subsets are the average over a random block assignment of
independent uniform c-subsets per block, so the relaxed ratio R satisfies E[R | y] = L and, by
Jensen, E_Q[L^alpha] <= E_Q[R^alpha] (the argument of Feldman & Shenfeld's Lemma 3.2, whose
c = 1 case is the k-fold reduction). Every value returned is therefore the exact moment or an
upper bound on it, and never above the reduction.

Add direction, log E_Q[L^(1-alpha)] (:func:`log_moments_add`). Here no exact form is known to
us for 2 <= k <= T - 2: 1 - alpha < 0, so the moment is not a polynomial in the subset
indicators and the overlap expansion above does not exist; the Laplace form
x^-m = Gamma(m)^-1 int t^(m-1) e^(-t x) dt, exact for k = 1 because e_1 is a sum, needs
E exp(-t e_k(w)), which does not factor for k >= 2. Partition relaxations in between
(2-of-m blocks through 3 or 4 parts, as in :mod:`balanced_pld`) were tried: certified by
mean-preserving spreads they came out above the reduction at sigma = 1, 1.42 and at most 0.4%
below it at sigma = 0.6, so they are not used. What is used, all certified:
- the reduction over all T steps: a uniformly random partition of [T] into T mod k blocks of
  floor(T/k) + 1 and k - T mod k blocks of floor(T/k), one uniform pick per block, draws a
  uniform k-subset (the law is permutation invariant), so L = E_pi R_pi with R_pi a product of
  independent 1-of-n ratios and, x^(1-alpha) being convex, E_Q L^(1-alpha) <= E_Q R^(1-alpha)
  (Feldman & Shenfeld 2502.08202, Lemma 3.2, with unequal blocks); it never uses fewer steps
  than the floor(T/k)-block reduction and is capped by it;
- complements, exact: e_k(w) = prod(w) e_(T-k)(1/w). Tilting Q by prod w^(-m) (m = alpha - 1)
  and rescaling 1/w back to the law of w gives
  log E_Q[L_k^-m] = log E_Q[L_(T-k)^-m] + m (m+1) (2k - T) / (2 sigma^2),
  so k = T - 1 is exact (1-of-T quadrature) and k > T/2 inherits the (T-k)-bound.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

# Inner steps of the profile program (compositions tried) allowed per (T, k, sigma) query.
DEFAULT_BUDGET = 25_000


def _log_binom(n: int, r: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(r + 1) - math.lgamma(n - r + 1)


def _compositions(total: int, caps: tuple[int, ...]):
    """All j with sum(j) = total and 0 <= j_c <= caps[c]."""
    if len(caps) == 1:
        if total <= caps[0]:
            yield (total,)
        return
    room = sum(caps[1:])
    for j in range(max(0, total - room), min(total, caps[0]) + 1):
        for rest in _compositions(total - j, caps[1:]):
            yield (j, *rest)


@lru_cache(maxsize=512)
def profile_log_moments(
    steps: int, k: int, sigma: float, max_order: int, budget: int = DEFAULT_BUDGET
) -> tuple[float, ...]:
    """log E_Q[L^a] for a = 0, 1, 2, ... (exact), as far as ``budget`` allows (<= max_order).

    Entries 0 and 1 are 0. Uses e_k <-> e_{T-k} symmetry: with complements,
    |S_i^c & S_j^c| = T - 2k + |S_i & S_j|, so the k-of-T moment is the (T-k)-of-T moment times
    exp(C(a,2) (2k - T) / sigma^2).
    """
    if not 1 <= k <= steps:
        raise ValueError(f"k must satisfy 1 <= k <= steps, got k={k}, steps={steps}")
    shift_per_pair = 0.0
    if k > steps - k:
        shift_per_pair = (2 * k - steps) / sigma**2
        k = steps - k
    out = [0.0, 0.0]
    if k == 0:  # k = T: every subset is [T]
        return tuple(a * (a - 1) / 2 * shift_per_pair for a in range(max_order + 1))
    log_total = _log_binom(steps, k)
    inv_var = 1.0 / sigma**2
    states: dict[tuple[int, ...], float] = {(steps - k, k): 0.0}
    work = 0
    for order in range(2, max_order + 1):
        new: dict[tuple[int, ...], float] = {}
        for profile, log_w in states.items():
            base = log_w - log_total
            for j in _compositions(k, profile):
                work += 1
                log_p = base + inv_var * sum(c * jc for c, jc in enumerate(j))
                nxt = [*profile, 0]
                for c, jc in enumerate(j):
                    if jc:
                        log_p += _log_binom(profile[c], jc)
                        nxt[c] -= jc
                        nxt[c + 1] += jc
                while len(nxt) > 1 and nxt[-1] == 0:
                    nxt.pop()
                key = tuple(nxt)
                prev = new.get(key)
                new[key] = log_p if prev is None else float(np.logaddexp(prev, log_p))
            if work > budget:
                return tuple(out)
        states = new
        total = float(np.logaddexp.reduce(np.fromiter(states.values(), float)))
        out.append(total + order * (order - 1) / 2 * shift_per_pair)
    return tuple(out)


def block_structures(steps: int, k: int) -> list[tuple[tuple[int, int, int], ...]]:
    """Block relaxations of k of T, finest first: tuples of (count c, block size n, blocks).

    Group size c in (k, 4, 2, 1): floor(k/c) blocks of c-of-floor(c T/k) plus the remaining
    selections as 1-of-floor(T/k) blocks (coordinates left over form a block nobody selects,
    which only reveals more). c = 1 is Feldman & Shenfeld's k-fold reduction.
    """
    out: list[tuple[tuple[int, int, int], ...]] = []
    for c in sorted({k, 4, 2, 1}, reverse=True):
        if c > k:
            continue
        groups, rest = divmod(k, c)
        blocks = [(c, (c * steps) // k, groups)]
        if rest:
            blocks.append((1, steps // k, rest))
        out.append(tuple(b for b in blocks if b[2] > 0))
    return out


def log_moments_remove(
    steps: int, k: int, sigma: float, max_order: int, budget: int = DEFAULT_BUDGET
) -> tuple[np.ndarray, np.ndarray]:
    """(log E_Q[L^a], exact) for a = 0..max_order: the smallest upper bound available.

    ``exact[a]`` says whether entry a is the exact moment (the full k-of-T profile program
    finished) or the best block relaxation. The reduction (c = 1) needs only k = 1 moments and
    always covers every order.
    """
    from asymflow.accounting.allocation import remove_log_moments

    best = np.full(max_order + 1, np.inf)
    exact = np.zeros(max_order + 1, dtype=bool)
    for structure in block_structures(steps, k):
        total = np.zeros(max_order + 1)
        for c, n, blocks in structure:
            if c == 1:
                part = remove_log_moments(n, sigma, max_order)
            else:
                got = profile_log_moments(n, c, float(sigma), max_order, budget)
                part = np.full(max_order + 1, np.inf)
                part[: len(got)] = got
            total = total + blocks * part
        is_exact = structure == ((k, steps, 1),)
        better = total < best
        if is_exact:  # the exact value wins whenever it is known
            better = np.isfinite(total)
        best = np.where(better, total, best)
        exact = np.where(better, is_exact, exact)
    best[:2] = 0.0
    return best, exact


def reduction_sizes(steps: int, k: int) -> tuple[tuple[int, int], ...]:
    """(block size n, blocks) of the reduction over all T steps: floor(T/k) + 1 for T mod k
    blocks, floor(T/k) for the rest."""
    n, extra = divmod(steps, k)
    return tuple((size, count) for size, count in ((n, k - extra), (n + 1, extra)) if count)


def log_moments_add(steps: int, k: int, sigma: float, max_order: int) -> np.ndarray:
    """Upper bound on log E_Q[L^(1-a)], a = 0..max_order, the add-direction cumulants of one
    k-of-T pass: the smaller of the reduction over all T steps (capped by the floor(T/k)
    reduction) and, for k > T/2, the exact complement shift of the (T-k)-bound (module
    docstring). Exact for k in {1, T-1, T} (up to the 1-of-n quadrature's 1e-6 margin)."""
    from asymflow.accounting.allocation import add_log_moments

    if not 1 <= k <= steps:
        raise ValueError(f"k must satisfy 1 <= k <= steps, got k={k}, steps={steps}")
    a = np.arange(max_order + 1, dtype=float)
    if k == steps:  # the Gaussian mechanism with mu^2 = T/sigma^2
        return a * (a - 1) * steps / (2 * sigma**2)
    floor = k * add_log_moments(steps // k, sigma, max_order)
    spread = sum(
        count * add_log_moments(size, sigma, max_order) for size, count in reduction_sizes(steps, k)
    )
    best = np.minimum(floor, spread)
    if 2 * k > steps:
        shift = a * (a - 1) * (2 * k - steps) / (2 * sigma**2)
        best = np.minimum(best, log_moments_add(steps, steps - k, sigma, max_order) + shift)
    best[:2] = 0.0
    return best
