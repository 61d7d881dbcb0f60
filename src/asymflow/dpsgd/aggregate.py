"""The noisy aggregation of one DP-SGD step, shared by plain and partitioned training.

Abadi et al., "Deep Learning with Differential Privacy", CCS 2016, Algorithm 1, with the
masking of Dong, Chen, Ozgur 2025 (arXiv 2503.03043, Sec. 3) in front of the clipping. For a
batch S (any size, possibly empty), per-sample gradients g_i (from Opacus's GradSampleModule),
per-sample masks m_i (:meth:`PartitionPlan.draw_masks`) and the two parts of the parameters
(split part A, shared part B; B is empty unless partial splitting is used):

    h_i   = m_i * g_i                                    (zero outside the record's block)
    c_i^P = h_i^P * min(1, C_P / ||h_i^P||_2)            for each part P in {A, B}
    G^P   = sum_{i in S} c_i^P + N(0, sigma^2 C_P^2 I)   (noise on EVERY coordinate of P)
    grad  = G / B                                        (B: the DECLARED batch size)

The privacy analysis is about the noisy sum G: the L2 sensitivity of sum_i c_i^P is C_P under
add/remove of one record, and anything computed from G and public constants is post-processing.
B is such a constant: the batch size the user declares before training. It is deliberately not
the expected batch size kN/T (BIS) or qN (Poisson): those depend on the number N of records,
which add/remove DP does not treat as public (a neighbouring data set has N +- 1). Nor is it the
realized |S|, which depends on which records are present. An empty batch still releases the
noise, G = N(0, sigma^2 C^2 I), exactly as the accountant assumes.

:func:`validate_model` refuses models whose g_i are not per-sample (BatchNorm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from opacus.validators import ModuleValidator
from torch import Tensor, nn

from asymflow.checks import check_positive
from asymflow.dpsgd.partition import SHARED, PartitionPlan

__all__ = [
    "clip_factors",
    "noisy_gradient_sum",
    "set_private_gradients",
    "validate_model",
]


def validate_model(module: nn.Module) -> None:
    """Raise ``ValueError`` unless Opacus can compute exact per-sample gradients of ``module``.

    BatchNorm is refused: it normalizes each sample with statistics of its batch, so one
    record's gradient depends on the others and per-sample clipping bounds nothing. Use a
    GroupNorm model (``norm="group"``; Wu & He, ECCV 2018).
    """
    errors = ModuleValidator.validate(module, strict=False)
    if errors:
        batchnorm = any("BatchNorm" in str(e) for e in errors)
        hint = (
            "BatchNorm mixes the samples of a batch, so per-sample gradients and their clipping "
            "are undefined; build the model with norm='group' (GroupNorm). "
            if batchnorm
            else ""
        )
        details = "; ".join(str(e).split(".")[0] for e in errors)
        raise ValueError(
            f"module must be compatible with Opacus per-sample gradients: {hint}"
            f"Opacus reports: {details}"
        )


def clip_factors(norms: Tensor, clip: float) -> Tensor:
    """Per-sample factors min(1, C / ||g_i||), equal to 1 where the norm is 0."""
    safe = torch.where(norms > clip, norms, torch.full_like(norms, clip))
    return clip / safe


def noisy_gradient_sum(
    grad_samples: Sequence[Tensor],
    plan: PartitionPlan,
    *,
    clip: float,
    sigma: float,
    generator: torch.Generator,
    shared_clip: float | None = None,
) -> list[Tensor]:
    """G per parameter (see the module docstring): masked, clipped, summed and noised.

    ``grad_samples[j]`` has shape (B, *shape_j), B >= 0 shared by all parameters, in the order
    of ``plan.names``. ``clip`` is C_A (the whole gradient without a shared part), and
    ``shared_clip`` is C_B (default ``clip``). Masks are drawn first, then noise for each
    parameter in order, all from ``generator``.
    """
    clip = check_positive("clip", clip)
    shared_clip = clip if shared_clip is None else check_positive("shared_clip", shared_clip)
    check_positive("sigma", sigma, zero=True)
    if len(grad_samples) != len(plan.names):
        raise ValueError(
            f"grad_samples must hold one tensor per plan parameter ({len(plan.names)}), "
            f"got {len(grad_samples)}"
        )
    batch = {int(g.shape[0]) for g in grad_samples}
    if len(batch) != 1:
        raise ValueError(f"grad_samples must share the batch dimension, got sizes {batch}")
    (size,) = batch
    shapes = [g.shape[1:] for g in grad_samples]
    masks = plan.draw_masks(size, shapes, generator)
    masked = [
        g if m is None else g * m.to(device=g.device, dtype=g.dtype)
        for g, m in zip(grad_samples, masks, strict=True)
    ]
    device = masked[0].device
    sq = {part: torch.zeros(size, device=device, dtype=torch.float32) for part in ("A", "B")}
    parts = ["B" if b == SHARED else "A" for b in plan.block_of]
    for h, part in zip(masked, parts, strict=True):
        sq[part] = sq[part] + h.flatten(1).float().pow(2).sum(dim=1)
    clips = {"A": clip, "B": shared_clip}
    factors = {part: clip_factors(sq[part].sqrt(), clips[part]) for part in ("A", "B")}
    out = []
    for h, part in zip(masked, parts, strict=True):
        total = torch.einsum("i,i...->...", factors[part].to(h.dtype), h)
        if sigma > 0:
            noise = torch.randn(total.shape, generator=generator, device=generator.device)
            total = total + (sigma * clips[part]) * noise.to(device=total.device, dtype=total.dtype)
        out.append(total)
    return out


def set_private_gradients(
    params: Sequence[nn.Parameter],
    grad_samples: Sequence[Tensor],
    plan: PartitionPlan,
    *,
    clip: float,
    sigma: float,
    normalizer: float,
    generator: torch.Generator,
    shared_clip: float | None = None,
) -> None:
    """Set ``p.grad = G / B`` for every parameter (``B = normalizer``, the declared batch size,
    a public constant; see the module docstring). The caller then records the step in the
    ledger and calls ``optimizer.step()``."""
    normalizer = check_positive("normalizer", normalizer)
    if len(params) != len(plan.names):
        raise ValueError(f"params must hold the plan's {len(plan.names)} parameters")
    sums = noisy_gradient_sum(
        grad_samples, plan, clip=clip, sigma=sigma, generator=generator, shared_clip=shared_clip
    )
    for p, total in zip(params, sums, strict=True):
        if total.shape != p.shape:
            raise ValueError(f"grad_samples must match parameter shapes, got {tuple(total.shape)}")
        p.grad = (total / normalizer).to(p.dtype)
