"""The federated model: building it identically on the server and on every client, its
parameter blocks, moving weights in and out of Flower's ``ArrayRecord``, and local training.

Only trainable parameters travel (``named_parameters``): the models are GroupNorm networks
without buffers (Wu & He, ECCV 2018); BatchNorm is refused, its running statistics would be
an unaccounted release of client data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional

from asymflow.data.dataset import TensorImageDataset
from asymflow.dpsgd.aggregate import validate_model
from asymflow.dpsgd.partition import PartitionPlan, plan_partition
from asymflow.federated.config import FederatedConfig
from asymflow.models import build_model

__all__ = [
    "block_names",
    "build_network",
    "load_weights",
    "local_update",
    "partition_plan",
    "test_accuracy",
    "weights_of",
]


def build_network(
    config: FederatedConfig, *, num_classes: int, in_channels: int, seed: int | None = None
) -> nn.Module:
    """``config.model`` with GroupNorm at ``config.width``, initialized from ``seed``
    (default ``config.seed``) without touching the global RNG; refuses models with buffers."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed if seed is None else seed)
        model = build_model(
            config.model,
            num_classes=num_classes,
            in_channels=in_channels,
            norm="group",
            width=config.width,
        )
    validate_model(model)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:  # pragma: no cover - GroupNorm ResNets have none
        raise ValueError(f"model must have no buffers to federate, got {buffers[:5]}")
    return model


def partition_plan(model: nn.Module, config: FederatedConfig) -> PartitionPlan:
    """The d disjoint blocks of ``config.subnetwork`` (one block for "none"), by greedy
    balancing of whole layers or tensors (:func:`asymflow.dpsgd.plan_partition`)."""
    return plan_partition(model, config.partition_spec, unit=config.partition_unit)


def block_names(plan: PartitionPlan, block: int) -> tuple[str, ...]:
    """Names of the parameters in ``block`` (all parameters when there is one block)."""
    if not 0 <= block < plan.num_blocks:
        raise ValueError(f"block must satisfy 0 <= block < {plan.num_blocks}, got block={block}")
    if plan.num_blocks == 1:
        return plan.names
    return plan.blocks[block]


def weights_of(model: nn.Module) -> dict[str, Tensor]:
    """Detached copies of the trainable parameters, by name."""
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def load_weights(model: nn.Module, weights: Mapping[str, Tensor | np.ndarray]) -> None:
    """Copy ``weights`` (exactly the model's parameter names and shapes) into ``model``."""
    params = dict(model.named_parameters())
    if set(weights) != set(params):
        missing = sorted(set(params) - set(weights))[:5]
        extra = sorted(set(weights) - set(params))[:5]
        raise ValueError(
            f"weights must name the model's parameters: missing {missing}, extra {extra}"
        )
    with torch.no_grad():
        for name, value in weights.items():
            tensor = torch.as_tensor(value)
            if tuple(tensor.shape) != tuple(params[name].shape):
                raise ValueError(
                    f"weights[{name!r}] must have shape {tuple(params[name].shape)}, "
                    f"got {tuple(tensor.shape)}"
                )
            params[name].copy_(tensor)


def local_update(
    model: nn.Module,
    names: Iterable[str],
    dataset: TensorImageDataset,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    momentum: float,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Train only the parameters ``names`` (the others frozen) with ``epochs`` passes of
    minibatch SGD on cross-entropy over ``dataset``; return Delta = w_local - w_global on them.

    An empty dataset gives a zero update. No statistic of the data leaves this function.
    """
    chosen = set(names)
    params = dict(model.named_parameters())
    unknown = sorted(chosen - set(params))
    if unknown:
        raise ValueError(f"names must be model parameters, got unknown {unknown[:5]}")
    start = {n: params[n].detach().clone() for n in chosen}
    trainable = [p for n, p in params.items() if n in chosen]
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in chosen)
    try:
        optimizer = torch.optim.SGD(trainable, lr=lr, momentum=momentum)
        model.train()
        n = len(dataset)
        for _ in range(epochs if n else 0):
            order = torch.randperm(n, generator=generator)
            for lo in range(0, n, batch_size):
                x, y = dataset.get_batch(order[lo : lo + batch_size].numpy())
                optimizer.zero_grad(set_to_none=True)
                functional.cross_entropy(model(x), y).backward()
                optimizer.step()
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
    return {n: params[n].detach() - start[n] for n in chosen}


@torch.no_grad()
def test_accuracy(model: nn.Module, dataset: TensorImageDataset, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` (the server's test split, public)."""
    was_training = model.training
    model.eval()
    correct = 0
    for lo in range(0, len(dataset), batch_size):
        x, y = dataset.get_batch(range(lo, min(lo + batch_size, len(dataset))))
        correct += int((model(x).argmax(1) == y).sum())
    model.train(was_training)
    return correct / max(1, len(dataset))
