"""The messages of the private <-> public link, each field declared once with its rule.

Every message is one envelope of :mod:`asymflow.transport.codec`; encoding, decoding and the
strict checks follow from the declarations below, and decoding raises only :class:`WireError`.
The typed messages carry :class:`SanitizedResidual` (bit-packed, with its privacy event),
:class:`NoisyLabels`, model states and plain arguments, the only things allowed across the
boundary (DESIGN.md sec. 2, 5). The names of the codec its users call (``wire.encode``,
``wire.pack``, ...) are re-exported here.
"""

# No ``from __future__ import annotations``: the rules in the messages' annotations are built
# when the module is imported.
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Annotated, Any, ClassVar

import numpy as np
from torch import Tensor

from asymflow.accounting.events import (
    BalancedSampled,
    Event,
    Gaussian,
    NonPrivate,
    RandomizedResponse,
)
from asymflow.delta.contract import (
    LABELS_LAYOUT,
    RESIDUAL_LAYOUT,
    WIRE_VERSION,
    Layout,
    NoisyLabelGradients,
    NoisyLabels,
    PartKind,
    SanitizedResidual,
    TrainArgs,
)
from asymflow.transport.codec import MAGIC as MAGIC
from asymflow.transport.codec import (
    MAX_DIM,
    Array,
    Flag,
    Integer,
    Items,
    Map,
    Nullable,
    Number,
    PrivacyEvent,
    Record,
    Rule,
    Text,
    Version,
)
from asymflow.transport.codec import PROTOCOL_VERSION as PROTOCOL_VERSION
from asymflow.transport.codec import Envelope as Envelope
from asymflow.transport.codec import M as M
from asymflow.transport.codec import Message as Message
from asymflow.transport.codec import Refusal as Refusal
from asymflow.transport.codec import WireError as WireError
from asymflow.transport.codec import decode as decode
from asymflow.transport.codec import encode as encode
from asymflow.transport.codec import pack as pack
from asymflow.transport.codec import tree_from_wire as tree_from_wire
from asymflow.transport.codec import tree_to_wire as tree_to_wire
from asymflow.transport.codec import unpack as unpack
from asymflow.transport.spec import MAX_CLASSES, MAX_SAMPLE_ELEMENTS, PublicSpec

SERVICE = "asymflow.transport.v1.PublicSide"
"""The gRPC service name; methods are ``/SERVICE/Method``, requests and replies envelopes."""

MISSING_KEY = "asymflow-missing"
"""Trailing metadata of a NOT_FOUND reply: what is missing (``session`` or ``dataset``)."""

MAX_STEP_ROWS = 1 << 16
"""Most rows in one training step of ``labels="grad"`` (one batch)."""

RESIDUAL_EVENTS: tuple[type[Event], ...] = (Gaussian, NonPrivate, BalancedSampled)
"""Events a residual release may carry: the Gaussian sanitizer, the flagged sign quantizer, or
a padded pass of the Gaussian sanitizer (``BalancedSampled`` of a ``Gaussian``)."""

LABEL_EVENTS: tuple[type[Event], ...] = (RandomizedResponse, NonPrivate)
"""Events a label release may carry: randomized response or flagged clear labels."""

SESSION = Text(re.compile(r"[0-9a-f]{32}"))
REQUEST_ID = SESSION
DATASET_ID = Text(re.compile(r"[0-9a-f]{20}"))
MODEL = Text(re.compile(r"[A-Za-z0-9_.\-]{1,64}"))
LR = Number(bounds=(0.0, 1e3))
SEED = Integer(0, 2**62)
INDICES = Array(np.int64, 1, rows=(1, MAX_DIM))
STEP_INDICES = Array(np.int64, 1, rows=(1, MAX_STEP_ROWS))


# ------------------------------------------------------------------------- payloads


class ResidualShape(Rule):
    """A residual's [c, h, w]: positive integers with c*h*w <= MAX_SAMPLE_ELEMENTS."""

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> list[int]:
        return [int(d) for d in value]

    def decode(self, raw: Any, env: Envelope, where: str) -> tuple[int, int, int]:
        if not isinstance(raw, list) or len(raw) != 3:
            raise WireError(f"{where} must be [c, h, w], got {raw!r}")
        for d in raw:
            if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_SAMPLE_ELEMENTS:
                raise WireError(f"{where} must hold positive integers, got {raw!r}")
        if math.prod(raw) > MAX_SAMPLE_ELEMENTS:
            raise WireError(
                f"{where} must have c*h*w <= {MAX_SAMPLE_ELEMENTS}, got {math.prod(raw)}",
                Refusal.TOO_LARGE,
            )
        return (raw[0], raw[1], raw[2])


