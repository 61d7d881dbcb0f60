"""CIFAR ResNets (and the ImageNet stem), each split into ``stem`` + ``body`` for Delta.

- ResNet-20: He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2:
  a 3x3 stem with 16 channels, 3 stages of 3 BasicBlocks with widths 16/32/64, and
  parameter-free identity shortcuts that zero-pad new channels (option A).
- ResNet-18/-34: ibid. Table 1 block counts [2,2,2,2] / [3,4,6,3] in the common CIFAR
  adaptation (3x3 stride-1 stem with 64 channels, no max-pool, 1x1 projection shortcuts, option B).
  The ImageNet stem is conv7x7/2 + norm + activation + maxpool3x3/2.

Delta (Niu et al., "All Rivers Run to the Sea: Private Learning with Asymmetric Flows",
CVPR 2024, arXiv 2312.05264; DESIGN.md sec. 3) cuts a network after its stem:

- :class:`Backbone` (private ``M_bb``): the stem with PReLU, giving the intermediate
  representation X of shape ``C_ir x H x W``;
- :func:`public_model` (public ``M_res``): the network without its stem, fed with the
  sanitized residual, which has X's shape;
- :func:`original_model`: ``Backbone`` followed by the public body, the non-private baseline.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional

from asymflow.checks import check_choice, check_int, check_int_pairs

NormKind = Literal["batch", "group"]
StemKind = Literal["cifar", "imagenet"]
ActivationKind = Literal["relu", "prelu"]
ShortcutKind = Literal["pad", "project"]

NORMS: tuple[str, ...] = ("batch", "group")
STEMS: tuple[str, ...] = ("cifar", "imagenet")
ACTIVATIONS: tuple[str, ...] = ("relu", "prelu")
SHORTCUTS: tuple[str, ...] = ("pad", "project")


@dataclass(frozen=True, slots=True)
class ResNetSpec:
    """Depth-defining numbers of one ResNet: BasicBlocks per stage and stage widths."""

    name: str
    blocks: tuple[int, ...]
    widths: tuple[int, ...]
    shortcut: ShortcutKind


ARCHS: dict[str, ResNetSpec] = {
    "resnet20": ResNetSpec("resnet20", (3, 3, 3), (16, 32, 64), "pad"),
    "resnet18": ResNetSpec("resnet18", (2, 2, 2, 2), (64, 128, 256, 512), "project"),
    "resnet34": ResNetSpec("resnet34", (3, 4, 6, 3), (64, 128, 256, 512), "project"),
}


def get_spec(arch: str) -> ResNetSpec:
    """Look up an architecture by name; ``arch`` must be a key of :data:`ARCHS`."""
    check_choice("arch", arch, tuple(ARCHS))
    return ARCHS[arch]


def scale_width(channels: int, width: float) -> int:
    """Channel count after a width multiplier: ``max(1, round(width * channels))``."""
    if not width > 0:
        raise ValueError(f"width must be > 0, got {width!r}")
    return max(1, round(width * channels))


def group_count(channels: int, max_groups: int = 32) -> int:
    """GroupNorm groups: the largest divisor g of ``channels`` with g <= max_groups and at
    least two channels per group (g = 1 for a single channel).

    Wu & He, "Group Normalization", ECCV 2018, use G = 32; groups of one channel
    (instance norm) are avoided because they discard the per-channel mean of small maps.
    """
    check_int("channels", channels, 1)
    check_int("max_groups", max_groups, 1)
    limit = min(max_groups, max(1, channels // 2))
    return max(g for g in range(1, limit + 1) if channels % g == 0)


def make_norm(norm: NormKind, channels: int) -> nn.Module:
    """BatchNorm2d or GroupNorm(:func:`group_count`) over ``channels``; ``norm`` in NORMS."""
    check_choice("norm", norm, NORMS)
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(group_count(channels), channels)


def make_activation(activation: ActivationKind, channels: int) -> nn.Module:
    """ReLU, or PReLU with one slope per channel; ``activation`` in ACTIVATIONS."""
    check_choice("activation", activation, ACTIVATIONS)
    if activation == "relu":
        return nn.ReLU()
    return nn.PReLU(num_parameters=channels)


def init_weights(module: nn.Module, *, skip: Iterable[nn.Module] = ()) -> None:
    """He (fan-out) init for convs, unit scale / zero shift for norms (He et al. 2015).

    Modules in ``skip`` (and everything inside them) keep their own initialization.
    """
    skipped = {id(m) for s in skip for m in s.modules()}
    for m in module.modules():
        if id(m) in skipped:
            continue
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class PadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::s, ::s]`` with zero channels appended (He et al. 2016)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"out_channels must be >= in_channels for a padding shortcut, "
                f"got in_channels={in_channels}, out_channels={out_channels}"
            )
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return functional.pad(x, (0, 0, 0, 0, 0, self.extra))


def projection_shortcut(
    in_channels: int, out_channels: int, stride: int, norm: NormKind
) -> nn.Module:
    """The projection shortcut norm(conv1x1_s(x)) (He et al. 2016, sec. 3.3, option B)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
        make_norm(norm, out_channels),
    )


