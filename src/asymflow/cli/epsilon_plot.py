"""A PNG of certified ε against epochs for Poisson(q) and BIS(k, T) at the same rate, and
their ratio (matplotlib, Agg canvas)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.progress import Progress

from asymflow.accounting.events import (
    BalancedSampled,
    Event,
    Gaussian,
    ModelPartitioned,
    PoissonSampled,
    SelfComposed,
)
from asymflow.accounting.pld import PldAccountant
from asymflow.accounting.rdp import RdpAccountant
from asymflow.cli.schedule import Query

PLOT_MAX_POINTS = 12
PLOT_MIN_EPOCHS = 8


def _epoch_grid(epochs: int) -> list[int]:
    """Epoch counts to plot: 1..max(E, 8), thinned to at most 12 log-spaced points."""
    top = max(epochs, PLOT_MIN_EPOCHS)
    if top <= PLOT_MAX_POINTS:
        return list(range(1, top + 1))
    grid = {round(top ** (i / (PLOT_MAX_POINTS - 1))) for i in range(PLOT_MAX_POINTS)}
    return sorted(grid | {1, epochs, top})


def _pld_epsilon(pld: Any, delta: float) -> float:
    eps = float(pld.get_epsilon_for_delta(delta))
    return max(eps, 0.0) if math.isfinite(eps) else math.inf


def _curve(event: Event, grid: list[int], delta: float, *, pessimistic: bool = True) -> list[float]:
    """ε after e repetitions of ``event`` for each e in ``grid``.

    Certified (``pessimistic``): the min of RDP and PLD, the PLD built once and composed
    incrementally (composition keeps the rounding direction). Otherwise the optimistic PLD
    alone, a lower estimate.
    """
    best = [math.inf] * len(grid)
    if pessimistic and RdpAccountant().supports(event):
        best = [RdpAccountant().compose(event, e).epsilon(delta) for e in grid]
    pld = PldAccountant(pessimistic=pessimistic)
    if pld.supports(event):
        base = pld.compose(event).distribution()
        composed, done = None, 0
        for i, e in enumerate(grid):  # incremental: much cheaper than self_compose(e) per e
            step = base.self_compose(e - done) if e - done > 1 else base
            composed = step if composed is None else composed.compose(step)
            done = e
            best[i] = min(best[i], _pld_epsilon(composed, delta))
    return best


def _plot_rate(query: Query) -> tuple[int | None, float]:
    """(k for BIS or None if q·T is not a whole number, q for Poisson) at the query's rate."""
    if query.k is not None:
        return query.k, query.k / query.steps
    assert query.q is not None
    kq = query.q * query.steps
    k = round(kq)
    return (k if k >= 1 and abs(kq - k) <= 1e-9 * max(1.0, kq) else None), query.q


def plot_epsilon_vs_epochs(query: Query, path: Path, progress: Progress | None = None) -> dict:
    """Plot certified ε against epochs for Poisson(q = k/T) and BIS(k, T) at the same rate.

    Left: ε after e = 1..max(E, 8) epochs (min of RDP and PLD); for shuffling the lower bound
    (1-of-T allocation, optimistic PLD) is drawn dashed. Right: ε(BIS)/ε(Poisson). Saved as
    PNG with matplotlib's Agg canvas; returns the plotted series.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    grid = _epoch_grid(query.epochs)
    k, q = _plot_rate(query)
    step_noise: Event = Gaussian(query.sigma)
    if query.parts > 1:
        step_noise = ModelPartitioned(query.parts, step_noise)
    poisson_label = f"Poisson (q={q:.4g})"
    bis_label = f"BIS (k={k} of T={query.steps})"
    lower_label = "shuffle: lower bound (not a guarantee)"
    # One epoch of each schedule, and whether its curve is certified.
    curves: dict[str, tuple[Event, bool]] = {
        poisson_label: (SelfComposed(PoissonSampled(q, step_noise), query.steps), True)
    }
    if k is not None:
        bis = BalancedSampled(k, query.steps, step_noise)
        if RdpAccountant().supports(bis) or PldAccountant().supports(bis):
            curves[bis_label] = (bis, True)
    if query.sampler == "shuffle":
        curves[lower_label] = (BalancedSampled(1, query.steps, Gaussian(query.sigma)), False)
    task = progress.add_task("plot", total=len(curves)) if progress is not None else None
    series: dict[str, list[float]] = {}
    for label, (event, certified) in curves.items():
        if progress is not None and task is not None:
            progress.update(task, description=f"plot: {label}")
        series[label] = _curve(event, grid, query.delta, pessimistic=certified)
        if progress is not None and task is not None:
            progress.advance(task)

    def finite(values: list[float]) -> list[float]:
        return [v if math.isfinite(v) else math.nan for v in values]

    fig = Figure(figsize=(11, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for label, values in series.items():
        style = "--" if label == lower_label else "-"
        left.plot(grid, finite(values), style, marker="o", markersize=3, label=label)
    left.axvline(query.epochs, color="gray", linestyle=":", linewidth=1, label=f"E={query.epochs}")
    left.set_xlabel(f"epochs (passes of T={query.steps} steps)")
    left.set_ylabel(f"ε at δ={query.delta:g}")
    parts = f", {query.parts} parts" if query.parts > 1 else ""
    left.set_title(f"certified ε (min of RDP, PLD), σ={query.sigma:g}{parts}")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if bis_label in series:
        ratio = [
            b / p if p > 0 and math.isfinite(b) and math.isfinite(p) else math.nan
            for b, p in zip(series[bis_label], series[poisson_label], strict=True)
        ]
        right.plot(grid, ratio, "-o", markersize=3, color="tab:green")
        right.axhline(1.0, color="gray", linewidth=1)
    else:
        right.text(
            0.5,
            0.5,
            "no certified BIS schedule at this rate",
            ha="center",
            va="center",
            transform=right.transAxes,
        )
    right.set_title("ε(BIS) / ε(Poisson) at the same rate")
    right.set_xlabel("epochs")
    right.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    return {"path": str(path), "epochs": grid, "series": series}
