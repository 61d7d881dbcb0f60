"""The envelope of the private <-> public link, and a codec derived from declared fields.

Every message is one envelope (all integers big-endian)::

    header  4s magic b"ASFW" | u16 protocol version | u16 kind | u32 meta length | u32 arrays
    meta    UTF-8 JSON object (at most MAX_META_BYTES)
    arrays  per array: u8 dtype code | u8 ndim | ndim x u64 dims | raw little-endian data

and nothing else: no trailing bytes, no pickle, no code. JSON names arrays by their index.

A message declares each field once, annotated with the :class:`Rule` that sends it;
encoding, decoding and the strict checks follow from the rules. Decoding refuses a wrong
magic, version, kind or length, a missing or unknown key, an array used twice or not at all,
and any wrong type, dtype, shape or range, with :class:`WireError`, the only exception the
decoders raise.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any, ClassVar, TypeVar, get_args, get_type_hints

import numpy as np
import torch
from torch import Tensor

from asymflow.accounting.events import Event, event_from_dict

MAGIC = b"ASFW"
PROTOCOL_VERSION = 1
"""Version of the envelope and of the message schemas."""

MAX_META_BYTES = 1 << 20
MAX_ARRAYS = 4096
MAX_NDIM = 8
MAX_DIM = 1 << 40
MAX_TREE_DEPTH = 32
MAX_TREE_NODES = 200_000
MAX_EVENT_DEPTH = 8
MAX_TEXT = 256
MAX_NAME = 64
"""Longest key of a :class:`Map` (metric and counter names)."""

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
        code = _CODES.get(array.dtype.newbyteorder("="))
        if code is None:
            names = [str(dt) for dt in _DTYPES.values()]
            raise WireError(f"arrays must have one of the dtypes {names}, got {array.dtype}")
        if array.ndim > MAX_NDIM:
            raise WireError(f"arrays must have at most {MAX_NDIM} dimensions, got {array.ndim}")
        data = np.asarray(array, dtype=_DTYPES[code], order="C")
        parts.append(_ARRAY.pack(code, data.ndim))
        parts.append(struct.pack(f">{data.ndim}Q", *data.shape))
        parts.append(data.tobytes())
    return b"".join(parts)


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


# ------------------------------------------------------------------------- rules


class Rule(ABC):
    """How one field travels: its JSON form (arrays are appended to ``arrays`` and named by
    index), and the strict check of what arrives. ``where`` names the field in errors."""

    first: ClassVar[bool] = False
    """Read before the other fields of its record."""

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> Any:
        """The JSON form of ``value``."""
        return value

    @abstractmethod
    def decode(self, raw: Any, env: Envelope, where: str) -> Any:
        """The value of JSON ``raw``; anything malformed raises :class:`WireError`."""


@dataclass(frozen=True)
class Text(Rule):
    """A string of at most MAX_TEXT characters, matching ``pattern`` if given."""

    pattern: re.Pattern[str] | None = None

    def decode(self, raw: Any, env: Envelope, where: str) -> str:
        if not isinstance(raw, str) or len(raw) > MAX_TEXT:
            raise WireError(f"{where} must be a string of at most {MAX_TEXT} chars")
        if self.pattern is not None and not self.pattern.fullmatch(raw):
            raise WireError(f"{where} must match {self.pattern.pattern}, got {raw!r}")
        return raw


@dataclass(frozen=True)
class Integer(Rule):
    """An integer in [low, high] (not a bool)."""

    low: int
    high: int

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> int:
        return int(value)

    def decode(self, raw: Any, env: Envelope, where: str) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int) or not self.low <= raw <= self.high:
            raise WireError(f"{where} must be an integer in [{self.low}, {self.high}], got {raw!r}")
        return raw


@dataclass(frozen=True)
class Version(Rule):
    """A format version that must equal ``version``. It is read before the other fields, so a
    newer format is refused as a version mismatch whatever else it changed."""

    version: int
    what: str
    first: ClassVar[bool] = True

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> int:
        return int(value)

    def decode(self, raw: Any, env: Envelope, where: str) -> int:
        value = Integer(0, 1 << 16).decode(raw, env, where)
        if value != self.version:
            raise WireError(
                f"{where} must be {self.version} ({self.what}), got {value}", Refusal.VERSION
            )
        return value


@dataclass(frozen=True)
class Number(Rule):
    """A number (sent and read as a float): finite unless ``finite`` is false, and in
    (low, high] if ``bounds`` are given."""

    finite: bool = True
    bounds: tuple[float, float] | None = None

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> float:
        return float(value)

    def decode(self, raw: Any, env: Envelope, where: str) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise WireError(f"{where} must be a number, got {raw!r}")
        if self.finite and not math.isfinite(raw):
            raise WireError(f"{where} must be finite, got {raw!r}")
        if self.bounds is not None and not self.bounds[0] < raw <= self.bounds[1]:
            low, high = self.bounds
            raise WireError(f"{where} must be a number in ({low:g}, {high:g}], got {raw!r}")
        return float(raw)


class Flag(Rule):
    """true or false."""

    def decode(self, raw: Any, env: Envelope, where: str) -> bool:
        if not isinstance(raw, bool):
            raise WireError(f"{where} must be true or false, got {raw!r}")
        return raw


@dataclass(frozen=True)
class Array(Rule):
    """An ``ndim``-D array of ``dtype``, sent as one of the envelope's arrays; ``rows`` and
    ``cols`` bound its first two dimensions. ``copy`` false keeps a read-only view of the
    message buffer (for large payloads)."""

    dtype: type[np.generic]
    ndim: int
    rows: tuple[int, int] | None = None
    cols: tuple[int, int] | None = None
    copy: bool = True

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> int:
        arrays.append(np.ascontiguousarray(value, dtype=self.dtype))
        return len(arrays) - 1

    def decode(self, raw: Any, env: Envelope, where: str) -> np.ndarray:
        array = env.take(raw, where)
        dtype = np.dtype(self.dtype)
        if array.dtype != dtype or array.ndim != self.ndim:
            raise WireError(
                f"{where} must be a {self.ndim}-D {dtype} array, got {array.ndim}-D {array.dtype}"
            )
        if self.rows is not None and not self.rows[0] <= len(array) <= self.rows[1]:
            low, high = self.rows
            raise WireError(f"{where} must hold {low} to {high} rows, got {len(array)}")
        if self.cols is not None and not self.cols[0] <= array.shape[1] <= self.cols[1]:
            low, high = self.cols
            raise WireError(f"{where} must have {low} to {high} columns, got {array.shape[1]}")
        return np.array(array) if self.copy else array


@dataclass(frozen=True)
class Nullable(Rule):
    """``rule``'s value or None (JSON null); the key itself is still required."""

    rule: Rule

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> Any:
        return None if value is None else self.rule.encode(value, arrays, where)

    def decode(self, raw: Any, env: Envelope, where: str) -> Any:
        return None if raw is None else self.rule.decode(raw, env, where)


