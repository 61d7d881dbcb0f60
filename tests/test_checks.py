"""The shared validators: their one-line refusals, and their place as a leaf of the package."""

from __future__ import annotations

import ast
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import asymflow
from asymflow.checks import (
    check_bool,
    check_bounded_number,
    check_choice,
    check_delta,
    check_int,
    check_int_pairs,
    check_noise,
    check_number,
    check_positive,
)

PACKAGE = Path(asymflow.__file__).parent


def _asymflow_imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return {n for n in names if n == "asymflow" or n.startswith("asymflow.")}


def test_checks_imports_nothing_from_asymflow() -> None:
    assert _asymflow_imports(PACKAGE / "checks.py") == set()


def test_accounting_imports_only_itself_and_checks() -> None:
    for path in (PACKAGE / "accounting").glob("*.py"):
        outside = {
            n
            for n in _asymflow_imports(path)
            if not n.startswith("asymflow.accounting") and n != "asymflow.checks"
        }
        assert outside == set(), path.name


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: check_int("k", 0, 1), "k must be an integer >= 1, got 0"),
        (lambda: check_int("k", True, 0), "k must be an integer >= 0, got True"),
        (lambda: check_int("k", 1.0, 0), "k must be an integer >= 0, got 1.0"),
        (lambda: check_int("--days", 0, 1, 3650), r"--days must be an integer in \[1, 3650\]"),
        (lambda: check_int_pairs("w", (8,), "r", ()), r"w and r must be non-empty and of equal"),
        (lambda: check_int_pairs("w", (), "r", ()), r"got w=\(\), r=\(\)"),
        (lambda: check_int_pairs("w", (8, 0), "r", (2, 2)), r"w\[1\] must be an integer >= 1"),
        (lambda: check_int_pairs("w", (8,), "r", (2.5,)), r"r\[0\] must be an integer >= 1"),
        (lambda: check_bool("flip", 1), "flip must be a bool, got 1"),
        (lambda: check_positive("clip", math.inf), "clip must be a finite number > 0, got inf"),
        (lambda: check_positive("sigma", -1, zero=True), "sigma must be a finite number >= 0"),
        (lambda: check_number("q", 0.0, 0.0, 1.0, open_low=True), r"q must lie in \(0.0, 1.0\]"),
        (lambda: check_number("m", math.nan, 0.0, 1.0), r"m must lie in \[0.0, 1.0\]"),
        (lambda: check_bounded_number("lr", 0, low=0, high=10, open_low=True), "0 < lr <= 10"),
        (lambda: check_bounded_number("a", "x", low=0), r"a must be a number in \[0, inf\]"),
        (lambda: check_delta("--delta", 1.0), "--delta must satisfy 0 < delta < 1, got 1.0"),
        (lambda: check_choice("--m", "x", ("rdp", "pld")), "--m must be one of rdp, pld, got 'x'"),
        (lambda: check_noise(None, None, 1e-5, 1.0), "exactly one of sigma and target_epsilon"),
        (lambda: check_noise(1.0, None, 1e-5, 0.0), r"clip must lie in \(0.0"),
    ],
)
def test_refusals_name_the_parameter_and_its_range(
    call: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_accepted_values_come_back_converted() -> None:
    assert check_int("n", np.int64(3), 1) == 3
    assert check_positive("c", 2) == 2.0
    assert check_positive("s", 0, zero=True) == 0.0
    assert check_bounded_number("e", math.inf, low=0, open_low=True) == math.inf
    assert check_delta("delta", 1e-5) == 1e-5
    assert check_choice("arch", "resnet18", ("resnet18",)) == "resnet18"
