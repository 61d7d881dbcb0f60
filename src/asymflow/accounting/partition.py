"""Model partitioning and dropout as random allocation (Dong, Chen, Ozgur 2025, Sec. 3-4).

A record that updates one of d disjoint blocks chosen uniformly, with Gaussian noise on every
block, releases the 1-of-d random-allocation pair of its Gaussian mechanism: the blocks play the
role of steps. Dropout at rate 1/2 with noise on all coordinates reduces to d = 2 (Cor. 3.7).
Without noise on untouched blocks nothing is hidden, and no amplification is claimed.
"""

from __future__ import annotations

from asymflow.accounting.events import Composed, Dropout, Event, Gaussian, ModelPartitioned


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


def joint_parts(event: Event) -> list[tuple[int, float]] | None:
    """The per-step mechanism as independent 1-of-n allocated Gaussians [(n, sigma), ...]
    (n = 1: a plain Gaussian), or None if it is not of that form.

    ``Composed`` under one subsampling decision is the joint release of its parts for the same
    record, e.g. partial model splitting (a shared Gaussian part plus a split part); the
    likelihood ratio of the joint pair is the product of the parts' ratios.
    """
    if isinstance(event, Gaussian):
        return [(1, event.sigma)]
    if isinstance(event, Composed):
        parts = [joint_parts(e) for e in event.events]
        if not event.events or any(p is None or len(p) != 1 for p in parts):
            return None
        return [p[0] for p in parts if p is not None]
    alloc = allocation_of(event)
    return None if alloc is None else [alloc]
