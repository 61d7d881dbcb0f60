"""The DP-SGD step: mask, clip, sum, noise on every coordinate, divide by the fixed B_bar."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from opacus import GradSampleModule
from torch import Tensor, nn
from torch.nn import functional

from asymflow.dpsgd.aggregate import clip_factors, noisy_gradient_sum, set_private_gradients
from asymflow.dpsgd.loader import EmptySafeCollate
from asymflow.dpsgd.opacus_accountant import AsymflowAccountant
from asymflow.dpsgd.partition import SHARED, PartitionPlan, plan_partition
from asymflow.dpsgd.train import private_step
from asymflow.sampling import BalancedIterationSampler
from tests.dpsgd.tiny import tiny_cnn, tiny_data

CLIP = 0.5


def _per_sample_grads(model: nn.Module, x: Tensor, y: Tensor) -> list[list[Tensor]]:
    """Reference per-sample gradients by one autograd call per example (no Opacus)."""
    params = list(model.parameters())
    out = []
    for i in range(len(y)):
        loss = functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1], reduction="sum")
        out.append([g.detach() for g in torch.autograd.grad(loss, params)])
    return out


def _opacus_grads(module: GradSampleModule, params: list[nn.Parameter], x: Tensor, y: Tensor):
    for p in params:
        p.grad_sample = None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        functional.cross_entropy(module(x), y, reduction="sum").backward()
    return [p.grad_sample for p in params]


def _setup(partition: str = "none", shared: tuple[str, ...] = ()):
    model = tiny_cnn()
    reference = copy.deepcopy(model)
    plan = plan_partition(model, partition, shared=shared)
    module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = plan.parameters(model)
    return model, reference, plan, module, params


def _accountant() -> AsymflowAccountant:
    return AsymflowAccountant(BalancedIterationSampler(24, 2, 6, seed=0), methods=("rdp",))


def test_clip_factors_are_min_one_and_clip_over_norm() -> None:
    norms = torch.tensor([0.0, 0.25, 0.5, 2.0])
    assert clip_factors(norms, 0.5).tolist() == [1.0, 1.0, 1.0, 0.25]


def test_update_is_clipped_sum_plus_noise_over_the_declared_batch_size() -> None:
    """theta_1 = theta_0 - lr (sum_i clip_C(g_i) + N(0, sigma^2 C^2)) / B, with the declared
    B = 2.5 while the realized batch has 3 examples (Abadi et al. 2016, Alg. 1)."""
    _, reference, plan, module, params = _setup()
    data = tiny_data(3, seed=1, scale=3.0)
    x, y = data.tensors
    sigma, lr, expected, seed, clip = 0.7, 0.1, 2.5, 123, 1.2
    before = [p.detach().clone() for p in params]
    grads = _per_sample_grads(reference, x, y)
    norms = [torch.sqrt(sum(g.pow(2).sum() for g in gi)) for gi in grads]
    assert max(norms) > clip > min(norms)  # both clipped and unclipped examples
    total = [torch.zeros_like(p) for p in params]
    for gi, norm in zip(grads, norms, strict=True):
        factor = min(1.0, clip / float(norm))
        total = [t + factor * g for t, g in zip(total, gi, strict=True)]
    gen = torch.Generator().manual_seed(seed)
    noise = [sigma * clip * torch.randn(p.shape, generator=gen) for p in params]
    expected_params = [
        b - lr * (t + n) / expected for b, t, n in zip(before, total, noise, strict=True)
    ]

    optimizer = torch.optim.SGD(params, lr=lr)
    private_step(
        module,
        params,
        plan,
        (x, y),
        optimizer=optimizer,
        accountant=_accountant(),
        clip=clip,
        sigma=sigma,
        normalizer=expected,
        generator=torch.Generator().manual_seed(seed),
    )
    for p, want in zip(params, expected_params, strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=1e-5, atol=1e-6)


def test_update_does_not_depend_on_realized_batch_size_only_on_the_sum() -> None:
    """Without noise the aggregate is additive over disjoint sub-batches, so nothing in it is
    divided by the realized batch size |S|."""
    _, _, plan, module, params = _setup()
    x, y = tiny_data(4, seed=2).tensors
    grads = _opacus_grads(module, params, x, y)
    one = noisy_gradient_sum(
        [g[:2] for g in grads], plan, clip=CLIP, sigma=0.0, generator=torch.Generator()
    )
    two = noisy_gradient_sum(
        [g[2:] for g in grads], plan, clip=CLIP, sigma=0.0, generator=torch.Generator()
    )
    both = noisy_gradient_sum(grads, plan, clip=CLIP, sigma=0.0, generator=torch.Generator())
    for a, b, ab in zip(one, two, both, strict=True):
        torch.testing.assert_close(a + b, ab, rtol=1e-5, atol=1e-7)


def test_empty_batch_still_adds_noise_and_is_accounted() -> None:
    _, _, plan, module, params = _setup()
    collate = EmptySafeCollate(tiny_data(1)[0])
    x, y = collate([])
    assert x.shape == (0, 3, 6, 6) and y.shape == (0,)
    sigma, lr, expected, seed = 1.3, 0.2, 4.0, 7
    before = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    noise = [sigma * CLIP * torch.randn(p.shape, generator=gen) for p in params]
    accountant = _accountant()
    private_step(
        module,
        params,
        plan,
        (x, y),
        optimizer=torch.optim.SGD(params, lr=lr),
        accountant=accountant,
        clip=CLIP,
        sigma=sigma,
        normalizer=expected,
        generator=torch.Generator().manual_seed(seed),
    )
    assert len(accountant) == 1
    for p, b, n in zip(params, before, noise, strict=True):
        torch.testing.assert_close(p.detach(), b - lr * n / expected, rtol=1e-5, atol=1e-7)


def _chosen_block(plan: PartitionPlan, seed: int) -> int:
    """Replays the block draw of :meth:`PartitionPlan.draw_masks` for a batch of one."""
    gen = torch.Generator().manual_seed(seed)
    return int(torch.randint(0, plan.num_blocks, (1,), generator=gen))


def test_partitioned_step_without_noise_changes_only_the_chosen_block() -> None:
    x, y = tiny_data(1, seed=3).tensors
    seen = set()
    for seed in range(12):
        _, _, plan, module, params = _setup("split:3")
        before = [p.detach().clone() for p in params]
        grads = _opacus_grads(module, params, x, y)
        set_private_gradients(
            params,
            grads,
            plan,
            clip=CLIP,
            sigma=0.0,
            normalizer=1.0,
            generator=torch.Generator().manual_seed(seed),
        )
        torch.optim.SGD(params, lr=0.5).step()
        block = _chosen_block(plan, seed)
        seen.add(block)
        changed_in_block = False
        for p, b, owner in zip(params, before, plan.block_of, strict=True):
            if owner == block:
                changed_in_block |= bool((p.detach() != b).any())
            else:
                assert torch.equal(p.detach(), b), f"block {owner} changed, chosen {block}"
        assert changed_in_block
        # the clipped norm involves the chosen block only: the update has norm <= lr C
        step = torch.sqrt(
            sum(((p.detach() - b) ** 2).sum() for p, b in zip(params, before, strict=True))
        )
        assert float(step) <= 0.5 * CLIP * (1 + 1e-5)
    assert seen == {0, 1, 2}


def test_partitioned_step_with_noise_changes_every_block() -> None:
    _, _, plan, module, params = _setup("split:3")
    x, y = tiny_data(1, seed=4).tensors
    before = [p.detach().clone() for p in params]
    private_step(
        module,
        params,
        plan,
        (x, y),
        optimizer=torch.optim.SGD(params, lr=0.1),
        accountant=_accountant(),
        clip=CLIP,
        sigma=1.0,
        normalizer=1.0,
        generator=torch.Generator().manual_seed(5),
    )
    for name, p, b in zip(plan.names, params, before, strict=True):
        assert bool((p.detach() != b).all()), f"{name} received no noise"


def test_dropout_keeps_each_coordinate_with_probability_one_half() -> None:
    _, _, plan, module, params = _setup("dropout:0.5")
    x, y = tiny_data(1, seed=6).tensors
    grads = _opacus_grads(module, params, x, y)
    gen = torch.Generator().manual_seed(9)
    masks = plan.draw_masks(1, [g.shape[1:] for g in grads], torch.Generator().manual_seed(9))
    sums = noisy_gradient_sum(grads, plan, clip=1e6, sigma=0.0, generator=gen)
    kept = 0
    total = 0
    for s, g, m in zip(sums, grads, masks, strict=True):
        assert m is not None
        torch.testing.assert_close(s, (g * m)[0])
        kept += int(m.sum())
        total += m.numel()
    assert 0.35 < kept / total < 0.65


def test_partial_split_clips_shared_and_split_parts_separately() -> None:
    _, _, plan, module, params = _setup("split:2", shared=("5",))
    assert plan.shared == ("5.weight", "5.bias")
    x, y = tiny_data(1, seed=7, scale=50.0).tensors
    grads = _opacus_grads(module, params, x, y)
    shared_clip = 0.01
    sums = noisy_gradient_sum(
        grads,
        plan,
        clip=CLIP,
        sigma=0.0,
        generator=torch.Generator().manual_seed(0),
        shared_clip=shared_clip,
    )
    roles = list(zip(sums, plan.block_of, strict=True))
    shared_norm = torch.sqrt(sum(s.pow(2).sum() for s, b in roles if b == SHARED))
    split_norm = torch.sqrt(sum(s.pow(2).sum() for s, b in roles if b != SHARED))
    assert float(shared_norm) == pytest.approx(shared_clip, rel=1e-4)
    assert float(split_norm) <= CLIP * (1 + 1e-5)


def test_aggregation_rejects_bad_parameters() -> None:
    _, _, plan, _, params = _setup()
    grads = [torch.zeros((0, *p.shape)) for p in params]
    gen = torch.Generator()
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        noisy_gradient_sum(grads, plan, clip=0.0, sigma=1.0, generator=gen)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        noisy_gradient_sum(grads, plan, clip=1.0, sigma=-1.0, generator=gen)
    with pytest.raises(ValueError, match="normalizer must be a finite number > 0"):
        set_private_gradients(params, grads, plan, clip=1.0, sigma=1.0, normalizer=0, generator=gen)
    with pytest.raises(ValueError, match="one tensor per plan parameter"):
        noisy_gradient_sum(grads[:-1], plan, clip=1.0, sigma=1.0, generator=gen)
