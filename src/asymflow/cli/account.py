"""``asymflow account`` (the ε of a DP-SGD schedule by every method) and ``asymflow account
calibrate`` (the smallest σ whose certified ε meets a target).

Shuffled fixed batches have no certified ε (Chua et al. 2024); for them a *lower bound* is
reported, never an ε.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from asymflow.accounting.calibrate import noise_for_epsilon
from asymflow.accounting.schedule import training_event
from asymflow.checks import check_choice, check_delta, check_int, check_positive
from asymflow.cli.bounds import (
    CERTIFIED,
    LOWER_METHOD,
    MC_DEFAULT_SAMPLES,
    check_supported,
    run_account,
)
from asymflow.cli.common import (
    CliInputError,
    JsonOpt,
    emit_json,
    errors,
    fail,
    fmt,
    out_console,
    progress_display,
    require,
)
from asymflow.cli.epsilon_plot import plot_epsilon_vs_epochs
from asymflow.cli.schedule import Query, describe_query, parse_query, parse_schedule

ACCOUNT_METHODS = ("rdp", "pld", "pld-blocks", "mc", "best")
CALIBRATE_METHODS = ("rdp", "pld", "pld-blocks", "best")

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
            metavar="[rdp|pld|pld-blocks|mc|best]",
            help="Which ε to report: rdp, pld, pld-blocks (certified; pld-blocks bounds balanced "
            "k >= 2 through 2-of-m blocks, ~1-2 s), mc (estimate, balanced only) or best "
            "(smallest certified). \\[default: best]",
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
            fail(
                f"options of 'account' cannot be combined with 'account "
                f"{ctx.invoked_subcommand}'; pass them after the subcommand"
            )
        return
    with errors():
        query = parse_query(sampler, sigma, steps, k, q, epochs, parts, delta)
        method = check_choice("--method", method or "best", ACCOUNT_METHODS)
        if mc_samples is not None:
            check_int("--mc-samples", mc_samples, 100)
        if (method == "mc" or mc_samples is not None) and (
            query.sampler != "balanced" or query.parts != 1
        ):
            raise CliInputError(
                "--method mc and --mc-samples apply only to --sampler balanced with --parts 1, "
                f"got --sampler {query.sampler} --parts {query.parts}"
            )
        if query.sampler != "shuffle":
            check_supported(query, CERTIFIED if method in ("best", "mc") else (method,))
        with progress_display() as progress:
            result = run_account(query, method, mc_samples, progress)
            if plot is not None:
                result["plot"] = plot_epsilon_vs_epochs(query, plot, progress)
    if json_out:
        emit_json(result)
    else:
        print_account(result)


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
            metavar="[rdp|pld|pld-blocks|best]",
            help="Certified method to calibrate against. \\[default: best]",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Smallest noise multiplier σ whose certified ε is at most --epsilon."""
    with errors():
        target = check_positive("--epsilon", require("--epsilon", epsilon, "a target epsilon > 0"))
        delta = check_delta("--delta", require("--delta", delta, "0 < delta < 1"))
        sampler, steps, k, q, epochs, parts = parse_schedule(sampler, steps, k, q, epochs, parts)
        if sampler == "shuffle":
            raise CliInputError(
                "--sampler shuffle has no certified epsilon to calibrate (Chua et al. 2024); "
                "use --sampler balanced --k 1 for the same batch structure"
            )
        method = check_choice("--method", method or "best", CALIBRATE_METHODS)
        methods = CERTIFIED if method == "best" else (method,)
        check_supported(Query(sampler, 1.0, steps, k, q, epochs, parts, delta), methods)
        with progress_display() as progress:
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
        emit_json(result)
        return
    table = Table(title=describe_query(query.to_dict()), title_justify="left")
    for column in ("target ε", "δ", "σ", "certified ε", "method", "time (s)"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{target:g}",
        f"{delta:g}",
        f"{cal.sigma:.4f}",
        fmt(cal.epsilon),
        cal.method,
        f"{seconds:.1f}",
    )
    out_console().print(table)
    out_console().print(
        f"σ = {cal.sigma:.4f} gives ε <= {fmt(cal.epsilon)} <= {target:g} at δ={delta:g} "
        f"(certified, {cal.method})"
    )


def print_account(result: dict[str, Any]) -> None:
    console = out_console()
    table = Table(title=describe_query(result["query"]), title_justify="left")
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
                f"{mc['samples']} samples/direction; lower confidence ε {fmt(mc['epsilon_lower'])}"
            )
            if math.isinf(mc["epsilon"]):
                notes += f"; δ below MC resolution, need >= {mc['min_samples_for_delta']} samples"
        elif name == LOWER_METHOD:
            notes = "shuffle ⪰ 1-of-T allocation per epoch (optimistic PLD)"
        chosen = name == result["method"]
        table.add_row(
            f"[bold]{name}[/bold]" if chosen else name,
            f"[bold]{fmt(value)}[/bold]" if chosen else fmt(value),
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
            f"(not a guarantee): ε >= {fmt(result['lower_bound'])} at δ={result['delta']:g}."
        )
        console.print(result["note"], style="dim")
    elif result["certified"]:
        console.print(
            f"ε <= {fmt(result['epsilon'])} at δ={result['delta']:g} "
            f"(certified upper bound, method {result['method']})"
        )
        if "bracket" in result:
            b = result["bracket"]
            width = b["relative_width"]
            console.print(
                f"bracket: {fmt(b['lower'])} <= ε <= {fmt(b['upper'])}"
                + (f" (width {100 * width:.1f}%)" if width is not None else "")
                + f"; upper: {b['upper_method']} ({b['upper_how']}); "
                f"lower: {b['lower_method']} "
                f"({b['seconds']:.2f} s)",
                style="dim",
            )
    else:
        console.print(
            f"ε ≈ {fmt(result['epsilon'])} at δ={result['delta']:g} "
            f"({result['kind']}, method {result['method']}; not a certified bound)"
        )
    if "plot" in result:
        console.print(f"plot written to {result['plot']['path']}")
