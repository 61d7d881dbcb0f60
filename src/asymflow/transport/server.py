"""The public server: an untrusted process hosting :class:`LocalPublic` behind gRPC.

It accepts only well-formed envelopes (:mod:`asymflow.transport.wire`) whose residuals have
the agreed shape, and refuses everything else with a gRPC status, keeping nothing from a
refused request (DESIGN.md sec. 5):

- INVALID_ARGUMENT: malformed message, wrong shape, dtype or size, a reused request id;
- FAILED_PRECONDITION: another protocol or payload version, a model or labels it lacks;
- UNAUTHENTICATED: no or a wrong bearer token (:mod:`asymflow.transport.auth`);
- RESOURCE_EXHAUSTED: a message over ``max_message_bytes`` (gRPC's own limit), too much
  data held, or more concurrent calls than ``max_concurrent_rpcs`` (gRPC's bounded queue);
- NOT_FOUND: an unknown session or data set; the trailing metadata ``asymflow-missing``
  says which, so the client can configure or upload again.
- INTERNAL: a training job over several processes (``nproc_per_node`` > 1) that failed;
  the model keeps its state.

With ``labels="grad"`` the public side trains step by step: StepLogits returns z_res of a
batch and keeps it for the StepApply that carries the released noisy label gradients (the
only other payload accepted); a pending step is in memory only, and a StepApply after a
restart is refused with ``asymflow-missing: step`` so the client sends the batch again.

Uploads, training, steps and state loads carry request ids: a repeated request returns the
stored reply instead of running again. The server is stateless apart from its models; with
``state_dir`` the models, specs and completed training replies are written atomically after
every change, so a restarted server resumes where the last completed request left it.
Uploaded data sets are held in memory only: the private side uploads them again.

Start it with ``asymflow public serve --listen 127.0.0.1:7070 --token-file F --cert C --key K``
(:mod:`asymflow.cli.public`).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import grpc
import numpy as np
import torch

from asymflow.delta.contract import WIRE_VERSION, NoisyLabels, SanitizedResidual
from asymflow.public.local import LocalPublic
from asymflow.transport import wire
from asymflow.transport.auth import (
    BearerTokenInterceptor,
    is_loopback,
    read_token,
    server_credentials,
    split_address,
)
from asymflow.transport.ddp import DistributedPublic, DistributedTrainingError
from asymflow.transport.spec import PublicSpec

log = logging.getLogger("asymflow.transport.server")

SERVICE = wire.SERVICE
METHODS: tuple[str, ...] = (
    "Configure",
    "Upload",
    "Train",
    "Logits",
    "StepLogits",
    "StepApply",
    "GetState",
    "LoadState",
    "Forget",
    "Health",
)
MISSING_KEY = wire.MISSING_KEY

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_MAX_CONCURRENT_RPCS = 16
DEFAULT_WORKERS = 4
DEFAULT_MAX_SESSIONS = 4
DEFAULT_MAX_HELD_BYTES = 4 << 30
MAX_MODELS_PER_SESSION = 16
MAX_PENDING_UPLOADS = 8
PENDING_UPLOAD_SECONDS = 3600.0
KEEP_COMPLETED = 256
"""Completed requests remembered per session (replies of retried request ids). A client runs
its session's calls one at a time and retries only the call in flight, so the last few are
what matter; a small bound keeps a long session's memory and snapshot size flat."""
SNAPSHOT_PREFIX = "session-"
SNAPSHOT_SUFFIX = ".afs"


