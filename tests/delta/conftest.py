"""Shared settings for the Delta tests: one torch thread, a tiny configuration."""

from __future__ import annotations

from typing import Any

import pytest

from asymflow.delta.runs import DeltaConfig
from tests.fixtures import one_torch_thread  # noqa: F401 (autouse)


def tiny_config(**changes: Any) -> DeltaConfig:
    """A Delta run of a second or two on synthetic 16x16 images, with seeded noise."""
    base = DeltaConfig(
        data="synthetic:160",
        ir_channels=8,
        r=2,
        private_widths=(8, 16),
        private_ranks=(2, 4),
        public_width=0.25,
        epochs_stage1=1,
        epochs_stage2=1,
        batch_size=32,
        eval_batch_size=64,
        noise_seed=0,
        release="once",
        public_epochs=1,
    )
    return base.replace(**changes)


@pytest.fixture(scope="session")
def tiny() -> Any:
    """:func:`tiny_config`, as a fixture: ``tiny(epochs_stage2=3)``."""
    return tiny_config
