"""Run a federated training on one machine with Flower's simulation engine (Ray backend).

:func:`run_federated` starts ``config.clients`` virtual SuperNodes (``partition-id`` i of
``num-partitions`` N each) running :data:`asymflow.federated.client_app.app`, and the
ServerApp of :func:`asymflow.federated.server_app.make_server_app`, through
``flwr.simulation.run_simulation``. Ray keeps its sockets and logs in ``RAY_TMPDIR``:
``ray_tmpdir`` if given, else the environment's ``RAY_TMPDIR``, else a fresh temporary
directory (removed afterwards). Ray is shut down at the end, and the environment variables
Flower and Ray change (``RAY_TMPDIR``, ``PYTHONPATH``) are restored, also on errors; the
ServerApp thread is told to give up if the engine stops first (:class:`StoppableGrid`).

``config.parallelism`` Ray CPUs are reserved, one per client actor, so at most that many
clients train at once; every client process uses ``config.threads`` torch threads.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from asymflow.federated.config import FederatedConfig
from asymflow.federated.runs import RESULT_FILE, FederatedResult, check_resumable, read_result
from asymflow.runfiles import SAMPLING_NOISE_SEEDS

__all__ = ["SimulationStoppedError", "StoppableGrid", "backend_config", "run_federated"]

_RAY_OBJECT_STORE_BYTES = 128 * 1024 * 1024
_MAX_RAY_TMPDIR = 36
"""Longest RAY_TMPDIR used as is: Ray appends about 70 bytes for its socket paths."""


def backend_config(config: FederatedConfig) -> dict[str, dict[str, int | float | bool | str]]:
    """Flower's simulation backend config: ``parallelism`` CPUs, one per client actor, a small
    object store, no dashboard."""
    return {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": config.parallelism,
            "num_gpus": 0,
            "include_dashboard": False,
            "object_store_memory": _RAY_OBJECT_STORE_BYTES,
        },
    }


class StoppableGrid(Grid):
    """A ``Grid`` that delegates to ``grid`` but gives up waiting once ``stop`` is set.

    Flower's simulation runs the ServerApp in a non-daemon thread that waits for nodes and
    replies without end; if the simulation engine (Ray) crashes, that thread would keep the
    process alive. :func:`run_federated` sets ``stop`` when ``run_simulation`` returns, and
    the next wait in this grid raises :class:`SimulationStoppedError`.
    """

    def __init__(self, grid: Grid, stop: threading.Event, *, poll_interval: float = 0.1) -> None:
        self._grid = grid
        self._stop = stop
        self._poll = poll_interval

    def _check(self) -> None:
        if self._stop.is_set():
            raise SimulationStoppedError("the simulation engine stopped; ending the ServerApp")

    def set_run(self, run: Run) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Run:
        return self._grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        self._check()
        return self._grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        self._check()
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._check()
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Push, then pull until every reply is in, ``timeout`` passes, or ``stop`` is set."""
        pending = set(self.push_messages(messages))
        end = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (end is None or time.monotonic() < end):
            self._check()
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self._poll)
        return replies


class SimulationStoppedError(RuntimeError):
    """The simulation engine ended while the ServerApp was still waiting."""


@contextmanager
def _ray_environment(ray_tmpdir: str | None) -> Iterator[str]:
    """Set ``RAY_TMPDIR`` (given, else the environment's, else a fresh temporary directory),
    shut Ray down and restore ``RAY_TMPDIR`` and ``PYTHONPATH`` afterwards.

    Ray binds unix sockets at ``RAY_TMPDIR/ray/session_<time>_<pid>/sockets/plasma_store``,
    which must stay under 108 bytes; a longer directory (pytest's ``tmp_path``, say) is
    reached through a short symbolic link in the system's temporary directory.
    """
    saved = {key: os.environ.get(key) for key in ("RAY_TMPDIR", "PYTHONPATH")}
    scratch = tempfile.mkdtemp(prefix="afray-", dir="/tmp" if os.path.isdir("/tmp") else None)
    target = ray_tmpdir or saved["RAY_TMPDIR"]
    if target is None:
        path = scratch
    else:
        Path(target).mkdir(parents=True, exist_ok=True)
        path = str(Path(target).absolute())
        if len(path) > _MAX_RAY_TMPDIR:
            link = os.path.join(scratch, "r")
            os.symlink(path, link)
            path = link
    os.environ["RAY_TMPDIR"] = path
    try:
        yield path
    finally:
        try:
            import ray

            if ray.is_initialized():
                ray.shutdown()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            shutil.rmtree(scratch, ignore_errors=True)


def run_federated(
    config: FederatedConfig,
    run_dir: str | os.PathLike[str],
    progress: bool = True,
    *,
    ray_tmpdir: str | os.PathLike[str] | None = None,
    verbose: bool = False,
    resume: bool = False,
) -> FederatedResult:
    """Simulate ``config`` into the new directory ``run_dir`` and return its summary.

    Writes config.json, metrics.jsonl (per round), ledger.sqlite (before each release),
    ckpt/round{N}.pt, ckpt/final.pt, result.json, report.md and report.png. Refuses an existing
    run directory unless ``resume``: then the run there (same config) continues from its last
    completed round, and a finished one is summarized without starting the engine.
    ``verbose`` keeps Flower's per-round INFO logs (otherwise only warnings are shown).
    """
    if not isinstance(config, FederatedConfig):
        raise TypeError(f"config must be a FederatedConfig, got {type(config).__name__}")
    run_path = Path(run_dir)
    resuming = check_resumable(run_path, config, resume, seed_pair=SAMPLING_NOISE_SEEDS)
    if resuming and (run_path / RESULT_FILE).is_file():
        return read_result(run_path)
    from flwr.simulation import run_simulation

    from asymflow.federated.client_app import app as client_app
    from asymflow.federated.server_app import make_server_app

    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    try:
        with _ray_environment(None if ray_tmpdir is None else str(ray_tmpdir)):
            stop = threading.Event()
            server_app = make_server_app(
                config,
                run_path,
                progress=progress,
                resume=resume,
                wrap_grid=lambda g: StoppableGrid(g, stop),
            )
            try:
                run_simulation(
                    server_app=server_app,
                    client_app=client_app,
                    num_supernodes=config.clients,
                    backend_config=backend_config(config),  # type: ignore[arg-type]
                )
            finally:
                stop.set()
    finally:
        flwr_logger.setLevel(level)
    return read_result(run_path)
