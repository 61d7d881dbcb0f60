"""M_res trained step by step on noisy label gradients (``labels="grad"``).

Each step the public side computes z_res on a batch of released rows and the private side
answers with g~ = softmax(z_res) - e_y + N(0, 2 sigma^2 I) per row
(:func:`asymflow.delta.labels.noisy_label_gradients`), the cross-entropy gradient of the
paper's stage 2 (Niu et al., CVPR 2024, arXiv 2312.05264, Sec. 3.4) made label-DP. A record's
row is released once per public epoch of each model that trains on it, so with R such
releases per record sigma = sqrt(R) sigma_1, where sigma_1 is the exact Gaussian noise
multiplier for (epsilon, delta) (Balle & Wang 2018): R Gaussian releases of multiplier sigma
compose to one of multiplier sigma / sqrt(R).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.nn import functional

from asymflow.delta.contract import StepwisePublicSide, TrainArgs
from asymflow.delta.labels import noisy_label_gradients
from asymflow.delta.private import calibrated_sigma
from asymflow.public.local import cosine_lr


def check_stepwise(public: object) -> StepwisePublicSide:
    """``public`` if it can train step by step on label gradients, else a clear error."""
    if not isinstance(public, StepwisePublicSide):
        raise ValueError(
            "labels='grad' needs a public side with step_logits/step_apply (per-step label "
            f"gradients), got {type(public).__name__}; use labels='rr' with this public side"
        )
    return public


def label_gradient_releases(epochs: int, public_epochs: int, folds: int) -> int:
    """R: releases of each record's label gradient over a run. With K > 1 cross-fitting
    folds a record trains the K - 1 models outside its fold, each every public epoch."""
    for name, value in (("epochs", epochs), ("public_epochs", public_epochs), ("folds", folds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
    return epochs * public_epochs * max(1, folds - 1)


def label_gradient_sigma(epsilon: float, delta: float, releases: int) -> float:
    """Noise multiplier sigma such that ``releases`` Gaussian(sigma) releases of a record's
    label gradient cost at most (epsilon, delta)."""
    return calibrated_sigma(epsilon, delta, releases)


def train_on_label_gradients(
    public: StepwisePublicSide,
    dataset_id: str,
    labels: np.ndarray,
    *,
    sigma: float,
    noise: torch.Generator,
    **options: Any,
) -> dict[str, float]:
    """Train a public model as :class:`TrainArgs` (``options``) says, answering each of its
    batches with noisy label gradients drawn from ``noise``. The caller records the releases
    in the ledger first.

    Returns the private side's view of the public model on the batches it answered: mean
    cross-entropy and accuracy on the true labels (private metrics, never sent).
    """
    args = TrainArgs(**options)
    epochs, batch_size = args.epochs, args.batch_size
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs must be an integer >= 0, got epochs={epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")
    true = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    rows = args.rows(len(true))
    steps = math.ceil(len(rows) / batch_size)
    loss_sum, correct, seen = 0.0, 0, 0
    for epoch in range(args.start_epoch, args.start_epoch + epochs):
        order_gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        order = rows[torch.randperm(len(rows), generator=order_gen).numpy()]
        for i in range(steps):
            idx = order[i * batch_size : (i + 1) * batch_size]
            step = epoch * steps + i
            z = public.step_logits(
                dataset_id,
                idx,
                lr=cosine_lr(args.lr, step, args.total * steps),
                seed=args.seed,
                step=step,
                model=args.model,
            )
            y = true[idx]
            public.step_apply(noisy_label_gradients(z, y, sigma, noise), model=args.model)
            loss_sum += float(functional.cross_entropy(z, y)) * len(idx)
            correct += int((z.argmax(1) == y).sum())
            seen += len(idx)
    return {
        "loss": loss_sum / max(seen, 1),
        "acc_on_true_labels": correct / max(seen, 1),
        "samples": float(seen),
    }
