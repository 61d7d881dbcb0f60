"""The two environments for real: a public server process on loopback with TLS and a token.

Delta trained through it matches the in-process run exactly; malformed, unauthenticated or
oversized calls are refused with the right status while the server keeps serving; and a
server killed mid-upload and mid-training (SIGKILL) is restarted, the client resumes with the
same request ids, and nothing is released twice outside the ledger.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch

from asymflow.accounting.events import Gaussian
from asymflow.accounting.ledger import LEDGER_FILENAME, PrivacyLedger
from asymflow.data import load_data
from asymflow.delta.contract import dataset_id
from asymflow.delta.infer import infer, load_system
from asymflow.delta.runs import read_metrics
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.delta.train import train_delta
from asymflow.transport import wire
from asymflow.transport.auth import KeyFiles, read_token
from asymflow.transport.client import PublicServerError, RemotePublic, RetryPolicy
from asymflow.transport.server import SERVICE
from asymflow.transport.spec import PublicSpec
from tests.delta.conftest import tiny_config
from tests.transport.conftest import ServerProcess, free_port, tls_args

CONFIG = tiny_config(epochs_stage2=2)
"""Two stage-2 epochs with two cross-fitted public models: four Train calls per run."""

MAX_MESSAGE = 1 << 20
SHAPE = (CONFIG.ir_channels, 16, 16)
SPEC = PublicSpec.from_config(CONFIG, classes=10, shape=SHAPE)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run with the in-process public side."""
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_delta(CONFIG, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def server(keys: KeyFiles) -> Iterator[ServerProcess]:
    """``asymflow public serve`` with TLS, a token and a 1 MiB message limit.
    Tests call ``server.ready()``: the process starts while the reference run trains."""
    process = ServerProcess(
        [*tls_args(keys), "--max-message-mb", str(MAX_MESSAGE >> 20)], wait=False
    )
    yield process
    process.stop()
    assert process.proc.returncode == 0, "\n".join(process.lines[-20:])


def remote(address: str, keys: KeyFiles, **kwargs: Any) -> RemotePublic:
    return RemotePublic(address, root_cert=keys.cert, token_file=keys.token, **kwargs)


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k != "seconds"} for row in read_metrics(run_dir)]


def ledger_rows(run_dir: Path) -> list[tuple[Any, ...]]:
    with PrivacyLedger(run_dir / LEDGER_FILENAME) as ledger:
        return [(e.dataset, e.scope, e.count, e.event, e.note) for e in ledger.entries()]


# ------------------------------------------------------------------------- end to end


def test_delta_through_the_server_matches_the_in_process_run_exactly(
    server, keys, reference, tmp_path
):
    server.ready()
    run_dir = tmp_path / "remote"
    with remote(server.address, keys, config=CONFIG) as public:
        result = train_delta(CONFIG, run_dir, progress=False, public=public)
        assert public.spec == SPEC
    # Same seeds, same float32 ops on one thread on both sides: bit-identical, not approximate.
    assert metric_rows(run_dir) == metric_rows(reference)
    assert result.final == train_result_final(reference)
    assert ledger_rows(run_dir) == ledger_rows(reference)

    # Inference: a fresh session receives the checkpointed M_res; queries sanitized with the
    # same seed give the same logits as the in-process public side.
    images = load_data(CONFIG.data).test.images
    with RemotePublic.for_run(
        run_dir, server.address, root_cert=keys.cert, token_file=keys.token
    ) as public:
        system = load_system(run_dir, public=public, seed=11)
        with PrivacyLedger(tmp_path / "q1.sqlite") as ledger:
            z_remote = infer(system, images, batch_size=16, ledger=ledger, dataset="q")
        assert public.server_seconds > 0
    local = load_system(reference, seed=11)
    with PrivacyLedger(tmp_path / "q2.sqlite") as ledger:
        z_local = infer(local, images, batch_size=16, ledger=ledger, dataset="q")
    assert torch.equal(z_remote, z_local)
    labels = torch.from_numpy(load_data(CONFIG.data).test.labels)
    accuracy = float((z_remote.argmax(1) == labels).float().mean())
    assert accuracy == float((z_local.argmax(1) == labels).float().mean())


def test_a_padded_run_through_the_server_matches_the_in_process_run(server, keys, tmp_path):
    config = tiny_config(epochs_stage2=2, release="padded", sample_k=1, slots=180)
    local = train_delta(config, tmp_path / "local", progress=False)
    server.ready()
    with remote(server.address, keys, config=config) as public:
        result = train_delta(config, tmp_path / "remote", progress=False, public=public)
    assert metric_rows(tmp_path / "remote") == metric_rows(tmp_path / "local")
    assert result.final == local.final
    assert ledger_rows(tmp_path / "remote") == ledger_rows(tmp_path / "local")


