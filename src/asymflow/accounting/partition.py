"""Model partitioning and dropout as random allocation (Dong, Chen, Ozgur 2025, Sec. 3-4).

A record that updates one of d disjoint blocks chosen uniformly, with Gaussian noise on every
block, releases the 1-of-d random-allocation pair of its Gaussian mechanism: the blocks play the
role of steps. Dropout at rate 1/2 with noise on all coordinates reduces to d = 2 (Cor. 3.7).
Without noise on untouched blocks nothing is hidden, and no amplification is claimed.
"""

from __future__ import annotations

from asymflow.accounting.events import Dropout, Event, Gaussian, ModelPartitioned


def allocation_of(event: Event) -> tuple[int, float] | None:
    """(d, sigma) if ``event`` is a partitioned Gaussian step this package can bound, else None."""
    if isinstance(event, ModelPartitioned):
        if event.noise_on_all_blocks and isinstance(event.event, Gaussian):
            return event.parts, event.event.sigma
        return None
    if isinstance(event, Dropout):
        if event.rate == 0.5 and isinstance(event.event, Gaussian):
            return 2, event.event.sigma
        return None
    return None