class ResidualBlock(nn.Module):
    """y = act2(norm2(conv2(act1(norm1(conv1(x))))) + shortcut(x)); subclasses make the parts."""

    conv1: nn.Module
    norm1: nn.Module
    act1: nn.Module
    conv2: nn.Module
    norm2: nn.Module
    act2: nn.Module
    shortcut: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class BasicBlock(ResidualBlock):
    """y = relu(norm(conv3x3(relu(norm(conv3x3_s(x))))) + shortcut(x)) (He et al. 2016, Fig. 2)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        norm: NormKind = "batch",
        shortcut: ShortcutKind = "project",
    ) -> None:
        super().__init__()
        check_choice("shortcut", shortcut, SHORTCUTS)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        self.act2 = nn.ReLU()
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "pad":
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = projection_shortcut(in_channels, out_channels, stride, norm)


class Stem(nn.Module):
    """Input stem: conv3x3/1 + norm + act (CIFAR), or conv7x7/2 + norm + act + maxpool3x3/2."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        kind: StemKind = "cifar",
        norm: NormKind = "batch",
        activation: ActivationKind = "relu",
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("out_channels", out_channels, 1)
        check_choice("kind", kind, STEMS)
        self.kind = kind
        self.in_channels = in_channels
        self.out_channels = out_channels
        if kind == "cifar":
            self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
            self.pool: nn.Module = nn.Identity()
        else:
            self.conv = nn.Conv2d(in_channels, out_channels, 7, 2, 3, bias=False)
            self.pool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.norm = make_norm(norm, out_channels)
        self.act = make_activation(activation, out_channels)
        init_weights(self)

    def output_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Shape (C, H', W') of the output for an ``in_channels x height x width`` input."""
        if self.kind == "cifar":
            return (self.out_channels, height, width)
        h, w = (height - 1) // 2 + 1, (width - 1) // 2 + 1  # conv7x7, stride 2, pad 3
        return (self.out_channels, (h - 1) // 2 + 1, (w - 1) // 2 + 1)  # maxpool 3/2, pad 1

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class Backbone(Stem):
    """Delta's private backbone M_bb: X = PReLU(norm(conv(x))) [+ maxpool], C_ir channels.

    CIFAR: conv3x3(3 -> 64), X is 64x32x32; ImageNet: conv7x7/2 + maxpool, X is 64x56x56
    (Niu et al., CVPR 2024; DESIGN.md sec. 3).
    """

    def __init__(
        self,
        in_channels: int = 3,
        ir_channels: int = 64,
        *,
        kind: StemKind = "cifar",
        norm: NormKind = "batch",
        activation: ActivationKind = "prelu",
    ) -> None:
        super().__init__(in_channels, ir_channels, kind=kind, norm=norm, activation=activation)

    @property
    def ir_channels(self) -> int:
        """Number of channels C_ir of the intermediate representation X."""
        return self.out_channels


class ResNetBody(nn.Module):
    """Everything after the stem: [input conv] -> stages -> global average pool -> fc.

    The input conv (conv k x k + norm + ReLU) exists only when ``in_channels`` differs from
    the first stage width, e.g. a 64-channel IR fed to ResNet-20's 16-channel stage 1.
    """

    def __init__(
        self,
        in_channels: int,
        blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int,
        *,
        norm: NormKind = "batch",
        shortcut: ShortcutKind = "project",
        input_kernel_size: int = 3,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 1)
        check_choice("input_kernel_size", input_kernel_size, (1, 3))
        check_int_pairs("blocks", blocks, "widths", widths)
        self.in_channels = in_channels
        self.out_features = widths[-1]
        self.input: nn.Module = nn.Identity()
        if in_channels != widths[0]:
            pad = input_kernel_size // 2
            self.input = nn.Sequential(
                nn.Conv2d(in_channels, widths[0], input_kernel_size, 1, pad, bias=False),
                make_norm(norm, widths[0]),
                nn.ReLU(),
            )
        stages: list[nn.Module] = []
        channels = widths[0]
        for i, (count, out_channels) in enumerate(zip(blocks, widths, strict=True)):
            stage: list[nn.Module] = []
            for j in range(count):
                stride = 2 if i > 0 and j == 0 else 1
                stage.append(
                    BasicBlock(channels, out_channels, stride, norm=norm, shortcut=shortcut)
                )
                channels = out_channels
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stages(self.input(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNet(nn.Module):
    """logits = body(stem(x)); ``stem`` and ``body`` are usable on their own."""

    def __init__(self, stem: Stem, body: ResNetBody) -> None:
        super().__init__()
        if stem.out_channels != body.in_channels:
            raise ValueError(
                f"body.in_channels must equal stem.out_channels, "
                f"got {body.in_channels} and {stem.out_channels}"
            )
        self.stem = stem
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(self.stem(x))


def resnet(
    arch: str,
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    norm: NormKind = "batch",
    width: float = 1.0,
    stem: StemKind = "cifar",
    activation: ActivationKind = "relu",
) -> ResNet:
    """The standard network ``arch`` in ARCHS: stem to the first stage width, then the body."""
    spec = get_spec(arch)
    widths = [scale_width(w, width) for w in spec.widths]
    stem_module = Stem(in_channels, widths[0], kind=stem, norm=norm, activation=activation)
    body = ResNetBody(
        widths[0], spec.blocks, widths, num_classes, norm=norm, shortcut=spec.shortcut
    )
    return ResNet(stem_module, body)


def resnet20(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    norm: NormKind = "batch",
    width: float = 1.0,
    stem: StemKind = "cifar",
) -> ResNet:
    """ResNet-20 for CIFAR (He et al. 2016, sec. 4.2, n = 3): about 41M MACs at 32x32."""
    return resnet(
        "resnet20", num_classes, in_channels=in_channels, norm=norm, width=width, stem=stem
    )


def resnet18(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    norm: NormKind = "batch",
    width: float = 1.0,
    stem: StemKind = "cifar",
) -> ResNet:
    """ResNet-18, CIFAR adaptation (He et al. 2016, Table 1): about 0.56G MACs at 32x32."""
    return resnet(
        "resnet18", num_classes, in_channels=in_channels, norm=norm, width=width, stem=stem
    )


def resnet34(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    norm: NormKind = "batch",
    width: float = 1.0,
    stem: StemKind = "cifar",
) -> ResNet:
    """ResNet-34, CIFAR adaptation (He et al. 2016, Table 1): about 1.16G MACs at 32x32."""
    return resnet(
        "resnet34", num_classes, in_channels=in_channels, norm=norm, width=width, stem=stem
    )


def public_model(
    arch: str,
    ir_channels: int = 64,
    num_classes: int = 10,
    *,
    norm: NormKind = "batch",
    width: float = 1.0,
    input_kernel_size: int = 3,
) -> ResNetBody:
    """Delta's public model M_res: the network ``arch`` without its stem (DESIGN.md sec. 3).

    Takes the residual, shaped like the IR (``ir_channels x H x W``; 1-bit values as floats,
    {0, 1} or +-1). An input conv ``ir_channels -> widths[0]`` is inserted only when the two
    differ (ResNet-20, or a width multiplier); ResNet-18/34 at width 1 start at block 1.
    """
    spec = get_spec(arch)
    widths = [scale_width(w, width) for w in spec.widths]
    return ResNetBody(
        ir_channels,
        spec.blocks,
        widths,
        num_classes,
        norm=norm,
        shortcut=spec.shortcut,
        input_kernel_size=input_kernel_size,
    )


def original_model(
    arch: str,
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    ir_channels: int = 64,
    stem: StemKind = "cifar",
    norm: NormKind = "batch",
    width: float = 1.0,
    input_kernel_size: int = 3,
) -> ResNet:
    """Non-private baseline: :class:`Backbone` then :func:`public_model`, same shapes as Delta."""
    backbone = Backbone(in_channels, ir_channels, kind=stem, norm=norm)
    body = public_model(
        arch,
        ir_channels,
        num_classes,
        norm=norm,
        width=width,
        input_kernel_size=input_kernel_size,
    )
    return ResNet(backbone, body)
