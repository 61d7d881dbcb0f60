"""The private side's end of the link: :class:`RemotePublic`, a :class:`PublicSide` over gRPC.

Only :class:`SanitizedResidual` and :class:`NoisyLabels` payloads (already recorded in the
ledger by their producer) and plain arguments leave through it (DESIGN.md sec. 2, 5). Calls
that fail with UNAVAILABLE or DEADLINE_EXCEEDED are retried with exponential backoff and the
same request id, so a restarted server answers a repeated Upload/Train/LoadState with the
stored reply instead of running it twice. When the server has lost an uploaded data set (it
keeps them in memory only), the client uploads the same payload again: the same bytes of
the same recorded release, not a new release.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import grpc
import numpy as np
import torch
from torch import Tensor

from asymflow.checks import check_int, check_positive
from asymflow.delta.contract import (
    DEFAULT_MODEL,
    WIRE_VERSION,
    NoisyLabelGradients,
    NoisyLabels,
    PublicConfig,
    SanitizedResidual,
    StepArgs,
    StepsWithArgs,
    TrainArgs,
    TrainsWithArgs,
    check_payload,
    checked_rows,
    dataset_id,
    trained_public,
)
from asymflow.transport import wire
from asymflow.transport.auth import (
    bearer_metadata,
    channel_credentials,
    is_loopback,
    read_token,
    split_address,
)
from asymflow.transport.spec import PublicSpec

log = logging.getLogger(__name__)

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""Status codes retried with the same request (the call may not have reached the server)."""

DEFAULT_PART_BYTES = 16 << 20
"""Largest payload per Upload/Logits message (further capped at half the server's limit)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: waits ``initial``, ``initial * multiplier``, ... (at most
    ``max_delay``, times 1 + U(0, ``jitter``)) until ``deadline`` seconds have passed."""

    initial: float = 0.1
    multiplier: float = 2.0
    max_delay: float = 2.0
    deadline: float = 120.0
    jitter: float = 0.2

    def __post_init__(self) -> None:
        if not (0 < self.initial <= self.max_delay):
            raise ValueError(
                f"initial must satisfy 0 < initial <= max_delay={self.max_delay}, "
                f"got {self.initial}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier}")
        if self.deadline < 0:
            raise ValueError(f"deadline must be >= 0 seconds, got {self.deadline}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter must satisfy 0 <= jitter <= 1, got {self.jitter}")


class PublicServerError(RuntimeError):
    """A call the public server refused or could not answer (``code``: the gRPC status)."""

    def __init__(
        self, method: str, code: grpc.StatusCode, details: str, missing: str | None = None
    ) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details
        self.missing = missing


class PublicSessionLostError(PublicServerError):
    """The server no longer holds this client's trained models (it restarted without a
    state directory, or evicted the session): resume the run from its last checkpoint."""


def _new_id() -> str:
    return secrets.token_hex(16)


