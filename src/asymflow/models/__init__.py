"""Networks for Delta and the baselines: CIFAR ResNets split into stem + body, the private
low-rank model, and a MAC counter (DESIGN.md sec. 3).

``build_model(name, **kwargs)`` builds any of them by name; ``MODEL_NAMES`` lists the names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from asymflow.models.lowrank import (
    DEMO_PRIVATE_RANKS,
    DEMO_PRIVATE_WIDTHS,
    RESNET18_PRIVATE_RANKS,
    RESNET18_PRIVATE_WIDTHS,
    FactorizedConv2d,
    LowRankBlock,
    LowRankResNet,
    build_private_model,
)
from asymflow.models.macs import count_macs, mac_breakdown
from asymflow.models.resnet import (
    ARCHS,
    Backbone,
    BasicBlock,
    ResNet,
    ResNetBody,
    ResNetSpec,
    Stem,
    group_count,
    original_model,
    public_model,
    resnet,
    resnet18,
    resnet20,
    resnet34,
)

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "backbone": Backbone,
    "public": public_model,
    "original": original_model,
    "private": build_private_model,
}

MODEL_NAMES: tuple[str, ...] = tuple(_BUILDERS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the model registered as ``name`` (one of MODEL_NAMES) with builder ``kwargs``.

    "resnet20"/"resnet18"/"resnet34": the standard networks; "backbone": Delta's M_bb;
    "public": M_res (needs ``arch``); "original": M_bb + M_res (needs ``arch``);
    "private": the low-rank M_main (needs ``r``).
    """
    if name not in _BUILDERS:
        raise ValueError(f"name must be one of {MODEL_NAMES}, got {name!r}")
    builder = _BUILDERS[name]
    signature = inspect.signature(builder)
    try:
        signature.bind(**kwargs)
    except TypeError as err:
        allowed = ", ".join(signature.parameters)
        raise TypeError(
            f"build_model({name!r}): {err}; allowed keyword arguments: {allowed}"
        ) from None
    return builder(**kwargs)


__all__ = [
    "ARCHS",
    "DEMO_PRIVATE_RANKS",
    "DEMO_PRIVATE_WIDTHS",
    "MODEL_NAMES",
    "RESNET18_PRIVATE_RANKS",
    "RESNET18_PRIVATE_WIDTHS",
    "Backbone",
    "BasicBlock",
    "FactorizedConv2d",
    "LowRankBlock",
    "LowRankResNet",
    "ResNet",
    "ResNetBody",
    "ResNetSpec",
    "Stem",
    "build_model",
    "build_private_model",
    "count_macs",
    "group_count",
    "mac_breakdown",
    "original_model",
    "public_model",
    "resnet",
    "resnet18",
    "resnet20",
    "resnet34",
]
