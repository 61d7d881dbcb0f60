"""The wire format of the private <-> public link: a small versioned binary envelope.

Every message is one envelope (all integers big-endian)::

    header  4s magic b"ASFW" | u16 protocol version | u16 kind | u32 meta length | u32 arrays
    meta    UTF-8 JSON object (at most MAX_META_BYTES)
    arrays  per array: u8 dtype code | u8 ndim | ndim x u64 dims | raw little-endian data

and nothing else: no trailing bytes, no pickle, no code. JSON names arrays by their index.
Decoding is strict: wrong magic, version, kind, length, dtype, shape, field name or field type
raise :class:`WireError`, the only exception the decoders raise. The typed messages carry
:class:`SanitizedResidual` (bit-packed, with its privacy event), :class:`NoisyLabels`, model
states and plain arguments, the only things allowed across the boundary (DESIGN.md sec. 2, 5).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor

from asymflow.accounting.events import (
    BalancedSampled,
    Event,
    Gaussian,
    NonPrivate,
    RandomizedResponse,
    event_from_dict,
)
from asymflow.delta.labels import NoisyLabelGradients, NoisyLabels
from asymflow.delta.sanitize import WIRE_VERSION, SanitizedResidual
from asymflow.transport.spec import MAX_CLASSES, MAX_SAMPLE_ELEMENTS, PublicSpec

MAGIC = b"ASFW"
PROTOCOL_VERSION = 1
"""Version of the envelope and of the message schemas below."""

SERVICE = "asymflow.transport.v1.PublicSide"
"""The gRPC service name; methods are ``/SERVICE/Method``, requests and replies envelopes."""

MISSING_KEY = "asymflow-missing"
"""Trailing metadata of a NOT_FOUND reply: what is missing (``session`` or ``dataset``)."""

MAX_META_BYTES = 1 << 20
MAX_ARRAYS = 4096
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_TREE_DEPTH = 32
MAX_TREE_NODES = 200_000
MAX_EVENT_DEPTH = 8
MAX_TEXT = 256
MAX_STEP_ROWS = 1 << 16
"""Most rows in one training step of ``labels="grad"`` (one batch)."""

_HEADER = struct.Struct(">4sHHII")
_ARRAY = struct.Struct(">BB")

_DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype("u1"),
    2: np.dtype("<i8"),
    3: np.dtype("<f4"),
    4: np.dtype("<f8"),
    5: np.dtype("<i4"),
    6: np.dtype("?"),
    7: np.dtype("<f2"),
    8: np.dtype("<i2"),
    9: np.dtype("i1"),
}
_CODES: dict[np.dtype[Any], int] = {dt.newbyteorder("="): code for code, dt in _DTYPES.items()}

_HEX32 = re.compile(r"[0-9a-f]{32}")
_DATASET_ID = re.compile(r"[0-9a-f]{20}")
_MODEL = re.compile(r"[A-Za-z0-9_.\-]{1,64}")

RESIDUAL_EVENTS: tuple[type[Event], ...] = (Gaussian, NonPrivate, BalancedSampled)
"""Events a residual release may carry: the Gaussian sanitizer, the flagged sign quantizer, or
a padded pass of the Gaussian sanitizer (``BalancedSampled`` of a ``Gaussian``)."""

LABEL_EVENTS: tuple[type[Event], ...] = (RandomizedResponse, NonPrivate)
"""Events a label release may carry: randomized response or flagged clear labels."""


class Refusal(Enum):
    """Why a message was refused; the server maps it to a gRPC status."""

    MALFORMED = "malformed"
    VERSION = "version"
    TOO_LARGE = "too large"


class WireError(ValueError):
    """A message that is not a well-formed envelope of the expected kind."""

    def __init__(self, message: str, reason: Refusal = Refusal.MALFORMED) -> None:
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------- envelope


@dataclass(frozen=True)
class Envelope:
    """A decoded envelope: its kind, JSON meta and arrays (read-only views of the buffer).

    ``used`` collects the indices of the arrays a message reader consumed: a message must
    use each of its arrays exactly once.
    """

    kind: int
    meta: dict[str, Any]
    arrays: tuple[np.ndarray, ...] = ()
    used: set[int] = field(default_factory=set, compare=False)

    def take(self, index: object, where: str) -> np.ndarray:
        """Array ``index`` (marked used); a missing or reused index is refused."""
        if isinstance(index, bool) or not isinstance(index, int):
            raise WireError(f"{where} must be an array index, got {index!r}")
        if not 0 <= index < len(self.arrays):
            raise WireError(f"{where} must index one of the {len(self.arrays)} arrays, got {index}")
        if index in self.used:
            raise WireError(f"{where} refers to array {index}, already used by another field")
        self.used.add(index)
        return self.arrays[index]


def pack(kind: int, meta: Mapping[str, Any], arrays: Sequence[np.ndarray] = ()) -> bytes:
    """Serialize an envelope (``kind``, JSON ``meta``, ``arrays``) to bytes."""
    text = json.dumps(meta, separators=(",", ":"), allow_nan=True).encode()
    if len(text) > MAX_META_BYTES:
        raise WireError(
            f"meta must be at most {MAX_META_BYTES} bytes, got {len(text)}", Refusal.TOO_LARGE
        )
    if len(arrays) > MAX_ARRAYS:
        raise WireError(f"a message holds at most {MAX_ARRAYS} arrays, got {len(arrays)}")
    parts = [_HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, len(text), len(arrays)), text]
    for array in arrays:
        native = array.dtype.newbyteorder("=")
        code = _CODES.get(native)
        if code is None:
            raise WireError(
                f"arrays must have one of the dtypes {_dtype_names()}, got {array.dtype}"
            )
        if array.ndim > MAX_NDIM:
            raise WireError(f"arrays must have at most {MAX_NDIM} dimensions, got {array.ndim}")
        data = np.asarray(array, dtype=_DTYPES[code], order="C")
        parts.append(_ARRAY.pack(code, data.ndim))
        parts.append(struct.pack(f">{data.ndim}Q", *data.shape))
        parts.append(data.tobytes())
    return b"".join(parts)


def _dtype_names() -> list[str]:
    return [str(dt) for dt in _DTYPES.values()]


def unpack(buffer: bytes, *, max_bytes: int | None = None) -> Envelope:
    """Parse an envelope; anything else raises :class:`WireError`."""
    if not isinstance(buffer, bytes | bytearray | memoryview):
        raise WireError(f"message must be bytes, got {type(buffer).__name__}")
    view = memoryview(buffer).cast("B")
    if max_bytes is not None and len(view) > max_bytes:
        raise WireError(
            f"message must be at most {max_bytes} bytes, got {len(view)}", Refusal.TOO_LARGE
        )
    if len(view) < _HEADER.size:
        raise WireError(
            f"message must start with a {_HEADER.size}-byte header, got {len(view)} bytes"
        )
    magic, version, kind, meta_len, count = _HEADER.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError(f"message must start with the magic {MAGIC!r}, got {bytes(magic)!r}")
    if version != PROTOCOL_VERSION:
        raise WireError(
            f"protocol version must be {PROTOCOL_VERSION}, got {version} "
            "(client and server must run compatible asymflow releases)",
            Refusal.VERSION,
        )
    if meta_len > MAX_META_BYTES:
        raise WireError(f"meta must be at most {MAX_META_BYTES} bytes, got {meta_len}")
    if count > MAX_ARRAYS:
        raise WireError(f"a message holds at most {MAX_ARRAYS} arrays, got {count}")
    offset = _HEADER.size
    if offset + meta_len > len(view):
        raise WireError(f"meta length {meta_len} runs past the end of the message")
    meta = _parse_json(bytes(view[offset : offset + meta_len]))
    offset += meta_len
    arrays = []
    for i in range(count):
        array, offset = _read_array(view, offset, i)
        arrays.append(array)
    if offset != len(view):
        raise WireError(f"message has {len(view) - offset} trailing bytes after its arrays")
    return Envelope(kind, meta, tuple(arrays))


def _parse_json(text: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WireError(f"meta must be UTF-8 JSON: {type(err).__name__}") from None
    if not isinstance(meta, dict):
        raise WireError(f"meta must be a JSON object, got {type(meta).__name__}")
    return meta


def _read_array(view: memoryview, offset: int, index: int) -> tuple[np.ndarray, int]:
    if offset + _ARRAY.size > len(view):
        raise WireError(f"array {index}: header runs past the end of the message")
    code, ndim = _ARRAY.unpack_from(view, offset)
    offset += _ARRAY.size
    dtype = _DTYPES.get(code)
    if dtype is None:
        raise WireError(f"array {index}: dtype code must be one of {sorted(_DTYPES)}, got {code}")
    if ndim > MAX_NDIM:
        raise WireError(f"array {index}: ndim must be at most {MAX_NDIM}, got {ndim}")
    if offset + 8 * ndim > len(view):
        raise WireError(f"array {index}: dims run past the end of the message")
    dims = struct.unpack_from(f">{ndim}Q", view, offset)
    offset += 8 * ndim
    if any(d > MAX_DIM for d in dims):
        raise WireError(f"array {index}: every dimension must be at most {MAX_DIM}, got {dims}")
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes > len(view) - offset:
        raise WireError(
            f"array {index}: {dims} of {dtype} needs {nbytes} bytes, "
            f"{len(view) - offset} remain in the message"
        )
    try:
        flat = np.frombuffer(view, dtype=dtype, count=math.prod(dims), offset=offset)
        array = flat.reshape(dims)
    except ValueError as err:
        raise WireError(f"array {index}: {err}") from None
    if dtype == np.bool_ and array.size and np.any(array.view(np.uint8) > 1):
        raise WireError(f"array {index}: bool data must be 0 or 1 bytes")
    return array, offset + nbytes


# ------------------------------------------------------------------------- field readers


class _Fields:
    """Strict readers of a meta object: every key must be read exactly once."""

    def __init__(self, meta: object, env: Envelope, where: str) -> None:
        if not isinstance(meta, dict):
            raise WireError(f"{where} must be a JSON object, got {type(meta).__name__}")
        self.meta: dict[str, Any] = meta
        self.env = env
        self.where = where
        self.seen: set[str] = set()

    def _get(self, name: str) -> Any:
        if name not in self.meta:
            raise WireError(f"{self.where}.{name} is missing")
        self.seen.add(name)
        return self.meta[name]

    def has(self, name: str) -> bool:
        return name in self.meta

    def raw(self, name: str) -> Any:
        return self._get(name)

    def text(self, name: str, pattern: re.Pattern[str] | None = None) -> str:
        value = self._get(name)
        if not isinstance(value, str) or len(value) > MAX_TEXT:
            raise WireError(f"{self.where}.{name} must be a string of at most {MAX_TEXT} chars")
        if pattern is not None and not pattern.fullmatch(value):
            raise WireError(f"{self.where}.{name} must match {pattern.pattern}, got {value!r}")
        return value

    def optional_text(self, name: str, pattern: re.Pattern[str]) -> str | None:
        if self.meta.get(name, 0) is None:
            self.seen.add(name)
            return None
        return self.text(name, pattern)

    def integer(self, name: str, low: int, high: int) -> int:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise WireError(
                f"{self.where}.{name} must be an integer in [{low}, {high}], got {value!r}"
            )
        return value

    def optional_integer(self, name: str, low: int, high: int) -> int | None:
        if self.meta.get(name, 0) is None:
            self.seen.add(name)
            return None
        return self.integer(name, low, high)

    def number(self, name: str, *, finite: bool = True) -> float:
        value = self._get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WireError(f"{self.where}.{name} must be a number, got {value!r}")
        if finite and not math.isfinite(value):
            raise WireError(f"{self.where}.{name} must be finite, got {value!r}")
        return float(value)

    def flag(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise WireError(f"{self.where}.{name} must be true or false, got {value!r}")
        return value

    def obj(self, name: str) -> dict[str, Any]:
        value = self._get(name)
        if not isinstance(value, dict):
            raise WireError(f"{self.where}.{name} must be a JSON object")
        return value

    def array(self, name: str, dtype: np.dtype[Any] | type, ndim: int) -> np.ndarray:
        array = self.env.take(self._get(name), f"{self.where}.{name}")
        if array.dtype != np.dtype(dtype) or array.ndim != ndim:
            raise WireError(
                f"{self.where}.{name} must be a {ndim}-D {np.dtype(dtype)} array, "
                f"got {array.ndim}-D {array.dtype}"
            )
        return array

    def done(self) -> None:
        extra = sorted(set(self.meta) - self.seen)
        if extra:
            raise WireError(f"{self.where} has unknown fields {extra[:8]}")


# ------------------------------------------------------------------------- events


def event_to_wire(event: Event) -> dict[str, Any]:
    """The JSON form of a privacy event (:meth:`Event.to_dict`)."""
    if not isinstance(event, Event):
        raise WireError(f"event must be an Event, got {type(event).__name__}")
    return event.to_dict()


def event_from_wire(
    data: object, allowed: tuple[type[Event], ...] | None = None, *, where: str = "event"
) -> Event:
    """Rebuild a privacy event, refusing types outside ``allowed`` (None: any known type),
    nesting deeper than MAX_EVENT_DEPTH and any field the event does not declare."""
    _check_event_json(data, where, 0)
    try:
        event = event_from_dict(data)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, RecursionError, AttributeError) as err:
        raise WireError(f"{where} is not a valid privacy event: {err}") from None
    if allowed is not None and not isinstance(event, allowed):
        names = [t.__name__ for t in allowed]
        raise WireError(f"{where} must be one of {names}, got {type(event).__name__}")
    if event.to_dict() != data:
        raise WireError(f"{where} holds fields its type {type(event).__name__} does not declare")
    return event


def _check_event_json(data: object, where: str, depth: int) -> None:
    if depth > MAX_EVENT_DEPTH:
        raise WireError(f"{where} nests deeper than {MAX_EVENT_DEPTH} events")
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise WireError(f"{where} must be an object with a string 'type'")
    for key, value in data.items():
        if not isinstance(key, str):
            raise WireError(f"{where} has a non-string key")
        if isinstance(value, dict):
            _check_event_json(value, f"{where}.{key}", depth + 1)
        elif isinstance(value, list):
            if len(value) > 1024:
                raise WireError(f"{where}.{key} lists more than 1024 events")
            for i, item in enumerate(value):
                _check_event_json(item, f"{where}.{key}[{i}]", depth + 1)
        elif isinstance(value, str) and len(value) > MAX_TEXT:
            raise WireError(f"{where}.{key} must be at most {MAX_TEXT} characters")
        elif value is not None and not isinstance(value, str | int | float | bool):
            raise WireError(f"{where}.{key} has an unsupported value")


def encode_event(event: Event) -> bytes:
    """A privacy event as a standalone envelope (e.g. for logs and audits)."""
    return pack(EventMessage.KIND, {"event": event_to_wire(event)})


def decode_event(buffer: bytes) -> Event:
    """Inverse of :func:`encode_event`."""
    return decode(buffer, EventMessage).event


# ------------------------------------------------------------------------- payloads


def _residual_meta(data: SanitizedResidual, arrays: list[np.ndarray]) -> dict[str, Any]:
    if not isinstance(data, SanitizedResidual):
        raise WireError(
            f"data must be a SanitizedResidual (clipped, noised, 1-bit), got {type(data).__name__}"
        )
    arrays.append(np.ascontiguousarray(data.bits))
    return {
        "shape": [int(d) for d in data.shape],
        "version": int(data.version),
        "event": event_to_wire(data.event),
        "bits": len(arrays) - 1,
    }


def _residual_from(meta: object, env: Envelope, where: str) -> SanitizedResidual:
    f = _Fields(meta, env, where)
    version = f.integer("version", 0, 2**16)
    if version != WIRE_VERSION:
        raise WireError(
            f"{where}.version must be {WIRE_VERSION} (sanitized-residual format), got {version}",
            Refusal.VERSION,
        )
    shape_value = f.raw("shape")
    if not isinstance(shape_value, list) or len(shape_value) != 3:
        raise WireError(f"{where}.shape must be [c, h, w], got {shape_value!r}")
    for d in shape_value:
        if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= MAX_SAMPLE_ELEMENTS:
            raise WireError(f"{where}.shape must hold positive integers, got {shape_value!r}")
    shape = (shape_value[0], shape_value[1], shape_value[2])
    elements = math.prod(shape)
    if elements > MAX_SAMPLE_ELEMENTS:
        raise WireError(
            f"{where}.shape must have c*h*w <= {MAX_SAMPLE_ELEMENTS}, got {elements}",
            Refusal.TOO_LARGE,
        )
    event = event_from_wire(f.raw("event"), RESIDUAL_EVENTS, where=f"{where}.event")
    if isinstance(event, BalancedSampled) and not isinstance(event.event, Gaussian):
        raise WireError(f"{where}.event of a padded pass must sample a Gaussian, got {event!r}")
    bits = f.array("bits", np.uint8, 2)
    f.done()
    width = math.ceil(elements / 8)
    if bits.shape[1] != width:
        raise WireError(
            f"{where}.bits must have ceil(c*h*w/8) = {width} bytes per sample for shape {shape}, "
            f"got {bits.shape[1]}"
        )
    spare = 8 * width - elements
    if spare and len(bits) and np.any(bits[:, -1] & ((1 << spare) - 1)):
        raise WireError(f"{where}.bits must have zero padding bits after c*h*w elements")
    return SanitizedResidual(bits, shape, event, version)


def _labels_meta(labels: NoisyLabels, arrays: list[np.ndarray]) -> dict[str, Any]:
    if not isinstance(labels, NoisyLabels):
        raise WireError(
            f"labels must be NoisyLabels (a label-DP release), got {type(labels).__name__}"
        )
    arrays.append(np.ascontiguousarray(labels.labels, dtype=np.int64))
    return {
        "classes": labels.classes,
        "event": event_to_wire(labels.event),
        "values": len(arrays) - 1,
    }


def _labels_from(meta: object, env: Envelope, where: str) -> NoisyLabels:
    f = _Fields(meta, env, where)
    classes = f.integer("classes", 2, MAX_CLASSES)
    event = event_from_wire(f.raw("event"), LABEL_EVENTS, where=f"{where}.event")
    values = f.array("values", np.int64, 1)
    f.done()
    if len(values) and (values.min() < 0 or values.max() >= classes):
        raise WireError(
            f"{where}.values must lie in [0, {classes}), got [{values.min()}, {values.max()}]"
        )
    try:
        return NoisyLabels(np.array(values, dtype=np.int64), classes, event)
    except (TypeError, ValueError) as err:
        raise WireError(f"{where} is not a valid label release: {err}") from None


def _gradients_meta(gradients: NoisyLabelGradients, arrays: list[np.ndarray]) -> dict[str, Any]:
    if not isinstance(gradients, NoisyLabelGradients):
        raise WireError(
            f"gradients must be NoisyLabelGradients (a label-DP release), "
            f"got {type(gradients).__name__}"
        )
    arrays.append(np.ascontiguousarray(gradients.values, dtype=np.float32))
    return {"event": event_to_wire(gradients.event), "values": len(arrays) - 1}


def _gradients_from(meta: object, env: Envelope, where: str) -> NoisyLabelGradients:
    f = _Fields(meta, env, where)
    event = event_from_wire(f.raw("event"), (Gaussian,), where=f"{where}.event")
    values = f.array("values", np.float32, 2)
    f.done()
    if not 2 <= values.shape[1] <= MAX_CLASSES or len(values) == 0:
        raise WireError(
            f"{where}.values must have shape (rows >= 1, 2 <= classes <= {MAX_CLASSES}), "
            f"got {values.shape}"
        )
    try:
        return NoisyLabelGradients(np.array(values), event)  # type: ignore[arg-type]
    except (TypeError, ValueError) as err:
        raise WireError(f"{where} is not a valid label-gradient release: {err}") from None


# ------------------------------------------------------------------------- state trees


def tree_to_wire(tree: Any, arrays: list[np.ndarray]) -> Any:
    """JSON form of a state tree (dicts with str/int keys, lists, tuples, scalars, None,
    tensors); tensors are appended to ``arrays``. Tagged: {"D": [[k, v]...]}, {"L": [...]},
    {"T": [...]}, {"A": index}."""
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    if isinstance(tree, Tensor):
        arrays.append(tree.detach().cpu().contiguous().numpy())
        return {"A": len(arrays) - 1}
    if isinstance(tree, Mapping):
        items = []
        for key, value in tree.items():
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise WireError(f"state keys must be str or int, got {type(key).__name__}")
            items.append([key, tree_to_wire(value, arrays)])
        return {"D": items}
    if isinstance(tree, list):
        return {"L": [tree_to_wire(v, arrays) for v in tree]}
    if isinstance(tree, tuple):
        return {"T": [tree_to_wire(v, arrays) for v in tree]}
    raise WireError(
        f"state values must be tensors, containers or scalars, got {type(tree).__name__}"
    )


def tree_from_wire(data: Any, env: Envelope, *, where: str = "state") -> Any:
    """Inverse of :func:`tree_to_wire` on the arrays of ``env``; tensors are copied out of
    the message buffer."""
    counter = [0]
    return _tree(data, env, where, 0, counter)


def _tree(data: Any, env: Envelope, where: str, depth: int, n: list[int]) -> Any:
    n[0] += 1
    if n[0] > MAX_TREE_NODES:
        raise WireError(f"{where} has more than {MAX_TREE_NODES} nodes")
    if depth > MAX_TREE_DEPTH:
        raise WireError(f"{where} nests deeper than {MAX_TREE_DEPTH}")
    if data is None or isinstance(data, bool | int | float):
        return data
    if isinstance(data, str):
        if len(data) > MAX_TEXT:
            raise WireError(f"{where} strings must be at most {MAX_TEXT} characters")
        return data
    if not isinstance(data, dict) or len(data) != 1:
        raise WireError(f"{where} must be a scalar or a one-key tagged object")
    ((tag, body),) = data.items()
    if tag == "A":
        return torch.from_numpy(np.array(env.take(body, where)))
    if tag in ("L", "T"):
        if not isinstance(body, list):
            raise WireError(f"{where}.{tag} must be a list")
        items = [_tree(v, env, f"{where}[{i}]", depth + 1, n) for i, v in enumerate(body)]
        return items if tag == "L" else tuple(items)
    if tag == "D":
        if not isinstance(body, list):
            raise WireError(f"{where}.D must be a list of [key, value] pairs")
        out: dict[Any, Any] = {}
        for pair in body:
            if not isinstance(pair, list) or len(pair) != 2:
                raise WireError(f"{where}.D must be a list of [key, value] pairs")
            key, value = pair
            if isinstance(key, bool) or not isinstance(key, str | int):
                raise WireError(f"{where} keys must be strings or integers, got {key!r}")
            if isinstance(key, str) and len(key) > MAX_TEXT:
                raise WireError(f"{where} keys must be at most {MAX_TEXT} characters")
            if key in out:
                raise WireError(f"{where} repeats the key {key!r}")
            out[key] = _tree(value, env, f"{where}[{key!r}]", depth + 1, n)
        return out
    raise WireError(f"{where} has an unknown tag {tag!r}")


# ------------------------------------------------------------------------- messages


class Message:
    """Base of the typed messages; ``KIND`` identifies it in the envelope header."""

    KIND: ClassVar[int] = 0

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        raise NotImplementedError

    @classmethod
    def from_envelope(cls, env: Envelope) -> Message:
        raise NotImplementedError


M = TypeVar("M", bound=Message)


def encode(message: Message) -> bytes:
    """Serialize a typed message."""
    meta, arrays = message.to_envelope()
    return pack(message.KIND, meta, arrays)


def decode(buffer: bytes, expected: type[M], *, max_bytes: int | None = None) -> M:
    """Parse ``buffer`` as a message of type ``expected``; anything else raises
    :class:`WireError` (and only that)."""
    env = unpack(buffer, max_bytes=max_bytes)
    if env.kind != expected.KIND:
        raise WireError(
            f"message kind must be {expected.KIND} ({expected.__name__}), got {env.kind}"
        )
    try:
        message = expected.from_envelope(env)
    except WireError:
        raise
    except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as err:
        raise WireError(f"{expected.__name__} is malformed: {err}") from None
    unused = sorted(set(range(len(env.arrays))) - env.used)
    if unused:
        raise WireError(f"{expected.__name__} holds arrays no field refers to: {unused[:8]}")
    assert isinstance(message, expected)
    return message


@dataclass(frozen=True)
class EventMessage(Message):
    """A standalone privacy event."""

    KIND: ClassVar[int] = 90
    event: Event

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"event": event_to_wire(self.event)}, []

    @classmethod
    def from_envelope(cls, env: Envelope) -> EventMessage:
        f = _Fields(env.meta, env, "EventMessage")
        event = event_from_wire(f.raw("event"))
        f.done()
        return cls(event)


@dataclass(frozen=True)
class ConfigureRequest(Message):
    """Open (or confirm) session ``session`` with the public model ``spec``."""

    KIND: ClassVar[int] = 1
    session: str
    spec: PublicSpec

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"session": self.session, "spec": self.spec.to_dict()}, []

    @classmethod
    def from_envelope(cls, env: Envelope) -> ConfigureRequest:
        f = _Fields(env.meta, env, "ConfigureRequest")
        session = f.text("session", _HEX32)
        try:
            spec = PublicSpec.from_dict(f.obj("spec"))
        except (TypeError, ValueError) as err:
            raise WireError(f"ConfigureRequest.spec is invalid: {err}") from None
        f.done()
        return cls(session, spec)


@dataclass(frozen=True)
class ConfigureReply(Message):
    """``created`` is false when the session already existed with the same spec."""

    KIND: ClassVar[int] = 101
    session: str
    created: bool

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"session": self.session, "created": self.created}, []

    @classmethod
    def from_envelope(cls, env: Envelope) -> ConfigureReply:
        f = _Fields(env.meta, env, "ConfigureReply")
        out = cls(f.text("session", _HEX32), f.flag("created"))
        f.done()
        return out


@dataclass(frozen=True)
class UploadRequest(Message):
    """Part ``part`` of ``parts`` of upload ``request_id``: consecutive rows of one release
    (and their label-DP labels, if any)."""

    KIND: ClassVar[int] = 2
    session: str
    request_id: str
    part: int
    parts: int
    data: SanitizedResidual
    labels: NoisyLabels | None = None

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        arrays: list[np.ndarray] = []
        meta = {
            "session": self.session,
            "request_id": self.request_id,
            "part": self.part,
            "parts": self.parts,
            "data": _residual_meta(self.data, arrays),
            "labels": None if self.labels is None else _labels_meta(self.labels, arrays),
        }
        return meta, arrays

    @classmethod
    def from_envelope(cls, env: Envelope) -> UploadRequest:
        f = _Fields(env.meta, env, "UploadRequest")
        session = f.text("session", _HEX32)
        request_id = f.text("request_id", _HEX32)
        parts = f.integer("parts", 1, 1 << 20)
        part = f.integer("part", 0, parts - 1)
        data = _residual_from(f.raw("data"), env, "UploadRequest.data")
        labels_meta = f.raw("labels")
        labels = (
            None if labels_meta is None else _labels_from(labels_meta, env, "UploadRequest.labels")
        )
        f.done()
        if labels is not None and len(labels) != len(data):
            raise WireError(
                f"UploadRequest.labels must have one entry per sample ({len(data)}), "
                f"got {len(labels)}"
            )
        return cls(session, request_id, part, parts, data, labels)


@dataclass(frozen=True)
class UploadReply(Message):
    """The data set's id once all parts arrived (None before), and the parts received."""

    KIND: ClassVar[int] = 102
    dataset_id: str | None
    received: int

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"dataset_id": self.dataset_id, "received": self.received}, []

    @classmethod
    def from_envelope(cls, env: Envelope) -> UploadReply:
        f = _Fields(env.meta, env, "UploadReply")
        out = cls(f.optional_text("dataset_id", _DATASET_ID), f.integer("received", 0, 1 << 20))
        f.done()
        return out


