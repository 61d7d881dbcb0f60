"""Delta's factorized low-rank private model M_main."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional

from asymflow.models import (
    DEMO_PRIVATE_RANKS,
    DEMO_PRIVATE_WIDTHS,
    FactorizedConv2d,
    LowRankResNet,
    build_private_model,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("size", [16, 8])
def test_private_model_logits_shape_on_main_part(size: int) -> None:
    model = build_private_model(8, num_classes=10)
    assert model(torch.randn(2, 8, size, size)).shape == (2, 10)


@pytest.mark.parametrize("size", [16, 8])
def test_demo_private_model_logits_shape(size: int) -> None:
    model = build_private_model(4, 10, widths=DEMO_PRIVATE_WIDTHS, ranks=DEMO_PRIVATE_RANKS)
    assert model(torch.randn(2, 4, size, size)).shape == (2, 10)
    same = build_private_model(4, 10, width=0.25)
    assert (same.widths, same.ranks) == (DEMO_PRIVATE_WIDTHS, DEMO_PRIVATE_RANKS)


def test_every_kxk_conv_is_factorized_as_q_kernels_then_1x1_n_kernels() -> None:
    model = build_private_model(8)
    layers = list(model.factorized_layers())
    assert len(layers) == 12  # 6 blocks x 2 convs
    reduce_convs = {id(layer.reduce) for layer in layers}
    spatial = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert spatial
    assert all(id(m) in reduce_convs for m in spatial)
    # DESIGN.md sec. 3 table: blocks 1-2 n=64,q=16; 3-4 n=256,q=32; 5-6 n=512,q=64.
    expected = [(64, 16)] * 4 + [(256, 32)] * 4 + [(512, 64)] * 4
    got = [(layer.expand.out_channels, layer.reduce.out_channels) for layer in layers]
    assert got == expected
    for layer in layers:
        assert layer.reduce.kernel_size == (3, 3)
        assert layer.expand.kernel_size == (1, 1)
        assert layer.expand.in_channels == layer.reduce.out_channels
    assert layers[0].reduce.in_channels == 8


def test_private_model_downsamples_between_groups() -> None:
    model = build_private_model(8)
    strides = [layer.reduce.stride[0] for layer in model.factorized_layers()]
    assert strides == [1, 1, 1, 1, 2, 1, 1, 1, 2, 1, 1, 1]
    shapes: list[tuple[int, ...]] = []
    for group in model.groups:
        group.register_forward_hook(lambda _m, _i, out: shapes.append(tuple(out.shape)))
    model(torch.randn(2, 8, 16, 16))
    assert shapes == [(2, 64, 16, 16), (2, 256, 8, 8), (2, 512, 4, 4)]


def test_factorized_conv_equals_one_conv_with_rank_q_weight() -> None:
    layer = FactorizedConv2d(5, 12, 3, rank=4, stride=2)
    a = layer.reduce.weight  # q x c x k x k
    b = layer.expand.weight.flatten(1)  # n x q
    merged = (b @ a.flatten(1)).view(12, 5, 3, 3)
    assert torch.linalg.matrix_rank(merged.flatten(1)) <= 4
    x = torch.randn(2, 5, 9, 9)
    torch.testing.assert_close(layer(x), functional.conv2d(x, merged, stride=2, padding=1))


def test_orthogonality_penalty_is_zero_for_orthonormal_kernels() -> None:
    layer = FactorizedConv2d(8, 64, 3, rank=16)
    with torch.no_grad():
        w = torch.empty(16, 72)
        nn.init.orthogonal_(w)
        layer.reduce.weight.copy_(w.view(16, 8, 3, 3))
    assert layer.orthogonality_penalty().item() == pytest.approx(0.0, abs=1e-9)


def test_orthogonality_penalty_matches_frobenius_formula_and_is_positive() -> None:
    layer = FactorizedConv2d(2, 6, 3, rank=3)
    with torch.no_grad():
        layer.reduce.weight.normal_()
    w = layer.reduce.weight.detach().reshape(3, 18)
    expected = torch.linalg.matrix_norm(w @ w.T - torch.eye(3)) ** 2
    penalty = layer.orthogonality_penalty()
    assert penalty.item() > 0
    torch.testing.assert_close(penalty.detach(), expected)


def test_orthogonality_penalty_uses_short_side_when_rank_exceeds_fan_in() -> None:
    layer = FactorizedConv2d(1, 16, 3, rank=12)  # q = 12 > c k k = 9
    with torch.no_grad():
        w = torch.empty(12, 9)
        nn.init.orthogonal_(w)  # orthonormal columns
        layer.reduce.weight.copy_(w.view(12, 1, 3, 3))
    assert layer.orthogonality_penalty().item() == pytest.approx(0.0, abs=1e-9)


def test_model_penalty_sums_layers_scales_by_alpha_and_has_gradients() -> None:
    model = build_private_model(8, widths=DEMO_PRIVATE_WIDTHS, ranks=DEMO_PRIVATE_RANKS)
    assert model.orthogonality_penalty().item() == pytest.approx(0.0, abs=1e-6)  # orthogonal init
    with torch.no_grad():
        for layer in model.factorized_layers():
            layer.reduce.weight.mul_(1.5)
    total = sum(layer.orthogonality_penalty() for layer in model.factorized_layers())
    penalty = model.orthogonality_penalty(alpha=0.1)
    assert penalty.item() > 0
    torch.testing.assert_close(penalty, 0.1 * total)
    penalty.backward()
    for layer in model.factorized_layers():
        assert layer.reduce.weight.grad is not None
        assert layer.reduce.weight.grad.abs().sum() > 0
        assert layer.expand.weight.grad is None


def test_group_norm_private_model_has_no_batch_norm() -> None:
    model = build_private_model(8, norm="group")
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.randn(1, 8, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: build_private_model(0), "r must be an integer >= 1"),
        (lambda: build_private_model(8, widths=(64, 128), ranks=(16,)), "equal length"),
        (lambda: build_private_model(8, ranks=(16, 0, 64)), r"ranks\[1\] must be an integer >= 1"),
        (lambda: build_private_model(8, width=-1.0), "width must be > 0"),
        (lambda: LowRankResNet(8, 10, (), ()), "non-empty"),
        (lambda: FactorizedConv2d(8, 8, 2, 4), "kernel_size must be odd"),
        (lambda: build_private_model(8).orthogonality_penalty(alpha=-1.0), "alpha must be"),
    ],
)
def test_invalid_arguments_name_the_parameter(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()