def train_result_final(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "result.json").read_text())["final"]


# ------------------------------------------------------------------------- refusals


def call(
    address: str,
    keys: KeyFiles,
    method: str,
    request: bytes,
    *,
    token: str | None = "file",
    tls: bool = True,
) -> tuple[grpc.StatusCode, str]:
    """One raw call (no retries): the status code and details."""
    token = read_token(keys.token) if token == "file" else token
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    if tls:
        creds = grpc.ssl_channel_credentials(keys.cert.read_bytes())
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        stub = channel.unary_unary(f"/{SERVICE}/{method}")
        try:
            stub(request, timeout=20, metadata=metadata)
        except grpc.RpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def configured_session(address: str, keys: KeyFiles) -> str:
    session = "5" * 32
    request = wire.encode(wire.ConfigureRequest(session, SPEC))
    assert call(address, keys, "Configure", request)[0] == grpc.StatusCode.OK
    return session


def residual(shape: tuple[int, int, int] = SHAPE, n: int = 2) -> SanitizedResidual:
    rng = np.random.default_rng(0)
    bits = np.packbits(rng.random((n, math.prod(shape))) > 0.5, axis=1)
    return SanitizedResidual(bits, shape, Gaussian(1.0))


def upload_request(session: str, data: SanitizedResidual) -> bytes:
    return wire.encode(wire.UploadRequest(session, "6" * 32, 0, 1, data, None))


def logits_request(session: str) -> bytes:
    return wire.encode(wire.LogitsRequest(session, residual()))


def with_version(raw: bytes, version: int) -> bytes:
    return raw[:4] + struct.pack(">H", version) + raw[6:]


def with_payload_version(raw: bytes, version: int) -> bytes:
    env = wire.unpack(raw)
    meta = {**env.meta, "data": {**env.meta["data"], "version": version}}
    return wire.pack(env.kind, meta, env.arrays)


