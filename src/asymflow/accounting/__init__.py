"""Privacy accounting: events, certified accountants (RDP, PLD), Monte Carlo estimates, the
ledger and noise calibration. Imports nothing from the rest of asymflow.

Names are resolved lazily (PEP 562), so ``import asymflow.accounting.events`` stays light and
dp_accounting/scipy load only when an accountant is used.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Accountant": "accountant",
    "UnsupportedEventError": "accountant",
    "EpsilonReport": "best",
    "best_epsilon": "best",
    "Calibration": "calibrate",
    "noise_for_epsilon": "calibrate",
    "BalancedSampled": "events",
    "Composed": "events",
    "Dropout": "events",
    "Event": "events",
    "Gaussian": "events",
    "Laplace": "events",
    "ModelPartitioned": "events",
    "NonPrivate": "events",
    "PoissonSampled": "events",
    "RandomizedResponse": "events",
    "SelfComposed": "events",
    "PldAccountant": "pld",
    "RdpAccountant": "rdp",
    "training_event": "schedule",
}

__all__ = [
    "Accountant",
    "BalancedSampled",
    "Calibration",
    "Composed",
    "Dropout",
    "EpsilonReport",
    "Event",
    "Gaussian",
    "Laplace",
    "ModelPartitioned",
    "NonPrivate",
    "PldAccountant",
    "PoissonSampled",
    "RandomizedResponse",
    "RdpAccountant",
    "SelfComposed",
    "UnsupportedEventError",
    "best_epsilon",
    "noise_for_epsilon",
    "training_event",
]

if TYPE_CHECKING:
    from asymflow.accounting.accountant import Accountant, UnsupportedEventError
    from asymflow.accounting.best import EpsilonReport, best_epsilon
    from asymflow.accounting.calibrate import Calibration, noise_for_epsilon
    from asymflow.accounting.events import (
        BalancedSampled,
        Composed,
        Dropout,
        Event,
        Gaussian,
        Laplace,
        ModelPartitioned,
        NonPrivate,
        PoissonSampled,
        RandomizedResponse,
        SelfComposed,
    )
    from asymflow.accounting.pld import PldAccountant
    from asymflow.accounting.rdp import RdpAccountant
    from asymflow.accounting.schedule import training_event


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'asymflow.accounting' has no attribute {name!r}")
    value = getattr(import_module(f"asymflow.accounting.{module}"), name)
    globals()[name] = value
    return value
