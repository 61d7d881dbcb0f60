"""Pick the tightest certified bound among the accountants that support an event."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from asymflow.accounting.accountant import Accountant, UnsupportedEventError
from asymflow.accounting.balanced_pld import BlockPldAccountant
from asymflow.accounting.events import Event, check_delta
from asymflow.accounting.pld import PldAccountant
from asymflow.accounting.rdp import RdpAccountant

CERTIFIED_METHODS: dict[str, type[Accountant]] = {
    "rdp": RdpAccountant,
    "pld": PldAccountant,
    # Balanced k >= 2 through 2-of-m blocks (balanced_pld); seconds per query, so not a default.
    "pld-blocks": BlockPldAccountant,
}


@dataclass(frozen=True)
class EpsilonReport:
    """epsilon at ``delta`` from ``method``; ``by_method`` lists every certified method tried."""

    epsilon: float
    delta: float
    method: str
    certified: bool
    by_method: dict[str, float] = field(default_factory=dict)


def best_epsilon(
    event: Event, delta: float, methods: tuple[str, ...] = ("rdp", "pld")
) -> EpsilonReport:
    """The minimum over certified upper bounds (each is valid, so their minimum is too).

    Estimates (Monte Carlo) are never considered here.
    """
    check_delta(delta)
    unknown = [m for m in methods if m not in CERTIFIED_METHODS]
    if unknown:
        raise ValueError(f"methods must be among {sorted(CERTIFIED_METHODS)}, got {unknown}")
    by_method: dict[str, float] = {}
    for name in methods:
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
