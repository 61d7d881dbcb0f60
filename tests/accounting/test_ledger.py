"""Tests for the SQLite privacy ledger: round trips, scopes, validation, and crash safety.

The kill test checks the write-ahead rule of ``asymflow.accounting.ledger``: a writer that is
SIGKILLed at random moments never leaves a release that the ledger does not count.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import (
    BalancedSampled,
    Composed,
    Event,
    Gaussian,
    Laplace,
    ModelPartitioned,
    PoissonSampled,
    SelfComposed,
)
from asymflow.accounting.ledger import (
    LEDGER_FILENAME,
    SCHEMA_VERSION,
    LedgerEntry,
    Population,
    PrivacyLedger,
    population_events,
)

SRC = Path(__file__).resolve().parents[2] / "src"

NESTED = Composed(
    (
        SelfComposed(BalancedSampled(3, 50, Gaussian(1.3)), 4),
        PoissonSampled(0.01, Gaussian(0.9)),
        SelfComposed(
            Composed((ModelPartitioned(4, Gaussian(2.0)), BalancedSampled(1, 7, Gaussian(0.7)))),
            2,
        ),
        Laplace(0.5),
    )
)


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


# --- Storage and round trips ----------------------------------------------------------------


def test_for_run_creates_the_directory_and_a_wal_database(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "r1"
    with PrivacyLedger.for_run(run_dir) as ledger:
        assert ledger.path == run_dir / LEDGER_FILENAME
        ledger.record(Gaussian(1.0), dataset="digits")
    conn = sqlite3.connect(run_dir / LEDGER_FILENAME)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version == (str(SCHEMA_VERSION),)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(events)")]
        assert columns == [
            "id",
            "created",
            "dataset",
            "scope",
            "count",
            "event_json",
            "note",
            "status",
        ]
    finally:
        conn.close()


def test_nested_events_round_trip_through_the_database(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILENAME
    with PrivacyLedger(path) as ledger:
        first = ledger.record(NESTED, dataset="cifar10", count=3, note="stage 2")
        second = ledger.record(Gaussian(4.0), dataset="cifar10", scope="queries")
    with PrivacyLedger(path) as reopened:
        entries = reopened.entries()
    assert [e.id for e in entries] == [first, second]
    assert isinstance(entries[0], LedgerEntry)
    assert entries[0].event == NESTED
    assert (entries[0].dataset, entries[0].scope, entries[0].count) == ("cifar10", "all", 3)
    assert (entries[0].note, entries[0].status) == ("stage 2", "pending")
    assert entries[1].event == Gaussian(4.0)
    assert entries[1].scope == "queries"
    assert entries[0].created <= entries[1].created


def test_composed_event_repeats_each_row_by_its_count(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / LEDGER_FILENAME) as ledger:
        ledger.record(NESTED, dataset="d", count=2)
        ledger.record(Gaussian(3.0), dataset="d", count=5)
        assert ledger.composed_event() == Composed(
            (SelfComposed(NESTED, 2), SelfComposed(Gaussian(3.0), 5))
        )
        assert ledger.composed_event(dataset="other") == Composed(())


def test_mark_released_is_informational_and_idempotent(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / LEDGER_FILENAME) as ledger:
        row = ledger.record(Gaussian(1.0), dataset="d")
        before = ledger.composed_event()
        ledger.mark_released(row)
        ledger.mark_released(row)
        assert [e.status for e in ledger.entries()] == ["released"]
        assert ledger.composed_event() == before
        with pytest.raises(ValueError, match="row_id must name an existing ledger row"):
            ledger.mark_released(row + 100)
        # The mark's commit skips its fsync; every row is still recorded with synchronous=FULL.
        assert ledger._connection().execute("PRAGMA synchronous").fetchone()[0] == 2


# --- Scopes ---------------------------------------------------------------------------------


def test_scope_selects_its_own_rows_and_the_all_scope_rows(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / LEDGER_FILENAME) as ledger:
        everywhere = ledger.record(Gaussian(1.0), dataset="d")
        shard_a = ledger.record(Gaussian(2.0), dataset="d", scope="a")
        shard_b = ledger.record(Gaussian(3.0), dataset="d", scope="b")
        other = ledger.record(Gaussian(4.0), dataset="e", scope="a")
        assert [e.id for e in ledger.entries(dataset="d", scope="a")] == [everywhere, shard_a]
        assert [e.id for e in ledger.entries(dataset="d", scope="b")] == [everywhere, shard_b]
        assert [e.id for e in ledger.entries(dataset="d", scope="all")] == [everywhere]
        assert [e.id for e in ledger.entries(dataset="d")] == [everywhere, shard_a, shard_b]
        assert [e.id for e in ledger.entries(scope="a")] == [everywhere, shard_a, other]
        assert [e.id for e in ledger.entries()] == [everywhere, shard_a, shard_b, other]
        assert ledger.composed_event(dataset="d", scope="b") == Composed(
            (SelfComposed(Gaussian(1.0), 1), SelfComposed(Gaussian(3.0), 1))
        )


def test_epsilon_is_recomputed_from_the_matching_rows(tmp_path: Path) -> None:
    delta = 1e-5
    with PrivacyLedger(tmp_path / LEDGER_FILENAME) as ledger:
        assert ledger.epsilon(delta).epsilon == 0.0
        ledger.record(Gaussian(2.0), dataset="d", count=3)
        ledger.record(Gaussian(1.0), dataset="d", scope="a")
        shard_b = ledger.epsilon(delta, dataset="d", scope="b")
        shard_a = ledger.epsilon(delta, dataset="d", scope="a")
        # Unscoped queries count every row: here the same rows as scope "a".
        assert ledger.composed_event(dataset="d") == ledger.composed_event("d", "a")
    expected_b = best_epsilon(SelfComposed(Gaussian(2.0), 3), delta)
    assert shard_b.epsilon == pytest.approx(expected_b.epsilon, rel=1e-9)
    assert shard_b.certified
    assert shard_b.method in shard_b.by_method
    assert shard_a.epsilon > shard_b.epsilon


def test_rows_of_two_datasets_never_compose_into_one_epsilon(tmp_path: Path) -> None:
    """The demo's case: training rows of "digits" and an evaluation row of "digits/test"."""
    delta = 1e-5
    train = SelfComposed(Gaussian(2.0), 4)
    test = Gaussian(1.5)
    with PrivacyLedger(tmp_path / LEDGER_FILENAME) as ledger:
        ledger.record(Gaussian(2.0), dataset="digits", scope="train", count=4)
        ledger.record(test, dataset="digits/test", scope="eval")
        assert ledger.datasets() == ["digits", "digits/test"]
        with pytest.raises(ValueError, match="dataset must name one of the ledger's datasets"):
            ledger.epsilon(delta)
        with pytest.raises(ValueError, match="dataset must name one of the ledger's datasets"):
            ledger.composed_event()
        reports = ledger.epsilons(delta)
        assert list(reports) == [Population("digits", "train"), Population("digits/test", "eval")]
        training = ledger.epsilon(delta, dataset="digits")
        evaluation = ledger.epsilon(delta, dataset="digits/test")
    assert training.epsilon == pytest.approx(best_epsilon(train, delta).epsilon, rel=1e-9)
    assert evaluation.epsilon == pytest.approx(best_epsilon(test, delta).epsilon, rel=1e-9)
    assert reports[Population("digits", "train")].epsilon == training.epsilon
    assert reports[Population("digits/test", "eval")].epsilon == evaluation.epsilon
    both = best_epsilon(Composed((train, test)), delta).epsilon
    assert max(training.epsilon, evaluation.epsilon) < both


