"""Multiply-accumulate (MAC) counts from one traced forward pass.

Per sample, counted from the shapes seen by forward hooks:
- ``ConvNd``: MACs = numel(output) * (in_channels / groups) * prod(kernel_size);
- ``Linear``: MACs = numel(output) * in_features.
Norms, activations, pooling and residual additions count as 0, as in the usual
"FLOPs" tables (e.g. 0.56 GMACs for the CIFAR ResNet-18; 41M for ResNet-20, He et al. 2016).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layer_macs(module: nn.Module, output: Tensor) -> int:
    if isinstance(module, _CONVS):
        per_output = (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def mac_breakdown(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """MACs per Conv/Linear module (by qualified name) for one sample of ``input_shape``.

    ``input_shape`` is one sample's shape without the batch dimension, e.g. ``(3, 32, 32)``.
    A module called several times is counted once per call. The model is run once in eval
    mode under ``torch.no_grad()``; its training flag is restored afterwards.
    """
    shape = tuple(input_shape)
    if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(
            f"input_shape must be a non-empty sequence of integers >= 1 (one sample, no "
            f"batch dimension), got {input_shape!r}"
        )
    counts: dict[str, int] = {}
    handles = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, _inputs: tuple[Tensor, ...], output: Tensor) -> None:
            counts[name] = counts.get(name, 0) + _layer_macs(module, output)

        return hook

    for name, module in model.named_modules():
        if isinstance(module, (*_CONVS, nn.Linear)):
            handles.append(module.register_forward_hook(make_hook(name)))
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *shape), device=device, dtype=dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return counts


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Total Conv + Linear MACs of ``model`` for one sample of ``input_shape`` (no batch dim)."""
    return sum(mac_breakdown(model, input_shape).values())
