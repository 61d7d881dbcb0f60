"""The server's private aggregation without Flower: mask to the block, clip to C, noise on
every coordinate (also of untouched blocks and of empty rounds), fixed denominator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from asymflow.dpsgd.partition import PartitionPlan, plan_partition
from asymflow.federated.aggregate import (
    ClientUpdate,
    InvalidUpdateError,
    apply_update,
    check_update,
    masked_clipped,
    noisy_mean_update,
    noisy_sum,
)


def _model() -> nn.Module:
    """Two layers of 12 and 6 parameters: split:2 puts one layer in each block."""
    return nn.Sequential(nn.Linear(3, 3), nn.Linear(1, 3))


def _plan(spec: str = "split:2") -> tuple[PartitionPlan, dict[str, torch.Size]]:
    model = _model()
    plan = plan_partition(model, spec)
    return plan, {n: p.shape for n, p in model.named_parameters()}


def _full(shapes: dict[str, torch.Size], value: float) -> dict[str, torch.Tensor]:
    return {n: torch.full(tuple(s), value) for n, s in shapes.items()}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.pow(2).sum()) for t in tensors.values()))


def test_split_plan_of_the_test_model_has_one_layer_per_block() -> None:
    plan, _ = _plan()
    assert plan.blocks == (("0.weight", "0.bias"), ("1.weight", "1.bias"))


def test_update_is_masked_to_its_block_before_clipping() -> None:
    plan, _ = _plan()
    # Huge outside block 1, small inside: masking first means no clipping happens.
    delta = {"0.weight": torch.full((3, 3), 100.0), "0.bias": torch.full((3,), 100.0)}
    delta |= {"1.weight": torch.full((3, 1), 0.1), "1.bias": torch.full((3,), 0.1)}
    out = masked_clipped(ClientUpdate(1, delta), plan, clip=1.0)
    assert set(out) == {"1.weight", "1.bias"}
    assert torch.equal(out["1.weight"], delta["1.weight"])
    assert _norm(out) == pytest.approx(0.1 * math.sqrt(6))


def test_update_above_the_clip_norm_is_scaled_to_norm_c() -> None:
    plan, shapes = _plan("none")
    delta = _full(shapes, 3.0)
    out = masked_clipped(ClientUpdate(0, delta), plan, clip=0.5)
    assert _norm(out) == pytest.approx(0.5, rel=1e-6)
    ratio = out["0.weight"] / delta["0.weight"]
    assert torch.allclose(ratio, torch.full_like(ratio, 0.5 / _norm(delta)))


def test_sum_without_noise_divides_by_the_fixed_expected_number_of_clients() -> None:
    plan, shapes = _plan("none")
    small = {n: 0.01 * torch.ones(tuple(s)) for n, s in shapes.items()}  # norm < C
    updates = [ClientUpdate(0, small)] * 3
    gen = torch.Generator().manual_seed(0)
    mean = noisy_mean_update(
        updates, plan, shapes, clip=1.0, sigma=0.0, expected_clients=5.0, generator=gen
    )
    for name in shapes:
        assert torch.allclose(mean[name], 3 * small[name] / 5.0)  # not / 3 (the realized count)


def test_noise_covers_every_coordinate_of_every_block_even_in_an_empty_round() -> None:
    plan, shapes = _plan()
    gen = torch.Generator().manual_seed(1)
    out = noisy_sum([], plan, shapes, clip=2.0, sigma=0.5, generator=gen)
    assert set(out) == set(shapes)
    assert all(bool((t != 0).all()) for t in out.values())


def test_untouched_block_gets_noise_of_std_sigma_c_over_m() -> None:
    model = nn.Sequential(nn.Linear(100, 50), nn.Linear(100, 50))
    plan = plan_partition(model, "split:2")
    shapes = {n: p.shape for n, p in model.named_parameters()}
    block0 = set(plan.blocks[0])
    delta = {n: torch.ones(tuple(s)) for n, s in shapes.items() if n in block0}
    gen = torch.Generator().manual_seed(2)
    sigma, clip, m = 1.5, 0.4, 8.0
    mean = noisy_mean_update(
        [ClientUpdate(0, delta)],
        plan,
        shapes,
        clip=clip,
        sigma=sigma,
        expected_clients=m,
        generator=gen,
    )
    untouched = torch.cat([mean[n].flatten() for n in plan.blocks[1]])
    assert untouched.numel() > 5000
    # sample std of >5000 Gaussians is within 5% of the truth with overwhelming probability
    assert float(untouched.std()) == pytest.approx(sigma * clip / m, rel=0.05)
    assert abs(float(untouched.mean())) < 5 * sigma * clip / m / math.sqrt(untouched.numel())


def test_same_generator_state_gives_the_same_noise() -> None:
    plan, shapes = _plan()
    a = noisy_sum([], plan, shapes, clip=1.0, sigma=1.0, generator=torch.Generator().manual_seed(3))
    b = noisy_sum([], plan, shapes, clip=1.0, sigma=1.0, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[n], b[n]) for n in shapes)


def test_malformed_updates_are_refused() -> None:
    plan, shapes = _plan()
    with pytest.raises(InvalidUpdateError, match="unknown parameter"):
        check_update(ClientUpdate(0, {"nope": torch.zeros(1)}), plan, shapes)
    with pytest.raises(InvalidUpdateError, match="shape"):
        check_update(ClientUpdate(0, {"0.bias": torch.zeros(4)}), plan, shapes)
    with pytest.raises(InvalidUpdateError, match="finite"):
        check_update(ClientUpdate(0, {"0.bias": torch.full((3,), math.nan)}), plan, shapes)
    with pytest.raises(InvalidUpdateError, match="block"):
        check_update(ClientUpdate(2, {}), plan, shapes)


def test_apply_update_adds_the_server_step() -> None:
    w = {"a": torch.ones(2)}
    out = apply_update(w, {"a": torch.tensor([1.0, -1.0])}, server_lr=0.5)
    assert torch.equal(out["a"], torch.tensor([1.5, 0.5]))
    with pytest.raises(ValueError, match="exactly the parameters"):
        apply_update(w, {"b": torch.ones(2)})
