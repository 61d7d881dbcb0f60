"""``asymflow ledger show RUN_DIR``: the rows of a run's privacy ledger and the certified ε
each population spends.

A population is the records of one dataset in one scope (:class:`Population`); only its own
rows and its dataset's scope-``all`` rows compose, so the training records and a test split
get separate figures, and a dataset's ε is its worst population's. The headline ε is the
dataset named by ``--dataset``, else the run's training data (``data`` in the run's
``config.json``), else the ledger's only dataset.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from asymflow.accounting.ledger import (
    ALL_SCOPE,
    LEDGER_FILENAME,
    LedgerEntry,
    Population,
    PrivacyLedger,
)
from asymflow.checks import check_delta
from asymflow.cli.common import (
    CliInputError,
    JsonOpt,
    emit_json,
    errors,
    fmt,
    out_console,
    progress_display,
)

if TYPE_CHECKING:
    from asymflow.accounting.best import EpsilonReport

CONFIG_FILE = "config.json"


def _run_data(ledger_path: Path) -> str | None:
    """``data`` of the ``config.json`` beside the ledger (every run writes one), or None."""
    config = ledger_path.parent / CONFIG_FILE
    if not config.is_file():
        return None
    try:
        data = json.loads(config.read_text(encoding="utf-8")).get("data")
    except (ValueError, AttributeError) as exc:
        raise CliInputError(
            f"RUN_DIR's {CONFIG_FILE} must be a JSON object, got {str(config)!r}"
        ) from exc
    return data if isinstance(data, str) and data else None


def _headline(ledger_path: Path, datasets: list[str], dataset: str | None) -> tuple[str, str]:
    """(dataset, why) of the headline ε, or ("", why not)."""
    if dataset is not None:
        return dataset, "--dataset"
    data = _run_data(ledger_path)
    if data is not None:
        return data, f"the run's training data ({CONFIG_FILE} data)"
    if len(datasets) == 1:
        return datasets[0], "the ledger's only dataset"
    return "", f"no {CONFIG_FILE} beside the ledger and several datasets: pass --dataset"


def _report(report: EpsilonReport) -> dict[str, Any]:
    return {
        "epsilon": report.epsilon,
        "method": report.method,
        "certified": report.certified,
        "by_method": dict(report.by_method),
    }


def _population_rows(
    reports: dict[Population, EpsilonReport], entries: list[LedgerEntry]
) -> list[dict[str, Any]]:
    """One JSON-ready row per population: its ε and how many ledger rows compose into it."""
    return [
        {
            "dataset": p.dataset,
            "scope": p.scope,
            "rows": sum(
                1 for e in entries if e.dataset == p.dataset and e.scope in (p.scope, ALL_SCOPE)
            ),
            **_report(r),
        }
        for p, r in reports.items()
    ]


def _dataset_rows(populations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each dataset's ε per record: its worst population's."""
    worst: dict[str, dict[str, Any]] = {}
    for row in populations:
        seen = worst.get(row["dataset"])
        if seen is None or row["epsilon"] > seen["epsilon"]:
            worst[row["dataset"]] = row
    return [
        {"dataset": d, "worst_scope": r["scope"], **{k: r[k] for k in ("epsilon", "method")}}
        for d, r in worst.items()
    ]


def ledger_show(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory holding ledger.sqlite (or the file itself).")
    ],
    delta: Annotated[float, typer.Option(help="δ at which to report ε, 0 < δ < 1.")] = 1e-5,
    dataset: Annotated[
        str | None, typer.Option(help="Only rows of this dataset; its ε is the headline.")
    ] = None,
    scope: Annotated[
        str | None, typer.Option(help="Only rows affecting this scope (plus scope 'all').")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """List the ledger's releases and the certified ε each dataset and scope spends."""
    with errors():
        delta = check_delta("--delta", delta)
        path = run_dir if run_dir.is_file() else run_dir / LEDGER_FILENAME
        if not path.is_file():
            raise CliInputError(
                f"RUN_DIR must be a run directory containing {LEDGER_FILENAME}, got "
                f"{str(run_dir)!r} (no such file: {str(path)!r})"
            )
        with PrivacyLedger(path) as ledger:
            entries = ledger.entries(dataset, scope)
            datasets = [dataset] if dataset is not None else ledger.datasets()
            head, why = _headline(path, datasets, dataset)
            with progress_display() as progress:
                progress.add_task("certified ε per population", total=None)
                if scope is None:
                    reports = ledger.epsilons(delta, dataset)
                else:
                    reports = {
                        Population(d, scope): ledger.epsilon(delta, d, scope)
                        for d in datasets
                        if any(e.dataset == d for e in entries)
                    }
                headline = ledger.epsilon(delta, head, scope) if head else None
    rows = [
        {
            "id": e.id,
            "created": datetime.fromtimestamp(e.created).isoformat(timespec="seconds"),
            "dataset": e.dataset,
            "scope": e.scope,
            "count": e.count,
            "event": e.event.to_dict(),
            "description": e.event.describe(),
            "status": e.status,
            "note": e.note,
        }
        for e in entries
    ]
    populations = _population_rows(reports, entries)
    by_dataset = _dataset_rows(populations)
    empty = {"epsilon": None, "method": None, "certified": None, "by_method": {}}
    result = {
        "ledger": str(path),
        "delta": delta,
        "dataset": dataset,
        "scope": scope,
        **(empty if headline is None else _report(headline)),
        "headline": {"dataset": head or None, "scope": scope, "why": why},
        "datasets": by_dataset,
        "populations": populations,
        "entries": rows,
    }
    if json_out:
        emit_json(result)
        return
    _print(path, rows, populations, by_dataset, result)


def _print(
    path: Path,
    rows: list[dict[str, Any]],
    populations: list[dict[str, Any]],
    by_dataset: list[dict[str, Any]],
    result: dict[str, Any],
) -> None:
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
    delta = result["delta"]
    spent = Table(
        title=f"certified ε per population at δ={delta:g} (a scope's rows with its dataset's "
        "scope-'all' rows; different datasets and scopes never compose)",
        title_justify="left",
    )
    for column in ("dataset", "scope", "rows", "ε", "method", "dataset ε (worst scope)"):
        spent.add_column(column, justify="right" if column in ("rows", "ε") else "left")
    worst = {d["dataset"]: d for d in by_dataset}
    for p in populations:
        d = worst[p["dataset"]]
        mark = f"{fmt(d['epsilon'])} ({d['worst_scope']})" if d["worst_scope"] == p["scope"] else ""
        spent.add_row(
            p["dataset"], p["scope"], str(p["rows"]), fmt(p["epsilon"]), p["method"], mark
        )
    console.print(spent)
    head = result["headline"]
    if result["epsilon"] is None:
        console.print(f"headline ε spent: none named ({head['why']})")
        return
    where = f"dataset {head['dataset']!r}" + (
        f", scope {head['scope']!r}" if head["scope"] else ", its worst scope"
    )
    others = ", ".join(f"{m} {fmt(v)}" for m, v in result["by_method"].items())
    kind = "certified upper bound" if result["certified"] else "NOT certified"
    console.print(
        f"headline ε spent: {fmt(result['epsilon'])} at δ={delta:g} for {where}, "
        f"{head['why']} ({kind}, method {result['method']}; {others})"
    )
