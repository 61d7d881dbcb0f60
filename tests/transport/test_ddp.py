"""Training the public model as a torchrun DDP job: the same weights as one process, and a
failed job that leaves the server running with its model unchanged."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pytest
import torch

from asymflow.accounting.events import Gaussian, RandomizedResponse
from asymflow.delta.labels import NoisyLabels
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.transport import ddp, wire
from asymflow.transport.service import PublicService, RefusedError
from asymflow.transport.spec import PublicSpec

SHAPE = (4, 8, 8)
SPEC = PublicSpec("resnet20", SHAPE, 3, 0.25, init_seed=1, augment=True, eval_batch_size=16)
"""A ResNet-20 body with batch norm, trained with random crops."""
SESSION = "d" * 32


def payload(n: int) -> tuple[SanitizedResidual, NoisyLabels]:
    rng = np.random.default_rng(0)
    bits = np.packbits(rng.random((n, math.prod(SHAPE))) > 0.5, axis=1)
    labels = NoisyLabels(rng.integers(0, 3, n).astype(np.int64), 3, RandomizedResponse(2.0, 3))
    return SanitizedResidual(bits, SHAPE, Gaussian(1.0)), labels


def service_with(data: SanitizedResidual, labels: NoisyLabels) -> tuple[PublicService, str]:
    service = PublicService(nproc_per_node=2)
    service.configure(wire.encode(wire.ConfigureRequest(SESSION, SPEC)))
    upload = wire.UploadRequest(SESSION, "1" * 32, 0, 1, data, labels)
    key = wire.decode(service.upload(wire.encode(upload)), wire.UploadReply).dataset_id
    assert key is not None
    return service, key


def train_request(key: str, **fields: object) -> bytes:
    values: dict[str, object] = dict(
        session=SESSION, request_id="7" * 32, dataset_id=key, epochs=2, batch_size=8, lr=0.1,
        seed=3, start_epoch=0, total_epochs=None, model="res", indices=None,
    )  # fmt: skip
    values.update(fields)
    return wire.encode(wire.TrainRequest(**values))  # type: ignore[arg-type]


def test_two_process_ddp_training_gives_the_weights_of_one_process_training():
    """27 rows in batches of 8: the last batch of 3 is split 2 + 1 between the processes, so
    the loss weighting of uneven shards, the crops drawn for the whole batch and batch norm
    over both processes all matter (per-process batch norm is off by ~0.5 here)."""
    data, labels = payload(27)
    service, key = service_with(data, labels)
    remote = wire.decode(service.train(train_request(key)), wire.TrainReply).metrics
    local = SPEC.make_public()
    metrics = local.train(local.upload(data, labels), 2, batch_size=8, lr=0.1, seed=3)
    public = service.sessions[SESSION].public
    assert isinstance(public, ddp.DistributedPublic)
    weights, expected = public.models["res"].state_dict(), local.models["res"].state_dict()
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(weights[name], value, rtol=0, atol=1e-5, msg=name)
    momentum = public.optimizers["res"].state_dict()["state"]
    for index, state in local.optimizers["res"].state_dict()["state"].items():
        torch.testing.assert_close(
            momentum[index]["momentum_buffer"], state["momentum_buffer"], rtol=0, atol=1e-5
        )
    assert remote["samples"] == metrics["samples"] == 54
    assert remote["loss"] == pytest.approx(metrics["loss"], abs=1e-5)
    assert remote["acc_on_received_labels"] == pytest.approx(metrics["acc_on_received_labels"])


def test_a_failing_worker_fails_the_train_call_and_keeps_the_model(monkeypatch):
    data, labels = payload(16)
    service, key = service_with(data, labels)
    local = SPEC.make_public()
    net = local.model("res")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state = {"model": net.state_dict(), "optimizer": local.optimizers["res"].state_dict()}
    request = wire.LoadStateRequest(SESSION, "2" * 32, "res", state)
    service.load_state(wire.encode(request))
    monkeypatch.setattr(ddp, "WORKER", "asymflow.transport.no_such_worker")
    with pytest.raises(RefusedError, match="exited with code 1") as err:
        service.train(train_request(key))
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert "the model is unchanged" in err.value.message
    after = service.sessions[SESSION].public.models["res"].state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    logits = service.logits(wire.encode(wire.LogitsRequest(SESSION, data)))
    assert wire.decode(logits, wire.LogitsReply).logits.shape == (16, 3)


@pytest.mark.parametrize("value", [0, -1, True])
def test_the_number_of_processes_must_be_a_positive_integer(value):
    with pytest.raises(ValueError, match="nproc_per_node must be an integer >= 1"):
        PublicService(nproc_per_node=value)
    with pytest.raises(ValueError, match="nproc_per_node must be an integer >= 1"):
        ddp.DistributedPublic(SPEC, nproc_per_node=value)
