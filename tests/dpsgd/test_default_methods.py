"""DP-SGD, federated and CLI runs default to the library's one list of certified methods."""

from __future__ import annotations

import dataclasses
import inspect

from asymflow.accounting.best import DEFAULT_METHODS
from asymflow.cli.dpsgd import METHODS
from asymflow.dpsgd.opacus_accountant import AsymflowAccountant
from asymflow.dpsgd.runs import DpsgdConfig
from asymflow.federated.config import FederatedConfig


def _default(cls: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def test_run_configs_default_to_the_library_methods_including_block_pld():
    assert "pld-blocks" in DEFAULT_METHODS  # balanced k >= 2 runs get the block PLD
    assert _default(DpsgdConfig, "methods") == DEFAULT_METHODS
    assert _default(FederatedConfig, "methods") == DEFAULT_METHODS


def test_opacus_accountant_and_cli_best_use_the_library_methods():
    signature = inspect.signature(AsymflowAccountant.__init__)
    assert signature.parameters["methods"].default == DEFAULT_METHODS
    assert METHODS["best"] == DEFAULT_METHODS
