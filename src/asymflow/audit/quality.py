"""Image-quality scores of a reconstruction: PSNR and SSIM on images in [0, 1], computed with
scikit-image's reference implementations (``skimage.metrics``).

- PSNR = 10 log10(L^2 / MSE) with data range L = 1, per image (capped for identical images).
- SSIM (Wang, Bovik, Sheikh, Simoncelli, IEEE TIP 13(4), 2004, eq. 13): 11 x 11 Gaussian
  window with standard deviation 1.5, K1 = 0.01, K2 = 0.03, population moments (as in the
  paper's reference code), averaged over the image and over colour channels.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torch import Tensor

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


def _hwc(x: Tensor) -> np.ndarray:
    return x.detach().double().permute(0, 2, 3, 1).cpu().numpy()


def psnr(x: Tensor, y: Tensor, *, data_range: float = 1.0, max_db: float = 100.0) -> Tensor:
    """Per-image PSNR in dB, capped at ``max_db`` for identical images; (N, C, H, W) inputs."""
    _check_pair(x, y)
    a, b = _hwc(x), _hwc(y)
    with np.errstate(divide="ignore"):
        scores = [
            min(peak_signal_noise_ratio(p, q, data_range=data_range), max_db)
            for p, q in zip(a, b, strict=True)
        ]
    return torch.tensor(scores, dtype=torch.float32)


def ssim(
    x: Tensor,
    y: Tensor,
    *,
    data_range: float = 1.0,
    window: int = SSIM_WINDOW,
    sigma: float = SSIM_SIGMA,
) -> Tensor:
    """Per-image mean SSIM (see the module docstring); (N, C, H, W) inputs with
    H, W >= ``window``. Returns (N,)."""
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
    scores = [
        structural_similarity(
            p,
            q,
            data_range=data_range,
            channel_axis=-1,
            gaussian_weights=True,
            sigma=sigma,
            win_size=window,
            use_sample_covariance=False,
            K1=SSIM_K1,
            K2=SSIM_K2,
        )
        for p, q in zip(_hwc(x), _hwc(y), strict=True)
    ]
    return torch.tensor(scores, dtype=torch.float32)
