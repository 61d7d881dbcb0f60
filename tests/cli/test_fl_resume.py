"""``asymflow fl run --resume`` after a SIGKILL of the whole simulation (the command, Ray and
its actors) at a random round: the resumed run equals an uninterrupted one bit for bit (fixed
seeds), and the ledger keeps the cut round's row, over-counting by exactly the rounds that were
recorded but not checkpointed. And the clean errors of a resume with other options."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.federated.client_app import app as client_app
from asymflow.federated.config import FederatedConfig
from asymflow.federated.runs import (
    FINAL_CHECKPOINT,
    atomic_write_json,
    latest_round,
    read_metrics,
)
from asymflow.federated.server_app import serve
from tests.cli.helpers import assert_clean_error, invoke, subprocess_env
from tests.federated.direct import DirectGrid, set_task_identity

ROUNDS = 4
OPTIONS = [
    *("--data", "synthetic:30", "--clients", "2", "--rounds", str(ROUNDS), "--q", "0.5"),
    *("--subnetwork", "split:2", "--sigma", "1", "--batch-size", "8"),
    *("--sampler-seed", "123", "--noise-seed", "456"),
]
CONFIG = FederatedConfig(
    data="synthetic:30",
    clients=2,
    rounds=ROUNDS,
    q=0.5,
    subnetwork="split:2",
    sigma=1.0,
    batch_size=8,
    sampler_seed=123,
    noise_seed=456,
)


def fl_run(run: Path, ray_tmpdir: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``python -m asymflow fl run --out run ARGS --json`` in its own session (so that one
    killpg reaches Ray's processes too); returns it and the file holding its stdout."""
    env = {**subprocess_env(), "RAY_TMPDIR": str(ray_tmpdir)}
    out = run.parent / f"{run.name}-{time.monotonic_ns()}.out"
    with out.open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "asymflow", "fl", "run", "--out", str(run), *args, "--json"],
            stdout=stdout,
            stderr=stderr,
            env=env,
            start_new_session=True,
        )
    return process, out


def kill_after_round(process: subprocess.Popen[bytes], run: Path, cut: int) -> None:
    """SIGKILL ``process``'s whole session as soon as round ``cut``'s metrics row exists."""
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if any(m["round"] >= cut for m in read_metrics(run)):
                break
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before the kill"
        assert time.monotonic() < deadline, "the run did not reach the round to kill in"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def reference_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The uninterrupted run, in-process (DirectGrid: the same ServerApp and ClientApp)."""
    set_task_identity(monkeypatch)
    serve(DirectGrid(client_app, [5, 3]), CONFIG, tmp_path / "whole")
    return tmp_path / "whole"


def row_count(run: Path) -> int:
    with PrivacyLedger(run / "ledger.sqlite") as ledger:
        return len(ledger.entries())


@pytest.mark.slow
def test_fl_run_killed_at_a_random_round_resumes_to_the_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cut = random.Random(13).randint(1, ROUNDS - 1)
    run, ray = tmp_path / "run", tmp_path / "ray"
    kill_after_round(fl_run(run, ray, *OPTIONS)[0], run, cut)
    assert not (run / "result.json").exists()
    found = latest_round(run)
    done = 0 if found is None else found[0]
    recorded = row_count(run)  # Poisson: one row per round, written before its release
    assert done <= recorded <= done + 1  # at most the cut round is recorded, not checkpointed

    resumed, out = fl_run(run, ray, "--resume")
    assert resumed.wait(timeout=240) == 0, out.with_suffix(".err").read_text()
    payload = json.loads(out.read_text())

    whole = reference_run(tmp_path, monkeypatch)
    final = torch.load(run / FINAL_CHECKPOINT, weights_only=True)["model"]
    want = torch.load(whole / FINAL_CHECKPOINT, weights_only=True)["model"]
    assert all(torch.equal(final[name], want[name]) for name in want)
    got_metrics, want_metrics = read_metrics(run), read_metrics(whole)
    assert [(m["round"], m["test_acc"]) for m in got_metrics] == [
        (m["round"], m["test_acc"]) for m in want_metrics
    ]
    assert row_count(run) == ROUNDS + (recorded - done)  # the cut round's row is kept
    assert payload["epsilon"] >= json.loads((whole / "result.json").read_text())["epsilon"]
    assert payload["epsilon"] == got_metrics[-1]["epsilon"]


def test_fl_run_on_an_existing_run_needs_resume_and_the_same_options(tmp_path: Path) -> None:
    run = tmp_path / "run"
    atomic_write_json(run / "config.json", CONFIG.to_dict())
    assert_clean_error(invoke(["fl", "run", "--out", str(run), *OPTIONS]), "--resume")
    message = assert_clean_error(
        invoke(["fl", "run", "--out", str(run), "--resume", "--sigma", "2"]),
        "these options differ: --sigma (run: 1.0, given: 2.0)",
    )
    assert "--resume" in message
    assert not (run / "ledger.sqlite").exists()
