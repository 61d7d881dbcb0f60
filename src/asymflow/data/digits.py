"""scikit-learn's bundled handwritten digits (UCI optical digits, 1797 8×8 gray images, 10
classes; no download), upsampled bilinearly to a small CIFAR-like image."""

from __future__ import annotations

import operator

import numpy as np
import torch
from torch.nn import functional

from asymflow.data.dataset import ImageData, ImageSplit

__all__ = ["DIGIT_CLASSES", "load_digits"]

DIGIT_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
_GRAY_MAX = 16.0
"""The digits' pixel values are counts in 0..16."""


def load_digits(
    *, size: int = 16, channels: int = 3, test_fraction: float = 0.2, seed: int = 0
) -> ImageData:
    """Digits as uint8 (N, size, size, channels) images with a seeded, stratified split.

    Pixels ``v ∈ [0, 16]`` map to ``round(255·v/16)`` after bilinear resizing
    (``align_corners=False``); ``channels=3`` replicates the gray channel.
    """
    size = operator.index(size)
    if size < 1:
        raise ValueError(f"size must be >= 1, got size={size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got channels={channels!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must satisfy 0 < test_fraction < 1, got {test_fraction}")
    from sklearn.datasets import load_digits as sklearn_digits  # deferred: slow import
    from sklearn.model_selection import train_test_split

    bunch = sklearn_digits()
    gray = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / _GRAY_MAX)[:, None]
    if gray.shape[-1] != size:
        gray = functional.interpolate(
            gray, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    pixels = (gray.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    images = pixels.permute(0, 2, 3, 1).repeat(1, 1, 1, channels).numpy()
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, stratify=labels, random_state=seed
    )
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return ImageData(
        train=ImageSplit(np.ascontiguousarray(images[train_idx]), labels[train_idx], DIGIT_CLASSES),
        test=ImageSplit(np.ascontiguousarray(images[test_idx]), labels[test_idx], DIGIT_CLASSES),
        name="digits",
    )
