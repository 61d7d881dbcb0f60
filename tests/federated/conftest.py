"""Shared settings for the federated tests."""

from __future__ import annotations

from tests.fixtures import one_torch_thread  # noqa: F401 (autouse)
