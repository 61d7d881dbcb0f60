"""The public service: what the public server does with each call, independent of gRPC.

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
``state_dir`` its sessions are kept on disk (:mod:`asymflow.transport.sessions`).
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
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import torch

from asymflow.checks import check_int
from asymflow.delta.contract import WIRE_VERSION, SanitizedResidual
from asymflow.public.local import LocalPublic
from asymflow.transport import wire
from asymflow.transport.ddp import DistributedPublic, DistributedTrainingError
from asymflow.transport.sessions import (
    Done,
    PendingUpload,
    Session,
    SnapshotDir,
    assemble,
    payload_bytes,
)
from asymflow.transport.spec import PublicSpec

log = logging.getLogger("asymflow.transport.server")

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_MAX_SESSIONS = 4
DEFAULT_MAX_HELD_BYTES = 4 << 30
MAX_MODELS_PER_SESSION = 16
MAX_PENDING_UPLOADS = 8
PENDING_UPLOAD_SECONDS = 3600.0
METHODS = {
    "Configure": "configure",
    "Upload": "upload",
    "Train": "train",
    "Logits": "logits",
    "StepLogits": "step_logits",
    "StepApply": "step_apply",
    "GetState": "get_state",
    "LoadState": "load_state",
    "Forget": "forget",
    "Health": "health",
}
"""The service's gRPC methods and the :class:`PublicService` method answering each."""