REFUSALS = {
    "bad token": (
        lambda s: ("Health", wire.encode(wire.Empty()), {"token": "x" * 32}),
        grpc.StatusCode.UNAUTHENTICATED,
        "bearer token",
    ),
    "no token": (
        lambda s: ("Health", wire.encode(wire.Empty()), {"token": None}),
        grpc.StatusCode.UNAUTHENTICATED,
        "bearer token",
    ),
    "no TLS": (
        lambda s: ("Health", wire.encode(wire.Empty()), {"tls": False}),
        grpc.StatusCode.UNAVAILABLE,
        "",
    ),
    "oversized payload": (
        lambda s: ("Upload", upload_request(s, residual(n=5000)), {}),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "larger than max",
    ),
    "wrong shape": (
        lambda s: ("Upload", upload_request(s, residual((4, 16, 16))), {}),
        grpc.StatusCode.INVALID_ARGUMENT,
        r"agreed residual shape (8, 16, 16)",
    ),
    "wrong protocol version": (
        lambda s: ("Upload", with_version(upload_request(s, residual()), 2), {}),
        grpc.StatusCode.FAILED_PRECONDITION,
        "protocol version must be 1, got 2",
    ),
    "wrong payload version": (
        lambda s: ("Logits", with_payload_version(logits_request(s), 9), {}),
        grpc.StatusCode.FAILED_PRECONDITION,
        "version must be 1",
    ),
    "garbage bytes": (
        lambda s: ("Train", bytes(range(256)) * 3, {}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "magic",
    ),
    "request of another kind": (
        lambda s: ("Train", upload_request(s, residual()), {}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "kind must be 3",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refused_calls_get_the_right_status_and_the_server_keeps_serving(server, keys, case):
    server.ready()
    session = configured_session(server.address, keys)
    build, expected, words = REFUSALS[case]
    method, request, options = build(session)
    code, details = call(server.address, keys, method, request, **options)
    assert code == expected, details
    assert words in details
    # Still serving, and the refused request left nothing behind.
    with remote(server.address, keys, spec=SPEC) as probe:
        health = probe.health()
    assert health.status == "serving" and server.proc.poll() is None
    state = wire.decode(
        call_ok(server.address, keys, "GetState", wire.encode(wire.StateRequest(session))),
        wire.StateReply,
    )
    assert state.models == ()
    train = wire.TrainRequest(session, "7" * 32, dataset_id(residual(), None), 1, 8, 0.1, 0)
    code, details = call(server.address, keys, "Train", wire.encode(train))
    assert code == grpc.StatusCode.NOT_FOUND, details  # no data set was kept


def call_ok(address: str, keys: KeyFiles, method: str, request: bytes) -> bytes:
    creds = grpc.ssl_channel_credentials(keys.cert.read_bytes())
    metadata = (("authorization", f"Bearer {read_token(keys.token)}"),)
    with grpc.secure_channel(address, creds) as channel:
        return channel.unary_unary(f"/{SERVICE}/{method}")(request, timeout=20, metadata=metadata)


def test_a_client_without_tls_gives_up_with_unavailable_after_its_retry_budget(server, keys):
    server.ready()
    quick = RetryPolicy(initial=0.05, max_delay=0.1, deadline=0.5)
    public = RemotePublic(server.address, spec=SPEC, insecure=True, retry=quick)
    with public, pytest.raises(PublicServerError) as err:
        public.health()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


# ------------------------------------------------------------------------- kill and resume


class KillAndRestart:
    """SIGKILL the server at chosen log lines; a warm spare takes over the same port.

    ``kill_at`` holds (text, after, count): kill the current process at its first line with
    ``text`` once ``count`` of its lines contain ``after``. Counting completed calls rather
    than started ones keeps the kill point fixed when an earlier kill lands late (a call may
    finish before SIGKILL arrives) and a retried call is first refused by the new process.
    """

    def __init__(
        self, keys: KeyFiles, state_dir: Path, kill_at: list[tuple[str, str, int]]
    ) -> None:
        self.keys = keys
        self.state_dir = state_dir
        self.kill_at = list(kill_at)
        self.killed: list[ServerProcess] = []
        self.lock = threading.Lock()
        self.listen = f"127.0.0.1:{free_port()}"
        self.current = ServerProcess(self._args(self.listen), self._on_line, wait=False)
        self.spares = [
            ServerProcess(self._args(self.listen), self._on_line, warm=True, wait=False)
            for _ in self.kill_at
        ]
        self.current.ready()
        self.errors: list[BaseException] = []

    def _args(self, listen: str) -> list[str]:
        return [*tls_args(self.keys, listen), "--state-dir", str(self.state_dir)]

    def _on_line(self, line: str, process: ServerProcess) -> None:
        with self.lock:
            if process is not self.current or not self.kill_at:
                return
            text, after, count = self.kill_at[0]
            if text not in line or process.count(after) < count:
                return
            self.kill_at.pop(0)
            process.kill()
            self.killed.append(process)
            threading.Thread(target=self._restart, daemon=True).start()

    def _restart(self) -> None:
        try:
            spare = self.spares.pop(0)
            spare.start()
            with self.lock:
                self.current = spare
        except BaseException as err:  # reported by the test
            self.errors.append(err)

    def close(self) -> None:
        for process in [self.current, *self.spares, *self.killed]:
            process.kill()


def test_a_killed_server_is_resumed_with_the_same_request_ids_and_no_silent_release(
    keys, reference, tmp_path
):
    # Kill once when the first upload starts, then when the third training call starts on
    # the restarted server (epoch 2, fold 0: it must resume from the persisted epoch-1 state).
    supervisor = KillAndRestart(
        keys,
        tmp_path / "state",
        [
            ("rpc=Upload phase=start", "rpc=Upload phase=start", 1),
            ("rpc=Train phase=start", "rpc=Train phase=done", 2),
        ],
    )
    run_dir = tmp_path / "run"
    try:
        patient = RetryPolicy(deadline=60.0)
        with remote(supervisor.listen, keys, config=CONFIG, retry=patient) as public:
            result = train_delta(CONFIG, run_dir, progress=False, public=public)
            uploads = list(public.upload_log)
        assert not supervisor.errors, supervisor.errors
        assert len(supervisor.killed) == 2
        second = supervisor.killed[1]
        assert second.count("rpc=Train phase=done") == 2, "the kill missed the training call"
        final = supervisor.current
        assert final.count("restored session") == 1
    finally:
        supervisor.close()

    # Resumed exactly: the same metrics as the uninterrupted in-process run.
    assert metric_rows(run_dir) == metric_rows(reference)
    assert result.final == train_result_final(reference)
    # Released once: the ledger is that of the uninterrupted run, one train-residual row.
    rows = ledger_rows(run_dir)
    assert rows == ledger_rows(reference)
    assert sum(note == "residual release (train)" for *_, note in rows) == 1
    # The restarted server lost the data set; the client sent the SAME recorded payload again.
    assert len(uploads) >= 2 and len(set(uploads)) == 1