@dataclass(frozen=True)
class TrainRequest(Message):
    """Arguments of :meth:`PublicSide.train`, with a request id for idempotent retries."""

    KIND: ClassVar[int] = 3
    session: str
    request_id: str
    dataset_id: str
    epochs: int
    batch_size: int
    lr: float
    seed: int
    start_epoch: int = 0
    total_epochs: int | None = None
    model: str = "res"
    indices: np.ndarray | None = field(default=None, compare=False)

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        arrays: list[np.ndarray] = []
        if self.indices is not None:
            arrays.append(np.ascontiguousarray(self.indices, dtype=np.int64))
        meta = {
            "session": self.session,
            "request_id": self.request_id,
            "dataset_id": self.dataset_id,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "seed": self.seed,
            "start_epoch": self.start_epoch,
            "total_epochs": self.total_epochs,
            "model": self.model,
            "indices": None if self.indices is None else 0,
        }
        return meta, arrays

    @classmethod
    def from_envelope(cls, env: Envelope) -> TrainRequest:
        f = _Fields(env.meta, env, "TrainRequest")
        session = f.text("session", _HEX32)
        request_id = f.text("request_id", _HEX32)
        dataset_id = f.text("dataset_id", _DATASET_ID)
        epochs = f.integer("epochs", 0, 1 << 20)
        batch_size = f.integer("batch_size", 1, 1 << 20)
        lr = f.number("lr")
        if not 0 < lr <= 1e3:
            raise WireError(f"TrainRequest.lr must satisfy 0 < lr <= 1000, got {lr}")
        seed = f.integer("seed", 0, 2**62)
        start_epoch = f.integer("start_epoch", 0, 1 << 30)
        total_epochs = f.optional_integer("total_epochs", 0, 1 << 30)
        model = f.text("model", _MODEL)
        indices = None
        if env.meta.get("indices") is None:
            f.raw("indices")
        else:
            indices = np.array(f.array("indices", np.int64, 1))
            if len(indices) == 0:
                raise WireError("TrainRequest.indices must be non-empty when given")
        f.done()
        return cls(
            session, request_id, dataset_id, epochs, batch_size, lr, seed,
            start_epoch, total_epochs, model, indices,
        )  # fmt: skip


