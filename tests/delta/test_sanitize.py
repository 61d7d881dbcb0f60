"""Sanitizer: payload size, calibrated noise, clipping, ledger-before-release."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from asymflow.accounting.gaussian import gaussian_epsilon
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta import sanitize as sanitize_module
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


def _bits(san: Sanitizer, residual: torch.Tensor, ledger: PrivacyLedger) -> np.ndarray:
    release = san.record_release(ledger, dataset="d", scope="all")
    return (san.sanitize(residual, release).unpack() > 0).numpy()


def test_bits_of_a_zero_residual_are_independent_fair_coins(ledger):
    bits = _bits(Sanitizer(clip=2.0, sigma=0.7, seed=1), torch.zeros(200, 4, 25, 25), ledger)
    n = bits.size
    assert stats.binomtest(int(bits.sum()), n, 0.5).pvalue > 1e-4
    # adjacent pairs (00, 01, 10, 11) uniform: no correlation between neighbouring bits
    flat = bits.reshape(-1)
    pairs = np.bincount(2 * flat[0:-1:2] + flat[1::2], minlength=4)
    assert stats.chisquare(pairs).pvalue > 1e-4


def test_bits_follow_the_gaussian_mechanism_of_the_clipped_input(ledger):
    # A residual of norm 10 clipped to C=1: every element becomes 0.1, so
    # P(bit = 1) = Phi(0.1 / sigma) (Gaussian mechanism followed by post-processing).
    clip, sigma = 1.0, 0.2
    residual = torch.full((4000, 1, 10, 10), 1.0)  # norm 10 per sample
    bits = _bits(Sanitizer(clip=clip, sigma=sigma, seed=2), residual, ledger)
    expected = stats.norm.cdf(0.1 / sigma)
    assert bits.mean() == pytest.approx(expected, abs=0.005)
    assert stats.binomtest(int(bits.sum()), bits.size, expected).pvalue > 1e-4


@pytest.mark.parametrize(
    ("clip", "sigma", "scale"),
    [
        (1.0, 0.6, 0.01),  # CIFAR-like: |a| ~ 0.02, nearly every bit decided by one byte
        (2.5, 0.77, 10.0),  # every sample clipped
        (1.0, 0.05, 0.2),  # |a| of order 1-10: most elements take the exact erf path
    ],
)
def test_each_bit_has_the_law_of_the_gaussian_mechanism(ledger, clip, sigma, scale):
    # Reference: P(1[clip(x) + sigma C Z >= 0] = 1) = Phi(clip(x) / (sigma C)), computed
    # independently with scipy's normal CDF in float64, per element; 400 sanitizations of
    # the same residual give each element's frequency. One chi-square statistic over all
    # elements (sum of (k - np)^2 / (np(1-p))) against chi2(elements).
    residual = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(7)) * scale
    residual[0, 0, 0, :2] = 0.0  # exact zeros: a fair bit
    san = Sanitizer(clip, sigma, seed=11)
    draws = 400
    counts = sum(_bits(san, residual, ledger).astype(np.int64) for _ in range(draws))
    flat = residual.flatten(1).double()
    clipped = flat / torch.clamp(flat.norm(dim=1, keepdim=True) / clip, min=1.0)
    p = stats.norm.cdf((clipped / (sigma * clip)).numpy()).reshape(counts.shape)
    p = np.clip(p, 1e-12, 1 - 1e-12)
    inside = (p > 1e-3) & (p < 1 - 1e-3)  # elements whose frequency carries information
    chi2 = (((counts - draws * p) ** 2) / (draws * p * (1 - p)))[inside].sum()
    assert stats.chi2.sf(chi2, int(inside.sum())) > 1e-4
    # and the nearly deterministic ones never flip more often than their law allows
    assert (np.abs(counts - draws * p)[~inside] <= 3).all()


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


def test_seeded_sanitizer_is_reproducible_and_production_seed_is_random(ledger):
    x = torch.randn(3, 2, 4, 4)
    a = _bits(Sanitizer(1.0, 1.0, seed=5), x, ledger)
    b = _bits(Sanitizer(1.0, 1.0, seed=5), x, ledger)
    c = _bits(Sanitizer(1.0, 1.0), x, ledger)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_non_finite_residual_is_refused(ledger):
    san = Sanitizer(1.0, 1.0, seed=0)
    release = san.record_release(ledger, dataset="d", scope="all")
    with pytest.raises(ValueError, match="residual must be finite"):
        san.sanitize(torch.tensor([[[[1.0, math.inf]]]]), release)


@pytest.mark.parametrize(("clip", "sigma"), [(0.0, 1.0), (math.nan, 1.0), (1.0, 0.0), (1.0, -1)])
def test_bad_parameters_are_refused(clip, sigma):
    with pytest.raises(ValueError, match=r"clip|sigma"):
        Sanitizer(clip=clip, sigma=sigma)


def test_wire_object_validates_its_size():
    with pytest.raises(ValueError, match="bytes per sample"):
        SanitizedResidual(np.zeros((2, 3), np.uint8), (3, 5, 5), Sanitizer(1.0, 1.0).event)


@pytest.mark.parametrize(
    ("shape", "scale"),
    [((3, 64, 64, 64), 1.0), ((4, 7, 111, 113), 1e-3), ((2, 3, 5, 7), 1e20), ((2, 1, 4, 4), 1e-30)],
)
def test_the_clip_scale_bounds_the_exact_norm_from_above(ledger, monkeypatch, shape, scale):
    """The scale handed to the sampler, sigma max(C, ||R||), must use a norm >= the exact
    one (float64 reference) and within 2e-5 of it: a float32 sum of squares over 262,144
    elements is ~1e-6 low, i.e. it would clip to slightly more than C. Shapes with a tail
    after the 256-element parts, entries whose float32 squares overflow or underflow."""
    seen = []

    def capture(x: np.ndarray, scale: np.ndarray, stream: object) -> np.ndarray:
        seen.append(scale)
        return np.zeros((len(x), math.ceil(x.shape[1] / 8)), dtype=np.uint8)

    monkeypatch.setattr(sanitize_module, "noisy_sign_bits", capture)
    gen = torch.Generator().manual_seed(3)
    residual = (torch.rand(*shape, generator=gen) + 1.0) * scale
    san = Sanitizer(clip=scale * 1e-3, sigma=0.5, seed=0)
    san.sanitize(residual, san.record_release(ledger, dataset="d", scope="all"))
    exact = residual.flatten(1).double().norm(dim=1).numpy() * 0.5
    assert (seen[0] >= exact).all()
    np.testing.assert_allclose(seen[0], exact, rtol=2e-5)
