"""``asymflow ledger show RUN_DIR``: the rows of a run's privacy ledger and the certified ε
they spend."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

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
from asymflow.cli.common import (
    CliInputError,
    JsonOpt,
    check_delta,
    emit_json,
    errors,
    fmt,
    out_console,
    progress_display,
)


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
    with errors():
        delta = check_delta("--delta", delta)
        from asymflow.accounting.ledger import LEDGER_FILENAME, PrivacyLedger

        path = run_dir if run_dir.is_file() else run_dir / LEDGER_FILENAME
        if not path.is_file():
            raise CliInputError(
                f"RUN_DIR must be a run directory containing {LEDGER_FILENAME}, got "
                f"{str(run_dir)!r} (no such file: {str(path)!r})"
            )
        with PrivacyLedger(path) as ledger:
            entries = ledger.entries(dataset, scope)
            with progress_display() as progress:
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
        emit_json(result)
        return
    console = out_console()
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
    others = ", ".join(f"{m} {fmt(v)}" for m, v in report.by_method.items())
    kind = "certified upper bound" if report.certified else "NOT certified"
    console.print(
        f"ε spent: {fmt(report.epsilon)} at δ={delta:g} ({kind}, method {report.method}; "
        f"{others}) over {len(rows)} row(s)"
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
