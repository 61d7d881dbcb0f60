"""What every command shares: one-line errors at the command boundary, input checks, the
consoles and progress display, and JSON output.

Errors: bad input exits with code 2 and one line ``Error: ...`` on stderr that names the
option and its allowed range, never a traceback. The library raises ``ValueError`` /
``TypeError`` naming its *parameter* (``t_low must satisfy ...``); :func:`errors` rewrites a
leading parameter name into the option that sets it (``--t-low must satisfy ...``).

JSON (``--json``): exactly one object on stdout, progress on stderr. Infinite values are
written as the string ``"inf"``; ``null`` means "no such value exists".
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
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

from asymflow.checks import check_choice
from asymflow.runfiles import jsonable

# ------------------------------------------------------------------------------------ errors

INPUT_OS_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)
"""File-system errors caused by a path the user gave: bad input (exit 2), not a failure."""

DATA_HINTS = {"spec": "--data", ":PATH": "--data"}
"""Errors of :func:`asymflow.data.load_data` name the data spec, not a parameter: --data's."""

_LEADING_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?=[\s\[=(:]|$)")


class CliInputError(ValueError):
    """Bad command-line input; the message names the option and its allowed range."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print a one-line error to stderr and exit with ``code``."""
    typer.echo(f"Error: {' '.join(str(message).split())}", err=True)
    raise typer.Exit(code)


def option_message(
    message: str,
    options: Mapping[str, str] | None = None,
    hints: Mapping[str, str] | None = None,
) -> str:
    """``message`` with its leading parameter name replaced by the option in ``options``.

    If no parameter leads the message, the first ``hints`` keyword found in it prefixes its
    option (``{"spec": "--data"}``: ``unknown data spec 'x'`` -> ``--data: unknown ...``).
    """
    if options:
        match = _LEADING_NAME.match(message)
        if match and match.group(1) in options:
            return options[match.group(1)] + message[match.end() :]
    for keyword, option in (hints or {}).items():
        if keyword in message:
            return f"{option}: {message}"
    return message


@contextmanager
def errors(
    options: Mapping[str, str] | None = None, hints: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Turn the library's errors into one-line messages at the command boundary.

    ``ValueError``/``TypeError`` (``UnsupportedEventError`` is a ``ValueError``) and missing or
    existing paths exit 2, their parameter names mapped to options by :func:`option_message`;
    ``sqlite3`` and other file-system failures exit 1.
    """
    try:
        yield
    except CliInputError as exc:
        fail(str(exc))
    except (ValueError, TypeError) as exc:
        fail(option_message(str(exc) or type(exc).__name__, options, hints))
    except INPUT_OS_ERRORS as exc:
        fail(option_message(str(exc), options, hints))
    except (sqlite3.Error, OSError) as exc:
        fail(f"{type(exc).__name__}: {exc}", code=1)


def option_name(field: str) -> str:
    """The option that sets a config field: ``t_low`` -> ``--t-low``."""
    return "--" + field.replace("_", "-")


# ------------------------------------------------------------------------------------ checks


def require(name: str, value: Any, what: str) -> Any:
    if value is None:
        raise CliInputError(f"{name} is required: {what}")
    return value


def check_training_noise(
    given: Mapping[str, Any], samplers: tuple[str, ...], shuffle_hint: str
) -> None:
    """The sampler and noise options of ``dpsgd train`` / ``fl run``: shuffle is refused
    (``shuffle_hint`` says what to use instead), and exactly one of --sigma and
    --target-epsilon is given."""
    if given.get("sampler") == "shuffle":
        raise CliInputError(f"--sampler shuffle has no certified ε{shuffle_hint}")
    if "sampler" in given:
        check_choice("--sampler", given["sampler"], samplers)
    if ("sigma" in given) == ("target_epsilon" in given):
        raise CliInputError(
            "give exactly one of --sigma (noise multiplier > 0) and --target-epsilon "
            f"(> 0), got {'both' if 'sigma' in given else 'neither'}"
        )


def parse_int_list(name: str, text: str) -> tuple[int, ...]:
    """``"8,16"`` -> ``(8, 16)``: a comma-separated list of integers >= 1."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise CliInputError(
            f"{name} must be a comma-separated list of integers >= 1 such as 8,16, got {text!r}"
        )
    return values


# ------------------------------------------------------------------------------------ consoles


def err_console() -> Console:
    return Console(stderr=True)


def out_console() -> Console:
    """Console for tables on stdout; 120 columns when not a terminal (pipes, logs)."""
    console = Console()
    return console if console.is_terminal else Console(width=max(console.width, 120))


def progress_display() -> Progress:
    """A transient progress display on stderr, so stdout (tables or JSON) stays clean."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err_console(),
        transient=True,
    )


# ------------------------------------------------------------------------------------ output


def emit_json(payload: dict[str, Any]) -> None:
    """Print exactly one JSON object on stdout."""
    typer.echo(json.dumps(jsonable(payload), indent=2, allow_nan=False))


def show_run(
    out: Path, result: dict[str, Any], json_out: bool, cells: Mapping[str, str], title: str
) -> None:
    """A finished training run: ``result`` as JSON, or a one-row table of ``cells`` (column ->
    value) under ``title``, the accounting line and where the run and its ledger are."""
    if json_out:
        emit_json(result)
        return
    table = Table(title=title, title_justify="left")
    for column in cells:
        table.add_column(column, justify="right")
    table.add_row(*cells.values())
    console = out_console()
    console.print(table)
    console.print(f"accounting: {result['accounting']}", style="dim")
    console.print(
        f"wrote {out}; inspect the releases with 'asymflow ledger show {out}'", soft_wrap=True
    )


def fmt(value: float | str | None) -> str:
    """ε and similar values: 4 decimals, ``∞`` for infinity (also the JSON string ``"inf"``)."""
    if value is None:
        return "-"
    if value == "inf" or math.isinf(float(value)):
        return "∞"
    return f"{float(value):.4f}"


JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print one JSON object on stdout and nothing else.")
]