def _check_residual(values: dict[str, Any], where: str) -> None:
    """A padded pass samples a Gaussian; the bits are ceil(c*h*w/8) bytes a sample, with
    zero padding bits."""
    event, shape, bits = values["event"], values["shape"], values["bits"]
    if isinstance(event, BalancedSampled) and not isinstance(event.event, Gaussian):
        raise WireError(f"{where}.event of a padded pass must sample a Gaussian, got {event!r}")
    elements = math.prod(shape)
    width = math.ceil(elements / 8)
    if bits.shape[1] != width:
        raise WireError(
            f"{where}.bits must have ceil(c*h*w/8) = {width} bytes per sample for shape {shape}, "
            f"got {bits.shape[1]}"
        )
    spare = 8 * width - elements
    if spare and len(bits) and np.any(bits[:, -1] & ((1 << spare) - 1)):
        raise WireError(f"{where}.bits must have zero padding bits after c*h*w elements")


def _check_labels(values: dict[str, Any], where: str) -> None:
    """Every label lies in [0, classes)."""
    labels, classes = values["labels"], values["classes"]
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise WireError(
            f"{where}.values must lie in [0, {classes}), got [{labels.min()}, {labels.max()}]"
        )


_KINDS: dict[PartKind, tuple[type[Rule], ...]] = {
    "array": (Array,),
    "int": (Integer, Version),
    "ints": (ResidualShape,),
    "event": (PrivacyEvent,),
}


def _payload(
    layout: Layout, what: str, rules: dict[str, Rule], check: Callable[[dict[str, Any], str], None]
) -> Record:
    """The record of a payload: one rule per part of its layout, sent in the layout's order."""
    parts = {part.key: part for part in layout.parts}
    if set(rules) != set(parts) or any(
        not isinstance(rules[key], _KINDS[part.kind]) for key, part in parts.items()
    ):
        raise TypeError(f"rules of {what} must follow its layout, got {sorted(rules)}")
    fields = {key: rules[key] for key in parts}
    attrs = {key: part.attr for key, part in parts.items() if part.attr}
    return Record(layout.cls, what, fields, attrs=attrs, check=check)


RESIDUAL = _payload(
    RESIDUAL_LAYOUT,
    "residual release: clipped, noised, 1-bit",
    {
        "shape": ResidualShape(),
        "version": Version(WIRE_VERSION, "sanitized-residual format"),
        "event": PrivacyEvent(RESIDUAL_EVENTS),
        "bits": Array(np.uint8, 2, copy=False),
    },
    _check_residual,
)
LABELS = _payload(
    LABELS_LAYOUT,
    "label release",
    {
        "classes": Integer(2, MAX_CLASSES),
        "event": PrivacyEvent(LABEL_EVENTS),
        "values": Array(np.int64, 1),
    },
    _check_labels,
)
GRADIENTS = Record(
    NoisyLabelGradients,
    "label-gradient release",
    {
        "event": PrivacyEvent((Gaussian,)),
        "values": Array(np.float32, 2, rows=(1, MAX_STEP_ROWS), cols=(2, MAX_CLASSES)),
    },
)


class Spec(Rule):
    """A :class:`PublicSpec` as its dict."""

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> dict[str, Any]:
        return value.to_dict()

    def decode(self, raw: Any, env: Envelope, where: str) -> PublicSpec:
        if not isinstance(raw, dict):
            raise WireError(f"{where} must be a JSON object")
        try:
            return PublicSpec.from_dict(raw)
        except (TypeError, ValueError) as err:
            raise WireError(f"{where} is invalid: {err}") from None


class ModelState(Rule):
    """{"model": parameter name -> tensor, "optimizer": state dict}, as a state tree."""

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> Any:
        return tree_to_wire(value, arrays)

    def decode(self, raw: Any, env: Envelope, where: str) -> dict[str, Any]:
        state = tree_from_wire(raw, env, where=where)
        if not isinstance(state, dict) or set(state) != {"model", "optimizer"}:
            raise WireError(f"{where} must hold exactly 'model' and 'optimizer'")
        weights = state["model"]
        if not isinstance(weights, dict) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in weights.items()
        ):
            raise WireError(f"{where}.model must map parameter names to tensors")
        if not isinstance(state["optimizer"], dict):
            raise WireError(f"{where}.optimizer must be an optimizer state dict")
        return state


