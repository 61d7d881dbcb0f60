"""Chaos: each long-running command is SIGKILLed at random points (fixed seeds), resumed, and
must end where an uninterrupted run ends, with a ledger that holds every row of that run and
over-counts by exactly the work the kills cut (rows written, not checkpointed), never less.

- ``dpsgd train``: killed twice (the second time while resuming), resumed in-process.
- ``delta train``: killed twice the same way.
- ``fl run``: the whole simulation (command, Ray and its actors) killed twice the same way
  (the second time while resuming through the CLI and Ray), then resumed in-process through
  the real ServerApp and ClientApp (DirectGrid), which spares a third Ray start-up.
- ``public serve``: the server (TLS, token, ``--state-dir``) killed twice at random points of
  a ``delta train --public`` session and restarted on the same address and state directory;
  the client process lives on, retries with the same request ids and must end as an
  uninterrupted in-process run, with its ledger unchanged (no release repeated). The load
  bench is ``bench/public_load.py``.

The uninterrupted reference runs in-process.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta import runs as delta_runs
from asymflow.delta.train import read_result, train_delta
from asymflow.dpsgd import runs as dpsgd_runs
from asymflow.dpsgd.train import train_dpsgd
from asymflow.federated import runs as fl_runs
from asymflow.federated.client_app import app as client_app
from asymflow.federated.server_app import serve
from asymflow.runfiles import read_metrics
from asymflow.transport.auth import KeyFiles, keygen
from tests.cli.helpers import subprocess_env
from tests.federated.direct import DirectGrid, set_task_identity

pytestmark = pytest.mark.slow

Row = tuple[str, str, int, object]

DPSGD = [
    *("dpsgd", "train", "--data", "synthetic:40", "--width", "0.25", "--k", "2", "--steps"),
    *("5", "--epochs", "4", "--method", "rdp", "--sampler-seed", "1", "--noise-seed", "2"),
    *("--sigma", "1.5"),
]
DELTA = [
    *("delta", "train", "--data", "synthetic:160", "--ir-channels", "8", "--r", "2"),
    *("--private-widths", "8,16", "--private-ranks", "2,4", "--public-width", "0.25"),
    *("--epochs-stage1", "1", "--epochs-stage2", "3", "--batch-size", "32"),
    *("--eval-batch-size", "64", "--noise-seed", "0"),
]
FL = [
    *("fl", "run", "--data", "synthetic:30", "--clients", "2", "--rounds", "6", "--q", "0.5"),
    *("--subnetwork", "split:2", "--sigma", "1", "--batch-size", "8"),
    *("--sampler-seed", "123", "--noise-seed", "456"),
]


def start(args: list[str], run: Path, *extra: str) -> subprocess.Popen[bytes]:
    """``python -m asymflow ARGS --out run`` in a session of its own (one killpg reaches all
    its processes), output discarded."""
    env = {**subprocess_env(), "RAY_TMPDIR": str(run.parent / "ray")}
    return subprocess.Popen(
        [sys.executable, "-m", "asymflow", *args, "--out", str(run), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )


def kill_at(process: subprocess.Popen[bytes], run: Path, rows: int, delay: float) -> None:
    """SIGKILL ``process``'s session ``delay`` seconds after metrics.jsonl reaches ``rows``
    rows; the run must still have been going."""
    deadline = time.monotonic() + 180
    try:
        while len(read_metrics(run)) < rows and process.poll() is None:
            assert time.monotonic() < deadline, "the run did not reach the point to kill at"
            time.sleep(0.01)
        time.sleep(delay)
        assert process.poll() is None, "the run ended before the kill"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert not (run / "result.json").exists()


def ledger_rows(run: Path) -> list[Row]:
    with PrivacyLedger(run / "ledger.sqlite") as ledger:
        return [(e.dataset, e.scope, e.count, e.event) for e in ledger.entries()]


def test_dpsgd_train_killed_twice_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rng = random.Random(41)
    cut: Counter[Row] = Counter()
    done = 0
    for extra in ((), ("--resume",)):
        before = len(ledger_rows(run)) if run.exists() else 0
        rows = done + rng.randint(1, 2)  # metrics.jsonl is truncated to the checkpoint
        kill_at(start(DPSGD, run, *extra), run, rows, rng.uniform(0.0, 0.15))
        found = dpsgd_runs.latest_checkpoint(run)
        checkpointed = 0 if found is None else found[0]
        # One row per epoch (a BIS pass), written at its first step: the rows of the epochs
        # this process started past its last checkpoint are the cut work.
        cut.update(ledger_rows(run)[before + checkpointed - done :])
        done = checkpointed
    config = dpsgd_runs.read_config(run)
    resumed = train_dpsgd(config, run, progress=False, resume=True)
    whole = train_dpsgd(config, tmp_path / "whole", progress=False)
    assert [m["test_acc"] for m in resumed.metrics] == [m["test_acc"] for m in whole.metrics]
    last = f"epoch{config.epochs}.pt"
    final = torch.load(run / "ckpt" / last, weights_only=True)["model"]
    want = torch.load(tmp_path / "whole" / "ckpt" / last, weights_only=True)["model"]
    assert all(torch.equal(final[n], want[n]) for n in want)
    assert Counter(ledger_rows(run)) == Counter(ledger_rows(tmp_path / "whole")) + cut
    assert resumed.epsilon >= whole.epsilon
    assert (resumed.epsilon == whole.epsilon) == (not cut)


def test_delta_train_killed_twice_ends_as_an_uninterrupted_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    rng = random.Random(42)
    for extra in ((), ("--resume",)):
        rows = len(read_metrics(run)) + rng.randint(1, 2)
        kill_at(start(DELTA, run, *extra), run, rows, rng.uniform(0.0, 0.15))
    config = delta_runs.read_config(run)
    resumed = train_delta(config, run, progress=False, resume=True)
    whole = train_delta(config, tmp_path / "whole", progress=False)
    assert resumed.accuracy == whole.accuracy
    assert resumed.final == whole.final
    # A cached release is reused on resume; only a row written just before a kill, whose
    # release never reached its file, is redone with a row of its own: at most one per kill,
    # each a copy of a row of the uninterrupted run.
    extra_rows = Counter(ledger_rows(run)) - Counter(ledger_rows(tmp_path / "whole"))
    assert Counter(ledger_rows(tmp_path / "whole")) <= Counter(ledger_rows(run))
    assert extra_rows.total() <= 2
    assert set(extra_rows) <= set(ledger_rows(tmp_path / "whole"))
    assert resumed.epsilon >= whole.epsilon


def test_fl_run_killed_twice_ends_as_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    rng = random.Random(43)
    cut: Counter[Row] = Counter()
    done = 0
    for extra in ((), ("--resume",)):
        before = len(ledger_rows(run)) if run.exists() else 0
        rows = len(read_metrics(run)) + 1  # a round further, then a random delay
        kill_at(start(FL, run, "--json", *extra), run, rows, rng.uniform(0.0, 0.3))
        found = fl_runs.latest_round(run)
        checkpointed = 0 if found is None else found[0]
        # Poisson: one row per round, written as it starts; the rounds this process started
        # past its last checkpoint are the cut work.
        cut.update(ledger_rows(run)[before + checkpointed - done :])
        done = checkpointed
    set_task_identity(monkeypatch)
    config = fl_runs.read_config(run)
    resumed = serve(DirectGrid(client_app, [8, 2]), config, run, resume=True)
    whole = serve(DirectGrid(client_app, [2, 8]), config, tmp_path / "whole")
    final = torch.load(run / fl_runs.FINAL_CHECKPOINT, weights_only=True)["model"]
    want = torch.load(tmp_path / "whole" / fl_runs.FINAL_CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(final[n], want[n]) for n in want)
    assert [m["test_acc"] for m in resumed.metrics] == [m["test_acc"] for m in whole.metrics]
    assert Counter(ledger_rows(run)) == Counter(ledger_rows(tmp_path / "whole")) + cut
    assert resumed.epsilon >= whole.epsilon


class PublicServe:
    """``asymflow public serve`` (TLS, token, ``--state-dir``) on ``address``; ``trains``
    counts the Train calls it has started, over every process it ran."""

    def __init__(self, keys: KeyFiles, address: str, state: Path) -> None:
        self.command = [
            *(sys.executable, "-m", "asymflow", "public", "serve", "--listen", address),
            *("--token-file", str(keys.token), "--cert", str(keys.cert), "--key", str(keys.key)),
            *("--state-dir", str(state)),
        ]
        self.trains = 0
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        """Start a server process and wait until it listens."""
        env = {**subprocess_env(), "OMP_NUM_THREADS": "1"}
        self.proc = proc = subprocess.Popen(
            self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        assert proc.stdout is not None
        assert "listening on" in proc.stdout.readline(), "\n".join(self.lines[-20:])

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            self.lines.append(line)
            self.trains += "rpc=Train phase=start" in line

    def kill(self) -> None:
        """SIGKILL the running server and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)