@dataclass(frozen=True)
class TrainReply(Message):
    """The public side's training metrics (loss, accuracy on the received labels, samples)."""

    KIND: ClassVar[int] = 103
    metrics: dict[str, float]

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"metrics": {k: float(v) for k, v in self.metrics.items()}}, []

    @classmethod
    def from_envelope(cls, env: Envelope) -> TrainReply:
        f = _Fields(env.meta, env, "TrainReply")
        raw = f.obj("metrics")
        f.done()
        if len(raw) > 64:
            raise WireError("TrainReply.metrics must hold at most 64 entries")
        metrics = {}
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or len(key) > 64:
                raise WireError(f"TrainReply.metrics[{key!r}] must be a number")
            metrics[key] = float(value)
        return cls(metrics)


@dataclass(frozen=True)
class LogitsRequest(Message):
    """z_res of released residuals from model ``model`` (no new release: the payload was
    recorded when it was sanitized)."""

    KIND: ClassVar[int] = 4
    session: str
    data: SanitizedResidual
    model: str = "res"

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        arrays: list[np.ndarray] = []
        meta = {
            "session": self.session,
            "model": self.model,
            "data": _residual_meta(self.data, arrays),
        }
        return meta, arrays

    @classmethod
    def from_envelope(cls, env: Envelope) -> LogitsRequest:
        f = _Fields(env.meta, env, "LogitsRequest")
        session = f.text("session", _HEX32)
        model = f.text("model", _MODEL)
        data = _residual_from(f.raw("data"), env, "LogitsRequest.data")
        f.done()
        return cls(session, data, model)


