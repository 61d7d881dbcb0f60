"""The privacy ledger: a durable, append-only record of every release, one SQLite file per run.

Write-ahead rule: a release is recorded, and the record is committed to disk, *before* the
release happens. A crash between the two leaves a row for a release that never happened,
so the ledger can over-report the privacy loss but never under-report it. The epsilon of
a run is always recomputed from the rows; no running total is stored that could drift.

Populations: a row of ``dataset`` and ``scope`` affects the records of that dataset in that
scope, and a row of scope ``"all"`` every record of its dataset. A record lies in one dataset
and in at most one scope, so a :class:`Population` (dataset, scope) composes its own rows
with its dataset's ``"all"`` rows and nothing else: rows of two datasets (the training
records and a test split, say) or of two scopes are never composed into one figure. A
dataset's epsilon per record is the largest of its populations'.

Durability comes from SQLite's write-ahead log with ``synchronous=FULL`` (every commit is
fsynced before :meth:`PrivacyLedger.record` returns), and concurrent writers from several
processes are serialized by SQLite's file locks with a busy timeout.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from asymflow.accounting.events import Composed, Event, SelfComposed, event_from_dict
from asymflow.checks import check_delta

if TYPE_CHECKING:
    from asymflow.accounting.best import EpsilonReport

LEDGER_FILENAME = "ledger.sqlite"
"""The ledger's file name inside a run directory."""

SCHEMA_VERSION = 1
"""Version of the on-disk schema written by this module."""

ALL_SCOPE = "all"
"""The scope of a release that may touch every record of its dataset."""

PENDING = "pending"
RELEASED = "released"

_BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created REAL NOT NULL,
    dataset TEXT NOT NULL,
    scope TEXT NOT NULL,
    count INTEGER NOT NULL CHECK (count >= 1),
    event_json TEXT NOT NULL,
    note TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('pending', 'released'))
);
CREATE INDEX IF NOT EXISTS events_dataset_scope ON events (dataset, scope);
"""


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One ledger row: ``count`` adaptive repetitions of ``event`` on ``dataset``.

    ``status`` is ``"pending"`` until the caller confirms the release with
    :meth:`PrivacyLedger.mark_released`. It is informational only: pending rows count toward
    epsilon, because the release may have happened before a crash.
    """

    id: int
    created: float
    dataset: str
    scope: str
    count: int
    event: Event
    note: str
    status: str


@dataclass(frozen=True, slots=True, order=True)
class Population:
    """The records of ``dataset`` in ``scope`` (scope ``"all"``: those in no other scope)."""

    dataset: str
    scope: str


def population_events(entries: Iterable[LedgerEntry]) -> dict[Population, Event]:
    """The composed event of each population of ``entries``, in order of first row.

    A population's event is ``Composed(SelfComposed(event_i, count_i))`` over the rows of its
    dataset whose scope is its own or ``"all"``, in row order (adaptive composition of what
    can affect one of its records); there is one population per (dataset, scope) of the rows.
    """
    rows = list(entries)
    populations = dict.fromkeys(Population(e.dataset, e.scope) for e in rows)
    return {
        p: Composed(
            tuple(
                SelfComposed(e.event, e.count)
                for e in rows
                if e.dataset == p.dataset and e.scope in (p.scope, ALL_SCOPE)
            )
        )
        for p in populations
    }


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: take the write lock up front (waiting up to the busy
    timeout), so concurrent writers serialize instead of failing on a lock upgrade."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _check_text(name: str, value: object, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must be a non-empty string, got {name}={value!r}")
    return value


def _check_optional_text(name: str, value: object) -> str | None:
    return None if value is None else _check_text(name, value)


