"""PSNR and SSIM (Wang et al., IEEE TIP 2004) against closed forms and a direct computation."""

from __future__ import annotations

import math

import pytest
import torch

from asymflow.audit.quality import SSIM_K1, SSIM_K2, psnr, ssim


def test_psnr_is_ten_log10_of_one_over_mse() -> None:
    x = torch.zeros(2, 3, 8, 8)
    y = x.clone()
    y[0] += 0.1  # MSE 0.01 -> 20 dB
    y[1, 0] += 0.5  # MSE 0.25 / 3 on one channel of three
    out = psnr(y, x)
    assert out[0].item() == pytest.approx(20.0, abs=1e-4)
    assert out[1].item() == pytest.approx(10 * math.log10(3 / 0.25), abs=1e-4)


def test_psnr_of_identical_images_is_capped() -> None:
    x = torch.rand(1, 3, 8, 8)
    assert psnr(x, x, max_db=100.0).item() == pytest.approx(100.0)


def test_ssim_of_identical_images_is_one() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)


def test_ssim_of_constant_images_is_the_luminance_term() -> None:
    """Constant images have zero variance and covariance, so SSIM = (2ab + C1)/(a^2 + b^2 + C1)
    (Wang et al. 2004, eq. 13 with the contrast-structure factor C2/C2 = 1)."""
    a, b = 0.3, 0.7
    x = torch.full((1, 1, 12, 12), a)
    y = torch.full((1, 1, 12, 12), b)
    c1 = SSIM_K1**2
    assert ssim(x, y).item() == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1), rel=1e-6)


def test_ssim_matches_a_direct_weighted_window_computation() -> None:
    """The separable valid-region filter equals the explicit 2-D Gaussian-weighted moments at
    every window position (a 12x12 image has a 2x2 map of 11x11 windows)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 12, 12, generator=gen, dtype=torch.float64)
    y = (0.6 * x + 0.4 * torch.rand(1, 1, 12, 12, generator=gen, dtype=torch.float64)).clamp(0, 1)
    coords = torch.arange(11, dtype=torch.float64) - 5
    g1 = torch.exp(-(coords**2) / (2 * 1.5**2))
    w = torch.outer(g1, g1)
    w = w / w.sum()
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    values = []
    for i in range(2):
        for j in range(2):
            a, b = x[0, 0, i : i + 11, j : j + 11], y[0, 0, i : i + 11, j : j + 11]
            ma, mb = (w * a).sum(), (w * b).sum()
            va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
            cov = (w * (a - ma) * (b - mb)).sum()
            values.append(
                (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
            )
    expected = torch.stack(values).mean().item()
    assert ssim(x.float(), y.float()).item() == pytest.approx(expected, abs=1e-5)


def test_ssim_averages_colour_channels_and_is_symmetric() -> None:
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 16, 16, generator=gen)
    y = torch.rand(2, 3, 16, 16, generator=gen)
    per_channel = torch.stack([ssim(x[:, c : c + 1], y[:, c : c + 1]) for c in range(3)], 1)
    assert torch.allclose(ssim(x, y), per_channel.mean(1), atol=1e-6)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-6)


def test_ssim_refuses_images_smaller_than_the_window() -> None:
    with pytest.raises(ValueError, match="at least window"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))