def test_a_dataset_reports_its_worst_scope_and_each_scope_keeps_the_all_rows(
    tmp_path: Path,
) -> None:
    delta = 1e-5
    with PrivacyLedger(tmp_path / LEDGER_FILENAME) as ledger:
        ledger.record(Gaussian(3.0), dataset="d")
        ledger.record(Gaussian(1.0), dataset="d", scope="a")
        ledger.record(Gaussian(2.0), dataset="d", scope="b", count=2)
        with pytest.raises(ValueError, match=r"scope must name one of dataset 'd'.s scopes"):
            ledger.composed_event(dataset="d")
        events = population_events(ledger.entries())
        worst = ledger.epsilon(delta, dataset="d")
        scoped = {s: ledger.epsilon(delta, dataset="d", scope=s).epsilon for s in "ab"}
    assert events == {
        Population("d", "all"): Composed((SelfComposed(Gaussian(3.0), 1),)),
        Population("d", "a"): Composed(
            (SelfComposed(Gaussian(3.0), 1), SelfComposed(Gaussian(1.0), 1))
        ),
        Population("d", "b"): Composed(
            (SelfComposed(Gaussian(3.0), 1), SelfComposed(Gaussian(2.0), 2))
        ),
    }
    assert worst.epsilon == max(scoped.values())
    everything = best_epsilon(Composed(tuple(events.values())), delta).epsilon
    assert worst.epsilon < everything