_Recorded = TypeVar("_Recorded", wire.TrainRequest, wire.StepApplyRequest, wire.LoadStateRequest)
"""A request run at most once per request id (:meth:`PublicService._once`)."""


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
            check_int(name, value, low)
        self.max_message_bytes = max_message_bytes
        self.max_sessions = max_sessions
        self.max_held_bytes = max_held_bytes
        self.threads = threads
        self.nproc_per_node = nproc_per_node
        self.snapshots = None if state_dir is None else SnapshotDir(Path(state_dir))
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.counters: dict[str, int] = {}
        self._lock = threading.RLock()
        self._count_lock = threading.Lock()
        if self.snapshots is not None:
            self.snapshots.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            for session in self.snapshots.load(max_sessions, self._make_public):
                self.sessions[session.id] = session

    # -------------------------------------------------------------- bookkeeping

    def count(self, key: str) -> None:
        """Increase counter ``key`` (reported by Health)."""
        with self._count_lock:
            self.counters[key] = self.counters.get(key, 0) + 1

    def _session(self, session_id: str) -> Session:
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

    def _once(
        self,
        request: bytes,
        kind: type[_Recorded],
        run: Callable[[Session, _Recorded], bytes],
        counter: str,
        replayed: str = "",
    ) -> bytes:
        """``run(session, req)`` of ``request`` decoded as ``kind``, at most once per request
        id: its reply is recorded and persisted (counted under ``counter``); a retry of the
        same request gets the recorded reply (counted under ``replayed``); a request id used
        for another request is refused."""
        req = self._decode(request, kind)
        digest = hashlib.sha256(request).hexdigest()
        with self._lock:
            session = self._session(req.session)
            done = session.completed.get(req.request_id)
            if done is not None:
                if done.kind != req.KIND or digest not in done.digests:
                    raise _invalid(f"request_id {req.request_id} was used for another request")
                if replayed:
                    self.count(replayed)
                return done.reply
            reply = run(session, req)
            session.remember(req.request_id, Done(kind.KIND, (digest,), reply))
            self._persist(session)
            self.count(counter)
            return reply

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
    def _check_shape(session: Session, data: SanitizedResidual, what: str) -> None:
        if len(data) == 0:
            raise _invalid(f"{what} must hold at least one sample, got 0")
        if data.shape != session.spec.shape:
            raise _invalid(
                f"{what}.shape must be the agreed residual shape {session.spec.shape}, "
                f"got {data.shape}"
            )

    def _persist(self, session: Session) -> None:
        if self.snapshots is not None:
            self.snapshots.save(session)

    def _make_public(self, spec: PublicSpec) -> LocalPublic:
        """A session's public side: in process, or training with DDP over several processes."""
        if self.nproc_per_node == 1:
            return spec.make_public()
        return DistributedPublic(spec, nproc_per_node=self.nproc_per_node)

    # -------------------------------------------------------------- dispatch

    def handle(self, method: str, request: bytes) -> bytes:
        """Decode ``request`` for ``method``, run it and return the encoded reply."""
        if method not in METHODS:
            raise RefusedError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method!r}")
        handler: Callable[[bytes], bytes] = getattr(self, METHODS[method])
        return handler(request)

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
            session = Session(req.session, req.spec, self._make_public(req.spec))
            self._persist(session)
            while len(self.sessions) >= self.max_sessions:
                old_id, _ = self.sessions.popitem(last=False)
                log.warning("evicting the least recently used session %s", old_id)
                if self.snapshots is not None:
                    self.snapshots.file(old_id).unlink(missing_ok=True)
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
                pending = PendingUpload(req.parts)
            elif pending.parts != req.parts:
                raise _invalid(
                    f"parts must stay {pending.parts} for upload {req.request_id}, got {req.parts}"
                )
            if req.part in pending.received:
                if pending.received[req.part][0] != digest:
                    raise _invalid(f"part {req.part} of upload {req.request_id} changed")
            else:
                self._check_consistent(pending, req)
                self._check_capacity(payload_bytes(req.data, req.labels))
                pending.received[req.part] = (digest, req.data, req.labels)
                session.pending[req.request_id] = pending
            if len(pending.received) < pending.parts:
                return wire.encode(wire.UploadReply(None, len(pending.received)))
            data, labels = assemble(pending)
            dataset_id = session.public.upload(data, labels)
            session.datasets[dataset_id] = payload_bytes(data, labels)
            del session.pending[req.request_id]
            reply = wire.encode(wire.UploadReply(dataset_id, pending.parts))
            digests = tuple(d for d, _, _ in pending.received.values())
            session.remember(req.request_id, Done(wire.UploadRequest.KIND, digests, reply))
            self.count("uploads_completed")
            return reply

    @staticmethod
    def _expire_pending(session: Session) -> None:
        now = time.monotonic()
        for key in [
            k for k, p in session.pending.items() if now - p.started > PENDING_UPLOAD_SECONDS
        ]:
            del session.pending[key]

    @staticmethod
    def _check_consistent(pending: PendingUpload, req: wire.UploadRequest) -> None:
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
        return self._once(request, wire.TrainRequest, self._train, "trains_run", "trains_replayed")

    def _train(self, session: Session, req: wire.TrainRequest) -> bytes:
        if req.dataset_id not in session.datasets:
            raise _dataset_missing(req.dataset_id)
        data, labels = session.public.dataset(req.dataset_id)
        if labels is None:
            raise RefusedError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"dataset_id {req.dataset_id} was uploaded without labels; training needs them",
            )
        if req.indices is not None and (req.indices.min() < 0 or req.indices.max() >= len(data)):
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
        return wire.encode(wire.TrainReply(metrics))

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
        return self._once(
            request, wire.StepApplyRequest, self._step_apply, "steps_applied", "steps_replayed"
        )

    def _step_apply(self, session: Session, req: wire.StepApplyRequest) -> bytes:
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
        return wire.encode(wire.Empty())

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
        return self._once(request, wire.LoadStateRequest, self._load_state, "states_loaded")

    def _load_state(self, session: Session, req: wire.LoadStateRequest) -> bytes:
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
        return wire.encode(wire.Empty())

    def forget(self, request: bytes) -> bytes:
        req = self._decode(request, wire.ForgetRequest)
        with self._lock:
            session = self._session(req.session)
            session.public.forget(req.dataset_id)
            session.datasets.pop(req.dataset_id, None)
            return wire.encode(wire.Empty())


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
