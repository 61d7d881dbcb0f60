"""The public environment's M_res, in process: :class:`LocalPublic`.

The private side hands over sanitized residuals (:class:`SanitizedResidual`: clipped, noised,
1-bit, with their privacy event) and label-DP payloads (:class:`NoisyLabels`); nothing else
is accepted (:mod:`asymflow.delta.contract`, the only module of the private side this one
imports). :class:`LocalPublic` trains M_res on its own (no per-step round trip) and returns
logits z_res, which the private side adds to z_main (Niu et al., CVPR 2024, arXiv 2312.05264,
Sec. 3.4; DESIGN.md sec. 3). ``train_delta`` runs it in process; the gRPC server
(:mod:`asymflow.transport.server`) hosts the same class behind the same :class:`PublicSide`
protocol.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional

from asymflow.accounting.events import RandomizedResponse
from asymflow.checks import check_int, check_positive
from asymflow.data.dataset import augment_batch
from asymflow.delta.contract import (
    DEFAULT_MODEL,
    NoisyLabelGradients,
    NoisyLabels,
    SanitizedResidual,
    StepArgs,
    StepsWithArgs,
    StepwisePublicSide,
    TrainArgs,
    TrainsWithArgs,
    check_payload,
    checked_rows,
    dataset_id,
    keep_probability,
)


def cosine_lr(lr: float, step: int, total: int) -> float:
    """lr_t = lr * (1 + cos(pi t / T)) / 2 (Loshchilov & Hutter 2017, SGDR without restarts)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def rr_log_transition(epsilon: float, classes: int) -> Tensor:
    """log T with T[i, j] = P(noisy = j | true = i) of k-ary randomized response."""
    p = keep_probability(epsilon, classes)
    t = torch.full((classes, classes), (1.0 - p) / (classes - 1))
    t.fill_diagonal_(p)
    return t.log()


def forward_corrected_loss(
    logits: Tensor, noisy: Tensor, log_t: Tensor, *, reduction: str = "mean"
) -> Tensor:
    """-log sum_i softmax(z)_i T[i, noisy]: cross-entropy of the noisy label under the known
    noise channel T (forward correction, Patrini et al., CVPR 2017, Thm 2); softmax(z) then
    estimates the clean posterior. Post-processing of the label-DP release: no privacy cost.
    ``reduction`` is that of :func:`torch.nn.functional.nll_loss`."""
    log_q = torch.logsumexp(functional.log_softmax(logits, 1)[:, :, None] + log_t[None], dim=1)
    return functional.nll_loss(log_q, noisy, reduction=reduction)


@dataclass(frozen=True)
class _Stored:
    data: SanitizedResidual
    labels: NoisyLabels | None


