"""Progress bars of long training runs, on stderr so that stdout (tables, JSON) stays clean."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)


class EpochBars:
    """Two rich bars: the epochs (or rounds) of a stage, and the steps of the current one.

    ``with EpochBars(enabled, title) as bars``: ``stage`` opens the outer bar (with the
    epochs ``done`` before a resume), ``start_batches`` a fresh inner bar per epoch, ``batch``
    and ``epoch_done`` advance them with a short info text. Disabled bars draw nothing.
    """

    def __init__(self, enabled: bool, title: str) -> None:
        self.title = title
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.epochs: TaskID | None = None
        self.batches: TaskID | None = None

    def __enter__(self) -> EpochBars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def stage(self, name: str, total: int, done: int) -> None:
        """Open the outer bar ``title name`` of ``total`` epochs, ``done`` of them already."""
        if self.batches is not None:
            self.progress.remove_task(self.batches)
            self.batches = None
        description = f"{self.title} {name}".strip()
        self.epochs = self.progress.add_task(description, total=total, completed=done, info="")

    def start_batches(self, what: str, total: int | None) -> None:
        """Replace the inner bar by a fresh one of ``total`` steps (None: unknown)."""
        if self.batches is not None:
            self.progress.remove_task(self.batches)
        self.batches = self.progress.add_task(f"  {what}", total=total, info="")

    def batch(self, info: str = "") -> None:
        """One step of the inner bar done."""
        if self.batches is not None:
            self.progress.update(self.batches, advance=1, info=info)

    def epoch_done(self, info: str) -> None:
        """One epoch of the outer bar done."""
        if self.epochs is not None:
            self.progress.update(self.epochs, advance=1, info=info)

    def epoch_at(self, completed: int, info: str) -> None:
        """Set the outer bar to ``completed`` epochs (rounds reported out of order)."""
        if self.epochs is not None:
            self.progress.update(self.epochs, completed=completed, info=info)