class RefusedError(Exception):
    """A refused request: the gRPC status code, a message for the client and, for
    NOT_FOUND, what is missing."""

    def __init__(self, code: grpc.StatusCode, message: str, missing: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.missing = missing


STATUS_OF_REFUSAL: dict[wire.Refusal, grpc.StatusCode] = {
    wire.Refusal.MALFORMED: grpc.StatusCode.INVALID_ARGUMENT,
    wire.Refusal.VERSION: grpc.StatusCode.FAILED_PRECONDITION,
    wire.Refusal.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _invalid(message: str) -> RefusedError:
    return RefusedError(grpc.StatusCode.INVALID_ARGUMENT, message)


# ------------------------------------------------------------------------- sessions


@dataclass(frozen=True)
class _Done:
    """A completed request: its kind, the digests of its content and the reply sent."""

    kind: int
    digests: tuple[str, ...]
    reply: bytes


@dataclass
class _PendingUpload:
    parts: int
    received: dict[int, tuple[str, SanitizedResidual, NoisyLabels | None]] = field(
        default_factory=dict
    )
    started: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(_payload_bytes(d, labels) for _, d, labels in self.received.values())


def _payload_bytes(data: SanitizedResidual, labels: NoisyLabels | None) -> int:
    return int(data.bits.nbytes) + (0 if labels is None else int(labels.labels.nbytes))


@dataclass
class _Session:
    """One private side's public models, its uploads and its completed requests."""

    id: str
    spec: PublicSpec
    public: LocalPublic
    datasets: dict[str, int] = field(default_factory=dict)  # dataset id -> bytes held
    pending: dict[str, _PendingUpload] = field(default_factory=dict)
    completed: OrderedDict[str, _Done] = field(default_factory=OrderedDict)
    steps: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    """model -> (request id, reply) of its pending StepLogits (``labels="grad"``)."""

    @property
    def held_bytes(self) -> int:
        return sum(self.datasets.values()) + sum(p.nbytes for p in self.pending.values())

    def remember(self, request_id: str, done: _Done) -> None:
        self.completed[request_id] = done
        self.completed.move_to_end(request_id)
        while len(self.completed) > KEEP_COMPLETED:
            self.completed.popitem(last=False)

    def model_state(self, name: str) -> dict[str, Any]:
        return {
            "model": self.public.models[name].state_dict(),
            "optimizer": self.public.optimizers[name].state_dict(),
        }


@dataclass(frozen=True)
class Snapshot(wire.Message):
    """A session on disk: spec, completed requests and the state of every model."""

    KIND: ClassVar[int] = 200
    session: str
    spec: PublicSpec
    completed: tuple[tuple[str, _Done], ...]
    models: tuple[tuple[str, dict[str, Any]], ...]

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        arrays: list[np.ndarray] = []
        done = []
        for request_id, d in self.completed:
            arrays.append(np.frombuffer(d.reply, dtype=np.uint8))
            done.append([request_id, d.kind, list(d.digests), len(arrays) - 1])
        models = [[name, wire.tree_to_wire(state, arrays)] for name, state in self.models]
        meta = {
            "session": self.session,
            "spec": self.spec.to_dict(),
            "completed": done,
            "models": models,
        }
        return meta, arrays

    @classmethod
    def from_envelope(cls, env: wire.Envelope) -> Snapshot:
        meta = env.meta
        if set(meta) != {"session", "spec", "completed", "models"}:
            raise wire.WireError("snapshot must hold session, spec, completed and models")
        spec = PublicSpec.from_dict(meta["spec"])
        completed = []
        for request_id, kind, digests, index in meta["completed"]:
            reply = bytes(env.take(index, "snapshot.completed"))
            completed.append((str(request_id), _Done(int(kind), tuple(digests), reply)))
        models = []
        for name, tree in meta["models"]:
            state = wire.tree_from_wire(tree, env, where=f"snapshot.models[{name!r}]")
            models.append((str(name), state))
        return cls(str(meta["session"]), spec, tuple(completed), tuple(models))


# ------------------------------------------------------------------------- the service


class PublicService:
    """The server's logic, independent of gRPC: ``handle(method, request_bytes)`` returns
    the reply bytes or raises :class:`RefusedError` / :class:`wire.WireError`. Thread-safe: one
    lock serializes the calls that touch models or data. With ``nproc_per_node`` > 1 every
    training call is a DDP job of that many processes (:class:`DistributedPublic`)."""

    def __init__(
        self,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
        threads: int = 1,
        nproc_per_node: int = 1,
    ) -> None:
        for name, value, low in (
            ("max_message_bytes", max_message_bytes, 1024),
            ("max_sessions", max_sessions, 1),
            ("max_held_bytes", max_held_bytes, 0),
            ("threads", threads, 1),
            ("nproc_per_node", nproc_per_node, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")
        self.max_message_bytes = max_message_bytes
        self.max_sessions = max_sessions
        self.max_held_bytes = max_held_bytes
        self.threads = threads
        self.nproc_per_node = nproc_per_node
        self.state_dir = None if state_dir is None else Path(state_dir)
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        self.counters: dict[str, int] = {}
        self._lock = threading.RLock()
        self._count_lock = threading.Lock()
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._load_snapshots()

    # -------------------------------------------------------------- bookkeeping

    def count(self, key: str) -> None:
        """Increase counter ``key`` (reported by Health)."""
        with self._count_lock:
            self.counters[key] = self.counters.get(key, 0) + 1

    def _session(self, session_id: str) -> _Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise RefusedError(
                grpc.StatusCode.NOT_FOUND,
                f"session {session_id} is unknown here: configure it first (a server "
                "restarted without --state-dir, or one that evicted the session, forgets it)",
                missing="session",
            )
        self.sessions.move_to_end(session_id)
        return session

    def _replayed(
        self,
        session: _Session,
        req: wire.TrainRequest | wire.StepApplyRequest | wire.LoadStateRequest,
        digest: str,
        counter: str = "",
    ) -> bytes | None:
        """The stored reply if ``req``'s request id completed this same request (counted
        under ``counter``), None if it is new; refused if it was used for another request."""
        done = session.completed.get(req.request_id)
        if done is None:
            return None
        if done.kind != req.KIND or digest not in done.digests:
            raise _invalid(f"request_id {req.request_id} was used for another request")
        if counter:
            self.count(counter)
        return done.reply

    def _held_bytes(self) -> int:
        return sum(s.held_bytes for s in self.sessions.values())

    def _check_capacity(self, extra: int) -> None:
        held = self._held_bytes()
        if held + extra > self.max_held_bytes:
            raise RefusedError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the server holds {held} bytes of uploads; {extra} more would exceed its "
                f"limit of {self.max_held_bytes} (forget old data sets first)",
            )

    @staticmethod
    def _check_shape(session: _Session, data: SanitizedResidual, what: str) -> None:
        if len(data) == 0:
            raise _invalid(f"{what} must hold at least one sample, got 0")
        if data.shape != session.spec.shape:
            raise _invalid(
                f"{what}.shape must be the agreed residual shape {session.spec.shape}, "
                f"got {data.shape}"
            )

    def _make_public(self, spec: PublicSpec) -> LocalPublic:
        """A session's public side: in process, or training with DDP over several processes."""
        if self.nproc_per_node == 1:
            return spec.make_public()
        return DistributedPublic(spec, nproc_per_node=self.nproc_per_node)

    # -------------------------------------------------------------- persistence

    def _snapshot_path(self, session_id: str) -> Path:
        assert self.state_dir is not None
        return self.state_dir / f"{SNAPSHOT_PREFIX}{session_id}{SNAPSHOT_SUFFIX}"

    def _persist(self, session: _Session) -> None:
        """Write the session atomically (temp file, fsync, rename, fsync of the directory)."""
        if self.state_dir is None:
            return
        snapshot = Snapshot(
            session.id,
            session.spec,
            tuple(session.completed.items()),
            tuple((name, session.model_state(name)) for name in session.public.models),
        )
        data = wire.encode(snapshot)
        path = self._snapshot_path(session.id)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        dir_fd = os.open(self.state_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _load_snapshots(self) -> None:
        assert self.state_dir is not None
        files = sorted(
            self.state_dir.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}"),
            key=lambda p: p.stat().st_mtime,
        )
        for path in files[-self.max_sessions :]:
            try:
                snap = wire.decode(path.read_bytes(), Snapshot)
                public = self._make_public(snap.spec)
                if snap.models:
                    public.load_state_dict(
                        {
                            "models": {n: s["model"] for n, s in snap.models},
                            "optimizers": {n: s["optimizer"] for n, s in snap.models},
                        }
                    )
            except (OSError, wire.WireError, ValueError, RuntimeError, KeyError) as err:
                log.error("skipping unreadable session snapshot %s: %s", path, err)
                continue
            session = _Session(snap.session, snap.spec, public)
            for request_id, done in snap.completed:
                session.remember(request_id, done)
            self.sessions[snap.session] = session
            log.info("restored session %s (%d models)", snap.session, len(snap.models))

    # -------------------------------------------------------------- dispatch

    def handle(self, method: str, request: bytes) -> bytes:
        """Decode ``request`` for ``method``, run it and return the encoded reply."""
        handler = self._handlers().get(method)
        if handler is None:
            raise RefusedError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}")
        return handler(request)

    def _handlers(self) -> dict[str, Callable[[bytes], bytes]]:
        return {
            "Configure": self.configure,
            "Upload": self.upload,
            "Train": self.train,
            "Logits": self.logits,
            "StepLogits": self.step_logits,
            "StepApply": self.step_apply,
            "GetState": self.get_state,
            "LoadState": self.load_state,
            "Forget": self.forget,
            "Health": self.health,
        }

    def _decode(self, request: bytes, kind: type[wire.M]) -> wire.M:
        return wire.decode(request, kind, max_bytes=self.max_message_bytes)

    def health(self, request: bytes) -> bytes:
        self._decode(request, wire.Empty)
        with self._count_lock:
            counters = dict(self.counters)
        reply = wire.HealthReply(
            status="serving",
            protocol=wire.PROTOCOL_VERSION,
            wire_version=WIRE_VERSION,
            max_message_bytes=self.max_message_bytes,
            pid=os.getpid(),
            sessions=len(self.sessions),
            counters=counters,
        )
        return wire.encode(reply)

    def configure(self, request: bytes) -> bytes:
        req = self._decode(request, wire.ConfigureRequest)
        with self._lock:
            existing = self.sessions.get(req.session)
            if existing is not None:
                if existing.spec != req.spec:
                    raise RefusedError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"session {req.session} is already configured with another spec",
                    )
                self.sessions.move_to_end(req.session)
                return wire.encode(wire.ConfigureReply(req.session, created=False))
            torch.set_num_threads(self.threads)
            session = _Session(req.session, req.spec, self._make_public(req.spec))
            self._persist(session)
            while len(self.sessions) >= self.max_sessions:
                old_id, _ = self.sessions.popitem(last=False)
                log.warning("evicting the least recently used session %s", old_id)
                if self.state_dir is not None:
                    self._snapshot_path(old_id).unlink(missing_ok=True)
            self.sessions[req.session] = session
            self.count("sessions_created")
            return wire.encode(wire.ConfigureReply(req.session, created=True))

    def upload(self, request: bytes) -> bytes:
        req = self._decode(request, wire.UploadRequest)
        digest = hashlib.sha256(request).hexdigest()
        with self._lock:
            session = self._session(req.session)
            self._check_shape(session, req.data, "data")
            if req.labels is not None and req.labels.classes != session.spec.classes:
                raise _invalid(
                    f"labels.classes must be the agreed {session.spec.classes}, "
                    f"got {req.labels.classes}"
                )
            done = session.completed.get(req.request_id)
            if done is not None and done.kind == wire.UploadRequest.KIND:
                if digest not in done.digests:
                    raise _invalid(f"request_id {req.request_id} was used for another upload")
                dataset_id = wire.decode(done.reply, wire.UploadReply).dataset_id
                if dataset_id in session.datasets:
                    self.count("uploads_replayed")
                    return done.reply
                # held in memory only, lost in a restart: receive the upload again
            self._expire_pending(session)
            pending = session.pending.get(req.request_id)
            if pending is None:
                if len(session.pending) >= MAX_PENDING_UPLOADS:
                    raise RefusedError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"at most {MAX_PENDING_UPLOADS} uploads may be in progress per session",
                    )
                pending = _PendingUpload(req.parts)
            elif pending.parts != req.parts:
                raise _invalid(
                    f"parts must stay {pending.parts} for upload {req.request_id}, got {req.parts}"
                )
            if req.part in pending.received:
                if pending.received[req.part][0] != digest:
                    raise _invalid(f"part {req.part} of upload {req.request_id} changed")
            else:
                self._check_consistent(pending, req)
                self._check_capacity(_payload_bytes(req.data, req.labels))
                pending.received[req.part] = (digest, req.data, req.labels)
                session.pending[req.request_id] = pending
            if len(pending.received) < pending.parts:
                return wire.encode(wire.UploadReply(None, len(pending.received)))
            data, labels = _assemble(pending)
            dataset_id = session.public.upload(data, labels)
            session.datasets[dataset_id] = _payload_bytes(data, labels)
            del session.pending[req.request_id]
            reply = wire.encode(wire.UploadReply(dataset_id, pending.parts))
            digests = tuple(d for d, _, _ in pending.received.values())
            session.remember(req.request_id, _Done(wire.UploadRequest.KIND, digests, reply))
            self.count("uploads_completed")
            return reply

    @staticmethod
    def _expire_pending(session: _Session) -> None:
        now = time.monotonic()
        for key in [
            k for k, p in session.pending.items() if now - p.started > PENDING_UPLOAD_SECONDS
        ]:
            del session.pending[key]

    @staticmethod
    def _check_consistent(pending: _PendingUpload, req: wire.UploadRequest) -> None:
        if not pending.received:
            return
        _, first, first_labels = next(iter(pending.received.values()))
        if req.data.event != first.event or req.data.version != first.version:
            raise _invalid("every part of an upload must carry the same release event")
        if (req.labels is None) != (first_labels is None):
            raise _invalid("either every part of an upload carries labels or none does")
        if (
            req.labels is not None
            and first_labels is not None
            and req.labels.event != first_labels.event
        ):
            raise _invalid("every part of an upload must carry the same label event")

    def train(self, request: bytes) -> bytes:
        req = self._decode(request, wire.TrainRequest)
        digest = hashlib.sha256(request).hexdigest()
        with self._lock:
            session = self._session(req.session)
            replayed = self._replayed(session, req, digest, "trains_replayed")
            if replayed is not None:
                return replayed
            if req.dataset_id not in session.datasets:
                raise _dataset_missing(req.dataset_id)
            data, labels = session.public.dataset(req.dataset_id)
            if labels is None:
                raise RefusedError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"dataset_id {req.dataset_id} was uploaded without labels; training needs them",
                )
            if req.indices is not None and (
                req.indices.min() < 0 or req.indices.max() >= len(data)
            ):
                raise _invalid(
                    f"indices must lie in [0, {len(data)}), "
                    f"got [{req.indices.min()}, {req.indices.max()}]"
                )
            public = session.public
            fresh = req.model not in public.models
            _check_room(public, req.model)
            before = None if fresh else copy.deepcopy(session.model_state(req.model))
            torch.set_num_threads(self.threads)
            try:
                metrics = public.train_with(req.dataset_id, req.args)
            except ValueError as err:  # arguments LocalPublic refuses
                _restore(public, req.model, before)
                raise _invalid(str(err)) from None
            except DistributedTrainingError as err:
                _restore(public, req.model, before)
                log.error("rpc=Train distributed training failed: %s\n%s", err, err.output)
                raise RefusedError(
                    grpc.StatusCode.INTERNAL,
                    f"training failed on the server, the model is unchanged: {err}",
                ) from None
            except BaseException:
                _restore(public, req.model, before)
                raise
            reply = wire.encode(wire.TrainReply(metrics))
            session.remember(req.request_id, _Done(wire.TrainRequest.KIND, (digest,), reply))
            self._persist(session)
            self.count("trains_run")
            return reply

    def logits(self, request: bytes) -> bytes:
        req = self._decode(request, wire.LogitsRequest)
        with self._lock:
            session = self._session(req.session)
            self._check_shape(session, req.data, "data")
            if req.model not in session.public.models:
                raise RefusedError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model {req.model!r} does not exist here: train it or load its state first",
                )
            torch.set_num_threads(self.threads)
            began = time.perf_counter()
            z = session.public.logits(req.data, model=req.model)
            seconds = time.perf_counter() - began
            return wire.encode(wire.LogitsReply(z.numpy().astype(np.float32), seconds))

    def step_logits(self, request: bytes) -> bytes:
        """z_res of a batch in training mode, held for the StepApply that follows (in this
        process, also with ``nproc_per_node`` > 1: one step is one batch). A repeated request
        id gets the same reply without a second forward pass."""
        req = self._decode(request, wire.StepLogitsRequest)
        with self._lock:
            session = self._session(req.session)
            held = session.steps.get(req.model)
            if held is not None and held[0] == req.request_id:
                self.count("steps_replayed")
                return held[1]
            if req.dataset_id not in session.datasets:
                raise _dataset_missing(req.dataset_id)
            public = session.public
            _check_room(public, req.model)
            torch.set_num_threads(self.threads)
            began = time.perf_counter()
            try:
                z = public.step_logits(
                    req.dataset_id,
                    req.indices,
                    lr=req.lr,
                    seed=req.seed,
                    step=req.step,
                    model=req.model,
                )
            except ValueError as err:
                raise _invalid(str(err)) from None
            seconds = time.perf_counter() - began
            reply = wire.encode(wire.LogitsReply(z.numpy().astype(np.float32), seconds))
            session.steps[req.model] = (req.request_id, reply)
            self.count("steps_started")
            return reply

    def step_apply(self, request: bytes) -> bytes:
        """One optimizer step along released label gradients; persisted before the reply, and
        applied at most once per request id (a retry gets the recorded reply)."""
        req = self._decode(request, wire.StepApplyRequest)
        digest = hashlib.sha256(request).hexdigest()
        with self._lock:
            session = self._session(req.session)
            replayed = self._replayed(session, req, digest, "steps_replayed")
            if replayed is not None:
                return replayed
            if req.model not in session.steps:
                raise RefusedError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model {req.model!r} has no pending step here (a restart loses it): "
                    "send its StepLogits again",
                    missing="step",
                )
            torch.set_num_threads(self.threads)
            try:
                session.public.step_apply(req.gradients, model=req.model)
            except ValueError as err:
                raise _invalid(str(err)) from None
            del session.steps[req.model]
            reply = wire.encode(wire.Empty())
            session.remember(req.request_id, _Done(wire.StepApplyRequest.KIND, (digest,), reply))
            self._persist(session)
            self.count("steps_applied")
            return reply

    def get_state(self, request: bytes) -> bytes:
        req = self._decode(request, wire.StateRequest)
        with self._lock:
            session = self._session(req.session)
            names = tuple(session.public.models)
            state = None
            if req.model is not None:
                if req.model not in session.public.models:
                    raise RefusedError(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"model {req.model!r} does not exist here",
                    )
                state = session.model_state(req.model)
            return wire.encode(wire.StateReply(names, state))

    def load_state(self, request: bytes) -> bytes:
        req = self._decode(request, wire.LoadStateRequest)
        digest = hashlib.sha256(request).hexdigest()
        with self._lock:
            session = self._session(req.session)
            replayed = self._replayed(session, req, digest)
            if replayed is not None:
                return replayed
            public = session.public
            _check_room(public, req.model)
            scratch = session.spec.make_public()
            try:
                scratch.load_state_dict(
                    {
                        "models": {req.model: req.state["model"]},
                        "optimizers": {req.model: req.state["optimizer"]},
                    }
                )
                _check_momentum(scratch, req.model)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
                raise _invalid(f"state does not fit the agreed model: {err}") from None
            public.models[req.model] = scratch.models[req.model]
            public.optimizers[req.model] = scratch.optimizers[req.model]
            session.steps.pop(req.model, None)  # a pending step belonged to the old model
            reply = wire.encode(wire.Empty())
            session.remember(req.request_id, _Done(wire.LoadStateRequest.KIND, (digest,), reply))
            self._persist(session)
            self.count("states_loaded")
            return reply

    def forget(self, request: bytes) -> bytes:
        req = self._decode(request, wire.ForgetRequest)
        with self._lock:
            session = self._session(req.session)
            session.public.forget(req.dataset_id)
            session.datasets.pop(req.dataset_id, None)
            return wire.encode(wire.Empty())