@dataclass(frozen=True)
class LogitsReply(Message):
    """float32 logits (N, classes) and the server's compute time in seconds."""

    KIND: ClassVar[int] = 104
    logits: np.ndarray
    seconds: float = 0.0

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"logits": 0, "seconds": self.seconds}, [
            np.ascontiguousarray(self.logits, dtype=np.float32)
        ]

    @classmethod
    def from_envelope(cls, env: Envelope) -> LogitsReply:
        f = _Fields(env.meta, env, "LogitsReply")
        logits = np.array(f.array("logits", np.float32, 2))
        seconds = f.number("seconds")
        f.done()
        return cls(logits, seconds)


@dataclass(frozen=True)
class StepLogitsRequest(Message):
    """Arguments of :meth:`StepwisePublicSide.step_logits` (``labels="grad"``): z_res of rows
    ``indices`` in training mode, held by the server until the StepApply that follows."""

    KIND: ClassVar[int] = 8
    session: str
    request_id: str
    dataset_id: str
    lr: float
    seed: int
    step: int
    model: str
    indices: np.ndarray = field(compare=False)

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        meta = {
            "session": self.session,
            "request_id": self.request_id,
            "dataset_id": self.dataset_id,
            "lr": self.lr,
            "seed": self.seed,
            "step": self.step,
            "model": self.model,
            "indices": 0,
        }
        return meta, [np.ascontiguousarray(self.indices, dtype=np.int64)]

    @classmethod
    def from_envelope(cls, env: Envelope) -> StepLogitsRequest:
        f = _Fields(env.meta, env, "StepLogitsRequest")
        session = f.text("session", _HEX32)
        request_id = f.text("request_id", _HEX32)
        dataset_id = f.text("dataset_id", _DATASET_ID)
        lr = f.number("lr")
        if not 0 < lr <= 1e3:
            raise WireError(f"StepLogitsRequest.lr must satisfy 0 < lr <= 1000, got {lr}")
        seed = f.integer("seed", 0, 2**62)
        step = f.integer("step", 0, 2**40)
        model = f.text("model", _MODEL)
        indices = np.array(f.array("indices", np.int64, 1))
        f.done()
        if not 1 <= len(indices) <= MAX_STEP_ROWS:
            raise WireError(
                f"StepLogitsRequest.indices must hold 1 to {MAX_STEP_ROWS} rows, got {len(indices)}"
            )
        return cls(session, request_id, dataset_id, lr, seed, step, model, indices)


