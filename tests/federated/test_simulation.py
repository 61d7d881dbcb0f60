"""A real Flower simulation (Ray backend): 2 clients, 2 rounds, Poisson sampling with a
random-subnetwork split; the reported client-level epsilon is the expected composed event's.
And the grid wrapper that lets the ServerApp thread end when the engine stops first."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import ray
from flwr.serverapp import Grid

from asymflow.accounting import (
    Gaussian,
    ModelPartitioned,
    PoissonSampled,
    SelfComposed,
    best_epsilon,
)
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.federated import FederatedConfig, run_federated
from asymflow.federated.runs import read_metrics
from asymflow.federated.simulation import SimulationStoppedError, StoppableGrid


@pytest.mark.slow
def test_two_client_simulation_reports_the_expected_client_level_epsilon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))  # longer than Ray's socket limit

    config = FederatedConfig(
        data="synthetic:40",
        clients=2,
        rounds=2,
        sampler="poisson",
        q=0.5,
        subnetwork="split:2",
        sigma=1.0,
        batch_size=10,
        sampler_seed=1,
        noise_seed=2,
    )
    before = {key: os.environ.get(key) for key in ("RAY_TMPDIR", "PYTHONPATH")}
    result = run_federated(config, tmp_path / "run", progress=False)

    expected = SelfComposed(PoissonSampled(0.5, ModelPartitioned(2, Gaussian(1.0))), 2)
    want = best_epsilon(expected, config.delta)
    assert result.epsilon == pytest.approx(want.epsilon, rel=1e-12)
    assert result.method == want.method
    assert [m["round"] for m in read_metrics(tmp_path / "run")] == [0, 1, 2]
    with PrivacyLedger(tmp_path / "run" / "ledger.sqlite") as ledger:
        assert [e.event for e in ledger.entries()] == [expected.event] * 2
        assert all(e.status == "released" for e in ledger.entries())
    assert (tmp_path / "run" / "report.png").is_file()
    assert not ray.is_initialized()
    assert {key: os.environ.get(key) for key in before} == before
    assert (tmp_path / "ray" / "ray").is_dir()  # Ray's session files went to RAY_TMPDIR


def test_stoppable_grid_stops_waiting_once_the_engine_has_stopped() -> None:
    class SilentGrid(Grid):
        """Accepts messages and never replies."""

        def set_run(self, run: Any) -> None:  # pragma: no cover - unused
            raise NotImplementedError

        @property
        def run(self) -> Any:  # pragma: no cover - unused
            raise NotImplementedError

        def create_message(self, *args: Any, **kwargs: Any) -> Any:  # pragma: no cover
            raise NotImplementedError

        def get_node_ids(self) -> Iterable[int]:
            return [1, 2]

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            return [str(i) for i, _ in enumerate(messages)]

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            return []

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Any:
            raise AssertionError("StoppableGrid must not delegate its waiting")  # pragma: no cover

    stop = threading.Event()
    grid = StoppableGrid(SilentGrid(), stop, poll_interval=0.01)
    assert list(grid.get_node_ids()) == [1, 2]
    assert list(grid.send_and_receive(["m"], timeout=0.05)) == []  # timeout still honoured
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    began = time.monotonic()
    with pytest.raises(SimulationStoppedError):
        grid.send_and_receive(["m"], timeout=None)
    assert time.monotonic() - began < 5
    with pytest.raises(SimulationStoppedError):
        grid.get_node_ids()