def _assemble(pending: _PendingUpload) -> tuple[SanitizedResidual, NoisyLabels | None]:
    parts = [pending.received[i] for i in range(pending.parts)]
    first = parts[0][1]
    bits = np.concatenate([d.bits for _, d, _ in parts]) if len(parts) > 1 else first.bits
    data = SanitizedResidual(np.ascontiguousarray(bits), first.shape, first.event, first.version)
    first_labels = parts[0][2]
    if first_labels is None:
        return data, None
    values = np.concatenate([labels.labels for _, _, labels in parts if labels is not None])
    return data, NoisyLabels(values.astype(np.int64), first_labels.classes, first_labels.event)


def _dataset_missing(dataset_id: str) -> RefusedError:
    return RefusedError(
        grpc.StatusCode.NOT_FOUND,
        f"dataset_id {dataset_id} is not held here: upload it (again)",
        missing="dataset",
    )


def _check_room(public: LocalPublic, model: str) -> None:
    """Refuse a new model beyond :data:`MAX_MODELS_PER_SESSION`."""
    if model not in public.models and len(public.models) >= MAX_MODELS_PER_SESSION:
        raise RefusedError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"a session holds at most {MAX_MODELS_PER_SESSION} models",
        )


def _restore(public: LocalPublic, name: str, before: dict[str, Any] | None) -> None:
    """Undo a failed training call: drop a model it created, or reload the old state."""
    if before is None:
        public.models.pop(name, None)
        public.optimizers.pop(name, None)
    else:
        public.models[name].load_state_dict(before["model"])
        public.optimizers[name].load_state_dict(before["optimizer"])


