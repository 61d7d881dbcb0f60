"""The accountant contract shared by every method: supports, chainable compose, epsilon/delta."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Self

from asymflow.accounting.events import (
    Composed,
    Event,
    NonPrivate,
    SelfComposed,
    check_epsilon,
)
from asymflow.checks import check_delta


class UnsupportedEventError(ValueError):
    """Raised when an accountant is asked to bound an event it cannot bound."""


class Accountant(ABC):
    """Accumulates events and reports (epsilon, delta) upper bounds.

    Subclasses implement :meth:`_supports_leaf` for non-composite events and the two queries.
    Composite events (``Composed``, ``SelfComposed``) are unpacked here, so every accountant
    composes the same way. A ``NonPrivate`` leaf is accepted by every accountant and makes the
    whole composition infinite: epsilon = inf, delta = 1.
    """

    name: str = "accountant"
    certified: bool = True

    def __init__(self) -> None:
        self._leaves: list[tuple[Event, int]] = []

    def supports(self, event: Event) -> bool:
        """True iff every leaf of ``event`` can be bounded by this accountant."""
        if isinstance(event, SelfComposed):
            return self.supports(event.event)
        if isinstance(event, Composed):
            return all(self.supports(e) for e in event.events)
        return isinstance(event, NonPrivate) or self._supports_leaf(event)

    def compose(self, event: Event, count: int = 1) -> Self:
        """Add ``count`` adaptive repetitions of ``event``; returns self for chaining."""
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"count must be an integer >= 0, got count={count!r}")
        if not self.supports(event):
            raise UnsupportedEventError(f"{self.name} accountant cannot bound {event!r}")
        self._add(event, count)
        return self

    def _add(self, event: Event, count: int) -> None:
        if count == 0:
            return
        if isinstance(event, SelfComposed):
            self._add(event.event, count * event.count)
        elif isinstance(event, Composed):
            for e in event.events:
                self._add(e, count)
        elif self._leaves and self._leaves[-1][0] == event:
            # Repeated releases (one ledger row per round) compose as one SelfComposed.
            self._leaves[-1] = (event, self._leaves[-1][1] + count)
        else:
            self._leaves.append((event, count))

    @property
    def leaks(self) -> bool:
        """True if a release without any guarantee was composed."""
        return any(isinstance(e, NonPrivate) for e, _ in self._leaves)

    @property
    def leaves(self) -> list[tuple[Event, int]]:
        """The composed non-composite events with their repetition counts."""
        return list(self._leaves)

    def epsilon(self, delta: float) -> float:
        """Smallest epsilon this method certifies at ``delta`` (0 when nothing was composed)."""
        check_delta("delta", delta)
        if not self._leaves:
            return 0.0
        if self.leaks:
            return math.inf
        return self._epsilon(delta)

    def delta(self, epsilon: float) -> float:
        """Smallest delta this method certifies at ``epsilon`` (0 when nothing was composed)."""
        check_epsilon(epsilon)
        if not self._leaves:
            return 0.0
        if self.leaks:
            return 1.0
        return self._delta(epsilon)

    @abstractmethod
    def _supports_leaf(self, event: Event) -> bool: ...

    @abstractmethod
    def _epsilon(self, delta: float) -> float: ...

    @abstractmethod
    def _delta(self, epsilon: float) -> float: ...
