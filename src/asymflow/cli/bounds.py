"""The ε of one accounting query by every requested method: certified bounds (RDP, PLD), a
Monte Carlo estimate, and for shuffled batches a lower bound (never reported as an ε)."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.progress import Progress

from asymflow.accounting.allocation import MIN_SIGMA
from asymflow.accounting.balanced_pld import uses_blocks
from asymflow.accounting.best import CERTIFIED_METHODS, DEFAULT_METHODS, best_epsilon
from asymflow.accounting.events import Event
from asymflow.accounting.pld import PldAccountant
from asymflow.cli.common import CliInputError
from asymflow.cli.schedule import Query

CERTIFIED = DEFAULT_METHODS  # rdp, pld, pld-blocks
MC_CONFIDENCE = 0.95
MC_DEFAULT_SAMPLES = 100_000
MC_SEED = 0
KIND_CERTIFIED = "certified upper bound"
KIND_ESTIMATE = f"estimate (confidence {MC_CONFIDENCE:g})"
KIND_LOWER = "lower bound (not a guarantee)"
LOWER_METHOD = "lower-bound"


def _certified_epsilon(
    event: Event, delta: float, method: str
) -> tuple[float | None, float, str | None]:
    """(ε or None if unsupported, seconds, reason) of one certified method via ``best_epsilon``."""
    start = time.perf_counter()
    accountant = CERTIFIED_METHODS[method]()
    if not accountant.supports(event):
        return None, 0.0, f"{method} cannot bound this event"
    report = best_epsilon(event, delta, (method,))
    return report.epsilon, time.perf_counter() - start, None


def _monte_carlo(event: Event, delta: float, samples: int) -> dict[str, Any]:
    """Monte Carlo ε estimate (upper and lower confidence ε) with its confidence level."""
    from asymflow.accounting.montecarlo import MonteCarloAccountant

    start = time.perf_counter()
    accountant = MonteCarloAccountant(samples=samples, confidence=MC_CONFIDENCE, seed=MC_SEED)
    if not accountant.supports(event):
        raise CliInputError(
            "--method mc / --mc-samples apply only to --sampler balanced with --parts 1 "
            "(Monte Carlo needs the exact BIS likelihood ratio)"
        )
    accountant.compose(event)
    epsilon = accountant.epsilon(delta)
    lower = accountant.epsilon_lower(delta)
    # Smallest sample size whose upper confidence bound can fall below delta at all.
    needed = math.ceil(math.log(2 / (1 - MC_CONFIDENCE)) / -math.log1p(-delta))
    return {
        "epsilon": epsilon,
        "epsilon_lower": lower,
        "confidence": MC_CONFIDENCE,
        "samples": samples,
        "seed": MC_SEED,
        "min_samples_for_delta": needed,
        "seconds": time.perf_counter() - start,
    }


def _shuffle_lower_bound(query: Query) -> float:
    """A lower bound on the ε of shuffled fixed batches (Chua et al. 2024).

    If every other record contributes zero, shuffling is 1-of-T random allocation per epoch,
    so that pair's ε is a lower bound; ``PldAccountant(pessimistic=False)`` rounds every piece
    down and gives a lower estimate of it.
    """
    return PldAccountant(pessimistic=False).compose(query.lower_bound_event()).epsilon(query.delta)


def check_supported(query: Query, methods: tuple[str, ...]) -> None:
    """Refuse, before any work, a schedule that none of ``methods`` can bound."""
    event = query.event()
    if not any(CERTIFIED_METHODS[m]().supports(event) for m in methods):
        hint = ""
        if query.parts > 1:
            hint = "; model partitioning (--parts > 1) is supported with --sampler poisson"
        elif any(m.startswith("pld") for m in methods) and query.sigma < MIN_SIGMA:
            hint = f"; the PLD accountant needs --sigma >= {MIN_SIGMA}"
        raise CliInputError(
            f"no certified accountant ({', '.join(methods)}) bounds --sampler {query.sampler} "
            f"with --parts {query.parts} at --sigma {query.sigma:g}{hint}"
        )


def run_account(
    query: Query, method: str, mc_samples: int | None, progress: Progress | None = None
) -> dict[str, Any]:
    """Every requested bound of ``query`` as a JSON-ready dict (infinities still as floats).

    ``method="best"`` selects the minimum over certified bounds (never Monte Carlo). Shuffled
    batches get only a lower bound: ``epsilon`` is None and ``lower_bound`` holds the value.
    """
    want_mc = method == "mc" or mc_samples is not None
    event = query.event() if query.sampler != "shuffle" else None
    names = [
        name
        for name in CERTIFIED
        # pld-blocks on an event without a k-of-T pass (k >= 2) is the same computation as pld
        if name != "pld-blocks" or method == name or (event is not None and uses_blocks(event))
    ]
    n_tasks = 1 if query.sampler == "shuffle" else len(names) + int(want_mc)
    n_tasks += int(query.sampler == "balanced" and query.parts == 1)
    task = progress.add_task("accounting", total=n_tasks) if progress is not None else None

    def step(description: str) -> None:
        if progress is not None and task is not None:
            progress.update(task, description=description)

    def done() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    out: dict[str, Any] = {"query": query.to_dict(), "delta": query.delta}
    if query.sampler == "shuffle":
        step("shuffle lower bound (optimistic PLD of 1-of-T allocation)")
        start = time.perf_counter()
        lower = _shuffle_lower_bound(query)
        done()
        out.update(
            epsilon=None,
            method=LOWER_METHOD,
            certified=False,
            kind=KIND_LOWER,
            lower_bound=lower,
            by_method={LOWER_METHOD: lower},
            kinds={LOWER_METHOD: KIND_LOWER},
            seconds={LOWER_METHOD: time.perf_counter() - start},
            event=None,
            lower_bound_event=query.lower_bound_event().to_dict(),
            note=(
                "no certified epsilon is known for shuffled fixed-size batches "
                "(Chua et al. 2024); with all other records contributing zero, shuffling is "
                "1-of-T random allocation per epoch, whose epsilon (optimistic PLD) is shown. "
                "Use --sampler balanced --k 1 for the same batch structure with a certified bound."
            ),
        )
        return out

    assert event is not None
    by_method: dict[str, float] = {}
    kinds: dict[str, str] = {}
    seconds: dict[str, float] = {}
    unsupported: dict[str, str] = {}
    for name in names:
        step(f"{name}: certified bound")
        eps, secs, reason = _certified_epsilon(event, query.delta, name)
        done()
        if eps is None:
            unsupported[name] = reason or "unsupported"
            continue
        by_method[name], kinds[name], seconds[name] = eps, KIND_CERTIFIED, secs
    if want_mc:
        samples = MC_DEFAULT_SAMPLES if mc_samples is None else mc_samples
        step(f"mc: Monte Carlo estimate, {samples} samples per direction")
        mc = _monte_carlo(event, query.delta, samples)
        done()
        by_method["mc"], kinds["mc"], seconds["mc"] = mc["epsilon"], KIND_ESTIMATE, mc["seconds"]
        out["mc"] = mc
    certified = {m: by_method[m] for m in CERTIFIED if m in by_method}
    if method in CERTIFIED and method not in certified:
        raise CliInputError(f"--method {method} cannot bound this schedule ({unsupported[method]})")
    if method == "best":
        if not certified:
            raise CliInputError(
                "no certified accountant bounds this schedule "
                f"(--sampler {query.sampler}, --parts {query.parts}); try --sampler poisson"
            )
        chosen = min(certified, key=lambda m: certified[m])
    else:
        chosen = method
    out.update(
        epsilon=by_method[chosen],
        method=chosen,
        certified=chosen in certified,
        kind=kinds[chosen],
        by_method=by_method,
        kinds=kinds,
        seconds=seconds,
        event=event.to_dict(),
    )
    if unsupported:
        out["unsupported"] = unsupported
    if query.sampler == "balanced" and query.parts == 1 and certified:
        step("certified lower bound (fixed test)")
        out["bracket"] = _balanced_bracket(query, min(certified.values()), certified)
        done()
    return out


def _balanced_bracket(query: Query, upper: float, certified: dict[str, float]) -> dict[str, Any]:
    """[lower, upper] for balanced sampling: the certified upper bound used and a certified
    lower bound on the true ε (a fixed Neyman-Pearson test, :mod:`balanced_lower`)."""
    from asymflow.accounting.balanced_lower import epsilon_lower

    assert query.k is not None
    start = time.perf_counter()
    lower = epsilon_lower(query.steps, query.k, query.sigma, query.delta, query.epochs)
    upper_method = min(certified, key=lambda m: certified[m])
    if query.k == 1:
        how = {"rdp": "exact 1-of-T RDP", "pld": "1-of-T allocation PLD"}[upper_method]
    else:
        how = {
            "rdp": "exact k-of-T remove RDP (profile program) / block relaxation; add: reduction",
            "pld": "PLD of the k-fold reduction to 1-of-floor(T/k) (Feldman & Shenfeld)",
            "pld-blocks": "block PLD: floor(k/2) 2-of-floor(2T/k) pairs via 4-part partitions",
        }[upper_method]
    return {
        "lower": lower,
        "upper": upper,
        "upper_method": upper_method,
        "upper_how": how,
        "lower_method": "fixed-test lower bound (Poisson log-ratio statistic, exact lattice law)",
        "relative_width": (upper - lower) / upper if upper > 0 and math.isfinite(upper) else None,
        "seconds": time.perf_counter() - start,
    }
