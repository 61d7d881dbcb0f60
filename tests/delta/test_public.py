"""The public side: only sanitized payloads cross; M_res trains on its own from bits + labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from asymflow.accounting.events import Gaussian, NonPrivate
from asymflow.delta.contract import PublicSide, check_payload
from asymflow.delta.labels import NoisyLabels, clear_labels, randomized_response
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.public.local import LocalPublic, cosine_lr, forward_corrected_loss, rr_log_transition

SHAPE = (2, 4, 4)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(SHAPE), 2))


def separable_bits(n: int = 256, seed: int = 0) -> tuple[SanitizedResidual, np.ndarray]:
    """Class y in {0, 1} sets the sign of every element, with 10% of the bits flipped."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.int64)
    signs = np.where(y[:, None] == 1, 1, 0) ^ (rng.random((n, math.prod(SHAPE))) < 0.1)
    bits = np.packbits(signs.astype(np.uint8), axis=1)
    return SanitizedResidual(bits, SHAPE, Gaussian(1.0)), y


def test_local_public_satisfies_the_protocol():
    assert isinstance(LocalPublic(tiny_model), PublicSide)


@pytest.mark.parametrize("raw", [torch.randn(4, *SHAPE), np.zeros((4, 4), np.uint8), [1, 2]])
def test_public_side_refuses_anything_but_a_sanitized_residual(raw):
    public = LocalPublic(tiny_model)
    with pytest.raises(TypeError, match="SanitizedResidual"):
        public.upload(raw)
    with pytest.raises(TypeError, match="SanitizedResidual"):
        public.logits(raw)


def test_public_side_refuses_plain_label_arrays():
    data, y = separable_bits(8)
    public = LocalPublic(tiny_model)
    for raw in (y, torch.from_numpy(y)):
        with pytest.raises(TypeError, match="NoisyLabels"):
            public.upload(data, raw)
    with pytest.raises(ValueError, match="one entry per sample"):
        check_payload(data, clear_labels(y[:4], 2))


def test_upload_is_idempotent_and_keeps_what_was_sent():
    data, y = separable_bits(16)
    labels = clear_labels(y, 2)
    public = LocalPublic(tiny_model)
    first = public.upload(data, labels)
    assert public.upload(data, labels) == first
    stored_data, stored_labels = public.dataset(first)
    assert stored_data is data and stored_labels is labels
    assert public.upload(data) != first  # unlabelled payload is another data set


def test_public_trains_by_itself_on_clean_and_on_randomized_response_labels():
    data, y = separable_bits(512)
    rr = randomized_response(y, 1.0, 2, np.random.default_rng(0))  # 27% of labels flipped
    for labels in (clear_labels(y, 2), rr):
        public = LocalPublic(tiny_model, augment=False)
        key = public.upload(data, labels)
        metrics = public.train(key, 4, batch_size=32, lr=0.1, seed=0)
        acc = (public.logits(data).argmax(1).numpy() == y).mean()
        assert acc > 0.95, (labels.event, acc)
        assert metrics["samples"] == 4 * len(data)


def test_named_models_train_only_on_their_rows():
    data, y = separable_bits(256)
    public = LocalPublic(tiny_model, augment=False)
    key = public.upload(data, clear_labels(y, 2))
    ones = np.flatnonzero(y == 1)
    metrics = public.train(key, 3, batch_size=32, lr=0.1, seed=0, model="ones", indices=ones)
    public.train(key, 3, batch_size=32, lr=0.1, seed=0, model="all")
    assert set(public.models) == {"ones", "all"}
    assert metrics["samples"] == 3 * len(ones) and metrics["acc_on_received_labels"] > 0.9
    assert (public.logits(data.subset(ones), model="ones").argmax(1) == 1).all()
    assert (public.logits(data, model="all").argmax(1).numpy() == y).mean() > 0.95
    with pytest.raises(ValueError, match="indices"):
        public.train(key, 1, batch_size=8, lr=0.1, seed=0, indices=np.array([0, 999]))


def test_forward_correction_matches_the_noisy_label_likelihood():
    # P(noisy = j) = sum_i softmax(z)_i T[i, j]; the loss is its negative log.
    z = torch.tensor([[2.0, 0.0, -1.0]])
    log_t = rr_log_transition(1.0, 3)
    probs = torch.softmax(z, 1) @ log_t.exp()
    loss = forward_corrected_loss(z, torch.tensor([2]), log_t)
    assert float(loss) == pytest.approx(-math.log(float(probs[0, 2])), rel=1e-6)
    assert torch.allclose(log_t.exp().sum(1), torch.ones(3))


def test_cosine_schedule_ends_at_zero():
    assert cosine_lr(0.1, 0, 10) == pytest.approx(0.1)
    assert cosine_lr(0.1, 5, 10) == pytest.approx(0.05)
    assert cosine_lr(0.1, 10, 10) == pytest.approx(0.0)


def test_state_dict_round_trip_restores_the_logits():
    data, y = separable_bits(64)
    public = LocalPublic(tiny_model)
    key = public.upload(data, clear_labels(y, 2))
    public.train(key, 1, batch_size=16, lr=0.1, seed=0)
    other = LocalPublic(tiny_model)
    other.load_state_dict(public.state_dict())
    torch.testing.assert_close(other.logits(data), public.logits(data))


def test_training_needs_labels_and_valid_arguments():
    data, y = separable_bits(8)
    public = LocalPublic(tiny_model)
    with pytest.raises(ValueError, match="labelled"):
        public.train(public.upload(data), 1, batch_size=4, lr=0.1, seed=0)
    key = public.upload(data, NoisyLabels(y, 2, NonPrivate("labels sent in clear")))
    with pytest.raises(ValueError, match="epochs"):
        public.train(key, -1, batch_size=4, lr=0.1, seed=0)
    with pytest.raises(ValueError, match="lr"):
        public.train(key, 1, batch_size=4, lr=0.0, seed=0)
    with pytest.raises(KeyError, match="dataset_id"):
        public.train("nope", 1, batch_size=4, lr=0.1, seed=0)
