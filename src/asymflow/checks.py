"""Parameter validators shared by the library, its configs and its command line.

Each raises ``ValueError`` with one line that names the parameter and the range it must lie
in (``k must be an integer >= 1, got 0``); ``name`` may be a field (``sigma``) or an option
(``--sigma``). This module imports nothing else from asymflow, so that every package,
``accounting`` included, may use it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import TypeVar

__all__ = [
    "check_bool",
    "check_bounded_number",
    "check_choice",
    "check_delta",
    "check_int",
    "check_noise",
    "check_number",
    "check_positive",
]

T = TypeVar("T")


def _number(value: object) -> float | None:
    """``value`` as a float if it is an int or float (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool) >= ``low`` (and <= ``high``)."""
    try:
        out = None if isinstance(value, bool) else operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        out = None
    if out is None or out < low or (high is not None and out > high):
        allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be an integer {allowed}, got {value!r}")
    return out


def check_int_pairs(first: str, a: Sequence[object], second: str, b: Sequence[object]) -> None:
    """Refuse unless ``a`` and ``b`` (one entry per group, e.g. widths and ranks) are non-empty,
    of equal length and integers >= 1."""
    if len(a) != len(b) or not a:
        raise ValueError(
            f"{first} and {second} must be non-empty and of equal length, "
            f"got {first}={tuple(a)}, {second}={tuple(b)}"
        )
    for name, values in ((first, a), (second, b)):
        for i, value in enumerate(values):
            check_int(f"{name}[{i}]", value, 1)


def check_bool(name: str, value: object) -> bool:
    """``value`` itself if it is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_positive(name: str, value: object, *, zero: bool = False) -> float:
    """``value`` as a float if it is a finite number > 0 (>= 0 with ``zero``)."""
    out = _number(value)
    if out is None or not math.isfinite(out) or out < 0 or (out == 0 and not zero):
        raise ValueError(f"{name} must be a finite number {'>=' if zero else '>'} 0, got {value!r}")
    return out


def check_number(
    name: str, value: object, low: float, high: float, *, open_low: bool = False
) -> float:
    """``value`` as a float if it is a finite number in [low, high], or (low, high]."""
    out = _number(value)
    ok = out is not None and math.isfinite(out) and low <= out <= high
    if not ok or (open_low and out == low):
        bracket = "(" if open_low else "["
        raise ValueError(f"{name} must lie in {bracket}{low}, {high}], got {value!r}")
    return float(out)  # type: ignore[arg-type]


def check_bounded_number(
    name: str, value: object, *, low: float, high: float = math.inf, open_low: bool = False
) -> float:
    """``value`` as a float if it is a non-NaN number in [low, high], or (low, high];
    infinities are allowed."""
    out = _number(value)
    if out is None or math.isnan(out):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    if not low <= out <= high or (open_low and out == low):
        below = "<" if open_low else "<="
        raise ValueError(f"{name} must satisfy {low} {below} {name} <= {high}, got {value!r}")
    return out


def check_delta(name: str, value: object) -> float:
    """``value`` as a float if 0 < value < 1 (the delta of an (epsilon, delta) bound)."""
    out = _number(value)
    if out is None or not 0 < out < 1:
        raise ValueError(f"{name} must satisfy 0 < delta < 1, got {value!r}")
    return out


def check_choice(name: str, value: T, allowed: Sequence[object]) -> T:
    """``value`` itself if it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(
            f"{name} must be one of {', '.join(str(a) for a in allowed)}, got {value!r}"
        )
    return value


def check_noise(
    sigma: float | None, target_epsilon: float | None, delta: float, clip: float
) -> None:
    """The DP noise settings of a run: exactly one of sigma (in (0, 1e6]) and target_epsilon
    (in (0, 1e4]), 0 < delta < 1, clip norm in (0, 1e6]."""
    if (sigma is None) == (target_epsilon is None):
        raise ValueError(
            "exactly one of sigma and target_epsilon must be given, got "
            f"sigma={sigma!r}, target_epsilon={target_epsilon!r}"
        )
    if sigma is not None:
        check_number("sigma", sigma, 0.0, 1e6, open_low=True)
    if target_epsilon is not None:
        check_number("target_epsilon", target_epsilon, 0.0, 1e4, open_low=True)
    check_delta("delta", delta)
    check_number("clip", clip, 0.0, 1e6, open_low=True)
