"""A public server's sessions: their uploads, the replies of completed requests (replayed
for a retried request id), and their snapshots on disk.

A session is one private side's public models, its data sets and its last
:data:`KEEP_COMPLETED` completed requests. With a state directory, a session is written
atomically after every change as a :class:`Snapshot` (one envelope of
:mod:`asymflow.transport.codec`), so a restarted server resumes where the last completed
request left it; uploaded data sets are held in memory only.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from asymflow.delta.contract import NoisyLabels, SanitizedResidual
from asymflow.public.local import LocalPublic
from asymflow.runfiles import atomic_write_bytes
from asymflow.transport import wire
from asymflow.transport.spec import PublicSpec

log = logging.getLogger("asymflow.transport.server")

KEEP_COMPLETED = 256
"""Completed requests remembered per session (replies of retried request ids). A client runs
its session's calls one at a time and retries only the call in flight, so the last few are
what matter; a small bound keeps a long session's memory and snapshot size flat."""
SNAPSHOT_PREFIX = "session-"
SNAPSHOT_SUFFIX = ".afs"


@dataclass(frozen=True)
class Done:
    """A completed request: its kind, the digests of its content and the reply sent."""

    kind: int
    digests: tuple[str, ...]
    reply: bytes


@dataclass
class PendingUpload:
    """The parts of an upload received so far: part -> (digest, payload, labels)."""

    parts: int
    received: dict[int, tuple[str, SanitizedResidual, NoisyLabels | None]] = field(
        default_factory=dict
    )
    started: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(payload_bytes(d, labels) for _, d, labels in self.received.values())


def payload_bytes(data: SanitizedResidual, labels: NoisyLabels | None) -> int:
    """The memory a payload holds (its bits and labels)."""
    return int(data.bits.nbytes) + (0 if labels is None else int(labels.labels.nbytes))


@dataclass
class Session:
    """One private side's public models, its uploads and its completed requests."""

    id: str
    spec: PublicSpec
    public: LocalPublic
    datasets: dict[str, int] = field(default_factory=dict)  # dataset id -> bytes held
    pending: dict[str, PendingUpload] = field(default_factory=dict)
    completed: OrderedDict[str, Done] = field(default_factory=OrderedDict)
    steps: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    """model -> (request id, reply) of its pending StepLogits (``labels="grad"``)."""

    @property
    def held_bytes(self) -> int:
        return sum(self.datasets.values()) + sum(p.nbytes for p in self.pending.values())

    def remember(self, request_id: str, done: Done) -> None:
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
    completed: tuple[tuple[str, Done], ...]
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
            completed.append((str(request_id), Done(int(kind), tuple(digests), reply)))
        models = []
        for name, tree in meta["models"]:
            state = wire.tree_from_wire(tree, env, where=f"snapshot.models[{name!r}]")
            models.append((str(name), state))
        return cls(str(meta["session"]), spec, tuple(completed), tuple(models))


@dataclass(frozen=True)
class SnapshotDir:
    """The directory of the sessions' snapshots, ``session-<id>.afs`` each."""

    path: Path

    def file(self, session_id: str) -> Path:
        return self.path / f"{SNAPSHOT_PREFIX}{session_id}{SNAPSHOT_SUFFIX}"

    def save(self, session: Session) -> None:
        """Write the session atomically (temp file, fsync, rename, fsync of the directory)."""
        snapshot = Snapshot(
            session.id,
            session.spec,
            tuple(session.completed.items()),
            tuple((name, session.model_state(name)) for name in session.public.models),
        )
        atomic_write_bytes(self.file(session.id), wire.encode(snapshot))
        dir_fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def load(self, limit: int, make_public: Callable[[PublicSpec], LocalPublic]) -> list[Session]:
        """The ``limit`` most recently written sessions, oldest first; an unreadable snapshot
        is logged and skipped."""
        files = sorted(
            self.path.glob(f"{SNAPSHOT_PREFIX}*{SNAPSHOT_SUFFIX}"),
            key=lambda p: p.stat().st_mtime,
        )
        sessions = []
        for path in files[-limit:]:
            try:
                snap = wire.decode(path.read_bytes(), Snapshot)
                public = make_public(snap.spec)
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
            session = Session(snap.session, snap.spec, public)
            for request_id, done in snap.completed:
                session.remember(request_id, done)
            sessions.append(session)
            log.info("restored session %s (%d models)", snap.session, len(snap.models))
        return sessions


def assemble(pending: PendingUpload) -> tuple[SanitizedResidual, NoisyLabels | None]:
    """The data set of a complete upload: its parts' payloads, concatenated in order."""
    parts = [pending.received[i] for i in range(pending.parts)]
    first = parts[0][1]
    bits = np.concatenate([d.bits for _, d, _ in parts]) if len(parts) > 1 else first.bits
    data = SanitizedResidual(np.ascontiguousarray(bits), first.shape, first.event, first.version)
    first_labels = parts[0][2]
    if first_labels is None:
        return data, None
    values = np.concatenate([labels.labels for _, _, labels in parts if labels is not None])
    return data, NoisyLabels(values.astype(np.int64), first_labels.classes, first_labels.event)
