"""Privacy events: frozen descriptions of what was released, interpreted by accountants.

Every event is a value object under add/remove-one adjacency with L2 sensitivity 1
(noise parameters are multipliers of the clip norm). Accountants read events; events never
compute privacy themselves. The pattern follows dp_accounting's ``DpEvent``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any


def _check_finite(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be finite, got {name}={value}")


def _check_positive(name: str, value: float) -> None:
    _check_finite(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {name}={value}")


def _check_int(name: str, value: int, low: int, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        upper = f" <= {high}" if high is not None else ""
        raise ValueError(f"{name} must satisfy {low} <= {name}{upper}, got {name}={value}")


def _check_event(name: str, value: object) -> None:
    if not isinstance(value, Event):
        raise TypeError(f"{name} must be an Event, got {type(value).__name__}")


@dataclass(frozen=True, slots=True)
class Event:
    """Base class of all privacy events."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, inverse of :func:`event_from_dict`."""
        out: dict[str, Any] = {"type": type(self).__name__}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Event):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = [v.to_dict() for v in value]
            out[f.name] = value
        return out

    def describe(self) -> str:
        """A short human-readable description, e.g. ``BIS(k=1 of T=78) ∘ Gaussian(σ=1.1)``."""
        shown = ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "type")
        return f"{type(self).__name__}({shown})"


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event from :meth:`Event.to_dict` output; unknown types are refused."""
    kind = data.get("type")
    cls = _EVENT_TYPES.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown privacy event type {kind!r}")
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        value = data[f.name]
        if isinstance(value, dict):
            value = event_from_dict(value)
        elif isinstance(value, list):
            value = tuple(event_from_dict(v) for v in value)
        kwargs[f.name] = value
    return cls(**kwargs)


@dataclass(frozen=True, slots=True)
class Gaussian(Event):
    """Gaussian mechanism N(f(D), sigma^2 I), L2 sensitivity 1; ``sigma`` is the multiplier."""

    sigma: float

    def __post_init__(self) -> None:
        _check_positive("sigma", self.sigma)

    def describe(self) -> str:
        return f"Gaussian(σ={self.sigma:g})"


@dataclass(frozen=True, slots=True)
class Laplace(Event):
    """Laplace mechanism with scale ``b`` and L1 sensitivity 1 (pure eps = 1/b)."""

    b: float

    def __post_init__(self) -> None:
        _check_positive("b", self.b)

    def describe(self) -> str:
        return f"Laplace(b={self.b:g})"


@dataclass(frozen=True, slots=True)
class RandomizedResponse(Event):
    """k-ary randomized response on one value (e.g. a label) among ``classes``: keep it with
    probability e^eps/(e^eps + classes - 1), else report one of the others uniformly.
    Pure ``epsilon``-DP under replacement of the value (Warner 1965; Kairouz et al. 2016)."""

    epsilon: float
    classes: int

    def __post_init__(self) -> None:
        _check_positive("epsilon", self.epsilon)
        _check_int("classes", self.classes, 2)


@dataclass(frozen=True, slots=True)
class NonPrivate(Event):
    """A release without any guarantee (e.g. labels sent in clear): epsilon is infinite."""

    what: str

    def __post_init__(self) -> None:
        if not isinstance(self.what, str) or not self.what:
            raise ValueError("what must be a non-empty description of the release")


@dataclass(frozen=True, slots=True)
class PoissonSampled(Event):
    """Each record joins the step independently with probability ``q``."""

    q: float
    event: Event

    def __post_init__(self) -> None:
        _check_finite("q", self.q)
        if not 0 <= self.q <= 1:
            raise ValueError(f"q must satisfy 0 <= q <= 1, got q={self.q}")
        _check_event("event", self.event)

    def describe(self) -> str:
        return f"Poisson(q={self.q:g}) ∘ {self.event.describe()}"


@dataclass(frozen=True, slots=True)
class BalancedSampled(Event):
    """One pass of Balanced Iteration Subsampling: each record joins a uniformly random
    k-subset of the ``steps`` steps, independently of other records (random allocation)."""

    k: int
    steps: int
    event: Event

    def __post_init__(self) -> None:
        _check_int("steps", self.steps, 1)
        _check_int("k", self.k, 1)
        if self.k > self.steps:
            raise ValueError(f"k must satisfy 1 <= k <= steps, got k={self.k}, steps={self.steps}")
        _check_event("event", self.event)

    def describe(self) -> str:
        return f"BIS(k={self.k} of T={self.steps}) ∘ {self.event.describe()}"


@dataclass(frozen=True, slots=True)
class ModelPartitioned(Event):
    """One step of model splitting: the record updates one of ``parts`` disjoint parameter
    blocks chosen uniformly, its clipped update touching only that block.

    ``noise_on_all_blocks`` must be true for any amplification: with noise only on the chosen
    block nothing is hidden (Dong, Chen, Ozgur 2025, Sec. 3), and accountants refuse it.
    """

    parts: int
    event: Event
    noise_on_all_blocks: bool = True

    def __post_init__(self) -> None:
        _check_int("parts", self.parts, 1)
        _check_event("event", self.event)
        if not isinstance(self.noise_on_all_blocks, bool):
            raise TypeError("noise_on_all_blocks must be a bool")

    def describe(self) -> str:
        noise = "" if self.noise_on_all_blocks else ", noise on chosen block only"
        return f"Partitioned(1 of {self.parts}{noise}) ∘ {self.event.describe()}"


@dataclass(frozen=True, slots=True)
class Dropout(Event):
    """Dropout of parameters at ``rate`` with noise on all coordinates. Rate 0.5 reduces to
    ``ModelPartitioned(2, event)`` (Dong, Chen, Ozgur 2025, Cor. 3.7); other rates are
    representable but no accountant claims amplification for them."""

    rate: float
    event: Event

    def __post_init__(self) -> None:
        _check_finite("rate", self.rate)
        if not 0 < self.rate < 1:
            raise ValueError(f"rate must satisfy 0 < rate < 1, got rate={self.rate}")
        _check_event("event", self.event)

    def describe(self) -> str:
        return f"Dropout(rate={self.rate:g}) ∘ {self.event.describe()}"


@dataclass(frozen=True, slots=True)
class SelfComposed(Event):
    """``count`` adaptive repetitions of ``event``."""

    event: Event
    count: int

    def __post_init__(self) -> None:
        _check_event("event", self.event)
        _check_int("count", self.count, 0)

    def describe(self) -> str:
        return f"{self.count} × [{self.event.describe()}]"


@dataclass(frozen=True, slots=True)
class Composed(Event):
    """Adaptive composition of ``events`` in order."""

    events: tuple[Event, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.events, tuple):
            object.__setattr__(self, "events", tuple(self.events))
        for i, e in enumerate(self.events):
            _check_event(f"events[{i}]", e)

    def describe(self) -> str:
        return " + ".join(e.describe() for e in self.events) or "nothing"


def check_epsilon(epsilon: float) -> None:
    """Raise unless epsilon >= 0 and finite."""
    _check_finite("epsilon", epsilon)
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got epsilon={epsilon}")


_EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        Gaussian,
        Laplace,
        RandomizedResponse,
        NonPrivate,
        PoissonSampled,
        BalancedSampled,
        ModelPartitioned,
        Dropout,
        SelfComposed,
        Composed,
    )
}