# ------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class EventMessage(Message):
    """A standalone privacy event."""

    KIND: ClassVar[int] = 90
    event: Annotated[Event, PrivacyEvent()]


def encode_event(event: Event) -> bytes:
    """A privacy event as a standalone envelope (e.g. for logs and audits)."""
    return encode(EventMessage(event))


def decode_event(buffer: bytes) -> Event:
    """Inverse of :func:`encode_event`."""
    return decode(buffer, EventMessage).event


@dataclass(frozen=True)
class ConfigureRequest(Message):
    """Open (or confirm) session ``session`` with the public model ``spec``."""

    KIND: ClassVar[int] = 1
    session: Annotated[str, SESSION]
    spec: Annotated[PublicSpec, Spec()]


@dataclass(frozen=True)
class ConfigureReply(Message):
    """``created`` is false when the session already existed with the same spec."""

    KIND: ClassVar[int] = 101
    session: Annotated[str, SESSION]
    created: Annotated[bool, Flag()]


@dataclass(frozen=True)
class UploadRequest(Message):
    """Part ``part`` of ``parts`` of upload ``request_id``: consecutive rows of one release
    (and their label-DP labels, if any)."""

    KIND: ClassVar[int] = 2
    session: Annotated[str, SESSION]
    request_id: Annotated[str, REQUEST_ID]
    part: Annotated[int, Integer(0, (1 << 20) - 1)]
    parts: Annotated[int, Integer(1, 1 << 20)]
    data: Annotated[SanitizedResidual, RESIDUAL]
    labels: Annotated[NoisyLabels | None, Nullable(LABELS)] = None

    @classmethod
    def check(cls, values: dict[str, Any], where: str) -> None:
        """``part`` < ``parts``; one label per sample."""
        part, parts, data, labels = (values[k] for k in ("part", "parts", "data", "labels"))
        if part >= parts:
            raise WireError(f"{where}.part must be an integer in [0, {parts - 1}], got {part}")
        if labels is not None and len(labels) != len(data):
            raise WireError(
                f"{where}.labels must have one entry per sample ({len(data)}), got {len(labels)}"
            )


@dataclass(frozen=True)
class UploadReply(Message):
    """The data set's id once all parts arrived (None before), and the parts received."""

    KIND: ClassVar[int] = 102
    dataset_id: Annotated[str | None, Nullable(DATASET_ID)]
    received: Annotated[int, Integer(0, 1 << 20)]


@dataclass(frozen=True)
class TrainRequest(Message):
    """Arguments of :meth:`PublicSide.train`, with a request id for idempotent retries."""

    KIND: ClassVar[int] = 3
    session: Annotated[str, SESSION]
    request_id: Annotated[str, REQUEST_ID]
    dataset_id: Annotated[str, DATASET_ID]
    epochs: Annotated[int, Integer(0, 1 << 20)]
    batch_size: Annotated[int, Integer(1, 1 << 20)]
    lr: Annotated[float, LR]
    seed: Annotated[int, SEED]
    start_epoch: Annotated[int, Integer(0, 1 << 30)] = 0
    total_epochs: Annotated[int | None, Nullable(Integer(0, 1 << 30))] = None
    model: Annotated[str, MODEL] = "res"
    indices: Annotated[np.ndarray | None, Nullable(INDICES)] = field(default=None, compare=False)

    @classmethod
    def carrying(
        cls, session: str, request_id: str, dataset_id: str, args: TrainArgs
    ) -> "TrainRequest":
        """The request that trains as ``args`` says."""
        return cls(
            session, request_id, dataset_id, **{f.name: getattr(args, f.name) for f in fields(args)}
        )

    @property
    def args(self) -> TrainArgs:
        """The training arguments this request carries."""
        return TrainArgs(**{f.name: getattr(self, f.name) for f in fields(TrainArgs)})


@dataclass(frozen=True)
class TrainReply(Message):
    """The public side's training metrics (loss, accuracy on the received labels, samples)."""

    KIND: ClassVar[int] = 103
    metrics: Annotated[dict[str, float], Map(Number(finite=False), most=64)]


