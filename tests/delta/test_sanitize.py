"""Sanitizer: payload size, calibrated noise, clipping, ledger-before-release."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from asymflow.accounting.gaussian import gaussian_epsilon
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.sanitize import SanitizedResidual, Sanitizer


@pytest.fixture
def ledger(tmp_path):
    with PrivacyLedger.for_run(tmp_path / "run") as led:
        yield led


@pytest.mark.parametrize("shape", [(3, 5, 5), (64, 32, 32), (1, 1, 1), (2, 3, 4)])
def test_payload_is_one_bit_per_element(ledger, shape):
    san = Sanitizer(clip=1.0, sigma=1.0, seed=0)
    release = san.record_release(ledger, dataset="d", scope="all")
    out = san.sanitize(torch.randn(4, *shape), release)
    assert out.bits.dtype == np.uint8
    assert out.bits.shape == (4, math.ceil(math.prod(shape) / 8))
    assert out.unpack().shape == (4, *shape)
    assert set(out.unpack().unique().tolist()) <= {-1.0, 1.0}


def test_noise_is_calibrated_on_a_known_input():
    clip, sigma = 2.0, 0.7
    san = Sanitizer(clip=clip, sigma=sigma, seed=1)
    noisy = san.clip_and_noise(torch.zeros(200, 500))
    # Zero input: pure N(0, (sigma C)^2) noise; KS test against it.
    p = stats.kstest(noisy.flatten().numpy()[:50_000], "norm", args=(0, sigma * clip)).pvalue
    assert p > 1e-4
    assert noisy.std().item() == pytest.approx(sigma * clip, rel=0.01)


def test_bits_follow_the_gaussian_mechanism_of_the_clipped_input():
    # A residual of norm 10 clipped to C=1: every element becomes 0.1, so
    # P(bit = 1) = Phi(0.1 / sigma) (Gaussian mechanism followed by post-processing).
    clip, sigma = 1.0, 0.2
    residual = torch.full((4000, 1, 10, 10), 1.0)  # norm 10 per sample
    san = Sanitizer(clip=clip, sigma=sigma, seed=2)
    flat = san.clip_and_noise(residual)
    assert flat.mean().item() == pytest.approx(0.1, abs=0.005)
    frac = (flat >= 0).float().mean().item()
    assert frac == pytest.approx(stats.norm.cdf(0.1 / sigma), abs=0.005)


def test_ledger_epsilon_matches_analytic_gaussian(ledger):
    san = Sanitizer.for_epsilon(1.4, 1e-5, clip=1.0, seed=0)
    assert gaussian_epsilon(san.sigma, 1e-5) == pytest.approx(1.4, abs=2e-3)
    san.record_release(ledger, dataset="cifar", scope="all")
    report = ledger.epsilon(1e-5, dataset="cifar")
    assert 1.4 - 5e-3 <= report.epsilon <= 1.4


def test_per_epoch_release_composes_in_the_ledger(ledger):
    san = Sanitizer.for_epsilon(2.0, 1e-5, clip=1.0, releases=3, seed=0)
    for _ in range(3):
        san.record_release(ledger, dataset="d", scope="all")
    assert ledger.epsilon(1e-5, dataset="d").epsilon <= 2.0
    assert gaussian_epsilon(san.sigma, 1e-5, count=3) == pytest.approx(2.0, abs=5e-3)


def test_release_is_in_the_ledger_before_sanitizing(ledger):
    san = Sanitizer(clip=1.0, sigma=1.0, seed=0)
    release = san.record_release(ledger, dataset="d", scope="batch-0")
    assert [e.id for e in ledger.entries(dataset="d")] == [release.row_id]
    out = san.sanitize(torch.randn(2, 1, 4, 4), release)
    assert out.event == san.event


def test_release_for_other_noise_is_refused(ledger):
    release = Sanitizer(clip=1.0, sigma=1.0).record_release(ledger, dataset="d", scope="all")
    with pytest.raises(ValueError, match="different noise"):
        Sanitizer(clip=1.0, sigma=2.0).sanitize(torch.randn(1, 1, 2, 2), release)


def test_seeded_sanitizer_is_reproducible_and_production_seed_is_random():
    x = torch.randn(3, 2, 4, 4)
    a = Sanitizer(1.0, 1.0, seed=5).clip_and_noise(x)
    b = Sanitizer(1.0, 1.0, seed=5).clip_and_noise(x)
    c = Sanitizer(1.0, 1.0).clip_and_noise(x)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize(("clip", "sigma"), [(0.0, 1.0), (math.nan, 1.0), (1.0, 0.0), (1.0, -1)])
def test_bad_parameters_are_refused(clip, sigma):
    with pytest.raises(ValueError, match=r"clip|sigma"):
        Sanitizer(clip=clip, sigma=sigma)


def test_wire_object_validates_its_size():
    with pytest.raises(ValueError, match="bytes per sample"):
        SanitizedResidual(np.zeros((2, 3), np.uint8), (3, 5, 5), Sanitizer(1.0, 1.0).event)


@pytest.mark.parametrize(
    ("shape", "clip", "sigma", "scale"),
    [
        ((5, 3, 5, 5), 2.5, 0.77, 10.0),  # odd sizes, every sample clipped
        ((40, 64, 32, 32), 1.0, 0.3, 0.01),  # several cache blocks, nothing clipped
        ((9, 32, 16, 16), 1.0, 1e-4, 0.2),  # tiny noise: the bits are the residual's signs
    ],
)
def test_bits_are_the_signs_of_clip_and_noise_for_the_same_seed(ledger, shape, clip, sigma, scale):
    # The fused, blocked path of sanitize() draws the same noise and computes the same
    # float32 values as clip_and_noise(), so the bits are identical, not just equal in law.
    residual = torch.randn(*shape, generator=torch.Generator().manual_seed(7)) * scale
    residual[0, 0, 0, :2] = 0.0  # exact zeros: bit 1 iff the noise is >= 0
    fused = Sanitizer(clip, sigma, seed=11)
    reference = Sanitizer(clip, sigma, seed=11)
    release = fused.record_release(ledger, dataset="d", scope="all")
    for _ in range(2):  # and the generators stay in step
        bits = fused.sanitize(residual, release).bits
        expected = np.packbits((reference.clip_and_noise(residual) >= 0).numpy(), axis=1)
        np.testing.assert_array_equal(bits, expected)
