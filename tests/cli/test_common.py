"""What every command shares: JSON values, one-line errors (ours and the parser's), the
version."""

from __future__ import annotations

import math

import pytest

from asymflow.cli.common import jsonable, option_message
from tests.cli.helpers import assert_clean_error, invoke


def test_infinity_is_written_as_the_string_inf() -> None:
    assert jsonable({"a": [math.inf, 1.0], "b": None}) == {"a": ["inf", 1.0], "b": None}


def test_version_option() -> None:
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert result.stdout.startswith("asymflow ")


def test_library_parameter_names_become_option_names() -> None:
    options = {"t_low": "--t-low", "run_dir": "RUN_DIR", "k": "--k"}
    assert (
        option_message("t_low must satisfy 1 <= t_low <= t=16, got 20", options)
        == "--t-low must satisfy 1 <= t_low <= t=16, got 20"
    )
    assert option_message("run_dir must hold a checkpoint", options).startswith("RUN_DIR must")
    # Only a whole leading name is replaced; other messages pass unchanged or take a hint.
    assert option_message("kind must be one of", options) == "kind must be one of"
    hinted = option_message("unknown data spec 'x'", options, {"spec": "--data"})
    assert hinted == "--data: unknown data spec 'x'"


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["account", "--sampler", "balanced", "--steps", "x"], "--steps"),
        (["account", "calibrate", "--bogus", "1"], "--bogus"),
        (["delta", "train", "--epochs-stage1", "1.5", "--out", "x"], "--epochs-stage1"),
        (["delta", "train", "--data", "synthetic:40"], "--out"),
        (["delta", "eval"], "RUN_DIR"),
        (["dpsgd", "train", "--sigma", "one", "--out", "x"], "--sigma"),
    ],
)
def test_parser_errors_are_one_line_naming_the_option(args: list[str], name: str) -> None:
    message = assert_clean_error(invoke(args), name)
    assert "--help" in message  # points to the command's help


def test_a_group_without_a_command_shows_its_help() -> None:
    result = invoke(["delta"])
    assert "train" in result.output
    assert "eval" in result.output
    assert "Error" not in result.output
