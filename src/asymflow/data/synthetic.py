"""Seeded synthetic images for tests: each class is a fixed smooth random template; a sample
is its class template at a random contrast plus i.i.d. Gaussian pixel noise.

``x = clip(128 + 48·a·T_y + noise·ε)``, ``a ~ U[0.6, 1.4]``, ``ε ~ N(0, I)``, where ``T_y``
is a 4×4 standard normal grid per channel, bilinearly upsampled to size×size and scaled to
unit standard deviation. Templates, train and test draw from independent streams of
``seed`` (numpy SeedSequence.spawn), so the test split does not change with ``num_train``.
"""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.nn import functional

from asymflow.data.dataset import ImageData, ImageSplit

__all__ = ["synthetic"]

_COARSE = 4
_AMPLITUDE = 48.0


def _count(name: str, value: int, low: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")
    out = operator.index(value)
    if out < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {name}={out}")
    return out


def _draw(
    rng: np.random.Generator,
    templates: np.ndarray,
    n: int,
    classes: tuple[str, ...],
    noise_scale: float,
) -> ImageSplit:
    k = len(classes)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % k)
    contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1, 1))
    noise = rng.standard_normal((n, *templates.shape[1:]))
    x = 128.0 + _AMPLITUDE * contrast * templates[labels] + noise_scale * noise
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8)
    return ImageSplit(np.ascontiguousarray(images), labels, classes)


def synthetic(
    num_train: int,
    num_test: int,
    *,
    classes: int = 10,
    size: int = 16,
    channels: int = 3,
    seed: int = 0,
    noise: float = 32.0,
) -> ImageData:
    """A learnable synthetic data set of uint8 (N, size, size, channels) images; labels are
    balanced (``i mod classes``, shuffled). Larger ``noise`` makes the task harder."""
    num_train = _count("num_train", num_train, 0)
    num_test = _count("num_test", num_test, 0)
    classes = _count("classes", classes, 1)
    size = _count("size", size, 1)
    channels = _count("channels", channels, 1)
    if not (isinstance(noise, int | float) and 0.0 <= noise < float("inf")):
        raise ValueError(f"noise must be a finite number >= 0, got noise={noise!r}")
    template_ss, train_ss, test_ss = np.random.SeedSequence(operator.index(seed)).spawn(3)
    coarse = np.random.default_rng(template_ss).standard_normal(
        (classes, channels, _COARSE, _COARSE)
    )
    smooth = functional.interpolate(
        torch.from_numpy(coarse), size=(size, size), mode="bilinear", align_corners=False
    )
    templates = smooth.permute(0, 2, 3, 1).numpy()  # K, H, W, C
    scale = templates.std(axis=(1, 2, 3), keepdims=True)
    templates = templates / np.where(scale > 0, scale, 1.0)
    names = tuple(f"class{k}" for k in range(classes))
    return ImageData(
        train=_draw(np.random.default_rng(train_ss), templates, num_train, names, noise),
        test=_draw(np.random.default_rng(test_ss), templates, num_test, names, noise),
        name="synthetic",
    )