class RemotePublic(TrainsWithArgs, StepsWithArgs):
    """A :class:`asymflow.delta.contract.StepwisePublicSide` on a remote public server.

    ``target`` is ``HOST:PORT``. TLS trusts ``root_cert`` (the server's CA or self-signed
    certificate, PEM); without it ``insecure=True`` is required and ``target`` must be a
    loopback address. The bearer token comes from ``token`` or ``token_file``.

    The public model is ``spec``, or is derived from ``config`` at the first upload (classes
    from the labels, or ``classes`` for unlabelled uploads with ``labels="grad"``; shape from
    the residuals), exactly as ``train_delta`` builds its in-process :class:`LocalPublic`.
    Each client opens its own session: a fresh public side, like a new :class:`LocalPublic`.
    """

    def __init__(
        self,
        target: str,
        *,
        config: PublicConfig | None = None,
        spec: PublicSpec | None = None,
        classes: int | None = None,
        root_cert: str | os.PathLike[str] | bytes | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
        insecure: bool = False,
        timeout: float = 60.0,
        train_timeout: float | None = None,
        retry: RetryPolicy | None = None,
        part_bytes: int = DEFAULT_PART_BYTES,
        max_receive_bytes: int = (1 << 31) - 1,
    ) -> None:
        host, _ = split_address(target)
        if (config is None) == (spec is None):
            raise ValueError("exactly one of config (a DeltaConfig) and spec must be given")
        if config is not None and not isinstance(config, PublicConfig):
            raise TypeError(f"config must be a DeltaConfig, got {type(config).__name__}")
        if spec is not None and not isinstance(spec, PublicSpec):
            raise TypeError(f"spec must be a PublicSpec, got {type(spec).__name__}")
        if classes is not None:
            check_int("classes", classes, 2)
        if root_cert is None and not (insecure and is_loopback(host)):
            raise ValueError(
                "root_cert (the server's TLS certificate or CA) is required; a plaintext "
                f"channel needs insecure=True and a loopback target, got target={target!r}"
            )
        if token is not None and token_file is not None:
            raise ValueError("give token or token_file, not both")
        if token_file is not None:
            token = read_token(token_file)
        self.timeout = check_positive("timeout", timeout)
        if train_timeout is not None:
            check_positive("train_timeout", train_timeout)
        self.part_bytes = check_int("part_bytes", part_bytes, 1024)
        self.target = target
        self.train_timeout = train_timeout
        self.retry = retry or RetryPolicy()
        self._config = config
        self._spec = spec
        self._classes = classes
        self._metadata = bearer_metadata(token) if token is not None else ()
        options = [
            ("grpc.max_receive_message_length", max_receive_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.enable_retries", 0),
        ]
        if root_cert is not None:
            self._channel = grpc.secure_channel(target, channel_credentials(root_cert), options)
        else:
            self._channel = grpc.insecure_channel(target, options)
        self.session = _new_id()
        self._configured = False
        self._server_max_bytes: int | None = None
        self._uploads: dict[str, tuple[SanitizedResidual, NoisyLabels | None]] = {}
        self._pending_state: Mapping[str, Any] | None = None
        self._replay_state: Mapping[str, Any] | None = None
        self._trained = False
        self._steps: dict[str, bytes] = {}  # model -> its last StepLogits request
        self._random = random.Random()
        self.upload_log: list[str] = []
        """Dataset ids in the order their bytes were sent (a re-upload appears twice)."""
        self.server_seconds = 0.0
        """Total public-side compute time reported by Logits replies."""

    # -------------------------------------------------------------- plumbing

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> RemotePublic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def spec(self) -> PublicSpec | None:
        """The agreed public model (None until known)."""
        return self._spec

    def _call(
        self,
        method: str,
        request: bytes,
        reply_type: type[wire.M],
        *,
        long: bool = False,
    ) -> wire.M:
        """One RPC, retried on UNAVAILABLE / DEADLINE_EXCEEDED with the same bytes; ``long``
        calls (training) get ``train_timeout`` instead of ``timeout``."""
        stub = self._channel.unary_unary(f"/{wire.SERVICE}/{method}")
        call_timeout = self.train_timeout if long else self.timeout
        give_up = time.monotonic() + self.retry.deadline
        delay = self.retry.initial
        while True:
            try:
                raw = stub(request, timeout=call_timeout, metadata=self._metadata)
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else grpc.StatusCode.UNKNOWN
                details = (err.details() if isinstance(err, grpc.Call) else None) or str(err)
                if code in RETRYABLE and time.monotonic() + delay < give_up:
                    log.warning("%s: %s (%s); retrying in %.2fs", method, code.name, details, delay)
                    time.sleep(delay * (1 + self.retry.jitter * self._random.random()))
                    delay = min(delay * self.retry.multiplier, self.retry.max_delay)
                    continue
                missing = None
                if isinstance(err, grpc.Call):
                    for key, value in err.trailing_metadata() or ():
                        if key == wire.MISSING_KEY:
                            missing = str(value)
                raise PublicServerError(method, code, details, missing) from None
            try:
                return wire.decode(raw, reply_type)
            except wire.WireError as err:
                raise PublicServerError(
                    method, grpc.StatusCode.DATA_LOSS, f"malformed reply from the server: {err}"
                ) from None

    def health(self) -> wire.HealthReply:
        """The server's status (protocol version, limits, counters); checks compatibility."""
        reply = self._call("Health", wire.encode(wire.Empty()), wire.HealthReply)
        if reply.protocol != wire.PROTOCOL_VERSION or reply.wire_version != WIRE_VERSION:
            raise PublicServerError(
                "Health",
                grpc.StatusCode.FAILED_PRECONDITION,
                f"the server speaks protocol {reply.protocol} / payload version "
                f"{reply.wire_version}; this client speaks {wire.PROTOCOL_VERSION} / "
                f"{WIRE_VERSION}",
            )
        self._server_max_bytes = reply.max_message_bytes
        return reply

    def _part_bytes(self) -> int:
        if self._server_max_bytes is None:
            self.health()
        assert self._server_max_bytes is not None
        return max(1024, min(self.part_bytes, self._server_max_bytes // 2))

    def _complete_spec(self, data: SanitizedResidual, labels: NoisyLabels | None) -> None:
        classes = self._classes if labels is None else labels.classes
        if self._spec is None and self._config is not None and classes is not None:
            self._spec = PublicSpec.from_config(self._config, classes=classes, shape=data.shape)

    def _configure(self) -> None:
        if self._spec is None:
            raise ValueError(
                "the public model is not known yet: upload labelled data first (with "
                "config=), construct the client with spec=, or give classes= for unlabelled "
                "uploads"
            )
        request = wire.encode(wire.ConfigureRequest(self.session, self._spec))
        self._call("Configure", request, wire.ConfigureReply)
        self._configured = True
        state = self._pending_state or self._replay_state
        self._pending_state = None
        if state is not None:
            self._push_state(state)

    def _session_call(
        self, method: str, request: bytes, reply_type: type[wire.M], *, long: bool = False
    ) -> wire.M:
        """A call within the session: configure first; if the server lost the session and
        held nothing that cannot be rebuilt, configure again and repeat the call."""
        if not self._configured:
            self._configure()
        try:
            return self._call(method, request, reply_type, long=long)
        except PublicServerError as err:
            if err.missing != "session":
                raise
            if self._trained:
                raise PublicSessionLostError(
                    err.method, err.code, err.details, err.missing
                ) from None
            log.warning("the server lost session %s; configuring it again", self.session)
            self._configured = False
            self._configure()
            return self._call(method, request, reply_type, long=long)

    # -------------------------------------------------------------- PublicSide

    def upload(self, data: SanitizedResidual, labels: NoisyLabels | None = None) -> str:
        """Send released residuals (and label-DP labels) once per session; return the
        content id (the same as :class:`LocalPublic`'s)."""
        check_payload(data, labels)
        self._complete_spec(data, labels)
        key = dataset_id(data, labels)
        if key in self._uploads:
            return key
        sent = self._send_upload(data, labels)
        if sent != key:
            raise PublicServerError(
                "Upload",
                grpc.StatusCode.DATA_LOSS,
                f"the server stored data set {sent}, expected the content id {key}",
            )
        self._uploads[key] = (data, labels)
        return key

    def _send_upload(self, data: SanitizedResidual, labels: NoisyLabels | None) -> str:
        row_bytes = data.bytes_per_sample + (0 if labels is None else 8)
        rows = max(1, (self._part_bytes() - 4096) // row_bytes)
        parts = max(1, math.ceil(len(data) / rows))
        request_id = _new_id()
        for _ in range(3):
            reply = None
            for part in range(parts):
                index = slice(part * rows, (part + 1) * rows)
                message = wire.UploadRequest(
                    self.session,
                    request_id,
                    part,
                    parts,
                    data.subset(index),
                    None if labels is None else _labels_subset(labels, index),
                )
                reply = self._session_call("Upload", wire.encode(message), wire.UploadReply)
            assert reply is not None
            if reply.dataset_id is not None:
                self.upload_log.append(reply.dataset_id)
                return reply.dataset_id
            log.warning("the server lost parts of upload %s; sending it again", request_id)
        raise PublicServerError(
            "Upload", grpc.StatusCode.ABORTED, "the server kept losing parts of the upload"
        )

    def train_with(self, dataset_id: str, args: TrainArgs) -> dict[str, float]:
        """Train ``args.model`` on the server. One request id for all retries; a data set the
        server lost is uploaded again (same payload)."""
        rows = None if args.indices is None else checked_rows(args.indices, np.iinfo(np.int64).max)
        args = replace(
            args, lr=float(args.lr), indices=None if rows is None else rows.astype(np.int64)
        )
        message = wire.TrainRequest.carrying(self.session, _new_id(), dataset_id, args)
        request = wire.encode(message)
        reply = self._on_dataset("Train", request, wire.TrainReply, dataset_id, long=True)
        self._trained = True
        self._replay_state = None
        return dict(reply.metrics)

    def _on_dataset(
        self,
        method: str,
        request: bytes,
        reply_type: type[wire.M],
        dataset_id: str,
        *,
        long: bool = False,
    ) -> wire.M:
        """A session call on an uploaded data set; if the server lost it (a restart), the
        same recorded payload is uploaded again and the call repeated."""
        for _ in range(3):
            try:
                return self._session_call(method, request, reply_type, long=long)
            except PublicServerError as err:
                if err.missing != "dataset" or dataset_id not in self._uploads:
                    raise
                log.warning("the server lost data set %s; uploading it again", dataset_id)
                self._send_upload(*self._uploads[dataset_id])
        raise PublicServerError(
            method, grpc.StatusCode.ABORTED, f"the server kept losing data set {dataset_id}"
        )

    def step_logits_with(self, dataset_id: str, args: StepArgs) -> Tensor:
        """z_res of the step's rows in training mode, held on the server for
        :meth:`step_apply` (see :class:`asymflow.delta.contract.StepwisePublicSide`)."""
        rows = checked_rows(args.indices, np.iinfo(np.int64).max).astype(np.int64)
        model = args.model
        message = wire.StepLogitsRequest(
            self.session, _new_id(), dataset_id, float(args.lr), args.seed, args.step, model, rows
        )
        self._steps[model] = wire.encode(message)
        return self._step_logits(model, dataset_id)

    def _step_logits(self, model: str, dataset_id: str) -> Tensor:
        request = self._steps[model]
        reply = self._on_dataset("StepLogits", request, wire.LogitsReply, dataset_id)
        self.server_seconds += reply.seconds
        return torch.from_numpy(reply.logits)

    def step_apply(self, gradients: NoisyLabelGradients, *, model: str = DEFAULT_MODEL) -> None:
        """Send the released gradients of ``model``'s pending batch for one optimizer step.
        One request id for all retries, so the step is applied at most once; if the server
        lost the pending batch (a restart), its StepLogits is sent again first and the same
        gradients follow: nothing new is released."""
        if not isinstance(gradients, NoisyLabelGradients):
            raise TypeError(
                f"gradients must be NoisyLabelGradients, got {type(gradients).__name__}"
            )
        if model not in self._steps:
            raise ValueError(f"model {model!r} has no pending step: call step_logits first")
        request = wire.encode(wire.StepApplyRequest(self.session, _new_id(), model, gradients))
        for _ in range(3):
            try:
                self._session_call("StepApply", request, wire.Empty, long=True)
            except PublicServerError as err:
                if err.missing != "step":
                    raise
                log.warning("the server lost the pending step of %s; computing it again", model)
                step = wire.decode(self._steps[model], wire.StepLogitsRequest)
                self._steps[model] = wire.encode(replace(step, request_id=_new_id()))
                self._step_logits(model, step.dataset_id)
                continue
            self._trained = True
            self._replay_state = None
            del self._steps[model]
            return
        raise PublicServerError(
            "StepApply", grpc.StatusCode.ABORTED, "the server kept losing the pending step"
        )

    def logits(self, data: SanitizedResidual, *, model: str = DEFAULT_MODEL) -> Tensor:
        """z_res (N, classes) of released residuals, in messages of at most the part size."""
        check_payload(data)
        if len(data) == 0:
            return torch.empty(0)
        rows = max(1, (self._part_bytes() - 4096) // data.bytes_per_sample)
        out = []
        for start in range(0, len(data), rows):
            message = wire.LogitsRequest(
                self.session, data.subset(slice(start, start + rows)), model
            )
            reply = self._session_call("Logits", wire.encode(message), wire.LogitsReply)
            self.server_seconds += reply.seconds
            out.append(torch.from_numpy(reply.logits))
        return torch.cat(out)

    def forget(self, dataset_id: str) -> None:
        """Let the server drop a data set (e.g. an earlier per-epoch release)."""
        self._uploads.pop(dataset_id, None)
        if self._configured:
            request = wire.encode(wire.ForgetRequest(self.session, dataset_id))
            self._session_call("Forget", request, wire.Empty)

    def state_dict(self) -> dict[str, Any]:
        """The server's models and optimizer states, fetched one model per message."""
        if not self._configured:
            if self._pending_state is not None:
                return dict(self._pending_state)
            return {"models": {}, "optimizers": {}}
        request = wire.encode(wire.StateRequest(self.session, None))
        names = self._session_call("GetState", request, wire.StateReply).models
        models: dict[str, Any] = {}
        optimizers: dict[str, Any] = {}
        for name in names:
            request = wire.encode(wire.StateRequest(self.session, name))
            state = self._session_call("GetState", request, wire.StateReply).state
            assert state is not None
            models[name] = state["model"]
            optimizers[name] = state["optimizer"]
        return {"models": models, "optimizers": optimizers}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the server's models with :meth:`state_dict` output (sent when the
        session is configured, i.e. at once or at the first upload)."""
        if not isinstance(state, Mapping) or set(state) != {"models", "optimizers"}:
            raise ValueError("state must be a public state dict with 'models' and 'optimizers'")
        if set(state["models"]) != set(state["optimizers"]):
            raise ValueError("state must hold an optimizer state for every model")
        if not self._configured:
            if self._spec is None:
                self._pending_state = state
                return
            self._configure()
        self._push_state(state)

    def _push_state(self, state: Mapping[str, Any]) -> None:
        for name in state["models"]:
            message = wire.LoadStateRequest(
                self.session,
                _new_id(),
                name,
                {"model": state["models"][name], "optimizer": state["optimizers"][name]},
            )
            self._call("LoadState", wire.encode(message), wire.Empty)
        self._replay_state = state
        self._trained = False  # the server's models equal ``state`` again

    # -------------------------------------------------------------- runs

    @classmethod
    def for_run(cls, run_dir: str | os.PathLike[str], target: str, **kwargs: Any) -> RemotePublic:
        """A client for inference with a trained run: its spec from the run's config and
        checkpoint, and the checkpoint's public models sent to the server."""
        run = trained_public(run_dir)
        spec = PublicSpec.from_config(run.config, classes=run.classes, shape=run.shape)
        client = cls(target, spec=spec, **kwargs)
        if run.state is not None:
            client.load_state_dict(run.state)
        return client


def _labels_subset(labels: NoisyLabels, index: slice) -> NoisyLabels:
    return NoisyLabels(np.array(labels.labels[index]), labels.classes, labels.event)


__all__ = [
    "PublicServerError",
    "PublicSessionLostError",
    "RemotePublic",
    "RetryPolicy",
]