@dataclass(frozen=True)
class Items(Rule):
    """A JSON list of ``item`` values, read as a tuple."""

    item: Rule

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> list[Any]:
        return [self.item.encode(v, arrays, f"{where}[{i}]") for i, v in enumerate(value)]

    def decode(self, raw: Any, env: Envelope, where: str) -> tuple[Any, ...]:
        if not isinstance(raw, list):
            raise WireError(f"{where} must be a list, got {type(raw).__name__}")
        return tuple(self.item.decode(v, env, f"{where}[{i}]") for i, v in enumerate(raw))


@dataclass(frozen=True)
class Map(Rule):
    """A JSON object of names (at most MAX_NAME characters) to ``value`` values, with at
    most ``most`` entries if given."""

    value: Rule
    most: int | None = None

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> dict[str, Any]:
        return {k: self.value.encode(v, arrays, f"{where}[{k!r}]") for k, v in value.items()}

    def decode(self, raw: Any, env: Envelope, where: str) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise WireError(f"{where} must be a JSON object")
        if self.most is not None and len(raw) > self.most:
            raise WireError(f"{where} must hold at most {self.most} entries")
        if any(len(key) > MAX_NAME for key in raw):
            raise WireError(f"{where} keys must be at most {MAX_NAME} characters")
        return {k: self.value.decode(v, env, f"{where}[{k!r}]") for k, v in raw.items()}


