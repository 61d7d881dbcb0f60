"""MAC counting: a hand-computed tiny network and the published ResNet figures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from asymflow.models import (
    build_private_model,
    count_macs,
    mac_breakdown,
    public_model,
    resnet18,
    resnet20,
    resnet34,
)


def _tiny() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),  # 4*8*8 outputs x 3*3*3 = 6912
        nn.BatchNorm2d(4),  # 0
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1, groups=2),  # 8*4*4 outputs x (4/2)*3*3 = 2304
        nn.Flatten(),
        nn.Linear(128, 5),  # 5 x 128 = 640
    )


def test_tiny_network_matches_hand_count() -> None:
    model = _tiny()
    assert mac_breakdown(model, (3, 8, 8)) == {"0": 6912, "3": 2304, "5": 640}
    assert count_macs(model, (3, 8, 8)) == 6912 + 2304 + 640


def test_reused_module_is_counted_per_call() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.fc(x))

    assert count_macs(Twice(), (4,)) == 2 * 16


def test_count_restores_training_mode_and_leaves_running_stats() -> None:
    model = _tiny().train()
    before = model[1].running_mean.clone()
    count_macs(model, (3, 8, 8))
    assert model.training
    torch.testing.assert_close(model[1].running_mean, before)


@pytest.mark.parametrize(
    ("build", "shape", "reference", "rel"),
    [
        # The commonly quoted figures: CIFAR ResNet-20 41M, ResNet-18 0.56G, ResNet-34 1.16G.
        (lambda: resnet20(10), (3, 32, 32), 41e6, 0.03),
        (lambda: resnet18(10), (3, 32, 32), 556e6, 0.01),
        (lambda: resnet34(10), (3, 32, 32), 1.16e9, 0.01),
        # He et al. 2016, Table 1: ImageNet ResNet-18 1.8e9 "FLOPs" (multiply-adds) at 224x224.
        (lambda: resnet18(1000, stem="imagenet"), (3, 224, 224), 1.8e9, 0.02),
    ],
    ids=["resnet20-cifar", "resnet18-cifar", "resnet34-cifar", "resnet18-imagenet"],
)
def test_resnet_macs_match_published_figures(build, shape, reference: float, rel: float) -> None:
    assert count_macs(build(), shape) == pytest.approx(reference, rel=rel)


def test_private_model_needs_far_fewer_macs_than_public_resnet18() -> None:
    private = count_macs(build_private_model(8), (8, 16, 16))
    public = count_macs(public_model("resnet18", ir_channels=64), (64, 32, 32))
    # Niu et al. 2024: 48.3M private MACs vs 547M for M_res, about 11x less.
    assert private == pytest.approx(48.3e6, rel=0.03)
    assert private / public <= 1 / 8


@pytest.mark.parametrize("shape", [(), (3, 0, 8), (3, 8.0, 8)])
def test_invalid_input_shape_is_rejected(shape: tuple) -> None:
    with pytest.raises(ValueError, match="input_shape must be"):
        count_macs(_tiny(), shape)