def _check_momentum(public: LocalPublic, name: str) -> None:
    """Every momentum buffer must be a float tensor of its parameter's shape."""
    optimizer = public.optimizers[name]
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if set(state) - {"momentum_buffer"}:
                raise ValueError(f"optimizer state has unknown entries {sorted(state)}")
            buf = state.get("momentum_buffer")
            if buf is not None and (buf.shape != param.shape or not buf.is_floating_point()):
                raise ValueError(
                    f"momentum buffer of shape {tuple(buf.shape)} for a parameter of shape "
                    f"{tuple(param.shape)}"
                )
    if len(optimizer.state) > sum(len(g["params"]) for g in optimizer.param_groups):
        raise ValueError("optimizer state has entries for unknown parameters")


# ------------------------------------------------------------------------- gRPC server


class PublicServer:
    """A running gRPC server around a :class:`PublicService`."""

    def __init__(self, server: grpc.Server, service: PublicService, host: str, port: int) -> None:
        self._server = server
        self.service = service
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        """``HOST:PORT`` the server listens on (the real port when 0 was asked)."""
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop accepting calls; running calls get ``grace`` seconds to finish."""
        self._server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` passes (False)."""
        return bool(self._server.wait_for_termination(timeout))


def _grpc_handler(service: PublicService, method: str) -> grpc.RpcMethodHandler:
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        began = time.perf_counter()
        log.info("rpc=%s phase=start peer=%s", method, context.peer())
        service.count(f"calls_{method}")
        try:
            reply = service.handle(method, request)
        except RefusedError as refusal:
            service.count(f"refused_{refusal.code.name}")
            log.info("rpc=%s phase=refused code=%s %s", method, refusal.code.name, refusal)
            if refusal.missing is not None:
                context.set_trailing_metadata(((MISSING_KEY, refusal.missing),))
            context.abort(refusal.code, refusal.message)
        except wire.WireError as err:
            code = STATUS_OF_REFUSAL[err.reason]
            service.count(f"refused_{code.name}")
            log.info("rpc=%s phase=refused code=%s %s", method, code.name, err)
            context.abort(code, str(err))
        except Exception:
            service.count("internal_errors")
            log.exception("rpc=%s phase=failed", method)
            context.abort(grpc.StatusCode.INTERNAL, f"{method} failed on the server (see its log)")
        log.info("rpc=%s phase=done seconds=%.4f", method, time.perf_counter() - began)
        return reply

    return grpc.unary_unary_rpc_method_handler(call)