@dataclass(frozen=True)
class LogitsRequest(Message):
    """z_res of released residuals from model ``model`` (no new release: the payload was
    recorded when it was sanitized)."""

    KIND: ClassVar[int] = 4
    KEYS: ClassVar[tuple[str, ...]] = ("session", "model", "data")
    session: Annotated[str, SESSION]
    data: Annotated[SanitizedResidual, RESIDUAL]
    model: Annotated[str, MODEL] = "res"


@dataclass(frozen=True)
class LogitsReply(Message):
    """float32 logits (N, classes) and the server's compute time in seconds."""

    KIND: ClassVar[int] = 104
    logits: Annotated[np.ndarray, Array(np.float32, 2)]
    seconds: Annotated[float, Number()] = 0.0


@dataclass(frozen=True)
class StepLogitsRequest(Message):
    """Arguments of :meth:`StepwisePublicSide.step_logits` (``labels="grad"``): z_res of rows
    ``indices`` in training mode, held by the server until the StepApply that follows."""

    KIND: ClassVar[int] = 8
    session: Annotated[str, SESSION]
    request_id: Annotated[str, REQUEST_ID]
    dataset_id: Annotated[str, DATASET_ID]
    lr: Annotated[float, LR]
    seed: Annotated[int, SEED]
    step: Annotated[int, Integer(0, 2**40)]
    model: Annotated[str, MODEL]
    indices: Annotated[np.ndarray, STEP_INDICES] = field(compare=False)


@dataclass(frozen=True)
class StepApplyRequest(Message):
    """One optimizer step of ``model`` along released noisy label gradients (a label-DP
    payload, recorded in the private side's ledger before it was sent)."""

    KIND: ClassVar[int] = 9
    session: Annotated[str, SESSION]
    request_id: Annotated[str, REQUEST_ID]
    model: Annotated[str, MODEL]
    gradients: Annotated[NoisyLabelGradients, GRADIENTS] = field(compare=False)


@dataclass(frozen=True)
class StateRequest(Message):
    """The names of the session's models, and the state of ``model`` if given."""

    KIND: ClassVar[int] = 5
    session: Annotated[str, SESSION]
    model: Annotated[str | None, Nullable(MODEL)] = None


@dataclass(frozen=True)
class StateReply(Message):
    """Model names, and ``state`` = {"model": weights, "optimizer": SGD state} of one model."""

    KIND: ClassVar[int] = 105
    models: Annotated[tuple[str, ...], Items(MODEL)]
    state: Annotated[dict[str, Any] | None, Nullable(ModelState())] = None


@dataclass(frozen=True)
class LoadStateRequest(Message):
    """Replace model ``model`` (weights and optimizer) with ``state``."""

    KIND: ClassVar[int] = 6
    session: Annotated[str, SESSION]
    request_id: Annotated[str, REQUEST_ID]
    model: Annotated[str, MODEL]
    state: Annotated[dict[str, Any], ModelState()]


@dataclass(frozen=True)
class ForgetRequest(Message):
    """Drop an uploaded data set."""

    KIND: ClassVar[int] = 7
    session: Annotated[str, SESSION]
    dataset_id: Annotated[str, DATASET_ID]


@dataclass(frozen=True)
class Empty(Message):
    """A reply without content (LoadState, Forget) or the Health request."""

    KIND: ClassVar[int] = 100


@dataclass(frozen=True)
class HealthReply(Message):
    """Server status: protocol and payload versions, limits, sessions and counters."""

    KIND: ClassVar[int] = 108
    status: Annotated[str, Text()]
    protocol: Annotated[int, Integer(0, 1 << 16)]
    wire_version: Annotated[int, Integer(0, 1 << 16)]
    max_message_bytes: Annotated[int, Integer(0, 1 << 40)]
    pid: Annotated[int, Integer(0, 1 << 40)]
    sessions: Annotated[int, Integer(0, 1 << 20)]
    counters: Annotated[dict[str, int], Map(Integer(0, 2**62))] = field(default_factory=dict)


REQUESTS: tuple[type[Message], ...] = (
    ConfigureRequest,
    UploadRequest,
    TrainRequest,
    LogitsRequest,
    StepLogitsRequest,
    StepApplyRequest,
    StateRequest,
    LoadStateRequest,
    ForgetRequest,
    Empty,
)
"""Every request type the server decodes (``Empty`` is the Health request)."""
