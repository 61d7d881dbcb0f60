"""From the outcomes of a membership test to a lower bound on epsilon, with confidence.

If a mechanism M is (epsilon, delta)-DP, every test S that separates neighbouring inputs D, D'
obeys P[M(D) in S] <= e^epsilon P[M(D') in S] + delta, in both orders of the pair. So a test
with true-positive rate TPR and false-positive rate FPR proves

    epsilon >= log((TPR - delta) / FPR)

(Kairouz, Oh, Viswanath, ICML 2015, Thm 2.1; used for auditing by Jagielski, Ullman, Oprea,
NeurIPS 2020, Sec. 3, and Nasr et al., IEEE S&P 2021, Sec. III). The rates are estimated
from n trials each; replacing TPR by its Clopper-Pearson lower limit and FPR by its upper
limit (Clopper & Pearson, Biometrika 1934), each one-sided at level alpha/2, makes the bound
hold with probability >= 1 - alpha over the trials (union bound).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats

__all__ = ["clopper_pearson", "epsilon_lower_bound"]


def clopper_pearson(
    successes: ArrayLike, trials: ArrayLike, confidence: float = 0.95
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Two-sided Clopper-Pearson interval (lower, upper) for a binomial proportion.

    lower = Beta^{-1}(alpha/2; x, n - x + 1) (0 if x = 0), upper = Beta^{-1}(1 - alpha/2;
    x + 1, n - x) (1 if x = n), alpha = 1 - confidence. Each limit alone is a one-sided
    bound at level 1 - alpha/2. Works elementwise on arrays.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must satisfy 0 < confidence < 1, got {confidence}")
    x = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    if np.any(n < 1) or np.any(x < 0) or np.any(x > n):
        raise ValueError("successes and trials must satisfy 0 <= successes <= trials, trials >= 1")
    alpha = 1.0 - confidence
    with np.errstate(invalid="ignore", divide="ignore"):
        lower = np.where(x > 0, stats.beta.ppf(alpha / 2, x, n - x + 1), 0.0)
        upper = np.where(x < n, stats.beta.ppf(1 - alpha / 2, x + 1, n - x), 1.0)
    return np.asarray(lower, dtype=np.float64), np.asarray(upper, dtype=np.float64)


def epsilon_lower_bound(
    true_positives: ArrayLike,
    positives: ArrayLike,
    false_positives: ArrayLike,
    negatives: ArrayLike,
    delta: float,
    confidence: float = 0.95,
) -> NDArray[np.float64]:
    """max(0, log((TPR_lo - delta) / FPR_hi)) elementwise, with the Clopper-Pearson limits
    of :func:`clopper_pearson` (valid with probability >= ``confidence``)."""
    if not 0 <= delta < 1:
        raise ValueError(f"delta must satisfy 0 <= delta < 1, got delta={delta}")
    tpr_lo, _ = clopper_pearson(true_positives, positives, confidence)
    _, fpr_hi = clopper_pearson(false_positives, negatives, confidence)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.log((tpr_lo - delta) / fpr_hi)
    return np.where(np.isfinite(eps) & (eps > 0), eps, 0.0)
