"""Image-quality scores of a reconstruction: PSNR and SSIM on images in [0, 1].

Neither scikit-image nor torchmetrics is a dependency, so both scores are written out here from
their published definitions (and checked against closed-form cases in ``tests/audit``):

- PSNR = 10 log10(L^2 / MSE) with data range L = 1, per image.
- SSIM (Wang, Bovik, Sheikh, Simoncelli, "Image Quality Assessment: From Error Visibility to
  Structural Similarity", IEEE TIP 13(4), 2004, eq. 13 and Sec. III-C):

      SSIM(x, y) = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2)),

  C1 = (K1 L)^2, C2 = (K2 L)^2, K1 = 0.01, K2 = 0.03, local statistics weighted by an 11 x 11
  circular-symmetric Gaussian window with standard deviation 1.5 (normalized to sum 1), taken
  only where the window fits inside the image ("valid"), averaged over that map (the mean SSIM
  of eq. 17) and over colour channels. Moments are population (weighted) moments, as in the
  paper's reference implementation; this matches ``skimage.metrics.structural_similarity``
  with ``gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1``.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor
from torch.nn import functional

__all__ = ["SSIM_K1", "SSIM_K2", "SSIM_SIGMA", "SSIM_WINDOW", "psnr", "ssim"]

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            f"x and y must be image batches of the same shape (N, C, H, W), "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )


def psnr(x: Tensor, y: Tensor, *, data_range: float = 1.0, max_db: float = 100.0) -> Tensor:
    """Per-image PSNR in dB, 10 log10(L^2 / mean((x - y)^2)), capped at ``max_db`` for
    identical images; ``x`` and ``y`` are (N, C, H, W)."""
    _check_pair(x, y)
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    floor = data_range**2 * 10 ** (-max_db / 10)
    return (10 * torch.log10(data_range**2 / mse.clamp_min(floor))).float()


@lru_cache(maxsize=8)
def _gaussian_window(size: int, sigma: float) -> Tensor:
    """The separable 1-D factor g of the normalized 2-D window g g^T (float64)."""
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(z: Tensor, g: Tensor) -> Tensor:
    """Valid-region weighted local mean of every channel map of z (N*C, 1, H, W)."""
    size = g.numel()
    z = functional.conv2d(z, g.view(1, 1, size, 1))
    return functional.conv2d(z, g.view(1, 1, 1, size))


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> Tensor:
    """Per-image mean SSIM of Wang et al. (2004) (see the module docstring); (N, C, H, W)
    inputs with H, W >= ``window``. Returns (N,)."""
    _check_pair(x, y)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be an odd integer >= 1, got window={window}")
    if min(x.shape[-2:]) < window:
        raise ValueError(
            f"images must be at least window x window = {window}x{window}, "
            f"got {tuple(x.shape[-2:])}"
        )
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a finite number > 0, got sigma={sigma}")
    n, c, h, w = x.shape
    g = _gaussian_window(window, float(sigma))
    a = x.double().reshape(n * c, 1, h, w)
    b = y.double().reshape(n * c, 1, h, w)
    mu_a, mu_b = _filter(a, g), _filter(b, g)
    var_a = _filter(a * a, g) - mu_a**2
    var_b = _filter(b * b, g) - mu_b**2
    cov = _filter(a * b, g) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    per_channel = (num / den).flatten(1).mean(1).reshape(n, c)
    return per_channel.mean(1).float()