class LocalPublic(TrainsWithArgs, StepsWithArgs, StepwisePublicSide):
    """An in-process :class:`StepwisePublicSide`: each named M_res (built by ``model_factory``
    on first use) is trained with SGD (momentum, weight decay) and a cosine learning rate on the
    unpacked +-1 bits and the label-DP labels.

    With ``correct_label_noise`` (default) randomized-response labels are learned with the
    forward-corrected loss :func:`forward_corrected_loss`; ``augment`` applies random crops
    (zero padding, i.e. "unknown" bits) and, with ``flip``, mirrors to the bit maps.
    """

    def __init__(
        self,
        model_factory: Callable[[], nn.Module],
        *,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        augment: bool = True,
        flip: bool = False,
        correct_label_noise: bool = True,
        eval_batch_size: int = 512,
    ) -> None:
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must satisfy 0 <= momentum < 1, got {momentum}")
        check_positive("weight_decay", weight_decay, zero=True)
        check_int("eval_batch_size", eval_batch_size, 1)
        self.model_factory = model_factory
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.augment = augment
        self.flip = flip
        self.correct_label_noise = correct_label_noise
        self.eval_batch_size = eval_batch_size
        self.models: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.SGD] = {}
        self._datasets: dict[str, _Stored] = {}
        self._pending: dict[str, Tensor] = {}  # step_logits output awaiting step_apply

    def model(self, name: str = DEFAULT_MODEL) -> nn.Module:
        """The model ``name``, created on first use."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"model must be a non-empty name, got model={name!r}")
        if name not in self.models:
            module = self.model_factory()
            self.models[name] = module
            self.optimizers[name] = torch.optim.SGD(
                module.parameters(),
                lr=0.0,
                momentum=self.momentum,
                weight_decay=self.weight_decay,
            )
        return self.models[name]

    def upload(self, data: SanitizedResidual, labels: NoisyLabels | None = None) -> str:
        check_payload(data, labels)
        key = dataset_id(data, labels)
        self._datasets[key] = _Stored(data, labels)
        return key

    def dataset(self, dataset_id: str) -> tuple[SanitizedResidual, NoisyLabels | None]:
        """What the public side holds under ``dataset_id`` (for audits and tests)."""
        if dataset_id not in self._datasets:
            raise KeyError(f"dataset_id must name an uploaded data set, got {dataset_id!r}")
        stored = self._datasets[dataset_id]
        return stored.data, stored.labels

    def forget(self, dataset_id: str) -> None:
        """Drop an uploaded data set (e.g. the residuals of an earlier per-epoch release)."""
        self._datasets.pop(dataset_id, None)

    def training_rows(self, dataset_id: str, args: TrainArgs) -> np.ndarray:
        """The rows :meth:`train` would use, or ``ValueError`` for arguments it refuses."""
        data, labels = self.dataset(dataset_id)
        if labels is None:
            raise ValueError(f"dataset_id must name a labelled data set, got {dataset_id!r}")
        check_int("epochs", args.epochs, 0)
        check_int("batch_size", args.batch_size, 1)
        check_positive("lr", args.lr)
        return args.rows(len(data))

    def train_with(self, dataset_id: str, args: TrainArgs) -> dict[str, float]:
        return self.train_shard(dataset_id, args, (0, 1))

    def train_shard(
        self, dataset_id: str, args: TrainArgs, shard: tuple[int, int]
    ) -> dict[str, float]:
        """:meth:`train` as process ``rank`` of ``world`` (``shard``) in a DDP job
        (:mod:`asymflow.transport.ddp`). Every process draws each batch and its crops as one
        process would, keeps rows ``rank::world`` and scales its summed loss by
        world/|batch|: DDP's average of the gradients over the world is then the gradient of
        the whole batch's mean loss, also for a short last batch. Metrics are this shard's."""
        rows = self.training_rows(dataset_id, args)
        rank, world = shard
        if not 0 <= rank < world:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard}")
        data, labels = self.dataset(dataset_id)
        assert labels is not None  # training_rows refuses unlabelled data sets
        net = self.model(args.model)
        optimizer = self.optimizers[args.model]
        device = next(net.parameters()).device
        batch_size = args.batch_size
        steps = math.ceil(len(rows) / batch_size)
        targets = torch.from_numpy(np.array(labels.labels, dtype=np.int64))
        log_t = None
        if self.correct_label_noise and isinstance(labels.event, RandomizedResponse):
            log_t = rr_log_transition(labels.event.epsilon, labels.classes).to(device)
        padding = max(1, data.shape[1] // 8)
        net.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for epoch in range(args.start_epoch, args.start_epoch + args.epochs):
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
            order = rows[torch.randperm(len(rows), generator=gen).numpy()]
            for i in range(steps):
                idx = order[i * batch_size : (i + 1) * batch_size]
                mine = idx[rank::world]
                if self.augment:  # crop the whole batch: the same draws as in one process
                    batch = augment_batch(
                        data.subset(idx).unpack(), gen, padding=padding, flip=self.flip
                    )
                    x = batch[rank::world]
                else:
                    x = data.subset(mine).unpack()
                x, y = x.to(device), targets[mine].to(device)
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(args.lr, epoch * steps + i, args.total * steps)
                z = net(x)
                if log_t is None:
                    summed = functional.cross_entropy(z, y, reduction="sum")
                else:
                    summed = forward_corrected_loss(z, y, log_t, reduction="sum")
                loss = summed * world / len(idx)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(summed.detach())
                correct += int((z.argmax(1) == y).sum())
                seen += len(mine)
        return {
            "loss": loss_sum / max(seen, 1),
            "acc_on_received_labels": correct / max(seen, 1),
            "samples": float(seen),
        }

    @torch.no_grad()
    def logits(self, data: SanitizedResidual, *, model: str = DEFAULT_MODEL) -> Tensor:
        check_payload(data)
        net = self.model(model)
        net.eval()
        out = [
            net(data.subset(slice(i, i + self.eval_batch_size)).unpack())
            for i in range(0, len(data), self.eval_batch_size)
        ]
        return torch.cat(out) if out else torch.empty(0)

    def state_dict(self) -> dict[str, Any]:
        """Models and optimizer states by name; uploaded data sets are not included (the
        private side keeps its releases and uploads them again after a restart)."""
        return {
            "models": {k: m.state_dict() for k, m in self.models.items()},
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, weights in state["models"].items():
            self.model(name).load_state_dict(weights)
            self.optimizers[name].load_state_dict(state["optimizers"][name])

    def step_logits_with(self, dataset_id: str, args: StepArgs) -> Tensor:
        """z_res of the step's rows in training mode, kept with its graph until
        :meth:`step_apply`."""
        data, _ = self.dataset(dataset_id)
        rows = checked_rows(args.indices, len(data))
        check_positive("lr", args.lr)
        net = self.model(args.model)
        x = data.subset(rows).unpack()
        if self.augment:
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + args.step)
            x = augment_batch(x, gen, padding=max(1, data.shape[1] // 8), flip=self.flip)
        for group in self.optimizers[args.model].param_groups:
            group["lr"] = args.lr
        net.train()
        z = net(x)
        self._pending[args.model] = z
        return z.detach().clone()

    def step_apply(self, gradients: NoisyLabelGradients, *, model: str = DEFAULT_MODEL) -> None:
        """One SGD step of ``model`` along the released dL/dz_res of its pending batch:
        backpropagate sum_i <z_i, g~_i> / B, whose gradient is the mean of g~_i dz_i/dtheta."""
        if not isinstance(gradients, NoisyLabelGradients):
            raise TypeError(
                f"gradients must be NoisyLabelGradients, got {type(gradients).__name__}"
            )
        z = self._pending.get(model)
        if z is None:
            raise ValueError(f"model {model!r} has no pending step: call step_logits first")
        if tuple(gradients.values.shape) != tuple(z.shape):
            raise ValueError(
                f"gradients must have the shape of the pending logits {tuple(z.shape)}, "
                f"got {gradients.values.shape}"
            )
        del self._pending[model]
        g = torch.from_numpy(np.array(gradients.values))
        optimizer = self.optimizers[model]
        optimizer.zero_grad(set_to_none=True)
        ((z * g).sum() / len(z)).backward()
        optimizer.step()