class PrivacyLedger:
    """SQLite-backed privacy ledger (one database per run directory).

    Rows are only ever appended; the only update is the informational status change
    ``pending -> released``. :meth:`composed_event` turns the rows of one population into one
    ``Composed`` event, :meth:`epsilon` bounds it (or a dataset's worst population) with the
    best available accountant, and :meth:`epsilons` lists every population's.

    Scopes model releases that touch only part of a dataset (for example one shard, or the
    queries of one user). A record in scope ``S`` is affected by rows of scope ``S`` and by
    rows of scope ``"all"``, so selecting ``scope=S`` returns both (module docstring).
    """

    def __init__(self, path: str | PathLike[str]) -> None:
        """Open ``path``, creating the database and its schema if needed.

        The parent directory must exist (use :meth:`for_run` to create a run directory).
        Raises ``ValueError`` if the file was written by an incompatible schema version.
        """
        self._path = Path(path)
        if not self._path.parent.is_dir():
            raise FileNotFoundError(
                f"path's directory must exist, got path={str(self._path)!r} "
                "(use PrivacyLedger.for_run(run_dir) to create it)"
            )
        conn = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise RuntimeError(f"could not enable WAL journal mode on {self._path}: {mode}")
            conn.execute("PRAGMA synchronous = FULL")
            self._init_schema(conn)
        except BaseException:
            conn.close()
            raise
        self._conn: sqlite3.Connection | None = conn

    @classmethod
    def for_run(cls, run_dir: str | PathLike[str]) -> PrivacyLedger:
        """Open the ledger ``run_dir/ledger.sqlite``, creating ``run_dir`` if needed."""
        directory = Path(run_dir)
        directory.mkdir(parents=True, exist_ok=True)
        return cls(directory / LEDGER_FILENAME)

    @staticmethod
    def _init_schema(conn: sqlite3.Connection) -> None:
        with _write_transaction(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )
            (found,) = conn.execute(
                "SELECT value FROM meta WHERE key = 'schema_version'"
            ).fetchone()
            if found != str(SCHEMA_VERSION):
                raise ValueError(
                    f"ledger schema_version must be {SCHEMA_VERSION}, got schema_version={found}"
                )

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError(f"the ledger at {self._path} is closed")
        return self._conn

    def record(
        self,
        event: Event,
        *,
        dataset: str,
        scope: str = ALL_SCOPE,
        count: int = 1,
        note: str = "",
    ) -> int:
        """Durably record ``count`` repetitions of ``event`` on ``dataset``; return the row id.

        Call this BEFORE the release (write-ahead rule): the row is committed and fsynced
        when this returns, so a crash after recording over-reports and never under-reports.
        The row starts as ``"pending"``; call :meth:`mark_released` once the release is done.
        """
        if not isinstance(event, Event):
            raise TypeError(f"event must be an Event, got {type(event).__name__}")
        _check_text("dataset", dataset)
        _check_text("scope", scope)
        _check_text("note", note, allow_empty=True)
        if isinstance(count, bool) or not isinstance(count, int):
            raise TypeError(f"count must be an integer, got {count!r}")
        if count < 1:
            raise ValueError(f"count must satisfy count >= 1, got count={count}")
        event_json = json.dumps(event.to_dict(), sort_keys=True, allow_nan=False)
        try:
            rebuilt = event_from_dict(json.loads(event_json))
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"event must be a serializable privacy event, got {event!r}") from exc
        if rebuilt != event:
            raise ValueError(f"event must round-trip through JSON unchanged, got {event!r}")
        conn = self._connection()
        with _write_transaction(conn):
            cursor = conn.execute(
                "INSERT INTO events (created, dataset, scope, count, event_json, note, status) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (time.time(), dataset, scope, count, event_json, note, PENDING),
            )
        row_id = cursor.lastrowid
        if row_id is None:  # pragma: no cover - sqlite always sets it after an INSERT
            raise RuntimeError("SQLite did not report the id of the recorded row")
        return row_id

    def mark_released(self, row_id: int) -> None:
        """Set row ``row_id`` from ``"pending"`` to ``"released"`` (idempotent).

        For information only: it does not change any epsilon. So its commit skips the fsync
        (``synchronous=NORMAL`` for this one transaction; the next recorded row's fsync makes
        it durable): a crash can at worst show a released row as pending, which counts the same.
        """
        if isinstance(row_id, bool) or not isinstance(row_id, int):
            raise TypeError(f"row_id must be an integer, got {row_id!r}")
        conn = self._connection()
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            with _write_transaction(conn):
                cursor = conn.execute(
                    "UPDATE events SET status = ? WHERE id = ? AND status = ?",
                    (RELEASED, row_id, PENDING),
                )
                if cursor.rowcount == 0:
                    found = conn.execute("SELECT 1 FROM events WHERE id = ?", (row_id,)).fetchone()
                    if found is None:
                        raise ValueError(
                            f"row_id must name an existing ledger row, got row_id={row_id}"
                        )
        finally:
            conn.execute("PRAGMA synchronous = FULL")

    def _select(
        self, dataset: str | None, scope: str | None
    ) -> list[tuple[int, float, str, str, int, str, str, str]]:
        dataset = _check_optional_text("dataset", dataset)
        scope = _check_optional_text("scope", scope)
        clauses: list[str] = []
        params: list[str] = []
        if dataset is not None:
            clauses.append("dataset = ?")
            params.append(dataset)
        if scope is not None:
            clauses.append("scope IN (?, ?)")
            params.extend((scope, ALL_SCOPE))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (
            "SELECT id, created, dataset, scope, count, event_json, note, status "
            f"FROM events{where} ORDER BY id"
        )
        # A single statement reads one consistent snapshot, even with concurrent writers.
        return self._connection().execute(query, params).fetchall()

    def entries(self, dataset: str | None = None, scope: str | None = None) -> list[LedgerEntry]:
        """The rows affecting a record of ``dataset`` in ``scope``, oldest first.

        ``None`` matches every dataset or every scope. ``scope=S`` selects the rows of scope
        ``S`` and of scope ``"all"``; ``scope=None`` selects all rows, the conservative
        choice when the record's scope is unknown.
        """
        return [
            LedgerEntry(
                id=row_id,
                created=created,
                dataset=ds,
                scope=sc,
                count=count,
                event=event_from_dict(json.loads(event_json)),
                note=note,
                status=status,
            )
            for row_id, created, ds, sc, count, event_json, note, status in self._select(
                dataset, scope
            )
        ]

    def datasets(self) -> list[str]:
        """The datasets of the rows, in order of first row."""
        query = "SELECT dataset FROM events GROUP BY dataset ORDER BY MIN(id)"
        return [name for (name,) in self._connection().execute(query).fetchall()]

    def _one_dataset(self, dataset: str | None) -> str | None:
        """``dataset``, or the ledger's only dataset (None when empty); several are refused."""
        if dataset is not None:
            return _check_text("dataset", dataset)
        names = self.datasets()
        if len(names) > 1:
            raise ValueError(
                f"dataset must name one of the ledger's datasets {names}, got dataset=None "
                "(rows of different datasets are different populations and never compose)"
            )
        return names[0] if names else None

    def composed_event(self, dataset: str | None = None, scope: str | None = None) -> Event:
        """The composed event of one population (see :func:`population_events`).

        ``dataset=None`` means the ledger's only dataset and ``scope=None`` that dataset's
        only scope besides ``"all"`` (whose rows it includes); a ``ValueError`` names the
        choices when there are several. Empty when no row matches.
        """
        name = self._one_dataset(dataset)
        if name is None:
            return Composed(())
        events = population_events(self.entries(name, scope))
        if scope is not None:
            return events.get(Population(name, scope), self._all_rows(events, name))
        named = [p for p in events if p.scope != ALL_SCOPE]
        if len(named) > 1:
            scopes = sorted(p.scope for p in named)
            raise ValueError(
                f"scope must name one of dataset {name!r}'s scopes {scopes}, got scope=None "
                "(rows of different scopes are different populations and never compose)"
            )
        return events[named[0]] if named else self._all_rows(events, name)

    @staticmethod
    def _all_rows(events: dict[Population, Event], dataset: str) -> Event:
        """The event of a scope without rows of its own: the dataset's ``"all"`` rows."""
        return events.get(Population(dataset, ALL_SCOPE), Composed(()))

    def epsilons(
        self,
        delta: float,
        dataset: str | None = None,
        methods: tuple[str, ...] | None = None,
    ) -> dict[Population, EpsilonReport]:
        """Certified epsilon at ``delta`` of every population (of ``dataset`` if given), each
        recomputed from its own rows; populations with the same event are bounded once."""
        check_delta("delta", delta)
        from asymflow.accounting.best import DEFAULT_METHODS, best_epsilon

        bounds: dict[Event, EpsilonReport] = {}
        out: dict[Population, EpsilonReport] = {}
        for population, event in population_events(self.entries(dataset)).items():
            if event not in bounds:
                bounds[event] = best_epsilon(event, delta, methods or DEFAULT_METHODS)
            out[population] = bounds[event]
        return out

    def epsilon(
        self,
        delta: float,
        dataset: str | None = None,
        scope: str | None = None,
        methods: tuple[str, ...] | None = None,
    ) -> EpsilonReport:
        """Certified epsilon at ``delta`` of one population, or with ``scope=None`` of one
        dataset: the largest over its populations (a record lies in one scope).

        ``dataset=None`` means the ledger's only dataset (several are refused). Delegates to
        :func:`asymflow.accounting.best.best_epsilon` (smallest valid upper bound among the
        accountants that support the event, ``methods`` if given); 0 without rows.
        """
        check_delta("delta", delta)
        from asymflow.accounting.best import DEFAULT_METHODS, best_epsilon

        name = self._one_dataset(dataset)
        if name is None or scope is not None:
            event = Composed(()) if name is None else self.composed_event(name, scope)
            return best_epsilon(event, delta, methods or DEFAULT_METHODS)
        reports = self.epsilons(delta, name, methods)
        if not reports:
            return best_epsilon(Composed(()), delta, methods or DEFAULT_METHODS)
        return max(reports.values(), key=lambda r: r.epsilon)

    def close(self) -> None:
        """Close the connection (idempotent). Committed rows are already on disk."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"PrivacyLedger({str(self._path)!r}, {state})"