@dataclass(frozen=True)
class Record(Rule):
    """A ``cls`` instance as a JSON object of ``fields`` (key -> rule, in wire order). Each
    key fills the attribute of its name, or ``attrs[key]``; every key is read exactly once and
    unknown keys are refused. ``check`` sees the decoded values (by attribute) before
    ``cls(**values)``; ``what`` names the record in errors."""

    cls: type
    what: str
    fields: Mapping[str, Rule]
    attrs: Mapping[str, str] = field(default_factory=dict)
    check: Callable[[dict[str, Any], str], None] | None = None

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> dict[str, Any]:
        if not isinstance(value, self.cls):
            raise WireError(
                f"{where} must be {self.cls.__name__} ({self.what}), got {type(value).__name__}"
            )
        return {
            key: rule.encode(getattr(value, self.attrs.get(key, key)), arrays, f"{where}.{key}")
            for key, rule in self.fields.items()
        }

    def decode(self, raw: Any, env: Envelope, where: str) -> Any:
        if not isinstance(raw, dict):
            raise WireError(f"{where} must be a JSON object, got {type(raw).__name__}")
        values = {}
        for key, rule in sorted(self.fields.items(), key=lambda item: not item[1].first):
            if key not in raw:
                raise WireError(f"{where}.{key} is missing")
            values[self.attrs.get(key, key)] = rule.decode(raw[key], env, f"{where}.{key}")
        extra = sorted(set(raw) - set(self.fields))
        if extra:
            raise WireError(f"{where} has unknown fields {extra[:8]}")
        if self.check is not None:
            self.check(values, where)
        try:
            return self.cls(**values)
        except (TypeError, ValueError) as err:
            raise WireError(f"{where} is not a valid {self.what}: {err}") from None


# ------------------------------------------------------------------------- events


@dataclass(frozen=True)
class PrivacyEvent(Rule):
    """A privacy event (:meth:`Event.to_dict`) of one of the ``allowed`` types (None: any known
    type), nesting at most MAX_EVENT_DEPTH deep, with no field its type does not declare."""

    allowed: tuple[type[Event], ...] | None = None

    def encode(self, value: Any, arrays: list[np.ndarray], where: str) -> dict[str, Any]:
        if not isinstance(value, Event):
            raise WireError(f"{where} must be an Event, got {type(value).__name__}")
        return value.to_dict()

    def decode(self, raw: Any, env: Envelope, where: str) -> Event:
        _check_event_json(raw, where, 0)
        try:
            event = event_from_dict(raw)
        except (KeyError, TypeError, ValueError, RecursionError, AttributeError) as err:
            raise WireError(f"{where} is not a valid privacy event: {err}") from None
        if self.allowed is not None and not isinstance(event, self.allowed):
            names = [t.__name__ for t in self.allowed]
            raise WireError(f"{where} must be one of {names}, got {type(event).__name__}")
        if event.to_dict() != raw:
            raise WireError(
                f"{where} holds fields its type {type(event).__name__} does not declare"
            )
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
    """Base of the typed messages: frozen dataclasses whose fields are each annotated with
    the rule that sends them, ``name: Annotated[type, rule]``.

    ``KIND`` identifies the message in the envelope header; the meta holds one key per field,
    in the order of the fields or of ``KEYS`` if given.
    """

    KIND: ClassVar[int] = 0
    KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def check(cls, values: dict[str, Any], where: str) -> None:
        """Rules across fields, on the decoded ``values`` before the message is built."""

    def to_envelope(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        """The meta and arrays of this message."""
        arrays: list[np.ndarray] = []
        meta = _record(type(self)).encode(self, arrays, type(self).__name__)
        return meta, arrays

    @classmethod
    def from_envelope(cls, env: Envelope) -> Message:
        """The message in ``env`` (its kind already checked)."""
        message: Message = _record(cls).decode(env.meta, env, cls.__name__)
        return message


@functools.cache
def _record(cls: type[Message]) -> Record:
    """The record of message class ``cls``: the rule in each field's ``Annotated`` type."""
    hints = get_type_hints(cls, include_extras=True)
    rules: dict[str, Rule] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        rule = next((a for a in get_args(hints[f.name])[1:] if isinstance(a, Rule)), None)
        if rule is None:
            raise TypeError(f"{cls.__name__}.{f.name} must be annotated with a Rule")
        rules[f.name] = rule
    return Record(cls, "message", {key: rules[key] for key in cls.KEYS or rules}, check=cls.check)


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
