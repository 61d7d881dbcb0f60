"""Label privacy: k-ary randomized response and clear labels, recorded before they leave."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from asymflow.accounting.events import Gaussian, NonPrivate, RandomizedResponse
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.labels import (
    CLEAR_LABELS,
    NoisyLabels,
    clear_labels,
    keep_probability,
    randomized_response,
    release_labels,
)


@pytest.fixture
def ledger(tmp_path):
    with PrivacyLedger.for_run(tmp_path / "run") as led:
        yield led


def test_keep_probability_is_the_k_ary_rr_formula():
    # Kairouz et al. 2016: p = e^eps / (e^eps + K - 1).
    assert keep_probability(2.0, 10) == pytest.approx(math.e**2 / (math.e**2 + 9))
    assert keep_probability(math.log(9), 10) == pytest.approx(0.5)


def test_rr_keeps_labels_at_the_rr_rate_and_spreads_the_rest_uniformly():
    n, k, eps = 40_000, 10, 1.5
    true = np.arange(n, dtype=np.int64) % k
    out = randomized_response(true, eps, k, np.random.default_rng(0))
    p = keep_probability(eps, k)
    kept = out.labels == true
    assert kept.mean() == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / n))
    # Among replaced labels, the shift (noisy - true) mod K is uniform on 1..K-1.
    shifts = (out.labels[~kept] - true[~kept]) % k
    counts = np.bincount(shifts, minlength=k)
    assert counts[0] == 0
    assert stats.chisquare(counts[1:]).pvalue > 1e-4
    assert out.event == RandomizedResponse(eps, k)


def test_rr_accepts_tensors_and_returns_read_only_int64():
    out = randomized_response(torch.tensor([0, 1, 2]), 1.0, 3, np.random.default_rng(1))
    assert out.labels.dtype == np.int64
    with pytest.raises(ValueError):
        out.labels[0] = 1


def test_release_labels_records_the_event_before_returning(ledger):
    labels, row = release_labels(
        np.zeros(50, np.int64),
        mode="rr",
        epsilon=2.0,
        classes=10,
        ledger=ledger,
        dataset="d",
        seed=0,
    )
    (entry,) = ledger.entries(dataset="d")
    assert entry.id == row and entry.event == RandomizedResponse(2.0, 10)
    assert ledger.epsilon(1e-5, dataset="d").epsilon == pytest.approx(2.0, abs=1e-3)
    assert labels.event == entry.event


def test_clear_labels_are_flagged_non_private_with_infinite_epsilon(ledger):
    true = np.array([3, 1, 4, 1, 5], np.int64)
    labels, _ = release_labels(true, mode="clear", classes=10, ledger=ledger, dataset="d")
    np.testing.assert_array_equal(labels.labels, true)
    assert labels.event == NonPrivate(CLEAR_LABELS)
    assert math.isinf(ledger.epsilon(1e-5, dataset="d").epsilon)
    assert clear_labels(true, 10).keep_probability == 1.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "rr", "epsilon": 0.0}, "epsilon"),
        ({"mode": "rr", "epsilon": math.inf}, "epsilon"),
        ({"mode": "rr", "epsilon": None}, "epsilon"),
        ({"mode": "noisy", "epsilon": 1.0}, "mode"),
        ({"mode": "rr", "epsilon": 1.0, "classes": 1}, "classes"),
    ],
)
def test_bad_label_release_parameters_are_refused_before_recording(ledger, kwargs, match):
    kwargs = {"classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        release_labels(np.zeros(3, np.int64), ledger=ledger, dataset="d", **kwargs)
    assert ledger.entries() == []


def test_labels_out_of_range_are_refused():
    with pytest.raises(ValueError, match="classes=3"):
        randomized_response(np.array([0, 3]), 1.0, 3, np.random.default_rng(0))


def test_noisy_labels_accept_only_label_dp_events():
    with pytest.raises(TypeError, match="RandomizedResponse or NonPrivate"):
        NoisyLabels(np.zeros(2, np.int64), 10, Gaussian(1.0))
    with pytest.raises(ValueError, match=r"event\.classes"):
        NoisyLabels(np.zeros(2, np.int64), 10, RandomizedResponse(1.0, 5))
