"""Noisy label gradients (labels="grad"): the mechanism, its calibration, and M_res trained
step by step on them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event, pld

from asymflow.accounting.events import Gaussian
from asymflow.delta.contract import StepwisePublicSide
from asymflow.delta.label_steps import (
    check_stepwise,
    label_gradient_releases,
    label_gradient_sigma,
    train_on_label_gradients,
)
from asymflow.delta.labels import (
    LABEL_GRADIENT_SENSITIVITY,
    NoisyLabelGradients,
    clear_labels,
    noisy_label_gradients,
)
from asymflow.public.local import LocalPublic
from tests.delta.test_public import separable_bits, tiny_model


def test_noisy_gradient_is_softmax_minus_onehot_plus_sqrt2_sigma_noise():
    z = torch.tensor([[2.0, 0.0, -1.0]]).repeat(20_000, 1)
    y = np.full(20_000, 1, dtype=np.int64)
    g = noisy_label_gradients(z, y, 0.7, torch.Generator().manual_seed(0))
    assert g.event == Gaussian(0.7) and g.values.dtype == np.float32
    clean = torch.softmax(z[0], 0).numpy() - np.eye(3)[1]
    # mean within 5 standard errors, per-coordinate std within 2% of sqrt(2) * sigma
    std = LABEL_GRADIENT_SENSITIVITY * 0.7
    np.testing.assert_allclose(g.values.mean(0), clean, atol=5 * std / math.sqrt(20_000))
    np.testing.assert_allclose(g.values.std(0), std, rtol=0.02)
    # the label moves the noiseless gradient by exactly the sensitivity sqrt(2)
    assert math.isclose(float(np.linalg.norm(np.eye(3)[1] - np.eye(3)[2])), math.sqrt(2))


@pytest.mark.parametrize(
    ("epsilon", "delta", "releases"), [(2.0, 1e-5, 1), (2.0, 1e-5, 12), (0.5, 1e-6, 40)]
)
def test_label_gradient_sigma_meets_the_target_by_dp_accounting(epsilon, delta, releases):
    """Independent reference: dp_accounting's PLD accountant (pessimistic, fine grid) composes
    ``releases`` Gaussian mechanisms of multiplier sigma; its epsilon must not exceed the
    target, and sigma must not be wastefully large (epsilon above 0.97 of the target)."""
    sigma = label_gradient_sigma(epsilon, delta, releases)
    accountant = pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_event.GaussianDpEvent(sigma), releases)
    reference = accountant.get_epsilon(delta)
    assert 0.97 * epsilon <= reference <= epsilon + 1e-3


def test_releases_count_every_public_epoch_of_every_model_trained_on_a_record():
    assert label_gradient_releases(6, 1, 1) == 6
    assert label_gradient_releases(6, 2, 2) == 12  # each record trains 1 of 2 fold models
    assert label_gradient_releases(3, 1, 4) == 9  # ... 3 of 4
    with pytest.raises(ValueError, match="public_epochs must be an integer >= 1"):
        label_gradient_releases(1, 0, 1)


def _weights(public: LocalPublic) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in public.model().parameters()])


def test_without_noise_stepwise_training_equals_training_on_clear_labels():
    """As sigma -> 0 the protocol is exactly the paper's: SGD on softmax(z) - y is SGD on the
    cross-entropy. Same seeds, same batches, same learning rates, same weights."""
    data, y = separable_bits(200)
    reference = LocalPublic(tiny_model, augment=False)
    key = reference.upload(data, clear_labels(y, 2))
    reference.train(key, 2, batch_size=32, lr=0.1, seed=3)
    stepwise = LocalPublic(tiny_model, augment=False)
    key = stepwise.upload(data)
    metrics = train_on_label_gradients(
        stepwise, key, y, sigma=1e-9, noise=torch.Generator().manual_seed(0),
        epochs=2, batch_size=32, lr=0.1, seed=3,
    )  # fmt: skip
    torch.testing.assert_close(_weights(stepwise), _weights(reference), rtol=1e-5, atol=1e-6)
    assert metrics["samples"] == 400


def test_stepwise_training_learns_through_the_noise():
    data, y = separable_bits(512)
    public = LocalPublic(tiny_model, augment=False)
    key = public.upload(data)
    metrics = train_on_label_gradients(
        public, key, y, sigma=1.0, noise=torch.Generator().manual_seed(1),
        epochs=4, batch_size=32, lr=0.1, seed=0,
    )  # fmt: skip
    acc = float((public.logits(data).argmax(1).numpy() == y).mean())
    assert acc > 0.9 and metrics["acc_on_true_labels"] > 0.8


def test_step_apply_refuses_a_step_it_did_not_start_and_a_wrong_shape():
    data, y = separable_bits(16)
    public = LocalPublic(tiny_model, augment=False)
    assert isinstance(public, StepwisePublicSide) and check_stepwise(public) is public
    key = public.upload(data)
    wrong = NoisyLabelGradients(np.zeros((3, 2), np.float32), Gaussian(1.0))
    with pytest.raises(ValueError, match="no pending step"):
        public.step_apply(wrong)
    public.step_logits(key, np.arange(4), lr=0.1, seed=0, step=0)
    with pytest.raises(ValueError, match=r"shape of the pending logits \(4, 2\)"):
        public.step_apply(wrong)
    with pytest.raises(TypeError, match="NoisyLabelGradients"):
        public.step_apply(np.zeros((4, 2), np.float32))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="indices must lie in"):
        public.step_logits(key, np.array([0, 16]), lr=0.1, seed=0, step=0)
    with pytest.raises(ValueError, match="finite"):
        NoisyLabelGradients(np.full((1, 2), np.nan, np.float32), Gaussian(1.0))
    with pytest.raises(ValueError, match="sigma must be a finite number > 0"):
        noisy_label_gradients(torch.zeros(1, 2), y[:1], 0.0, torch.Generator())
    with pytest.raises(ValueError, match="labels='grad' needs a public side"):
        check_stepwise(object())
