"""The wire bytes are fixed: one example of every message encodes to pinned bytes (SHA-256 and
length), and decoding those bytes and encoding them again gives the same bytes."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from asymflow.accounting.events import (
    BalancedSampled,
    Composed,
    Event,
    Gaussian,
    NonPrivate,
    PoissonSampled,
    RandomizedResponse,
    SelfComposed,
)
from asymflow.delta.labels import NoisyLabelGradients, NoisyLabels
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.transport import wire
from asymflow.transport.spec import PublicSpec

SESSION = "0123456789abcdef" * 2
REQUEST = "fedcba9876543210" * 2
DATASET = "a1" * 10


def _residual(n: int, event: Event) -> SanitizedResidual:
    """``n`` samples of shape (3, 5, 5): 75 bits, the last byte with 5 zero padding bits."""
    flat = (np.arange(n * 75).reshape(n, 75) * 7) % 5 < 2
    return SanitizedResidual(np.packbits(flat, axis=1), (3, 5, 5), event)


def _state() -> dict[str, object]:
    """A model state with float, integer and double tensors, int keys, tuples and None."""
    return {
        "model": {
            "w": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 4,
            "b": torch.tensor([0.5, -1.5], dtype=torch.float64),
            "n": torch.tensor(7, dtype=torch.int64),
        },
        "optimizer": {
            "state": {0: {"momentum_buffer": torch.ones(2, 3)}, 1: {"momentum_buffer": None}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "params": [0, 1], "foreach": None}],
        },
    }


EXAMPLES: dict[str, wire.Message] = {
    "event": wire.EventMessage(
        Composed((SelfComposed(Gaussian(0.7), 3), PoissonSampled(0.01, Gaussian(1.1))))
    ),
    "configure": wire.ConfigureRequest(SESSION, PublicSpec("resnet20", (3, 5, 5), 4, 0.5, 1)),
    "configure-reply": wire.ConfigureReply(SESSION, True),
    "upload": wire.UploadRequest(
        SESSION,
        REQUEST,
        1,
        3,
        _residual(4, Gaussian(1.25)),
        NoisyLabels(np.array([0, 3, 2, 1]), 4, RandomizedResponse(2.0, 4)),
    ),
    "upload-no-labels": wire.UploadRequest(
        SESSION, REQUEST, 0, 1, _residual(2, BalancedSampled(3, 10, Gaussian(2.0)))
    ),
    "upload-reply": wire.UploadReply(DATASET, 3),
    "upload-reply-pending": wire.UploadReply(None, 1),
    "train": wire.TrainRequest(
        SESSION, REQUEST, DATASET, 2, 32, 0.1, 5, 1, 4, "fold1", np.array([3, 1, 2])
    ),
    "train-defaults": wire.TrainRequest(SESSION, REQUEST, DATASET, 1, 8, 0.05, 0),
    "train-reply": wire.TrainReply({"loss": 0.625, "acc": 0.25, "samples": 6.0}),
    "logits": wire.LogitsRequest(SESSION, _residual(3, NonPrivate("sign")), "fold0"),
    "logits-reply": wire.LogitsReply(np.arange(6, dtype=np.float32).reshape(2, 3) / 8, 0.125),
    "step-logits": wire.StepLogitsRequest(
        SESSION, REQUEST, DATASET, 0.05, 3, 17, "res", np.array([4, 0, 2, 9])
    ),
    "step-apply": wire.StepApplyRequest(
        SESSION,
        REQUEST,
        "fold1",
        NoisyLabelGradients(np.linspace(-2, 2, 12, dtype=np.float32).reshape(4, 3), Gaussian(3.5)),
    ),
    "state": wire.StateRequest(SESSION, "res"),
    "state-names": wire.StateRequest(SESSION),
    "state-reply": wire.StateReply(("res", "fold0"), _state()),
    "state-reply-names": wire.StateReply(("res",)),
    "load-state": wire.LoadStateRequest(SESSION, REQUEST, "fold0", _state()),
    "forget": wire.ForgetRequest(SESSION, DATASET),
    "empty": wire.Empty(),
    "health": wire.HealthReply("ok", 1, 1, 1 << 20, 4242, 2, {"requests": 5, "refused": 1}),
}

PINNED: dict[str, tuple[int, str]] = {
    "event": (
        205,
        "54e513f0ba515e618cb3c694e46a1bdccdd7bd7ea66a6a7be302d17b89a1de64",
    ),
    "configure": (
        258,
        "a86b208bcf6f4ac62439f941fe4188f51e34f398f869ac6deda076c790610704",
    ),
    "configure-reply": (
        77,
        "ca51bdffb9958cb6604083565b3fb7d1431240269303b2aac8771b2b635daa45",
    ),
    "upload": (
        414,
        "3842c57d0c0c9fdc36a2fcb6867f372401b07922b1f008558ca6e289d2fac79b",
    ),
    "upload-no-labels": (
        319,
        "ae4e7cd72561425bcd0562246f0a7e5d2c55af1be509c823b6ca624e2f76b30d",
    ),
    "upload-reply": (
        66,
        "6748f2658e77fd9488d26f14999bfb99f7c5fcbbcd17ff2af8fd3166fa915d41",
    ),
    "upload-reply-pending": (
        48,
        "39f27fbfe3a89d8b94f054163be7c1b9e796be283ee2491c34ca54831eceee39",
    ),
    "train": (
        286,
        "662e71dec499a583352e78f3b52e325472a8c947fc819a4ae8b898e0723c5d4d",
    ),
    "train-defaults": (
        256,
        "80dd7205aadb42e3abd002355ca9253215800665c2e62984f7ec13bc0c6ac3e2",
    ),
    "train-reply": (
        67,
        "c91a7d52aa07e56eed5873bf6bb02323e227eb8de07d36c0ff3d7edb24c3768e",
    ),
    "logits": (
        216,
        "0563ccd98ae04229c0b5b074e2ddf8605837c2b0ffce2a025a425c89744983b9",
    ),
    "logits-reply": (
        86,
        "2f8453de4b3177901d5262d2276ebb1d213f5e375d62a80b9d79985e4a1f6e70",
    ),
    "step-logits": (
        243,
        "23c44931840839cd224df74d22ffd733aafb8f8eceb1db33bb850ab36b545de8",
    ),
    "step-apply": (
        257,
        "5e6e1f8f9c3f2cba340963b8cb10b49adc8d0b27af2a7b7ebfcf2541cd28cab5",
    ),
    "state": (
        76,
        "cba664401d6410fb47d6972713f80cf1385c7f151bbaa5ac769a46c01a4d9a29",
    ),
    "state-names": (
        75,
        "8603df5a2eefa637a94961aeacf9fd7815cec02b6813c24db4f8191d5981ed2b",
    ),
    "state-reply": (
        466,
        "681135b1be3e82b871899d2530daa9d5a78b1bde33aae1c5b5d0c5834cabe4c2",
    ),
    "state-reply-names": (
        47,
        "1e6ce97a2e67ea306996c2dbac10a410dd3937fe8f8f9860d0eb7f2fe0a56069",
    ),
    "load-state": (
        550,
        "104442bdeaf08eb82bab3db3f4c5df3d8b4923cd58f6c06cac1ab467bcc137ea",
    ),
    "forget": (
        98,
        "a7835c61bb1032bb72e3cd866b8c9915d6f3379183c335d87742b0a01fe17a98",
    ),
    "empty": (
        18,
        "5e2a230a46dcde154d501487eb79867b9de5f8652917cc4aff37e5c7d9c27020",
    ),
    "health": (
        151,
        "9b44226450f22852da52db86c77896830e3f73c3cd8f788ce390d38cd6a82038",
    ),
}
"""Length and SHA-256 of each example's bytes, as encoded before the declarative codec."""


def test_every_message_class_has_a_pinned_example():
    classes = {c for c in wire.Message.__subclasses__() if c.__module__ == wire.__name__}
    assert {type(m) for m in EXAMPLES.values()} == classes
    assert set(PINNED) == set(EXAMPLES)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_message_encodes_to_its_pinned_bytes(name):
    raw = wire.encode(EXAMPLES[name])
    assert (len(raw), hashlib.sha256(raw).hexdigest()) == PINNED[name]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_pinned_bytes_decode_and_encode_to_the_same_bytes(name):
    raw = wire.encode(EXAMPLES[name])
    assert wire.encode(wire.decode(raw, type(EXAMPLES[name]))) == raw
