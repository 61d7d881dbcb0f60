"""The ``asymflow`` command line (typer): privacy accounting, calibration, ledgers, a demo.

Commands (DESIGN.md sec. 1):

- ``asymflow account --sampler S --sigma σ --steps T (--k K | --q Q) --epochs E --delta δ``:
  ε of a training schedule by every certified method (RDP, PLD) and, on request, a Monte Carlo
  estimate. Shuffled fixed batches have no certified ε (Chua et al. 2024); for them a
  *lower bound* is reported, never an ε.
- ``asymflow account calibrate --epsilon ε ...``: the smallest σ whose certified ε meets ε.
- ``asymflow ledger show RUN_DIR``: the rows of a run's privacy ledger and the ε they spend.
- ``asymflow demo``: representative accounting queries, a JSON summary and a plot.

JSON output (``--json``): exactly one object on stdout; progress goes to stderr. Infinite values
are written as the string ``"inf"``; ``null`` means "no such value exists" (for example the
``epsilon`` of shuffled batches, for which only a lower bound is known).

Bad input exits with code 2 and a one-line ``Error: ...`` on stderr naming the parameter and
its allowed range, never a traceback.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from asymflow import __version__
from asymflow.accounting.allocation import MIN_SIGMA
from asymflow.accounting.best import best_epsilon
from asymflow.accounting.calibrate import noise_for_epsilon
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
from asymflow.accounting.schedule import SAMPLERS, training_event

# dp_accounting's truncation-bound search (pld/common.py) overflows inside scipy's logsumexp
# on large self-compositions; the result is handled there, so the warning is only noise.
warnings.filterwarnings(
    "ignore",
    message="overflow encountered in divide",
    category=RuntimeWarning,
    module=r"scipy\.special\._logsumexp",
)

CERTIFIED = ("rdp", "pld")
ACCOUNT_METHODS = ("rdp", "pld", "mc", "best")
CALIBRATE_METHODS = ("rdp", "pld", "best")
MC_CONFIDENCE = 0.95
MC_DEFAULT_SAMPLES = 100_000
MC_SEED = 0
KIND_CERTIFIED = "certified upper bound"
KIND_ESTIMATE = f"estimate (confidence {MC_CONFIDENCE:g})"
KIND_LOWER = "lower bound (not a guarantee)"
LOWER_METHOD = "lower-bound"
PLOT_MAX_POINTS = 12
PLOT_MIN_EPOCHS = 8

app = typer.Typer(
    name="asymflow",
    help="Private learning with asymmetric flows and partition-amplified DP accounting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
account_app = typer.Typer(
    help="Certified ε of a DP-SGD schedule (run with options), or noise calibration.",
    add_completion=False,
)
ledger_app = typer.Typer(help="Inspect a run's privacy ledger.", no_args_is_help=True)
app.add_typer(account_app, name="account")
app.add_typer(ledger_app, name="ledger")


# ------------------------------------------------------------------------------------ errors


class CliInputError(ValueError):
    """Bad command-line input; the message names the option and its allowed range."""


def _fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error to stderr and exit with ``code``."""
    typer.echo(f"Error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


@contextmanager
def _errors() -> Iterator[None]:
    """Turn the library's validation errors into one-line messages at the command boundary.

    ``UnsupportedEventError`` is a ``ValueError``; ``sqlite3`` and file-system failures exit 1.
    """
    try:
        yield
    except (ValueError, TypeError) as exc:
        _fail(str(exc) or type(exc).__name__)
    except (sqlite3.Error, OSError) as exc:
        _fail(f"{type(exc).__name__}: {exc}", code=1)


def _require(name: str, value: Any, what: str) -> Any:
    if value is None:
        raise CliInputError(f"{name} is required: {what}")
    return value


def _check_positive_finite(name: str, value: float) -> float:
    if not (math.isfinite(value) and value > 0):
        raise CliInputError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _check_delta(name: str, value: float) -> float:
    if not (math.isfinite(value) and 0 < value < 1):
        raise CliInputError(f"{name} must satisfy 0 < delta < 1, got {value}")
    return float(value)


def _check_min_int(name: str, value: int, low: int) -> int:
    if value < low:
        raise CliInputError(f"{name} must be an integer >= {low}, got {value}")
    return int(value)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise CliInputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


# ------------------------------------------------------------------------------------ queries


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
        return {
            "sampler": self.sampler,
            "sigma": self.sigma,
            "steps": self.steps,
            "k": self.k,
            "q": self.q,
            "epochs": self.epochs,
            "parts": self.parts,
            "delta": self.delta,
        }


def _schedule(
    sampler: str | None,
    steps: int | None,
    k: int | None,
    q: float | None,
    epochs: int | None,
    parts: int | None,
) -> tuple[str, int, int | None, float | None, int, int]:
    """Validate the schedule options shared by ``account`` and ``calibrate``."""
    sampler = _check_choice(
        "--sampler", _require("--sampler", sampler, f"one of {', '.join(SAMPLERS)}"), SAMPLERS
    )
    steps = _check_min_int("--steps", _require("--steps", steps, "an integer >= 1"), 1)
    epochs = _check_min_int("--epochs", 1 if epochs is None else epochs, 1)
    parts = _check_min_int("--parts", 1 if parts is None else parts, 1)
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
        _require("--k", k, f"balanced sampling needs 1 <= k <= steps ({steps})")
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


def _query(
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
    sampler, steps, k, q, epochs, parts = _schedule(sampler, steps, k, q, epochs, parts)
    sigma = _check_positive_finite(
        "--sigma", _require("--sigma", sigma, "a finite noise multiplier > 0")
    )
    delta = _check_delta("--delta", _require("--delta", delta, "0 < delta < 1"))
    return Query(sampler, sigma, steps, k, q, epochs, parts, delta)


# ------------------------------------------------------------------------------------ progress


def _err_console() -> Console:
    return Console(stderr=True)


def _out_console() -> Console:
    """Console for tables on stdout; 120 columns when not a terminal (pipes, logs)."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 120))


def _progress() -> Progress:
    """A transient progress display on stderr, so stdout (tables or JSON) stays clean."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=_err_console(),
        transient=True,
    )


# ------------------------------------------------------------------------------------ accounting


def _certified_epsilon(
    event: Event, delta: float, method: str
) -> tuple[float | None, float, str | None]:
    """(ε or None if unsupported, seconds, reason) of one certified method via ``best_epsilon``."""
    start = time.perf_counter()
    accountant = RdpAccountant() if method == "rdp" else PldAccountant()
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


def _check_supported(query: Query, methods: tuple[str, ...]) -> None:
    """Refuse, before any work, a schedule that none of ``methods`` can bound."""
    event = query.event()
    if not any((RdpAccountant if m == "rdp" else PldAccountant)().supports(event) for m in methods):
        hint = ""
        if query.parts > 1:
            hint = "; model partitioning (--parts > 1) is supported with --sampler poisson"
        elif "pld" in methods and query.sigma < MIN_SIGMA:
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
    n_tasks = 1 if query.sampler == "shuffle" else len(CERTIFIED) + int(want_mc)
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

    event = query.event()
    by_method: dict[str, float] = {}
    kinds: dict[str, str] = {}
    seconds: dict[str, float] = {}
    unsupported: dict[str, str] = {}
    for name in CERTIFIED:
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
    if method in ("rdp", "pld") and method not in certified:
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
    return out


# ------------------------------------------------------------------------------------ plotting


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


# ------------------------------------------------------------------------------------ output


def _jsonable(obj: Any) -> Any:
    """JSON-ready copy: ±inf become the strings "inf"/"-inf", NaN becomes null."""
    if isinstance(obj, dict):
        return {str(key): _jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(value) for value in obj]
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


def _emit_json(payload: dict[str, Any]) -> None:
    """Print exactly one JSON object on stdout."""
    typer.echo(json.dumps(_jsonable(payload), indent=2, allow_nan=False))


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "∞"
    return f"{value:.4f}"


def _describe_query(query: dict[str, Any]) -> str:
    rate = f"k={query['k']}" if query["k"] is not None else f"q={query['q']:g}"
    parts = f", parts={query['parts']}" if query["parts"] > 1 else ""
    return (
        f"{query['sampler']}: σ={query['sigma']:g}, T={query['steps']} steps/epoch, {rate}, "
        f"epochs={query['epochs']}{parts}, δ={query['delta']:g}"
    )


def describe_event(event: Event) -> str:
    """A short human-readable description of a privacy event."""
    if isinstance(event, Gaussian):
        return f"Gaussian(σ={event.sigma:g})"
    if isinstance(event, Laplace):
        return f"Laplace(b={event.b:g})"
    if isinstance(event, PoissonSampled):
        return f"Poisson(q={event.q:g}) ∘ {describe_event(event.event)}"
    if isinstance(event, BalancedSampled):
        return f"BIS(k={event.k} of T={event.steps}) ∘ {describe_event(event.event)}"
    if isinstance(event, ModelPartitioned):
        noise = "" if event.noise_on_all_blocks else ", noise on chosen block only"
        return f"Partitioned(1 of {event.parts}{noise}) ∘ {describe_event(event.event)}"
    if isinstance(event, Dropout):
        return f"Dropout(rate={event.rate:g}) ∘ {describe_event(event.event)}"
    if isinstance(event, SelfComposed):
        return f"{event.count} × [{describe_event(event.event)}]"
    if isinstance(event, Composed):
        return " + ".join(describe_event(e) for e in event.events) or "nothing"
    fields = ", ".join(f"{key}={value}" for key, value in event.to_dict().items() if key != "type")
    return f"{type(event).__name__}({fields})"


def _print_account(result: dict[str, Any]) -> None:
    console = _out_console()
    table = Table(title=_describe_query(result["query"]), title_justify="left")
    table.add_column("method")
    table.add_column(f"ε at δ={result['delta']:g}", justify="right")
    table.add_column("kind")
    table.add_column("time (s)", justify="right")
    table.add_column("notes")
    for name, value in result["by_method"].items():
        notes = ""
        if name == "mc":
            mc = result["mc"]
            notes = (
                f"{mc['samples']} samples/direction; lower confidence ε {_fmt(mc['epsilon_lower'])}"
            )
            if math.isinf(mc["epsilon"]):
                notes += f"; δ below MC resolution, need >= {mc['min_samples_for_delta']} samples"
        elif name == LOWER_METHOD:
            notes = "shuffle ⪰ 1-of-T allocation per epoch (optimistic PLD)"
        chosen = name == result["method"]
        table.add_row(
            f"[bold]{name}[/bold]" if chosen else name,
            f"[bold]{_fmt(value)}[/bold]" if chosen else _fmt(value),
            result["kinds"][name],
            f"{result['seconds'][name]:.2f}",
            "; ".join(filter(None, [notes, "← chosen" if chosen else ""])),
        )
    for name, reason in result.get("unsupported", {}).items():
        table.add_row(name, "-", "unsupported", "", reason)
    console.print(table)
    if result["method"] == LOWER_METHOD:
        console.print(
            f"No certified ε exists for shuffled fixed-size batches. Lower bound "
            f"(not a guarantee): ε >= {_fmt(result['lower_bound'])} at δ={result['delta']:g}."
        )
        console.print(result["note"], style="dim")
    elif result["certified"]:
        console.print(
            f"ε <= {_fmt(result['epsilon'])} at δ={result['delta']:g} "
            f"(certified upper bound, method {result['method']})"
        )
    else:
        console.print(
            f"ε ≈ {_fmt(result['epsilon'])} at δ={result['delta']:g} "
            f"({result['kind']}, method {result['method']}; not a certified bound)"
        )
    if "plot" in result:
        console.print(f"plot written to {result['plot']['path']}")


# ------------------------------------------------------------------------------------ commands


def _version(value: bool) -> None:
    if value:
        typer.echo(f"asymflow {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Private learning with asymmetric flows and partition-amplified DP accounting."""


SamplerOpt = Annotated[
    str | None,
    typer.Option(
        metavar="[poisson|balanced|shuffle]",
        help="poisson (rate q), balanced (BIS: k of T steps per pass) or shuffle. Required.",
    ),
]
StepsOpt = Annotated[int | None, typer.Option(help="Steps per epoch (one pass), T >= 1. Required.")]
KOpt = Annotated[
    int | None,
    typer.Option("--k", help="Steps each record joins per pass, 1 <= k <= T (Poisson: q = k/T)."),
]
QOpt = Annotated[
    float | None, typer.Option("--q", help="Poisson rate 0 < q <= 1 (instead of --k).")
]
EpochsOpt = Annotated[int | None, typer.Option(help="Passes over the data, >= 1. \\[default: 1]")]
PartsOpt = Annotated[
    int | None,
    typer.Option(help="Model partitioned into D blocks, one per record and step. \\[default: 1]"),
]
DeltaOpt = Annotated[float | None, typer.Option(help="Target δ, 0 < δ < 1. Required.")]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")
]


@account_app.callback(invoke_without_command=True)
def account(
    ctx: typer.Context,
    sampler: SamplerOpt = None,
    sigma: Annotated[
        float | None, typer.Option(help="Noise multiplier σ > 0 (noise std / clip norm). Required.")
    ] = None,
    steps: StepsOpt = None,
    k: KOpt = None,
    q: QOpt = None,
    epochs: EpochsOpt = None,
    delta: DeltaOpt = None,
    method: Annotated[
        str | None,
        typer.Option(
            metavar="[rdp|pld|mc|best]",
            help="Which ε to report: rdp, pld (certified), mc (estimate, balanced only) or "
            "best (smallest certified). \\[default: best]",
        ),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Write a PNG of certified ε vs epochs, Poisson vs BIS at this rate."),
    ] = None,
    json_out: JsonOpt = False,
    mc_samples: Annotated[
        int | None,
        typer.Option(
            help=f"Add a Monte Carlo estimate with N >= 100 samples per direction "
            f"(balanced only; default {MC_DEFAULT_SAMPLES} with --method mc). Slow for large T·k."
        ),
    ] = None,
    parts: PartsOpt = None,
) -> None:
    """ε of a DP-SGD schedule by RDP and PLD (certified), optionally Monte Carlo (estimate).

    Example: asymflow account --sampler balanced --sigma 1 --steps 1000 --k 10 --delta 1e-5
    """
    if ctx.invoked_subcommand is not None:
        if any(value is not None and value is not False for value in ctx.params.values()):
            _fail(
                f"options of 'account' cannot be combined with 'account "
                f"{ctx.invoked_subcommand}'; pass them after the subcommand"
            )
        return
    with _errors():
        query = _query(sampler, sigma, steps, k, q, epochs, parts, delta)
        method = _check_choice("--method", method or "best", ACCOUNT_METHODS)
        if mc_samples is not None:
            _check_min_int("--mc-samples", mc_samples, 100)
        if (method == "mc" or mc_samples is not None) and (
            query.sampler != "balanced" or query.parts != 1
        ):
            raise CliInputError(
                "--method mc and --mc-samples apply only to --sampler balanced with --parts 1, "
                f"got --sampler {query.sampler} --parts {query.parts}"
            )
        if query.sampler != "shuffle":
            _check_supported(query, CERTIFIED if method in ("best", "mc") else (method,))
        with _progress() as progress:
            result = run_account(query, method, mc_samples, progress)
            if plot is not None:
                result["plot"] = plot_epsilon_vs_epochs(query, plot, progress)
    if json_out:
        _emit_json(result)
    else:
        _print_account(result)


@account_app.command("calibrate")
def calibrate(
    epsilon: Annotated[
        float | None, typer.Option(help="Target ε, a finite number > 0. Required.")
    ] = None,
    delta: DeltaOpt = None,
    sampler: SamplerOpt = None,
    steps: StepsOpt = None,
    k: KOpt = None,
    q: QOpt = None,
    epochs: EpochsOpt = None,
    parts: PartsOpt = None,
    method: Annotated[
        str | None,
        typer.Option(
            metavar="[rdp|pld|best]",
            help="Certified method to calibrate against. \\[default: best]",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Smallest noise multiplier σ whose certified ε is at most --epsilon."""
    with _errors():
        target = _check_positive_finite(
            "--epsilon", _require("--epsilon", epsilon, "a target epsilon > 0")
        )
        delta = _check_delta("--delta", _require("--delta", delta, "0 < delta < 1"))
        sampler, steps, k, q, epochs, parts = _schedule(sampler, steps, k, q, epochs, parts)
        if sampler == "shuffle":
            raise CliInputError(
                "--sampler shuffle has no certified epsilon to calibrate (Chua et al. 2024); "
                "use --sampler balanced --k 1 for the same batch structure"
            )
        method = _check_choice("--method", method or "best", CALIBRATE_METHODS)
        methods = CERTIFIED if method == "best" else (method,)
        _check_supported(Query(sampler, 1.0, steps, k, q, epochs, parts, delta), methods)
        with _progress() as progress:
            progress.add_task(f"calibrating σ for ε <= {target:g} ({method})", total=None)
            start = time.perf_counter()
            cal = noise_for_epsilon(
                target,
                delta,
                sampler,
                steps,
                k=k,
                q=q,
                epochs=epochs,
                parts=parts,
                methods=methods,
            )
            seconds = time.perf_counter() - start
        event = training_event(sampler, cal.sigma, steps, k=k, q=q, epochs=epochs, parts=parts)
    query = Query(sampler, cal.sigma, steps, k, q, epochs, parts, delta)
    result = {
        "sigma": cal.sigma,
        "epsilon": cal.epsilon,
        "target_epsilon": cal.target_epsilon,
        "delta": cal.delta,
        "method": cal.method,
        "certified": True,
        "seconds": seconds,
        "query": query.to_dict(),
        "event": event.to_dict(),
    }
    if json_out:
        _emit_json(result)
        return
    table = Table(title=_describe_query(query.to_dict()), title_justify="left")
    for column in ("target ε", "δ", "σ", "certified ε", "method", "time (s)"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{target:g}",
        f"{delta:g}",
        f"{cal.sigma:.4f}",
        _fmt(cal.epsilon),
        cal.method,
        f"{seconds:.1f}",
    )
    _out_console().print(table)
    _out_console().print(
        f"σ = {cal.sigma:.4f} gives ε <= {_fmt(cal.epsilon)} <= {target:g} at δ={delta:g} "
        f"(certified, {cal.method})"
    )


@ledger_app.command("show")
def ledger_show(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory holding ledger.sqlite (or the file itself).")
    ],
    delta: Annotated[float, typer.Option(help="δ at which to report ε, 0 < δ < 1.")] = 1e-5,
    dataset: Annotated[str | None, typer.Option(help="Only rows of this dataset.")] = None,
    scope: Annotated[
        str | None, typer.Option(help="Only rows affecting this scope (plus scope 'all').")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the ledger's releases and the certified ε they spend."""
    with _errors():
        delta = _check_delta("--delta", delta)
        from asymflow.accounting.ledger import LEDGER_FILENAME, PrivacyLedger

        path = run_dir if run_dir.is_file() else run_dir / LEDGER_FILENAME
        if not path.is_file():
            raise CliInputError(
                f"RUN_DIR must be a run directory containing {LEDGER_FILENAME}, got "
                f"{str(run_dir)!r} (no such file: {str(path)!r})"
            )
        with PrivacyLedger(path) as ledger:
            entries = ledger.entries(dataset, scope)
            with _progress() as progress:
                progress.add_task("certified ε of the ledger", total=None)
                report = ledger.epsilon(delta, dataset, scope)
    rows = [
        {
            "id": e.id,
            "created": datetime.fromtimestamp(e.created).isoformat(timespec="seconds"),
            "dataset": e.dataset,
            "scope": e.scope,
            "count": e.count,
            "event": e.event.to_dict(),
            "description": describe_event(e.event),
            "status": e.status,
            "note": e.note,
        }
        for e in entries
    ]
    result = {
        "ledger": str(path),
        "delta": delta,
        "dataset": dataset,
        "scope": scope,
        "epsilon": report.epsilon,
        "method": report.method,
        "certified": report.certified,
        "by_method": dict(report.by_method),
        "entries": rows,
    }
    if json_out:
        _emit_json(result)
        return
    console = _out_console()
    table = Table(title=f"privacy ledger {path}", title_justify="left")
    for column in ("id", "created", "dataset", "scope", "count", "event", "status", "note"):
        table.add_column(
            column, justify="right" if column in ("id", "count") else "left", overflow="fold"
        )
    for row in rows:
        table.add_row(
            str(row["id"]),
            row["created"],
            row["dataset"],
            row["scope"],
            str(row["count"]),
            row["description"],
            row["status"],
            row["note"],
        )
    console.print(table)
    others = ", ".join(f"{m} {_fmt(v)}" for m, v in report.by_method.items())
    kind = "certified upper bound" if report.certified else "NOT certified"
    console.print(
        f"ε spent: {_fmt(report.epsilon)} at δ={delta:g} ({kind}, method {report.method}; "
        f"{others}) over {len(rows)} row(s)"
    )


DEMO_SIGMA = 1.0
DEMO_STEPS = 1000
DEMO_DELTA = 1e-5
DEMO_TARGET = 2.0
DEMO_KS = (1, 10)  # rates k/T compared
DEMO_K = 10  # rate of the calibration and the plot
DEMO_REL_TOL = 3e-2


@app.command()
def demo(
    out: Annotated[
        Path, typer.Option(help="Directory for account.json and epsilon_vs_steps.png.")
    ] = Path("runs/demo"),
) -> None:
    """Accounting demo: Poisson vs BIS at the same rate, shuffling, and a calibration.

    Writes OUT/account.json and OUT/epsilon_vs_steps.png. (The Delta training demo of
    DESIGN.md will replace this once the method lands.)
    """
    queries = [
        Query(sampler, DEMO_SIGMA, DEMO_STEPS, k, None, 1, 1, DEMO_DELTA)
        for k in DEMO_KS
        for sampler in ("poisson", "balanced")
    ]
    queries.append(Query("shuffle", DEMO_SIGMA, DEMO_STEPS, 1, None, 1, 1, DEMO_DELTA))
    plot_query = Query("balanced", DEMO_SIGMA, DEMO_STEPS, DEMO_K, None, 1, 1, DEMO_DELTA)
    results: list[dict[str, Any]] = []
    with _errors():
        out.mkdir(parents=True, exist_ok=True)
        with _progress() as progress:
            task = progress.add_task("demo", total=len(queries) + 2)
            for query in queries:
                progress.update(task, description=f"account: {query.sampler}, k={query.k}")
                results.append(run_account(query, "best", None))
                progress.advance(task)
            progress.update(
                task, description=f"calibrate: balanced k={DEMO_K}, ε <= {DEMO_TARGET:g}"
            )
            cal = noise_for_epsilon(
                DEMO_TARGET, DEMO_DELTA, "balanced", DEMO_STEPS, k=DEMO_K, rel_tol=DEMO_REL_TOL
            )
            progress.advance(task)
            progress.update(task, description="plot: ε vs epochs")
            plot = plot_epsilon_vs_epochs(plot_query, out / "epsilon_vs_steps.png")
            progress.advance(task)
    calibration = {
        "sigma": cal.sigma,
        "epsilon": cal.epsilon,
        "target_epsilon": cal.target_epsilon,
        "delta": cal.delta,
        "method": cal.method,
        "certified": True,
        "query": Query("balanced", cal.sigma, DEMO_STEPS, DEMO_K, None, 1, 1, DEMO_DELTA).to_dict(),
    }
    summary = {"version": __version__, "queries": results, "calibration": calibration, "plot": plot}
    (out / "account.json").write_text(json.dumps(_jsonable(summary), indent=2, allow_nan=False))

    console = _out_console()
    table = Table(
        title=f"one pass, σ={DEMO_SIGMA:g}, T={DEMO_STEPS}, δ={DEMO_DELTA:g}", title_justify="left"
    )
    for column in ("sampler", "rate", "rdp", "pld", "ε reported", "kind"):
        table.add_column(column, justify="right" if column in ("rdp", "pld") else "left")
    for r in results:
        query = r["query"]
        reported = r["lower_bound"] if r["method"] == LOWER_METHOD else r["epsilon"]
        table.add_row(
            query["sampler"],
            f"k={query['k']} of T={query['steps']}",
            _fmt(r["by_method"].get("rdp")),
            _fmt(r["by_method"].get("pld")),
            ("≥ " if r["method"] == LOWER_METHOD else "≤ ") + _fmt(reported),
            r["kind"],
        )
    console.print(table)
    console.print(
        f"calibration: balanced k={DEMO_K} of T={DEMO_STEPS} needs σ = {cal.sigma:.4f} for "
        f"ε <= {DEMO_TARGET:g} (certified ε {_fmt(cal.epsilon)}, {cal.method})"
    )
    console.print(f"wrote {out / 'account.json'} and {out / 'epsilon_vs_steps.png'}")
