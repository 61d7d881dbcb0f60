"""Shared settings for the model tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run each model test on one intra-op thread, restoring the setting afterwards.

    The tensors here are tiny (batch 2); on a shared 2-core runner, OpenMP threads spinning
    against other processes made the suite several times slower than a single thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