@dataclass(frozen=True)
class StepApplyRequest(Message):
    """One optimizer step of ``model`` along released noisy label gradients (a label-DP
    payload, recorded in the private side's ledger before it was sent)."""

    KIND: ClassVar[int] = 9
    session: str
    request_id: str
    model: str
    gradients: NoisyLabelGradients = field(compare=False)

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        arrays: list[np.ndarray] = []
        meta = {
            "session": self.session,
            "request_id": self.request_id,
            "model": self.model,
            "gradients": _gradients_meta(self.gradients, arrays),
        }
        return meta, arrays

    @classmethod
    def from_envelope(cls, env: Envelope) -> StepApplyRequest:
        f = _Fields(env.meta, env, "StepApplyRequest")
        session = f.text("session", _HEX32)
        request_id = f.text("request_id", _HEX32)
        model = f.text("model", _MODEL)
        gradients = _gradients_from(f.raw("gradients"), env, "StepApplyRequest.gradients")
        f.done()
        if len(gradients) > MAX_STEP_ROWS:
            raise WireError(f"StepApplyRequest.gradients must hold at most {MAX_STEP_ROWS} rows")
        return cls(session, request_id, model, gradients)


@dataclass(frozen=True)
class StateRequest(Message):
    """The names of the session's models, and the state of ``model`` if given."""

    KIND: ClassVar[int] = 5
    session: str
    model: str | None = None

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"session": self.session, "model": self.model}, []

    @classmethod
    def from_envelope(cls, env: Envelope) -> StateRequest:
        f = _Fields(env.meta, env, "StateRequest")
        out = cls(f.text("session", _HEX32), f.optional_text("model", _MODEL))
        f.done()
        return out


