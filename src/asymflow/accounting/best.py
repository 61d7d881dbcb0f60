"""Pick the tightest certified bound among the accountants that support an event."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

from asymflow.accounting.accountant import Accountant, UnsupportedEventError
from asymflow.accounting.balanced_pld import BlockPldAccountant, uses_blocks
from asymflow.accounting.events import Event
from asymflow.accounting.pld import PldAccountant
from asymflow.accounting.rdp import RdpAccountant
from asymflow.checks import check_delta

CERTIFIED_METHODS: dict[str, type[Accountant]] = {
    "rdp": RdpAccountant,
    "pld": PldAccountant,
    # Balanced k >= 2 through 2-of-m blocks (balanced_pld); ~1-1.7 s of CPU per cold query at
    # T <= 1e4 (issue-11 rows), cached per (T, k, sigma) after that.
    "pld-blocks": BlockPldAccountant,
}

# Methods tried by default (best_epsilon, the calibrator, ``asymflow account``).
DEFAULT_METHODS: tuple[str, ...] = ("rdp", "pld", "pld-blocks")


def check_methods(methods: Iterable[str]) -> tuple[str, ...]:
    """``methods`` as a tuple; refused unless a non-empty subset of :data:`CERTIFIED_METHODS`
    (Monte Carlo estimates are not certified, so they are never a method here)."""
    methods = tuple(methods)
    if not methods or any(m not in CERTIFIED_METHODS for m in methods):
        raise ValueError(
            f"methods must be a non-empty subset of {sorted(CERTIFIED_METHODS)}, "
            f"got methods={methods!r}"
        )
    return methods


@dataclass(frozen=True)
class EpsilonReport:
    """epsilon at ``delta`` from ``method``; ``by_method`` lists every certified method tried."""

    epsilon: float
    delta: float
    method: str
    certified: bool
    by_method: dict[str, float] = field(default_factory=dict)


def best_epsilon(
    event: Event, delta: float, methods: tuple[str, ...] = DEFAULT_METHODS
) -> EpsilonReport:
    """The minimum over certified upper bounds (each is valid, so their minimum is too).

    Estimates (Monte Carlo) are never considered here. "pld-blocks" is skipped when "pld" is
    also tried and the event has no k-of-T pass the blocks bound differently (the two would be
    the same computation).
    """
    check_delta("delta", delta)
    methods = check_methods(methods)
    by_method: dict[str, float] = {}
    for name in methods:
        if name == "pld-blocks" and "pld" in methods and not uses_blocks(event):
            continue
        accountant = CERTIFIED_METHODS[name]()
        if accountant.supports(event):
            by_method[name] = float(accountant.compose(event).epsilon(delta))
    if not by_method:
        raise UnsupportedEventError(f"no certified accountant among {methods} bounds {event!r}")
    method = min(by_method, key=lambda m: by_method[m])
    eps = by_method[method]
    return EpsilonReport(
        epsilon=eps if math.isfinite(eps) else math.inf,
        delta=delta,
        method=method,
        certified=True,
        by_method=by_method,
    )
