"""Run-configuration fields that document themselves: :func:`setting` is a dataclass field
whose metadata holds its help text (what it sets and its allowed range), its help panel and
the names of its values. :mod:`asymflow.cli.options` makes each such field a command-line
option; the config's ``__post_init__`` stays the one place that checks the values.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any

__all__ = ["setting"]


def setting(
    default: Any,
    help: str,
    panel: str,
    *,
    choices: tuple[str, ...] = (),
    metavar: str | None = None,
    unset: str | None = None,
) -> Any:
    """A field defaulting to ``default``, shown in the help panel ``panel`` as ``help``.

    ``choices`` lists the allowed strings (shown as ``[a|b]`` unless ``metavar`` is given);
    ``unset`` says what a default of None means (``"the OS's secure source"``).
    """
    return field(
        default=default,
        metadata={
            "help": help,
            "panel": panel,
            "metavar": metavar or (f"[{'|'.join(choices)}]" if choices else None),
            "unset": unset,
        },
    )
