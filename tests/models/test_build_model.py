"""The ``build_model`` registry."""

from __future__ import annotations

import pytest
import torch

from asymflow.models import (
    MODEL_NAMES,
    Backbone,
    LowRankResNet,
    ResNet,
    ResNetBody,
    build_model,
)


@pytest.mark.parametrize(
    ("name", "kwargs", "kind", "input_shape"),
    [
        ("resnet20", {"num_classes": 4}, ResNet, (3, 16, 16)),
        ("resnet18", {"num_classes": 4, "width": 0.25}, ResNet, (3, 16, 16)),
        ("resnet34", {"num_classes": 4, "width": 0.25}, ResNet, (3, 16, 16)),
        ("backbone", {"ir_channels": 32}, Backbone, (3, 16, 16)),
        ("public", {"arch": "resnet20", "num_classes": 4}, ResNetBody, (64, 16, 16)),
        ("original", {"arch": "resnet18", "num_classes": 4, "width": 0.25}, ResNet, (3, 16, 16)),
        ("private", {"r": 8, "num_classes": 4, "width": 0.25}, LowRankResNet, (8, 8, 8)),
    ],
)
def test_every_registered_name_builds_a_working_model(
    name: str, kwargs: dict, kind: type, input_shape: tuple[int, ...]
) -> None:
    model = build_model(name, **kwargs)
    assert isinstance(model, kind)
    with torch.no_grad():
        out = model(torch.randn(2, *input_shape))
    assert out.shape[0] == 2


def test_registry_covers_every_name() -> None:
    assert set(MODEL_NAMES) == {
        "resnet20",
        "resnet18",
        "resnet34",
        "backbone",
        "public",
        "original",
        "private",
    }


def test_unknown_name_lists_allowed_names() -> None:
    with pytest.raises(ValueError, match=r"name must be one of .*'resnet18'.*got 'vgg16'"):
        build_model("vgg16")


def test_unknown_keyword_names_the_allowed_keywords() -> None:
    with pytest.raises(TypeError, match=r"build_model\('private'\).*allowed keyword arguments: r"):
        build_model("private", rank=8)


def test_missing_required_argument_is_reported() -> None:
    with pytest.raises(TypeError, match=r"build_model\('public'\).*arch"):
        build_model("public")