def test_a_ledger_written_before_populations_still_reads(tmp_path: Path) -> None:
    """Schema 1 as earlier versions wrote it, filled by plain SQL: same file, same answers."""
    path = tmp_path / LEDGER_FILENAME
    PrivacyLedger(path).close()
    conn = sqlite3.connect(path)
    conn.execute(
        "INSERT INTO events (created, dataset, scope, count, event_json, note, status) "
        "VALUES (0, 'digits', 'all', 2, '{\"sigma\": 1.0, \"type\": \"Gaussian\"}', '', "
        "'released')"
    )
    conn.commit()
    conn.close()
    with PrivacyLedger(path) as ledger:
        assert ledger.composed_event() == Composed((SelfComposed(Gaussian(1.0), 2),))
        assert ledger.epsilon(1e-5).epsilon == pytest.approx(
            best_epsilon(SelfComposed(Gaussian(1.0), 2), 1e-5).epsilon
        )


# --- Validation -----------------------------------------------------------------------------


def test_bad_input_is_rejected_and_nothing_is_written(tmp_path: Path) -> None:
    with PrivacyLedger(tmp_path / LEDGER_FILENAME) as ledger:
        with pytest.raises(TypeError, match="event must be an Event"):
            ledger.record({"type": "Gaussian", "sigma": 1.0}, dataset="d")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="event must be a serializable privacy event"):
            ledger.record(Event(), dataset="d")
        with pytest.raises(ValueError, match="dataset must be a non-empty string"):
            ledger.record(Gaussian(1.0), dataset="")
        with pytest.raises(ValueError, match="dataset must be a non-empty string"):
            ledger.record(Gaussian(1.0), dataset="   ")
        with pytest.raises(TypeError, match="dataset must be a str"):
            ledger.record(Gaussian(1.0), dataset=None)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="scope must be a non-empty string"):
            ledger.record(Gaussian(1.0), dataset="d", scope="")
        with pytest.raises(ValueError, match="count must satisfy count >= 1"):
            ledger.record(Gaussian(1.0), dataset="d", count=0)
        with pytest.raises(TypeError, match="count must be an integer"):
            ledger.record(Gaussian(1.0), dataset="d", count=True)
        with pytest.raises(TypeError, match="count must be an integer"):
            ledger.record(Gaussian(1.0), dataset="d", count=2.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="delta must satisfy 0 < delta < 1"):
            ledger.epsilon(0.0)
        assert ledger.entries() == []


def test_closed_ledger_refuses_use(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILENAME)
    ledger.close()
    ledger.close()
    with pytest.raises(ValueError, match="closed"):
        ledger.record(Gaussian(1.0), dataset="d")


def test_missing_directory_and_foreign_schema_are_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="path's directory must exist"):
        PrivacyLedger(tmp_path / "missing" / LEDGER_FILENAME)
    path = tmp_path / LEDGER_FILENAME
    PrivacyLedger(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="schema_version must be 1"):
        PrivacyLedger(path)


