"""The server's noisy aggregation of one round: mask, clip, sum, noise everywhere, fixed mean.

DP-FedAvg with server-side fixed clipping (McMahan, Ramage, Talwar, Zhang, "Learning
Differentially Private Recurrent Language Models", ICLR 2018, Alg. 1 with the fixed-denominator
estimator f_f and uniform client weights) combined with random subnetworks (Dong, Chen, Ozgur,
"Leveraging Randomness in Model and Data Partitioning for Privacy Amplification", ICML 2025,
arXiv 2503.03043, Sec. 3). With S the sampled clients of the round, client i's update
Delta_i = w_i - w (its locally trained model minus the global one) and its block b_i:

    h_i  = 1[B_{b_i}] * Delta_i                      (zero outside the client's block)
    c_i  = h_i * min(1, C / ||h_i||_2)               (server-side clipping to norm C)
    G    = sum_{i in S} c_i + N(0, sigma^2 C^2 I)     (noise on EVERY coordinate of EVERY block)
    w'   = w + eta * G / m                            (m = qN or kN/T, FIXED; eta = server lr)

Under adding or removing one client, sum_i c_i moves by at most C in L2, whichever block the
client trained, so G is a Gaussian mechanism with multiplier sigma; with the block random and
noise on all blocks the step is the 1-of-d random-allocation pair (ModelPartitioned(d, ...)).
Dividing by a constant m is post-processing. Dividing by the realized |S| would not be: |S|
changes with the presence of a client. An empty round still releases w + eta * noise / m.

The mask is applied here, on the server, whatever the client sent: a client that trained or
sent coordinates outside its block cannot raise the sensitivity. An update that cannot be used
(unknown parameter, wrong shape, non-finite value) is dropped, i.e. counted as a zero update,
which also stays within the C-ball.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from asymflow.checks import check_positive
from asymflow.dpsgd.partition import SHARED, PartitionPlan

__all__ = [
    "ClientUpdate",
    "InvalidUpdateError",
    "apply_update",
    "check_update",
    "masked_clipped",
    "noisy_mean_update",
    "noisy_sum",
]


class InvalidUpdateError(ValueError):
    """A client's update that the server refuses (it is then treated as a zero update)."""


@dataclass(frozen=True)
class ClientUpdate:
    """One client's reply: ``delta`` maps parameter names to w_i - w (absent names: zero),
    ``block`` is the block the server assigned to that client this round."""

    block: int
    delta: Mapping[str, Tensor]


def check_update(
    update: ClientUpdate, plan: PartitionPlan, shapes: Mapping[str, torch.Size]
) -> None:
    """Raise :class:`InvalidUpdateError` unless every tensor names a plan parameter, has its
    shape and is finite, and the block lies in ``0..num_blocks-1``."""
    if isinstance(update.block, bool) or not 0 <= int(update.block) < plan.num_blocks:
        raise InvalidUpdateError(
            f"block must satisfy 0 <= block < {plan.num_blocks}, got block={update.block!r}"
        )
    for name, tensor in update.delta.items():
        if name not in shapes:
            raise InvalidUpdateError(f"update names an unknown parameter {name!r}")
        if not isinstance(tensor, Tensor) or tuple(tensor.shape) != tuple(shapes[name]):
            got = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise InvalidUpdateError(
                f"update of {name!r} must have shape {tuple(shapes[name])}, got {got}"
            )
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise InvalidUpdateError(f"update of {name!r} must hold finite floating-point values")


def masked_clipped(update: ClientUpdate, plan: PartitionPlan, *, clip: float) -> dict[str, Tensor]:
    """c_i: the update restricted to the parameters of block ``update.block`` (all parameters
    when there is one block), then scaled by min(1, C / ||h_i||_2). Names outside the block
    are dropped (they are zero in h_i). The input must pass :func:`check_update`."""
    clip = check_positive("clip", clip)
    if any(b == SHARED for b in plan.block_of):
        raise ValueError("plan must have no shared parameters (federated plans split all)")
    block_of = dict(zip(plan.names, plan.block_of, strict=True))
    kept = {
        name: t.detach().to(torch.float32)
        for name, t in update.delta.items()
        if plan.num_blocks == 1 or block_of[name] == update.block
    }
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in kept.values()))
    factor = 1.0 if norm <= clip else clip / norm
    return {name: t * factor for name, t in kept.items()}


def noisy_sum(
    updates: Sequence[ClientUpdate],
    plan: PartitionPlan,
    shapes: Mapping[str, torch.Size],
    *,
    clip: float,
    sigma: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """G = sum_i c_i + N(0, sigma^2 C^2 I) for every parameter of ``plan`` (in plan order).

    Noise is drawn for every parameter in plan order from ``generator``, also for an empty
    ``updates`` and for blocks no client trained. Raises :class:`InvalidUpdateError` on the
    first bad update (callers drop bad updates with :func:`check_update` first).
    """
    clip = check_positive("clip", clip)
    check_positive("sigma", sigma, zero=True)
    missing = [n for n in plan.names if n not in shapes]
    if missing:
        raise ValueError(f"shapes must give every plan parameter, missing {missing[:5]}")
    total = {name: torch.zeros(shapes[name], dtype=torch.float32) for name in plan.names}
    for update in updates:
        check_update(update, plan, shapes)
        for name, c in masked_clipped(update, plan, clip=clip).items():
            total[name] += c
    if sigma > 0:
        for name in plan.names:
            noise = torch.randn(tuple(shapes[name]), generator=generator, dtype=torch.float32)
            total[name] += (sigma * clip) * noise
    return total


def noisy_mean_update(
    updates: Sequence[ClientUpdate],
    plan: PartitionPlan,
    shapes: Mapping[str, torch.Size],
    *,
    clip: float,
    sigma: float,
    expected_clients: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """G / m with m = ``expected_clients`` (fixed: qN or kN/T), see the module docstring."""
    m = check_positive("expected_clients", expected_clients)
    sums = noisy_sum(updates, plan, shapes, clip=clip, sigma=sigma, generator=generator)
    return {name: g / m for name, g in sums.items()}


def apply_update(
    weights: Mapping[str, Tensor], mean_update: Mapping[str, Tensor], *, server_lr: float = 1.0
) -> dict[str, Tensor]:
    """w + eta * mean_update, parameter by parameter (dtype of ``weights`` kept)."""
    eta = check_positive("server_lr", server_lr)
    if set(weights) != set(mean_update):
        raise ValueError("mean_update must name exactly the parameters of weights")
    return {
        name: (w.to(torch.float32) + eta * mean_update[name]).to(w.dtype)
        for name, w in weights.items()
    }
