"""The wire format: exact round trips, strict refusals with clear errors, and a fuzzed decoder
that raises nothing but :class:`WireError`."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from asymflow.accounting.events import (
    Composed,
    Gaussian,
    NonPrivate,
    PoissonSampled,
    RandomizedResponse,
    SelfComposed,
)
from asymflow.delta.contract import WIRE_VERSION, SanitizedResidual
from asymflow.delta.labels import NoisyLabelGradients, NoisyLabels
from asymflow.transport import wire
from asymflow.transport.spec import PublicSpec

SESSION = "0" * 32
REQUEST = "1" * 32


def residual(
    n: int = 6, shape: tuple[int, int, int] = (3, 5, 5), seed: int = 0
) -> SanitizedResidual:
    """Random sanitized bits of ``n`` samples (c*h*w = 75: the last byte has 5 padding bits)."""
    rng = np.random.default_rng(seed)
    bits = np.packbits(rng.random((n, math.prod(shape))) > 0.5, axis=1)
    return SanitizedResidual(bits, shape, Gaussian(1.25))


def gradients(n: int = 4, classes: int = 3) -> NoisyLabelGradients:
    values = np.linspace(-2, 2, n * classes, dtype=np.float32).reshape(n, classes)
    return NoisyLabelGradients(values, Gaussian(3.5))


def labels(n: int = 6, classes: int = 4) -> NoisyLabels:
    values = np.arange(n, dtype=np.int64) % classes
    return NoisyLabels(values, classes, RandomizedResponse(2.0, classes))


def upload_bytes(**changes: object) -> bytes:
    fields = {
        "session": SESSION,
        "request_id": REQUEST,
        "part": 0,
        "parts": 1,
        "data": residual(),
        "labels": labels(),
    }
    fields.update(changes)
    return wire.encode(wire.UploadRequest(**fields))  # type: ignore[arg-type]


def edit_meta(buffer: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    """Re-pack ``buffer`` with ``edit(meta)`` applied (arrays unchanged)."""
    env = wire.unpack(buffer)
    meta = json.loads(json.dumps(env.meta))
    edit(meta)
    return wire.pack(env.kind, meta, env.arrays)


# ------------------------------------------------------------------------- round trips


def test_upload_round_trips_bits_labels_and_events_exactly():
    data, noisy = residual(), labels()
    back = wire.decode(upload_bytes(), wire.UploadRequest)
    np.testing.assert_array_equal(back.data.bits, data.bits)
    assert back.data.shape == data.shape and back.data.event == data.event
    assert back.data.version == WIRE_VERSION
    assert back.labels is not None
    np.testing.assert_array_equal(back.labels.labels, noisy.labels)
    assert back.labels.event == noisy.event and back.labels.classes == noisy.classes


def test_upload_costs_one_bit_per_element_plus_a_constant_header():
    small = len(upload_bytes(data=residual(1), labels=None))
    large = len(upload_bytes(data=residual(1001), labels=None))
    assert (large - small) / 1000 == residual().bytes_per_sample == math.ceil(75 / 8)


def test_events_round_trip_through_their_own_envelope():
    event = Composed((SelfComposed(Gaussian(0.7), 3), PoissonSampled(0.01, Gaussian(1.1))))
    assert wire.decode_event(wire.encode_event(event)) == event


def test_model_state_round_trips_tensors_int_keys_and_none():
    spec = PublicSpec("resnet20", (3, 5, 5), 4, 0.25, init_seed=3)
    public = spec.make_public()
    net = public.model("res")
    net(torch.randn(2, 3, 5, 5)).sum().backward()
    public.optimizers["res"].step()
    state = {"model": net.state_dict(), "optimizer": public.optimizers["res"].state_dict()}
    back = wire.decode(
        wire.encode(wire.LoadStateRequest(SESSION, REQUEST, "res", state)), wire.LoadStateRequest
    ).state
    for key, value in state["model"].items():
        assert torch.equal(back["model"][key], value) and back["model"][key].dtype == value.dtype
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert set(back["optimizer"]["state"]) == set(state["optimizer"]["state"])  # int keys
    for key, value in state["optimizer"]["state"].items():
        assert torch.equal(
            back["optimizer"]["state"][key]["momentum_buffer"], value["momentum_buffer"]
        )


def test_train_request_keeps_indices_and_optional_fields():
    message = wire.TrainRequest(
        SESSION, REQUEST, "a" * 20, 2, 32, 0.1, 5, 1, None, "fold1", np.array([3, 1, 2])
    )
    back = wire.decode(wire.encode(message), wire.TrainRequest)
    assert back == message and back.total_epochs is None
    np.testing.assert_array_equal(back.indices, [3, 1, 2])


# ------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:-1], "needs .* bytes"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:6] + struct.pack(">H", 3) + b[8:], "kind must be 2"),
        (lambda b: b[:10], "header"),
        (lambda b: b"", "header"),
    ],
)
def test_broken_envelopes_are_refused_with_a_reason(mutate, match):
    with pytest.raises(wire.WireError, match=match) as err:
        wire.decode(mutate(upload_bytes()), wire.UploadRequest)
    assert err.value.reason is wire.Refusal.MALFORMED


def test_another_protocol_version_is_refused_as_a_version_mismatch():
    raw = upload_bytes()
    with pytest.raises(wire.WireError, match="protocol version must be 1, got 7") as err:
        wire.decode(raw[:4] + struct.pack(">H", 7) + raw[6:], wire.UploadRequest)
    assert err.value.reason is wire.Refusal.VERSION


def test_another_payload_version_is_refused_as_a_version_mismatch():
    raw = edit_meta(upload_bytes(), lambda m: m["data"].update(version=WIRE_VERSION + 1))
    with pytest.raises(wire.WireError, match="version must be 1") as err:
        wire.decode(raw, wire.UploadRequest)
    assert err.value.reason is wire.Refusal.VERSION


def _set_event(meta: dict, event: dict) -> None:
    meta["data"]["event"] = event


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m["data"].update(shape=[3, 5, 6]), "bytes per sample"),
        (lambda m: m["data"].update(shape=[3, 5]), r"shape must be \[c, h, w\]"),
        (lambda m: m["data"].update(shape=[3, -5, 5]), "positive integers"),
        (lambda m: m["data"].update(shape=[3, 5, 5.0]), "positive integers"),
        (lambda m: m["data"].update(shape=[4096, 4096, 4096]), "c\\*h\\*w"),
        (lambda m: m["labels"].update(classes=2), "must lie in"),
        (lambda m: m.update(extra=1), "unknown fields"),
        (lambda m: m.pop("request_id"), "request_id is missing"),
        (lambda m: m.update(request_id="../../etc"), "must match"),
        (lambda m: m.update(part=1), "part must be an integer in"),
        (lambda m: m["labels"].update(values=0), "already used"),
        (lambda m: _set_event(m, RandomizedResponse(1.0, 4).to_dict()), "must be one of"),
        (lambda m: _set_event(m, {"type": "Gaussian", "sigma": -1.0}), "not a valid privacy"),
        (lambda m: _set_event(m, {"type": "Gaussian", "sigma": 1.0, "x": 2}), "does not declare"),
        (lambda m: _set_event(m, {"type": "Gaussian"}), "not a valid privacy"),
        (lambda m: _set_event(m, {"type": "Pickle", "sigma": 1.0}), "not a valid privacy"),
        (lambda m: _set_event(m, "Gaussian"), "string 'type'"),
    ],
)
def test_malformed_fields_are_refused_and_named(edit, match):
    with pytest.raises(wire.WireError, match=match):
        wire.decode(edit_meta(upload_bytes(), edit), wire.UploadRequest)


def test_bits_of_the_wrong_dtype_are_refused():
    env = wire.unpack(upload_bytes())
    arrays = (env.arrays[0].astype(np.int64), env.arrays[1])
    with pytest.raises(wire.WireError, match="must be a 2-D uint8 array"):
        wire.decode(wire.pack(env.kind, env.meta, arrays), wire.UploadRequest)


def test_nonzero_padding_bits_are_refused():
    env = wire.unpack(upload_bytes())
    bits = np.array(env.arrays[0])
    bits[0, -1] |= 1  # 75 elements: the low 5 bits of the last byte are padding
    with pytest.raises(wire.WireError, match="zero padding bits"):
        wire.decode(wire.pack(env.kind, env.meta, (bits, env.arrays[1])), wire.UploadRequest)


def test_an_unreferenced_array_is_refused():
    env = wire.unpack(upload_bytes(labels=None))
    extra = (env.arrays[0], np.zeros(3, dtype=np.uint8))
    with pytest.raises(wire.WireError, match="no field refers to"):
        wire.decode(wire.pack(env.kind, env.meta, extra), wire.UploadRequest)


def test_oversized_messages_are_refused_before_parsing():
    with pytest.raises(wire.WireError, match="at most 100 bytes") as err:
        wire.decode(upload_bytes(), wire.UploadRequest, max_bytes=100)
    assert err.value.reason is wire.Refusal.TOO_LARGE


def test_deeply_nested_json_is_refused():
    text = b"[" * 100_000 + b"]" * 100_000
    raw = struct.pack(">4sHHII", wire.MAGIC, 1, 2, len(text), 0) + text
    with pytest.raises(wire.WireError):
        wire.decode(raw, wire.UploadRequest)


def test_state_trees_refuse_unknown_tags_and_repeated_keys():
    base = wire.encode(wire.StateReply(("res",), None))
    for state in ({"X": 1}, {"D": [["a", 1], ["a", 2]]}, {"D": [["a"]]}, {"A": 0}):
        raw = edit_meta(base, lambda m, s=state: m.update(state=s))
        with pytest.raises(wire.WireError):
            wire.decode(raw, wire.StateReply)


def test_step_messages_round_trip_and_carry_only_gaussian_label_gradients():
    step = wire.StepLogitsRequest(SESSION, REQUEST, "b" * 20, 0.05, 3, 17, "fold1", np.arange(4))
    back = wire.decode(wire.encode(step), wire.StepLogitsRequest)
    assert back == step and np.array_equal(back.indices, np.arange(4))
    apply = wire.StepApplyRequest(SESSION, REQUEST, "fold1", gradients())
    back_apply = wire.decode(wire.encode(apply), wire.StepApplyRequest)
    assert back_apply == apply and back_apply.gradients.event == Gaussian(3.5)
    np.testing.assert_array_equal(back_apply.gradients.values, gradients().values)
    with pytest.raises(wire.WireError, match="NoisyLabelGradients"):
        wire.encode(wire.StepApplyRequest(SESSION, REQUEST, "res", np.zeros((2, 3), np.float32)))  # type: ignore[arg-type]
    raw = wire.encode(apply)
    for event, match in (
        ({"type": "RandomizedResponse", "epsilon": 1.0, "classes": 3}, "must be one of"),
        ({"type": "NonPrivate", "what": "clear"}, "must be one of"),
    ):
        edited = edit_meta(raw, lambda m, e=event: m["gradients"].update(event=e))
        with pytest.raises(wire.WireError, match=match):
            wire.decode(edited, wire.StepApplyRequest)
    env = wire.unpack(raw)
    nan = wire.pack(env.kind, env.meta, [np.full((4, 3), np.nan, np.float32)])
    with pytest.raises(wire.WireError, match="finite"):
        wire.decode(nan, wire.StepApplyRequest)
    env = wire.unpack(wire.encode(step))
    with pytest.raises(wire.WireError, match="1 to 65536 rows"):
        wire.decode(wire.pack(env.kind, env.meta, [np.zeros(0, np.int64)]), wire.StepLogitsRequest)


def test_only_sanitized_residuals_and_noisy_labels_can_be_encoded():
    with pytest.raises(wire.WireError, match="SanitizedResidual"):
        wire.encode(wire.LogitsRequest(SESSION, torch.zeros(2, 3, 5, 5)))  # type: ignore[arg-type]
    with pytest.raises(wire.WireError, match="NoisyLabels"):
        upload_bytes(labels=np.zeros(6, dtype=np.int64))


# ------------------------------------------------------------------------- fuzzing

VALID = [
    upload_bytes(),
    upload_bytes(labels=None, data=residual(2, (8, 4, 4))),
    wire.encode(wire.LogitsRequest(SESSION, residual(3), "fold0")),
    wire.encode(
        wire.TrainRequest(SESSION, REQUEST, "b" * 20, 1, 8, 0.1, 0, 0, 3, "res", np.arange(4))
    ),
    wire.encode(wire.ConfigureRequest(SESSION, PublicSpec("resnet20", (3, 5, 5), 4, 0.5, 1))),
    wire.encode(wire.StepLogitsRequest(SESSION, REQUEST, "b" * 20, 0.1, 0, 5, "res", np.arange(3))),
    wire.encode(wire.StepApplyRequest(SESSION, REQUEST, "res", gradients())),
    wire.encode(wire.StateReply(("res",), {"model": {"w": torch.ones(2, 2)}, "optimizer": {}})),
    wire.encode_event(Composed((NonPrivate("x"), Gaussian(2.0)))),
]


def _decode_any(raw: bytes) -> None:
    for kind in (*wire.REQUESTS, wire.StateReply, wire.EventMessage, wire.LogitsReply):
        try:
            wire.decode(raw, kind)
        except wire.WireError as err:
            assert isinstance(err.reason, wire.Refusal)
            assert str(err)


FUZZ = settings(
    max_examples=250,
    deadline=1000,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_never_crash_the_decoder(raw):
    _decode_any(raw)


@FUZZ
@given(st.binary(max_size=64))
def test_random_bytes_behind_a_valid_header_never_crash_the_decoder(body):
    for kind in (2, 4, 6):
        _decode_any(struct.pack(">4sHHII", wire.MAGIC, 1, kind, len(body), 0) + body)
        _decode_any(struct.pack(">4sHHII", wire.MAGIC, 1, kind, 0, 1) + body)


@FUZZ
@given(
    st.sampled_from(VALID),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
)
def test_mutated_valid_messages_never_crash_the_decoder(raw, edits):
    data = bytearray(raw)
    for position, value in edits:
        data[position % len(data)] = value
    _decode_any(bytes(data))


@FUZZ
@given(st.sampled_from(VALID), st.integers(0, 10_000), st.binary(max_size=16))
def test_truncated_or_spliced_valid_messages_never_crash_the_decoder(raw, cut, splice):
    cut %= len(raw) + 1
    _decode_any(raw[:cut])
    _decode_any(raw[:cut] + splice + raw[cut:])


@settings(FUZZ, max_examples=100)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_arbitrary_json_meta_never_crashes_the_decoder(meta):
    for kind in (1, 2, 3, 4, 5, 6, 7, 8, 9, 100, 90):
        for arrays in ((), (np.zeros((2, 10), dtype=np.uint8),)):
            _decode_any(wire.pack(kind, {"data": meta, "state": meta, "event": meta}, arrays))
            if isinstance(meta, dict):
                _decode_any(wire.pack(kind, meta, arrays))
