"""Shared helpers of the command-line tests: invoking the app and checking clean errors."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import click
import typer
from typer.testing import CliRunner

from asymflow.cli import app

SRC = Path(__file__).resolve().parents[2] / "src"
runner = CliRunner()


def invoke(args: list[str]) -> Any:
    return runner.invoke(app, args)


def subprocess_env() -> dict[str, str]:
    """The environment for ``python -m asymflow`` with this checkout's sources first."""
    return {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def assert_clean_error(result: Any, name: str, code: int = 2) -> str:
    """Exit ``code``, no exception or traceback, and one ``Error:`` line naming ``name``."""
    assert result.exit_code == code, (result.exit_code, result.output)
    # A clean exit (typer.Exit / SystemExit), not an exception caught by the test runner.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    message = result.stderr.strip()
    assert message.startswith("Error: "), message
    assert "\n" not in message, message
    assert name in message, message
    return message


def options_of(*path: str) -> dict[str, click.Option]:
    """The options of the command ``asymflow <path...>`` by parameter name."""
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p for p in command.params if isinstance(p, click.Option) and p.name}


def assert_documented_defaults(options: dict[str, click.Option], config: Any) -> int:
    """Each "[default: X]" in the help of an option named after a field of ``config`` is that
    field's value in ``config``; returns how many were checked."""
    checked = 0
    for name, option in options.items():
        match = re.search(r"\[default: ([^\]]+)\]", option.help or "")
        if match is None or not hasattr(config, name):
            continue
        text, value = match.group(1), getattr(config, name)
        if isinstance(value, bool):
            assert text == ("on" if value else "off"), name
        elif isinstance(value, tuple):
            assert text == ",".join(map(str, value)), name
        elif value is None:
            assert text.startswith("none"), name
        elif isinstance(value, str):
            assert text == value, name
        else:
            assert float(text) == value, name
        checked += 1
    return checked
