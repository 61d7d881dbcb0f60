"""Delta's private low-rank model M_main (DESIGN.md sec. 3).

Niu et al., "All Rivers Run to the Sea: Private Learning with Asymmetric Flows", CVPR 2024
(arXiv 2312.05264), low-dimensional model design: the main part of the IR has only r channels
at reduced spatial size, so each k x k conv (n out, c in) is factorized as a k x k conv with
q << n kernels followed by a 1x1 conv with n kernels, W = B A with A in R^{q x ckk},
B in R^{n x q}. The rows of A are kept near-orthonormal by the penalty alpha ||A A^T - I||_F^2.

Default widths (ResNet-18-style, r = 8): blocks 1-2 n=64, q=16; 3-4 n=256, q=32; 5-6 n=512,
q=64, with stride-2 downsampling at the start of blocks 3 and 5, then global pooling and fc.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from asymflow.checks import check_int, check_int_pairs
from asymflow.models.resnet import (
    NormKind,
    ResidualBlock,
    init_weights,
    make_norm,
    projection_shortcut,
    scale_width,
)

RESNET18_PRIVATE_WIDTHS: tuple[int, ...] = (64, 256, 512)
"""Output channels n of each block group for the ResNet-18 private model (Delta, r = 8)."""
RESNET18_PRIVATE_RANKS: tuple[int, ...] = (16, 32, 64)
"""Kernels q of the factorized k x k convs of each block group (Delta, r = 8)."""
DEMO_PRIVATE_WIDTHS: tuple[int, ...] = (16, 64, 128)
"""A quarter-width variant for the digits / synthetic demo (small inputs, a few CPU minutes)."""
DEMO_PRIVATE_RANKS: tuple[int, ...] = (4, 8, 16)
"""Ranks q matching :data:`DEMO_PRIVATE_WIDTHS`."""


class FactorizedConv2d(nn.Module):
    """conv_{k x k}(c -> n) ~= conv_{1x1}(q -> n) o conv_{k x k}(c -> q), rank <= q.

    No nonlinearity between the two: the pair is one linear conv of rank at most q.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        rank: int,
        *,
        stride: int = 1,
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("out_channels", out_channels, 1)
        check_int("kernel_size", kernel_size, 1)
        check_int("rank", rank, 1)
        check_int("stride", stride, 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.rank = rank
        self.reduce = nn.Conv2d(
            in_channels, rank, kernel_size, stride, kernel_size // 2, bias=False
        )
        self.expand = nn.Conv2d(rank, out_channels, 1, bias=False)
        nn.init.kaiming_normal_(self.expand.weight, mode="fan_out", nonlinearity="relu")
        self.reset_orthogonal()

    def reset_orthogonal(self) -> None:
        """Set the k x k kernels A (q x ckk) to a random (semi-)orthogonal matrix: penalty 0."""
        with torch.no_grad():
            flat = torch.empty(self.rank, self.reduce.weight[0].numel())
            nn.init.orthogonal_(flat)
            self.reduce.weight.copy_(flat.view_as(self.reduce.weight))

    def orthogonality_penalty(self) -> Tensor:
        """||A A^T - I_q||_F^2 for A = reduce.weight reshaped to q x (c k k).

        If q > ckk the rows cannot be orthonormal; then ||A^T A - I_ckk||_F^2 is used, the
        same choice as the authors' code (orthogonality along the shorter side).
        """
        a = self.reduce.weight.reshape(self.rank, -1)
        gram = a @ a.T if a.shape[0] <= a.shape[1] else a.T @ a
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return (gram - eye).pow(2).sum()

    def forward(self, x: Tensor) -> Tensor:
        return self.expand(self.reduce(x))


class LowRankBlock(ResidualBlock):
    """BasicBlock with factorized 3x3 convs: relu(norm(F2(relu(norm(F1_s(x))))) + shortcut(x))."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rank: int,
        stride: int = 1,
        *,
        norm: NormKind = "batch",
    ) -> None:
        super().__init__()
        self.conv1 = FactorizedConv2d(in_channels, out_channels, 3, rank, stride=stride)
        self.norm1 = make_norm(norm, out_channels)
        self.act1 = nn.ReLU()
        self.conv2 = FactorizedConv2d(out_channels, out_channels, 3, rank)
        self.norm2 = make_norm(norm, out_channels)
        self.act2 = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = projection_shortcut(in_channels, out_channels, stride, norm)


class LowRankResNet(nn.Module):
    """M_main: groups of :class:`LowRankBlock` (stride 2 entering groups 2, 3, ...), pool, fc.

    Input: the main part of the IR, r channels at (h t'/t) x (w t'/t), e.g. 8 x 16 x 16.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        ranks: Sequence[int],
        *,
        blocks_per_group: int = 2,
        norm: NormKind = "batch",
    ) -> None:
        super().__init__()
        check_int("in_channels", in_channels, 1)
        check_int("num_classes", num_classes, 1)
        check_int("blocks_per_group", blocks_per_group, 1)
        check_int_pairs("widths", widths, "ranks", ranks)
        self.in_channels = in_channels
        self.widths = tuple(widths)
        self.ranks = tuple(ranks)
        groups: list[nn.Module] = []
        channels = in_channels
        for i, (n, q) in enumerate(zip(widths, ranks, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(blocks_per_group):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(LowRankBlock(channels, n, q, stride, norm=norm))
                channels = n
            groups.append(nn.Sequential(*blocks))
        self.groups = nn.Sequential(*groups)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        init_weights(self, skip=self.factorized_layers())  # those keep their orthogonal init

    def factorized_layers(self) -> Iterator[FactorizedConv2d]:
        """All :class:`FactorizedConv2d` modules, in forward order."""
        for m in self.modules():
            if isinstance(m, FactorizedConv2d):
                yield m

    def orthogonality_penalty(self, alpha: float = 1.0) -> Tensor:
        """alpha * sum over factorized layers of ||A A^T - I||_F^2 (a differentiable scalar)."""
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")
        terms = [layer.orthogonality_penalty() for layer in self.factorized_layers()]
        return alpha * torch.stack(terms).sum()

    def forward(self, x: Tensor) -> Tensor:
        x = self.groups(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def build_private_model(
    r: int,
    num_classes: int = 10,
    *,
    widths: Sequence[int] = RESNET18_PRIVATE_WIDTHS,
    ranks: Sequence[int] = RESNET18_PRIVATE_RANKS,
    width: float = 1.0,
    blocks_per_group: int = 2,
    norm: NormKind = "batch",
) -> LowRankResNet:
    """Delta's private model M_main for an r-channel main part (DESIGN.md sec. 3 table).

    ``width`` scales both n and q; for the demo use ``widths=DEMO_PRIVATE_WIDTHS,
    ranks=DEMO_PRIVATE_RANKS`` (equivalently ``width=0.25``).
    """
    check_int("r", r, 1)
    check_int_pairs("widths", widths, "ranks", ranks)
    scaled_widths = [scale_width(n, width) for n in widths]
    scaled_ranks = [scale_width(q, width) for q in ranks]
    return LowRankResNet(
        r,
        num_classes,
        scaled_widths,
        scaled_ranks,
        blocks_per_group=blocks_per_group,
        norm=norm,
    )
