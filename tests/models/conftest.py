"""Shared settings for the model tests: one torch thread (the tensors are tiny, batch 2)."""

from __future__ import annotations

from tests.fixtures import one_torch_thread  # noqa: F401 (autouse)
