"""Privacy accounting: events, certified accountants (RDP, PLD), Monte Carlo estimates, the
ledger and noise calibration. Imports nothing from the rest of asymflow."""

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
    PoissonSampled,
    SelfComposed,
)
from asymflow.accounting.pld import PldAccountant
from asymflow.accounting.rdp import RdpAccountant
from asymflow.accounting.schedule import training_event

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
    "PldAccountant",
    "PoissonSampled",
    "RdpAccountant",
    "SelfComposed",
    "UnsupportedEventError",
    "best_epsilon",
    "noise_for_epsilon",
    "training_event",
]