@dataclass(frozen=True)
class StateReply(Message):
    """Model names, and ``state`` = {"model": weights, "optimizer": SGD state} of one model."""

    KIND: ClassVar[int] = 105
    models: tuple[str, ...]
    state: dict[str, Any] | None = None

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        arrays: list[np.ndarray] = []
        state = None if self.state is None else tree_to_wire(self.state, arrays)
        return {"models": list(self.models), "state": state}, arrays

    @classmethod
    def from_envelope(cls, env: Envelope) -> StateReply:
        f = _Fields(env.meta, env, "StateReply")
        names = f.raw("models")
        if not isinstance(names, list) or not all(
            isinstance(n, str) and _MODEL.fullmatch(n) for n in names
        ):
            raise WireError("StateReply.models must be a list of model names")
        raw = f.raw("state")
        f.done()
        state = None if raw is None else _model_state(raw, env, "StateReply.state")
        return cls(tuple(names), state)


def _model_state(raw: object, env: Envelope, where: str) -> dict[str, Any]:
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


@dataclass(frozen=True)
class LoadStateRequest(Message):
    """Replace model ``model`` (weights and optimizer) with ``state``."""

    KIND: ClassVar[int] = 6
    session: str
    request_id: str
    model: str
    state: dict[str, Any]

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        arrays: list[np.ndarray] = []
        meta = {
            "session": self.session,
            "request_id": self.request_id,
            "model": self.model,
            "state": tree_to_wire(self.state, arrays),
        }
        return meta, arrays

    @classmethod
    def from_envelope(cls, env: Envelope) -> LoadStateRequest:
        f = _Fields(env.meta, env, "LoadStateRequest")
        session = f.text("session", _HEX32)
        request_id = f.text("request_id", _HEX32)
        model = f.text("model", _MODEL)
        state = _model_state(f.raw("state"), env, "LoadStateRequest.state")
        f.done()
        return cls(session, request_id, model, state)


