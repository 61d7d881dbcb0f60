"""Shared settings for the audit tests: one torch thread, a tiny synthetic pipeline."""

from __future__ import annotations

import pytest

from asymflow.audit.views import PublicViewer
from asymflow.data import ImageData, synthetic
from tests.fixtures import one_torch_thread  # noqa: F401 (autouse)


def tiny_viewer(data: ImageData, seed: int = 0) -> PublicViewer:
    """A random-init M_bb with 8 IR channels on 16x16 images, r=2, 8x8 DCT blocks (low 4x4)."""
    mean, std = data.channel_stats()
    return PublicViewer.random(ir_channels=8, mean=mean, std=std, r=2, t=8, t_low=4, seed=seed)


@pytest.fixture(scope="session")
def tiny_data() -> ImageData:
    """600 training and 120 test synthetic 16x16 images (10 classes)."""
    return synthetic(600, 120, size=16, seed=3)