def serve(
    listen: str,
    token_file: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    insecure_local: bool = False,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    workers: int = DEFAULT_WORKERS,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
    threads: int = 1,
    nproc_per_node: int = 1,
) -> PublicServer:
    """Start a public server on ``listen`` (``HOST:PORT``; port 0 picks a free one).

    It requires a bearer token (``token_file``) and TLS (``cert`` + ``key``, PEM). Without
    them it refuses to start unless ``insecure_local=True`` and ``listen`` is a loopback
    address. ``max_message_bytes`` caps each request (gRPC answers RESOURCE_EXHAUSTED above
    it); at most ``max_concurrent_rpcs`` calls run or wait at once (the rest are refused
    with RESOURCE_EXHAUSTED) on ``workers`` threads; ``threads`` is torch's thread count.
    With ``nproc_per_node`` > 1 training runs as a torchrun DDP job of that many processes.
    """
    host, port = split_address(listen)
    if (cert is None) != (key is None):
        raise ValueError("cert and key must be given together (PEM files), or neither")
    tls = cert is not None and key is not None
    if token_file is None or not tls:
        if not insecure_local:
            raise ValueError(
                "the public server needs token_file and TLS (cert and key); without them it "
                "starts only with insecure_local=True on a loopback address"
            )
        if not is_loopback(host):
            raise ValueError(
                "insecure_local=True is allowed only on a loopback address "
                f"(127.0.0.1, ::1, localhost), got host={host!r}"
            )
    for name, value in (("max_concurrent_rpcs", max_concurrent_rpcs), ("workers", workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
    token = None if token_file is None else read_token(token_file)
    credentials = server_credentials(cert, key) if tls else None  # type: ignore[arg-type]
    service = PublicService(
        state_dir=state_dir,
        max_message_bytes=max_message_bytes,
        max_sessions=max_sessions,
        max_held_bytes=max_held_bytes,
        threads=threads,
        nproc_per_node=nproc_per_node,
    )
    interceptors = []
    if token is not None:
        interceptors.append(
            BearerTokenInterceptor(token, on_refusal=lambda m: service.count("unauthenticated"))
        )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="asymflow-public"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    handlers = {m: _grpc_handler(service, m) for m in METHODS}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bind = f"{host}:{port}"
    try:
        if credentials is not None:
            bound = server.add_secure_port(bind, credentials)
        else:
            bound = server.add_insecure_port(bind)
    except RuntimeError as err:
        raise OSError(f"could not listen on {bind}: {err}") from None
    if bound == 0:
        raise OSError(f"could not listen on {bind}")
    server.start()
    torch.set_num_threads(threads)
    log.info(
        "listening on %s:%d (tls=%s, token=%s, state_dir=%s)",
        host,
        bound,
        tls,
        bool(token),
        state_dir,
    )
    return PublicServer(server, service, host, bound)


__all__ = [
    "METHODS",
    "MISSING_KEY",
    "SERVICE",
    "PublicServer",
    "PublicService",
    "RefusedError",
    "serve",
]