@dataclass(frozen=True)
class ForgetRequest(Message):
    """Drop an uploaded data set."""

    KIND: ClassVar[int] = 7
    session: str
    dataset_id: str

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {"session": self.session, "dataset_id": self.dataset_id}, []

    @classmethod
    def from_envelope(cls, env: Envelope) -> ForgetRequest:
        f = _Fields(env.meta, env, "ForgetRequest")
        out = cls(f.text("session", _HEX32), f.text("dataset_id", _DATASET_ID))
        f.done()
        return out


@dataclass(frozen=True)
class Empty(Message):
    """A reply without content (LoadState, Forget) or the Health request."""

    KIND: ClassVar[int] = 100

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {}, []

    @classmethod
    def from_envelope(cls, env: Envelope) -> Empty:
        _Fields(env.meta, env, "Empty").done()
        return cls()


@dataclass(frozen=True)
class HealthReply(Message):
    """Server status: protocol and payload versions, limits, sessions and counters."""

    KIND: ClassVar[int] = 108
    status: str
    protocol: int
    wire_version: int
    max_message_bytes: int
    pid: int
    sessions: int
    counters: dict[str, int] = field(default_factory=dict)

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        return {
            "status": self.status,
            "protocol": self.protocol,
            "wire_version": self.wire_version,
            "max_message_bytes": self.max_message_bytes,
            "pid": self.pid,
            "sessions": self.sessions,
            "counters": dict(self.counters),
        }, []

    @classmethod
    def from_envelope(cls, env: Envelope) -> HealthReply:
        f = _Fields(env.meta, env, "HealthReply")
        status = f.text("status")
        protocol = f.integer("protocol", 0, 1 << 16)
        wire_version = f.integer("wire_version", 0, 1 << 16)
        max_bytes = f.integer("max_message_bytes", 0, 1 << 40)
        pid = f.integer("pid", 0, 1 << 40)
        sessions = f.integer("sessions", 0, 1 << 20)
        raw = f.obj("counters")
        f.done()
        counters = {}
        for key, value in raw.items():
            if isinstance(value, bool) or not isinstance(value, int) or len(key) > 64:
                raise WireError(f"HealthReply.counters[{key!r}] must be an integer")
            counters[key] = value
        return cls(status, protocol, wire_version, max_bytes, pid, sessions, counters)


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
