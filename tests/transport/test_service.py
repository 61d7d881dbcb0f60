"""The public server's logic in process: idempotent request ids, refusals that leave no state,
multi-part uploads, capacity limits and restart from the state directory."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch

from asymflow.accounting.events import Gaussian, RandomizedResponse
from asymflow.delta.contract import dataset_id
from asymflow.delta.labels import NoisyLabelGradients, NoisyLabels
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.transport import wire
from asymflow.transport.service import PublicService, RefusedError
from asymflow.transport.spec import PublicSpec

SHAPE = (4, 8, 8)
SPEC = PublicSpec("resnet20", SHAPE, 3, 0.25, init_seed=1, eval_batch_size=16)
SESSION = "a" * 32


def ids(k: int) -> str:
    return f"{k:032x}"


def payload(n: int = 24, seed: int = 0) -> tuple[SanitizedResidual, NoisyLabels]:
    rng = np.random.default_rng(seed)
    bits = np.packbits(rng.random((n, math.prod(SHAPE))) > 0.5, axis=1)
    labels = NoisyLabels(rng.integers(0, 3, n).astype(np.int64), 3, RandomizedResponse(2.0, 3))
    return SanitizedResidual(bits, SHAPE, Gaussian(1.0)), labels


def configured(**kwargs) -> PublicService:  # type: ignore[no-untyped-def]
    service = PublicService(**kwargs)
    service.configure(wire.encode(wire.ConfigureRequest(SESSION, SPEC)))
    return service


def upload(service: PublicService, data, labels, request: int = 1, parts: int = 1) -> str | None:  # type: ignore[no-untyped-def]
    rows = math.ceil(len(data) / parts)
    reply = None
    for part in range(parts):
        index = slice(part * rows, (part + 1) * rows)
        part_labels = (
            None
            if labels is None
            else NoisyLabels(np.array(labels.labels[index]), labels.classes, labels.event)
        )
        message = wire.UploadRequest(
            SESSION, ids(request), part, parts, data.subset(index), part_labels
        )
        reply = wire.decode(service.upload(wire.encode(message)), wire.UploadReply)
    assert reply is not None
    return reply.dataset_id


def train_bytes(key: str, request: int = 7, **changes) -> bytes:  # type: ignore[no-untyped-def]
    fields = dict(
        session=SESSION, request_id=ids(request), dataset_id=key, epochs=1, batch_size=8,
        lr=0.1, seed=0, start_epoch=0, total_epochs=None, model="res", indices=None,
    )  # fmt: skip
    fields.update(changes)
    return wire.encode(wire.TrainRequest(**fields))  # type: ignore[arg-type]


def weights(service: PublicService, model: str = "res") -> dict[str, torch.Tensor]:
    net = service.sessions[SESSION].public.models[model]
    return {k: v.clone() for k, v in net.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_server_trains_exactly_like_an_in_process_public_side():
    data, labels = payload()
    service = configured()
    key = upload(service, data, labels)
    remote = wire.decode(service.train(train_bytes(key)), wire.TrainReply).metrics
    local = SPEC.make_public()
    assert local.upload(data, labels) == key == dataset_id(data, labels)
    assert local.train(key, 1, batch_size=8, lr=0.1, seed=0) == remote
    logits = wire.decode(
        service.logits(wire.encode(wire.LogitsRequest(SESSION, data))), wire.LogitsReply
    ).logits
    assert torch.equal(torch.from_numpy(logits), local.logits(data))


def test_a_repeated_train_request_returns_the_stored_reply_without_training_again():
    data, labels = payload()
    service = configured()
    key = upload(service, data, labels)
    first = service.train(train_bytes(key))
    after_first = weights(service)
    assert service.train(train_bytes(key)) == first
    assert same(weights(service), after_first)
    assert service.counters["trains_run"] == 1 and service.counters["trains_replayed"] == 1
    with pytest.raises(RefusedError, match="used for another request") as err:
        service.train(train_bytes(key, lr=0.2))  # same request id, other content
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert same(weights(service), after_first)


def test_a_repeated_upload_part_is_stored_once_and_a_changed_one_refused():
    data, labels = payload()
    service = configured()
    key = upload(service, data, labels)
    assert upload(service, data, labels) == key
    assert service.counters["uploads_completed"] == 1
    other, _ = payload(seed=1)
    with pytest.raises(RefusedError, match="used for another upload"):
        upload(service, other, labels)
    assert list(service.sessions[SESSION].datasets) == [key]


def test_a_multi_part_upload_assembles_the_same_data_set_as_one_part():
    data, labels = payload(25)
    service = configured()
    assert upload(service, data, labels, request=2, parts=4) == dataset_id(data, labels)
    stored, stored_labels = service.sessions[SESSION].public.dataset(dataset_id(data, labels))
    np.testing.assert_array_equal(stored.bits, data.bits)
    assert stored_labels is not None
    np.testing.assert_array_equal(stored_labels.labels, labels.labels)


def test_payloads_of_another_shape_or_class_count_are_refused_and_leave_nothing():
    service = configured()
    rng = np.random.default_rng(0)
    wrong = SanitizedResidual(
        np.packbits(rng.random((4, 3 * 8 * 8)) > 0.5, axis=1), (3, 8, 8), Gaussian(1.0)
    )
    with pytest.raises(RefusedError, match=r"agreed residual shape \(4, 8, 8\)"):
        upload(service, wrong, None)
    data, _ = payload(4)
    five = NoisyLabels(np.zeros(4, dtype=np.int64), 5, RandomizedResponse(2.0, 5))
    with pytest.raises(RefusedError, match="classes must be the agreed 3"):
        upload(service, data, five)
    session = service.sessions[SESSION]
    assert not session.datasets and not session.pending and not session.public.models


def test_training_needs_a_held_labelled_data_set_and_valid_indices():
    data, labels = payload()
    service = configured()
    with pytest.raises(RefusedError) as err:
        service.train(train_bytes("f" * 20))
    assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.missing == "dataset"
    unlabelled = upload(service, data, None, request=3)
    with pytest.raises(RefusedError, match="without labels") as err:
        service.train(train_bytes(unlabelled))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    key = upload(service, data, labels, request=4)
    with pytest.raises(RefusedError, match=r"indices must lie in \[0, 24\)"):
        service.train(train_bytes(key, indices=np.array([0, 24])))
    assert not service.sessions[SESSION].public.models


def test_logits_need_an_existing_model_and_an_unknown_session_is_not_found():
    data, _ = payload(2)
    service = configured()
    with pytest.raises(RefusedError, match="does not exist") as err:
        service.logits(wire.encode(wire.LogitsRequest(SESSION, data, "fold3")))
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert not service.sessions[SESSION].public.models  # no model was created by asking
    with pytest.raises(RefusedError) as err:
        service.logits(wire.encode(wire.LogitsRequest("b" * 32, data)))
    assert err.value.code == grpc.StatusCode.NOT_FOUND and err.value.missing == "session"


def test_a_state_that_does_not_fit_is_refused_and_the_model_kept():
    data, labels = payload()
    service = configured()
    service.train(train_bytes(upload(service, data, labels)))
    before = weights(service)
    good = service.sessions[SESSION].model_state("res")
    bad_shape = {**good, "model": {**good["model"]}}
    name = next(k for k, v in bad_shape["model"].items() if v.dim() == 4)
    bad_shape["model"][name] = torch.zeros(1, 1, 1, 1)
    bad_momentum = {"model": good["model"], "optimizer": {**good["optimizer"]}}
    bad_momentum["optimizer"]["state"] = {0: {"momentum_buffer": torch.zeros(7)}}
    for k, state in enumerate((bad_shape, bad_momentum)):
        request = wire.LoadStateRequest(SESSION, ids(50 + k), "res", state)
        with pytest.raises(RefusedError, match="does not fit") as err:
            service.load_state(wire.encode(request))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert same(weights(service), before)
    fresh = SPEC.make_public()
    fresh.model("res")
    state = {
        "model": fresh.models["res"].state_dict(),
        "optimizer": fresh.optimizers["res"].state_dict(),
    }
    service.load_state(wire.encode(wire.LoadStateRequest(SESSION, ids(60), "res", state)))
    assert same(weights(service), fresh.models["res"].state_dict())


def test_uploads_beyond_the_held_bytes_limit_are_refused():
    data, labels = payload(24)
    service = configured(max_held_bytes=24 * 32 + 24 * 8)
    upload(service, data, labels)
    more, more_labels = payload(2, seed=3)
    with pytest.raises(RefusedError, match="would exceed") as err:
        upload(service, more, more_labels, request=9)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not service.sessions[SESSION].pending


def test_a_configured_session_refuses_another_spec_and_evicts_the_oldest_beyond_the_limit():
    service = configured(max_sessions=2)
    other = PublicSpec("resnet20", SHAPE, 4, 0.25, init_seed=1)
    with pytest.raises(RefusedError, match="another spec"):
        service.configure(wire.encode(wire.ConfigureRequest(SESSION, other)))
    for k in range(2):
        service.configure(wire.encode(wire.ConfigureRequest(ids(100 + k), SPEC)))
    assert list(service.sessions) == [ids(100), ids(101)]


def test_a_restarted_service_resumes_models_and_stored_replies_from_its_state_dir(tmp_path):
    data, labels = payload()
    service = configured(state_dir=tmp_path)
    key = upload(service, data, labels)
    reply = service.train(train_bytes(key))
    trained = weights(service)
    assert oct(tmp_path.stat().st_mode & 0o777) == "0o700"

    restarted = PublicService(state_dir=tmp_path)
    assert same(weights(restarted), trained)
    assert restarted.train(train_bytes(key)) == reply  # replayed, not run: data set is gone
    assert "trains_run" not in restarted.counters
    with pytest.raises(RefusedError) as err:
        restarted.train(train_bytes(key, request=8))
    assert err.value.missing == "dataset"
    upload(restarted, data, labels, request=11)
    restarted.train(train_bytes(key, request=8, start_epoch=1))
    local = SPEC.make_public()
    local.upload(data, labels)
    local.train(key, 1, batch_size=8, lr=0.1, seed=0)
    local.train(key, 1, batch_size=8, lr=0.1, seed=0, start_epoch=1)
    assert same(weights(restarted), local.models["res"].state_dict())


def test_empty_payloads_are_refused():
    service = configured()
    data, labels = payload(0)
    with pytest.raises(RefusedError, match="at least one sample"):
        upload(service, data, labels)
    with pytest.raises(RefusedError, match="at least one sample"):
        service.logits(wire.encode(wire.LogitsRequest(SESSION, data)))
    assert not service.sessions[SESSION].pending


def step_bytes(key: str, request: int, rows: np.ndarray) -> bytes:
    message = wire.StepLogitsRequest(SESSION, ids(request), key, 0.1, 0, 0, "res", rows)
    return wire.encode(message)


def apply_bytes(request: int, rows: int, classes: int = 3) -> bytes:
    values = np.linspace(-1, 1, rows * classes, dtype=np.float32).reshape(rows, classes)
    gradients = NoisyLabelGradients(values, Gaussian(2.0))
    return wire.encode(wire.StepApplyRequest(SESSION, ids(request), "res", gradients))


def test_a_step_needs_its_logits_fits_their_shape_and_is_applied_once():
    service = configured()
    data, _ = payload()
    key = upload(service, data, None)
    assert key is not None
    with pytest.raises(RefusedError, match="no pending step") as refused:
        service.step_apply(apply_bytes(20, 4))
    assert refused.value.missing == "step"
    first = service.step_logits(step_bytes(key, 21, np.arange(4)))
    assert service.step_logits(step_bytes(key, 21, np.arange(4))) == first  # replayed
    assert wire.decode(first, wire.LogitsReply).logits.shape == (4, 3)
    before = weights(service)
    with pytest.raises(RefusedError, match=r"shape of the pending logits \(4, 3\)"):
        service.step_apply(apply_bytes(22, 5))
    assert same(weights(service), before)  # refused: nothing changed, the step still pends
    reply = service.step_apply(apply_bytes(23, 4))
    after = weights(service)
    assert not same(after, before)
    assert service.step_apply(apply_bytes(23, 4)) == reply  # a retry is not a second step
    assert same(weights(service), after)
    with pytest.raises(RefusedError, match="indices must lie in"):
        service.step_logits(step_bytes(key, 24, np.array([0, 24])))
