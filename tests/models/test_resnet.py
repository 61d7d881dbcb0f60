"""CIFAR ResNets, the Delta backbone, the public model and the original network."""

from __future__ import annotations

import functools

import pytest
import torch
from torch import nn

from asymflow.models import (
    ARCHS,
    Backbone,
    ResNetBody,
    group_count,
    original_model,
    public_model,
    resnet,
    resnet18,
    resnet20,
)
from asymflow.models.resnet import PadShortcut

ARCH_NAMES = sorted(ARCHS)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@functools.cache
def _public(arch: str) -> ResNetBody:
    """One eval-mode public model per arch, shared by the forward-only tests below."""
    return public_model(arch, ir_channels=64, num_classes=10).eval()


@pytest.mark.parametrize("arch", ARCH_NAMES)
@torch.no_grad()
def test_resnet_logits_shape_for_cifar_and_demo_inputs(arch: str) -> None:
    model = resnet(arch, num_classes=7).eval()
    for size in (32, 16):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 7)


@torch.no_grad()
def test_resnet_accepts_grayscale_input_channels() -> None:
    model = resnet20(num_classes=10, in_channels=1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


@torch.no_grad()
def test_imagenet_stem_halves_twice_and_network_runs() -> None:
    model = resnet18(num_classes=5, stem="imagenet")
    assert isinstance(model.stem.pool, nn.MaxPool2d)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 5)


@pytest.mark.parametrize(
    ("kind", "size", "expected"),
    [("cifar", 32, (64, 32, 32)), ("cifar", 16, (64, 16, 16)), ("imagenet", 224, (64, 56, 56))],
)
@torch.no_grad()
def test_backbone_gives_ir_of_design_shape(
    kind: str, size: int, expected: tuple[int, int, int]
) -> None:
    backbone = Backbone(3, 64, kind=kind)  # DESIGN.md sec. 3: 64x32x32 (CIFAR), 64x56x56
    assert isinstance(backbone.act, nn.PReLU)
    assert backbone.ir_channels == 64
    assert backbone.output_shape(size, size) == expected
    x = torch.randn(2, 3, size, size)
    assert backbone(x).shape == (2, *expected)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@torch.no_grad()
def test_public_model_accepts_one_bit_ir_shaped_residual(arch: str) -> None:
    model = _public(arch)
    for size in (32, 16):
        bits = (torch.rand(2, 64, size, size) >= 0.5).float()
        for residual in (bits, 2 * bits - 1):  # {0, 1} and +-1 encodings
            assert model(residual).shape == (2, 10)


def test_public_resnet18_starts_at_block_one_and_resnet20_gets_input_conv() -> None:
    assert isinstance(_public("resnet18").input, nn.Identity)
    r20 = _public("resnet20")
    conv = r20.input[0]
    assert isinstance(conv, nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (64, 16, (3, 3))
    r20_1x1 = public_model("resnet20", ir_channels=64, input_kernel_size=1)
    assert r20_1x1.input[0].kernel_size == (1, 1)


@torch.no_grad()
def test_public_model_accepts_other_ir_channel_counts() -> None:
    model = public_model("resnet18", ir_channels=12, num_classes=3)
    assert model(torch.randn(2, 12, 16, 16)).shape == (2, 3)


@pytest.mark.parametrize("arch", ARCH_NAMES)
@torch.no_grad()
def test_original_model_is_backbone_then_public_body(arch: str) -> None:
    model = original_model(arch, num_classes=10).eval()
    assert isinstance(model.stem, Backbone)
    assert isinstance(model.body, ResNetBody)
    x = torch.randn(2, 3, 32, 32)
    ir = model.stem(x)
    assert ir.shape == (2, 64, 32, 32)
    torch.testing.assert_close(model(x), model.body(ir))
    public = _public(arch)
    public_shapes = {k: v.shape for k, v in public.state_dict().items()}
    body_shapes = {k: v.shape for k, v in model.body.state_dict().items()}
    assert body_shapes == public_shapes
    model.body.load_state_dict(public.state_dict())  # public weights load into the original


def test_resnet20_has_he_et_al_parameter_count_with_padding_shortcuts() -> None:
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters (option A: no projection convs).
    model = resnet20(num_classes=10)
    assert sum(isinstance(m, PadShortcut) for m in model.modules()) == 2
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model.modules())
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == pytest.approx(0.27e6, rel=0.02)


def test_resnet18_parameter_count_matches_cifar_adaptation() -> None:
    # The widely used CIFAR ResNet-18 (64..512, projection shortcuts) has 11,173,962 params.
    assert sum(p.numel() for p in resnet18(num_classes=10).parameters()) == 11_173_962


def test_width_multiplier_scales_every_stage() -> None:
    model = resnet18(num_classes=10, width=0.5)
    assert model.stem.out_channels == 32
    assert model.body.fc.in_features == 256
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize(
    ("build", "in_channels"),
    [
        (lambda: resnet("resnet20", norm="group"), 3),
        (lambda: resnet18(norm="group", stem="imagenet"), 3),
        (lambda: public_model("resnet18", norm="group"), 64),
        (lambda: original_model("resnet20", norm="group"), 3),
    ],
    ids=["resnet20", "resnet18-imagenet", "public18", "original20"],
)
@torch.no_grad()
def test_group_norm_variant_has_no_batch_norm(build, in_channels: int) -> None:
    model = build().train()
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert any(isinstance(m, nn.GroupNorm) for m in model.modules())
    # Per-sample normalization: a batch of one works in training mode (needed for DP-SGD).
    assert model(torch.randn(1, in_channels, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize(
    ("channels", "groups"), [(1, 1), (3, 1), (16, 8), (64, 32), (512, 32), (48, 24), (96, 32)]
)
def test_group_count_divides_channels_with_two_or_more_per_group(
    channels: int, groups: int
) -> None:
    assert group_count(channels) == groups
    assert channels % groups == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: resnet("resnet50"), "arch must be one of"),
        (lambda: resnet18(norm="layer"), "norm must be one of"),  # type: ignore[arg-type]
        (lambda: resnet18(stem="tiny"), "kind must be one of"),  # type: ignore[arg-type]
        (lambda: resnet18(width=0.0), "width must be > 0"),
        (lambda: resnet18(num_classes=0), "num_classes must be an integer >= 1"),
        (lambda: public_model("resnet20", input_kernel_size=5), "input_kernel_size must be"),
        (lambda: Backbone(3, 64, activation="gelu"), "activation must be one of"),  # type: ignore[arg-type]
    ],
)
def test_invalid_arguments_name_the_parameter(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_group_norm_variant_passes_opacus_validation_and_gives_per_sample_grads() -> None:
    opacus = pytest.importorskip("opacus")
    from opacus.validators import ModuleValidator

    model = original_model("resnet20", norm="group", width=0.25)
    assert ModuleValidator.validate(model, strict=False) == []
    wrapped = opacus.GradSampleModule(model)
    wrapped(torch.randn(3, 3, 8, 8)).sum().backward()
    assert all(p.grad_sample.shape[0] == 3 for p in model.parameters())