def test_public_serve_killed_twice_during_a_session_the_client_ends_as_uninterrupted(
    tmp_path: Path,
) -> None:
    keys = keygen(tmp_path / "keys")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    server = PublicServe(keys, address, tmp_path / "state")
    run = tmp_path / "run"
    rng = random.Random(44)
    client = None
    try:
        server.start()
        client = start(
            DELTA,
            run,
            *("--public", address, "--token-file", str(keys.token), "--ca-cert", str(keys.cert)),
        )
        # Six Train calls in the session (3 epochs, 2 cross-fitted models); kill at a random
        # moment after a random one of the first five has started, twice.
        first = rng.randint(1, 3)
        for trains in (first, rng.randint(first + 1, 5)):
            deadline = time.monotonic() + 180
            while server.trains < trains:
                assert client.poll() is None, "the client ended before the kill"
                assert time.monotonic() < deadline, "the session did not reach the kill point"
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
            assert client.poll() is None, "the client ended before the kill"
            server.kill()
            server.start()
        assert client.wait(timeout=300) == 0
    finally:
        if client is not None and client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(timeout=30)
        server.kill()
    assert sum("restored session" in line for line in server.lines) == 2
    whole = train_delta(delta_runs.read_config(run), tmp_path / "whole", progress=False)
    result = read_result(run)
    assert result["accuracy"] == whole.accuracy
    assert result["final"] == whole.to_dict()["final"]
    # The client never died: every release was recorded once, and a retried call sent the
    # same recorded bytes again.
    assert Counter(ledger_rows(run)) == Counter(ledger_rows(tmp_path / "whole"))
