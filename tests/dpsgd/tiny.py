"""Tiny GroupNorm CNN and data for the DP-SGD tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def tiny_cnn(seed: int = 0, norm: str = "group") -> nn.Sequential:
    """Conv(3->4) + GroupNorm (or BatchNorm) + ReLU + pool + Linear(4->3): 135 parameters in
    the layers "0" (112), "1" (8) and "5" (15)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        norm_layer: nn.Module = nn.GroupNorm(2, 4) if norm == "group" else nn.BatchNorm2d(4)
        return nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            norm_layer,
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 3),
        )


def tiny_data(n: int = 24, seed: int = 0, scale: float = 1.0) -> TensorDataset:
    """``n`` random 3x6x6 images with labels in {0, 1, 2}."""
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn((n, 3, 6, 6), generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return TensorDataset(x, y)