def test_two_connections_interleave_writes(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILENAME
    with PrivacyLedger(path) as a, PrivacyLedger(path) as b:
        ids = [(a if i % 2 else b).record(Gaussian(1.0), dataset="d") for i in range(20)]
        assert [e.id for e in a.entries()] == ids == [e.id for e in b.entries()]


# --- Crash safety ---------------------------------------------------------------------------

# A long-lived helper imports the ledger once and forks one writer per request, so the test
# pays Python's start-up cost once. Each writer follows the write-ahead protocol: record,
# then release (append "row count" to its log and fsync), then mark the row released.
_WRITER = textwrap.dedent(
    """
    import os, signal, sys, time, traceback
    from asymflow.accounting.events import BalancedSampled, Gaussian, SelfComposed
    from asymflow.accounting.ledger import PrivacyLedger

    EVENT = SelfComposed(BalancedSampled(2, 10, Gaussian(1.5)), 3)

    def write_until_killed(db, log, dataset):
        ledger = PrivacyLedger(db)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(1, f"ready {os.getpid()}\\n".encode())
        deadline = time.monotonic() + 20.0
        i = 0
        while time.monotonic() < deadline:
            count = 1 + i % 3
            row = ledger.record(EVENT, dataset=dataset, count=count, note=f"release {i}")
            time.sleep(0.002)  # the release takes a while: widen the crash window
            os.write(fd, f"{row} {count}\\n".encode())
            os.fsync(fd)
            ledger.mark_released(row)
            i += 1

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # reap killed writers automatically
    for line in sys.stdin:
        db, log, dataset = line.split()
        if os.fork() == 0:
            try:
                write_until_killed(db, log, dataset)
            except BaseException:
                with open(log + ".err", "w") as err:
                    err.write(traceback.format_exc())
                os.write(1, b"failed\\n")
            finally:
                os._exit(0)
    """
)


def _read_line(fd: int, buffer: bytearray, timeout: float = 30.0) -> str:
    """One line from a raw pipe, failing instead of hanging if none comes within timeout."""
    deadline = time.monotonic() + timeout
    while b"\n" not in buffer:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise AssertionError("the writer helper did not answer in time")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise AssertionError("the writer helper exited")
        buffer.extend(chunk)
    line, _, rest = bytes(buffer).partition(b"\n")
    buffer[:] = rest
    return line.decode()


def _wait_gone(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.002)
    raise AssertionError(f"writer {pid} did not exit after SIGKILL")


def _releases(log: Path) -> list[tuple[int, int]]:
    if not log.exists():
        return []
    text = log.read_text()
    out = []
    for line in text.splitlines():
        row, count = line.split()
        out.append((int(row), int(count)))
    return out


def _check_never_under_reports(path: Path, log: Path, dataset: str, crashes: int) -> int:
    """Every logged release has its row; released rows were logged; at most one unlogged
    (pending) row per crash. Returns the number of logged releases."""
    releases = _releases(log)
    with PrivacyLedger(path) as ledger:
        rows = {e.id: e for e in ledger.entries(dataset=dataset)}
    logged = Counter(row for row, _ in releases)
    assert all(n == 1 for n in logged.values())
    for row, count in releases:
        assert row in rows, f"release of row {row} is missing from the ledger"
        assert rows[row].count == count
    assert sum(e.count for e in rows.values()) >= sum(c for _, c in releases)
    unlogged = [e for e in rows.values() if e.id not in logged]
    assert all(e.status == "pending" for e in unlogged)
    assert len(unlogged) <= crashes
    return len(releases)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the writer helper forks (POSIX only)")
def test_sigkilled_writers_never_leave_an_unrecorded_release(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILENAME
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
    }
    rng = random.Random(20260522)
    datasets = ("alpha", "beta")
    logs = {d: tmp_path / f"{d}.log" for d in datasets}
    crashes = Counter[str]()
    pids: list[int] = []
    helper = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        bufsize=0,
        env=env,
    )
    assert helper.stdin is not None and helper.stdout is not None
    out_fd, pending_output = helper.stdout.fileno(), bytearray()
    try:
        for round_ in range(6):
            # Two concurrent writers on the same database, killed at independent random times.
            for d in datasets:
                helper.stdin.write(f"{path} {logs[d]} {d}\n".encode())
            ready = [_read_line(out_fd, pending_output).split() for _ in datasets]
            assert all(r[:1] == ["ready"] for r in ready), ready
            pids = [int(r[1]) for r in ready]
            start = time.monotonic()
            for delay, pid in sorted((rng.uniform(0.0, 0.25), pid) for pid in pids):
                time.sleep(max(0.0, start + delay - time.monotonic()))
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for pid in pids:
                _wait_gone(pid)
            pids = []
            assert not list(tmp_path.glob("*.err")), "a writer failed before it was killed"
            for d in datasets:
                crashes[d] += 1
                _check_never_under_reports(path, logs[d], d, crashes[d])
            assert _integrity(path) == "ok"
            # Reopen after the crash and keep writing, following the same protocol.
            with PrivacyLedger(path) as ledger:
                d = datasets[round_ % 2]
                row = ledger.record(Gaussian(1.0), dataset=d, count=2)
                with logs[d].open("a") as f:
                    f.write(f"{row} 2\n")
                ledger.mark_released(row)
        total = sum(_check_never_under_reports(path, logs[d], d, crashes[d]) for d in datasets)
        assert total > 12, "the writers should have completed some releases before the kills"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        helper.stdin.close()
        helper.kill()
        helper.wait(timeout=10)
        helper.stdout.close()
    assert _integrity(path) == "ok"
