"""Label privacy for Delta: labels reach the public side only through a label-DP mechanism.

In Delta's stage 2 the public model M_res learns from softmax(z_res) - y, which reveals y
(Niu et al., CVPR 2024, arXiv 2312.05264, Sec. 3.4). Here the labels are released once by
k-ary randomized response instead (Warner 1965; Kairouz, Oh, Viswanath 2016): each label is
kept with probability p = e^eps / (e^eps + K - 1) and otherwise replaced by one of the other
K - 1 classes uniformly, which is eps-DP per label. The public side can then train M_res on
its own. ``labels="clear"`` sends the true labels and records a ``NonPrivate`` event, so the
ledger reports epsilon = inf.

The other option keeps the paper's per-step protocol but noises it: for each row of a public
batch the private side returns g~ = softmax(z_res) - e_y + N(0, 2 sigma^2 I_K). Given z_res
(computed by the public side from public data), g~ depends on the record only through e_y,
and ||e_y - e_y'||_2 = sqrt(2) bounds its change when a label is replaced (a removed record,
zero-out style as for the residuals, changes it by ||e_y|| = 1), so each row released is the
Gaussian mechanism with noise multiplier sigma (Dwork & Roth 2014, Thm A.1; Balle & Wang 2018
for the exact epsilon). The rows of one step belong to different records, and a record's
rows over the epochs compose adaptively.
"""

from __future__ import annotations

import math
import secrets

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional

from asymflow.accounting.events import Event, Gaussian, NonPrivate, RandomizedResponse
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.contract import (
    NoisyLabelGradients,
    NoisyLabels,
    as_labels,
    keep_probability,
)

CLEAR_LABELS = "labels sent in clear"
"""The ``NonPrivate.what`` of labels released without noise."""


def randomized_response(
    labels: np.ndarray | Tensor, epsilon: float, classes: int, generator: np.random.Generator
) -> NoisyLabels:
    """k-ary randomized response: keep each label w.p. e^eps/(e^eps+K-1), else draw one of
    the other K-1 classes uniformly. The mechanism only; :func:`release_labels` records it
    in the ledger first."""
    true = as_labels(labels, classes)
    p = keep_probability(epsilon, classes)
    flip = generator.random(len(true)) >= p
    shift = generator.integers(1, classes, size=len(true))  # uniform over the K-1 others
    noisy = np.where(flip, (true + shift) % classes, true).astype(np.int64)
    return NoisyLabels(noisy, classes, RandomizedResponse(float(epsilon), classes))


def clear_labels(labels: np.ndarray | Tensor, classes: int) -> NoisyLabels:
    """The true labels with a ``NonPrivate`` event (epsilon = inf in the ledger)."""
    return NoisyLabels(as_labels(labels, classes).copy(), classes, NonPrivate(CLEAR_LABELS))


def release_labels(
    labels: np.ndarray | Tensor,
    *,
    mode: str,
    classes: int,
    ledger: PrivacyLedger,
    dataset: str,
    epsilon: float | None = None,
    scope: str = "train",
    seed: int | None = None,
) -> tuple[NoisyLabels, int]:
    """Record the label release in ``ledger`` (write-ahead), then run it.

    ``mode="rr"``: :func:`randomized_response` at ``epsilon``, its noise from ``seed`` or, when
    None, the OS's secure source; ``mode="clear"``: :func:`clear_labels`. Returns the labels
    and the ledger row id (mark it released once the labels are handed on).
    """
    true = as_labels(labels, classes)
    if mode == "rr":
        if epsilon is None:
            raise ValueError("epsilon must be a finite number > 0 for mode='rr', got None")
        keep_probability(epsilon, classes)  # validates before anything is recorded
        event: Event = RandomizedResponse(float(epsilon), classes)
        row = ledger.record(
            event, dataset=dataset, scope=scope, note="labels (randomized response)"
        )
        gen = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        return randomized_response(true, epsilon, classes, gen), row
    if mode == "clear":
        row = ledger.record(
            NonPrivate(CLEAR_LABELS), dataset=dataset, scope=scope, note="labels (clear)"
        )
        return clear_labels(true, classes), row
    raise ValueError(f"mode must be one of ('rr', 'clear'), got mode={mode!r}")


LABEL_GRADIENT_SENSITIVITY = math.sqrt(2.0)
"""L2 sensitivity of softmax(z) - e_y to the label: ||e_y - e_y'||_2 = sqrt(2)."""


def noisy_label_gradients(
    logits: Tensor, labels: np.ndarray | Tensor, sigma: float, generator: torch.Generator
) -> NoisyLabelGradients:
    """g~ = softmax(z) - e_y + N(0, (sqrt(2) sigma)^2 I) per row: the Gaussian mechanism on the
    label with sensitivity sqrt(2) (module docstring). The mechanism only; the caller records
    its event in the ledger before handing the result on."""
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got sigma={sigma}")
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (rows, classes), got {tuple(logits.shape)}")
    rows, classes = logits.shape
    true = torch.from_numpy(as_labels(labels, classes))
    if len(true) != rows:
        raise ValueError(f"labels must have one entry per logit row ({rows}), got {len(true)}")
    g = torch.softmax(logits.detach().double(), 1) - functional.one_hot(true, classes).double()
    noise = torch.randn(g.shape, generator=generator, dtype=torch.float64)
    g = g + noise * (LABEL_GRADIENT_SENSITIVITY * sigma)
    return NoisyLabelGradients(g.float().numpy(), Gaussian(float(sigma)))
