"""The training schedule an accounting command asks about: :class:`Query`, validated from the
options ``--sampler --sigma --steps --k/--q --epochs --parts --delta``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from asymflow.accounting.events import BalancedSampled, Event, Gaussian, SelfComposed
from asymflow.accounting.schedule import SAMPLERS, training_event
from asymflow.checks import check_choice, check_delta, check_int, check_positive
from asymflow.cli.common import (
    CliInputError,
    require,
)


@dataclass(frozen=True)
class Query:
    """One validated accounting question: a training schedule and a target δ."""

    sampler: str
    sigma: float
    steps: int
    k: int | None
    q: float | None
    epochs: int
    parts: int
    delta: float

    def event(self) -> Event:
        """The schedule's privacy event (refused for ``shuffle``, which has none certified)."""
        return training_event(
            self.sampler,
            self.sigma,
            self.steps,
            k=self.k,
            q=self.q,
            epochs=self.epochs,
            parts=self.parts,
        )

    def lower_bound_event(self) -> Event:
        """For shuffling: E passes of 1-of-T random allocation, whose ε is a lower bound."""
        return SelfComposed(BalancedSampled(1, self.steps, Gaussian(self.sigma)), self.epochs)

    def to_dict(self) -> dict[str, Any]:
        """The fields by name, in declaration order (the JSON ``query``)."""
        return asdict(self)


def describe_query(query: dict[str, Any]) -> str:
    """One line for a table title: sampler, σ, T, rate, epochs, parts, δ."""
    rate = f"k={query['k']}" if query["k"] is not None else f"q={query['q']:g}"
    parts = f", parts={query['parts']}" if query["parts"] > 1 else ""
    return (
        f"{query['sampler']}: σ={query['sigma']:g}, T={query['steps']} steps/epoch, {rate}, "
        f"epochs={query['epochs']}{parts}, δ={query['delta']:g}"
    )


def parse_schedule(
    sampler: str | None,
    steps: int | None,
    k: int | None,
    q: float | None,
    epochs: int | None,
    parts: int | None,
) -> tuple[str, int, int | None, float | None, int, int]:
    """Validate the schedule options shared by ``account`` and ``calibrate``."""
    sampler = check_choice(
        "--sampler", require("--sampler", sampler, f"one of {', '.join(SAMPLERS)}"), SAMPLERS
    )
    steps = check_int("--steps", require("--steps", steps, "an integer >= 1"), 1)
    epochs = check_int("--epochs", 1 if epochs is None else epochs, 1)
    parts = check_int("--parts", 1 if parts is None else parts, 1)
    if k is not None and not 1 <= k <= steps:
        raise CliInputError(f"--k must satisfy 1 <= k <= steps (--steps={steps}), got {k}")
    if q is not None and not (math.isfinite(q) and 0 < q <= 1):
        raise CliInputError(f"--q must satisfy 0 < q <= 1, got {q}")
    if sampler == "poisson":
        if k is None and q is None:
            raise CliInputError(
                f"--k or --q is required for --sampler poisson: 1 <= k <= steps ({steps}), "
                "or a rate 0 < q <= 1"
            )
        if k is not None and q is not None:
            raise CliInputError("--k and --q are exclusive: give one (q defaults to k/steps)")
    elif sampler == "balanced":
        if q is not None:
            raise CliInputError(
                "--q applies only to --sampler poisson; balanced sampling needs --k"
            )
        require("--k", k, f"balanced sampling needs 1 <= k <= steps ({steps})")
    else:
        if q is not None:
            raise CliInputError("--q applies only to --sampler poisson, not shuffle")
        if k is not None and k != 1:
            raise CliInputError(
                f"--k must be 1 for --sampler shuffle (each record joins one step per epoch), "
                f"got {k}"
            )
        if parts != 1:
            raise CliInputError(
                f"--parts must be 1 for --sampler shuffle (no bound is known for shuffled, "
                f"partitioned training), got {parts}"
            )
        k = 1
    return sampler, steps, k, q, epochs, parts


def parse_query(
    sampler: str | None,
    sigma: float | None,
    steps: int | None,
    k: int | None,
    q: float | None,
    epochs: int | None,
    parts: int | None,
    delta: float | None,
) -> Query:
    """Validate every option of ``account``; raise :class:`CliInputError` on bad input."""
    sampler, steps, k, q, epochs, parts = parse_schedule(sampler, steps, k, q, epochs, parts)
    sigma = check_positive("--sigma", require("--sigma", sigma, "a finite noise multiplier > 0"))
    delta = check_delta("--delta", require("--delta", delta, "0 < delta < 1"))
    return Query(sampler, sigma, steps, k, q, epochs, parts, delta)
