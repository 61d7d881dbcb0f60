"""DP-SGD training with our batch samplers, our accountant and optional model partitioning.

One step (Abadi et al., CCS 2016, Alg. 1; Dong, Chen, Ozgur, ICML 2025, Sec. 3 for the masks):

1. the sampler (BIS(k, T) or Poisson(q), :mod:`asymflow.sampling`) yields a batch S, maybe empty;
2. Opacus's ``GradSampleModule`` gives the per-sample gradients g_i of CE(f(x_i), y_i);
3. :func:`asymflow.dpsgd.aggregate.set_private_gradients` masks each g_i to its record's block,
   clips (C, and C_shared for a shared part), sums, adds N(0, sigma^2 C^2) to EVERY coordinate
   and divides by the declared ``batch_size`` B. Dividing by a public constant is
   post-processing of the Gaussian mechanism on the sum. Neither the expected batch size kN/T
   or qN (it depends on the record count N, private under add/remove) nor the realized |S|
   (it depends on who is in the data) is used. An empty batch releases pure noise / B;
4. :class:`asymflow.dpsgd.opacus_accountant.AsymflowAccountant` accounts the step, writing the
   ledger row of a new BIS pass (or Poisson epoch) BEFORE
5. ``optimizer.step()`` applies the update.

The plain and the partitioned cases run the same code; plain DP-SGD is the plan with one block.
This is the only DP-SGD step of the package. Opacus's ``DPOptimizer`` is not used: it is the
same mechanism for plain DP-SGD (same sigma, C, sum sensitivity, divisor once its
``expected_batch_size`` is set to B; same speed and accuracy, bench/dpsgd_paths.py), but it
cannot mask per record without rewriting ``p.grad_sample`` behind its back, nor clip a shared
part to its own C_shared, and :mod:`asymflow.audit.canary` audits this aggregation.
``sigma`` comes from the config or from :func:`asymflow.accounting.noise_for_epsilon` on the
exact schedule (see :func:`asymflow.dpsgd.partition.step_accounting` for the events).

Resume: epoch e draws its batches from (sampler seed, e) and its noise and masks from
(noise seed, e), so a run resumed from the checkpoint of epoch c redoes epochs c+1.. as an
uninterrupted run would (exactly, with fixed seeds). The ledger keeps the rows of the epoch that
was interrupted (its updates may have been released) and the redone epoch writes its own, so the
reported epsilon, always recomputed from the ledger, over-counts after a crash, never under-counts.
With the seeds None (production), a resumed process draws new secret seeds, so the redone epoch
is sampled and noised independently of the cut one, as its own ledger row assumes.
"""

from __future__ import annotations

import os
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from torch import Tensor, nn
from torch.nn import functional

from asymflow.accounting.best import EpsilonReport, best_epsilon
from asymflow.accounting.calibrate import noise_for_epsilon
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.data import load_data
from asymflow.dpsgd.aggregate import set_private_gradients, validate_model
from asymflow.dpsgd.loader import make_sampler, private_loader
from asymflow.dpsgd.opacus_accountant import AsymflowAccountant
from asymflow.dpsgd.partition import PartitionPlan, StepAccounting, plan_partition, step_accounting
from asymflow.dpsgd.runs import (
    CONFIG_FILE,
    RESULT_FILE,
    DpsgdConfig,
    append_metrics,
    atomic_write_json,
    latest_checkpoint,
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    truncate_metrics,
)
from asymflow.models import build_model
from asymflow.progress import EpochBars
from asymflow.runfiles import SAMPLING_NOISE_SEEDS, JsonFields, check_resumable
from asymflow.threads import torch_threads

__all__ = ["DpsgdResult", "calibrated_sigma", "private_step", "train_dpsgd"]

_BACKWARD_HOOK_WARNING = "Full backward hook is firing when gradients are computed"


@dataclass(frozen=True)
class DpsgdResult(JsonFields):
    """Summary of a run; ``epsilon`` is recomputed from the ledger (the source of truth)."""

    run_dir: str
    sigma: float
    epsilon: float
    delta: float
    method: str
    test_acc: float
    epochs: int
    steps_per_epoch: int
    expected_batch_size: float
    accounting: str
    partition: dict[str, Any]
    calibrated: bool
    seconds: float
    metrics: list[dict[str, Any]] = field(default_factory=list)


def calibrated_sigma(
    config: DpsgdConfig, steps: int, accounting: StepAccounting
) -> tuple[float, float | None]:
    """(sigma, certified epsilon of the whole schedule or None if sigma was given).

    With a target, sigma = s * ``accounting.sigma_divisor`` where s comes from
    :func:`noise_for_epsilon` on the same schedule with ``parts = accounting.parts``; the
    bisection returns an s whose own certified epsilon is <= the target, so it never overshoots.
    """
    if config.sigma is not None:
        return float(config.sigma), None
    assert config.target_epsilon is not None
    calibration = noise_for_epsilon(
        config.target_epsilon,
        config.delta,
        config.sampler,
        steps,
        k=config.k,
        q=config.q,
        epochs=config.epochs,
        parts=accounting.parts,
        shared=accounting.shared,
        methods=config.methods,
    )
    return calibration.sigma * accounting.sigma_divisor, calibration.epsilon


def _grad_samples(params: Sequence[nn.Parameter]) -> list[Tensor]:
    out = []
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if gs is None:
            raise ValueError("every trainable parameter must take part in the forward pass")
        if not isinstance(gs, Tensor):
            raise ValueError("one backward pass per step: grad_sample must be a single tensor")
        out.append(gs)
    return out


def private_step(
    module: GradSampleModule,
    params: Sequence[nn.Parameter],
    plan: PartitionPlan,
    batch: tuple[Tensor, Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    accountant: AsymflowAccountant,
    clip: float,
    sigma: float,
    normalizer: float,
    generator: torch.Generator,
    shared_clip: float | None = None,
) -> None:
    """One DP-SGD step on ``batch`` (see the module docstring); an empty batch adds noise only.

    ``params`` must be the plan's parameters (:meth:`PartitionPlan.parameters`) of the model
    wrapped by ``module`` (built with ``loss_reduction="sum"``).
    """
    if module.loss_reduction != "sum":
        raise ValueError("module must be a GradSampleModule with loss_reduction='sum'")
    x, y = batch
    for p in params:
        p.grad = None
        p.grad_sample = None
    if len(y) > 0:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_BACKWARD_HOOK_WARNING)
            loss = functional.cross_entropy(module(x), y, reduction="sum")
            loss.backward()
        grad_samples = _grad_samples(params)
    else:
        grad_samples = [torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device) for p in params]
    set_private_gradients(
        params,
        grad_samples,
        plan,
        clip=clip,
        sigma=sigma,
        normalizer=normalizer,
        generator=generator,
        shared_clip=shared_clip,
    )
    accountant.step(noise_multiplier=sigma, sample_rate=accountant.sample_rate)  # ledger first
    optimizer.step()
    for p in params:
        p.grad_sample = None


@torch.no_grad()
def _test_accuracy(model: nn.Module, dataset: Any, batch_size: int) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(dataset), batch_size):
        x, y = dataset.get_batch(range(start, min(start + batch_size, len(dataset))))
        correct += int((model(x).argmax(1) == y).sum())
    model.train()
    return correct / max(1, len(dataset))


def _seed(value: int | None) -> int:
    return secrets.randbits(63) if value is None else int(value)


def _noise_generator(noise_seed: int | None, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch``'s masks and noise: seeded from (noise_seed, epoch) by
    numpy's SeedSequence, so that a resumed epoch draws what it would have drawn in one go; from
    the OS's secure source when ``noise_seed`` is None."""
    if noise_seed is None:
        return torch.Generator().manual_seed(_seed(None))
    (seed,) = np.random.SeedSequence((noise_seed, epoch)).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(seed))


def _spent(ledger: PrivacyLedger, config: DpsgdConfig) -> EpsilonReport:
    """The certified epsilon of every row in the ledger, including those of an epoch that was
    interrupted and redone: never less than what was released."""
    return best_epsilon(ledger.composed_event(dataset=config.data), config.delta, config.methods)


def train_dpsgd(
    config: DpsgdConfig,
    run_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    resume: bool = False,
) -> DpsgdResult:
    """Train ``config`` into ``run_dir`` and return the summary.

    Writes config.json, metrics.jsonl (per epoch), ledger.sqlite (per pass/epoch, ahead of
    the updates), ckpt/epoch{N}.pt and result.json. ``resume=True`` continues the run in
    ``run_dir``, which must have the same config, from its latest checkpoint, or from epoch 1
    (keeping the ledger) without one; a finished run is summarized again without training (as
    :func:`asymflow.delta.train.train_delta` does). Refuses BatchNorm models, the shuffle
    sampler, and an existing run unless resuming it.
    """
    if not isinstance(config, DpsgdConfig):
        raise TypeError(f"config must be a DpsgdConfig, got {type(config).__name__}")
    run_path = Path(run_dir)
    check_resumable(run_path, config, resume, seed_pair=SAMPLING_NOISE_SEEDS)
    began = time.perf_counter()
    with torch_threads(config.threads):
        data = load_data(config.data, progress=progress)
        train_set, test_set = data.tensor_datasets(augment=config.augment, seed=config.seed)
        n = len(train_set)
        _, _, channels = data.train.image_shape
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = build_model(
                config.model,
                num_classes=len(data.classes),
                in_channels=channels,
                norm=config.norm,
                width=config.width,
            )
        validate_model(model)
        plan = plan_partition(
            model, config.partition_spec, shared=config.shared, unit=config.partition_unit
        )
        steps = config.steps_for(n)
        sampler = make_sampler(
            config.sampler,
            n,
            steps=steps,
            k=config.k,
            q=config.q,
            seed=_seed(config.sampler_seed),
        )
        accounting = step_accounting(
            config.partition_spec, config.sampler, has_shared=bool(plan.shared)
        )
        sigma, planned_epsilon = calibrated_sigma(config, steps, accounting)
        run_path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_path / CONFIG_FILE, config.to_dict())
        ledger = PrivacyLedger.for_run(run_path)
        try:
            accountant = AsymflowAccountant(
                sampler,
                ledger=ledger,
                dataset=config.data,
                step_event=accounting.event,
                note=f"dp-sgd sigma={sigma:.6g}; {accounting.note}",
                methods=config.methods,
            )
            module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
            params = plan.parameters(model)
            optimizer = torch.optim.SGD(
                params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
            )
            done = 0
            found = latest_checkpoint(run_path) if resume else None
            if found is not None:
                done, path = found
                state = load_checkpoint(path)
                if state["config"] != config.to_dict():
                    raise ValueError(f"checkpoint {path} must hold this run's config to resume")
                model.load_state_dict(state["model"])
                optimizer.load_state_dict(state["optimizer"])
                accountant.load_state_dict(state["accountant"])
            if resume:
                truncate_metrics(run_path, done)
            metrics = read_metrics(run_path)
            acc = metrics[-1]["test_acc"] if metrics else 0.0
            loader = private_loader(train_set, sampler)
            with EpochBars(progress, "dp-sgd") as bars:
                bars.stage("epochs", config.epochs, done)
                for epoch in range(done + 1, config.epochs + 1):
                    bars.start_batches(f"epoch {epoch}", len(sampler))
                    train_set.set_epoch(epoch)
                    sampler.set_epoch(epoch - 1)  # the sampler's passes count from 0
                    generator = _noise_generator(config.noise_seed, epoch)
                    for batch in loader:
                        private_step(
                            module,
                            params,
                            plan,
                            batch,
                            optimizer=optimizer,
                            accountant=accountant,
                            clip=config.clip,
                            sigma=sigma,
                            normalizer=config.batch_size,
                            generator=generator,
                            shared_clip=config.shared_clip,
                        )
                        bars.batch()
                    acc = _test_accuracy(model, test_set, config.eval_batch_size)
                    report = _spent(ledger, config)
                    row = {
                        "epoch": epoch,
                        "steps": len(accountant),
                        "test_acc": acc,
                        "epsilon": report.epsilon,
                        "epsilon_method": report.method,
                        "delta": config.delta,
                        "sigma": sigma,
                        "accounting": accounting.note,
                    }
                    append_metrics(run_path, row)
                    metrics.append(row)
                    save_checkpoint(
                        run_path,
                        epoch,
                        {
                            "epoch": epoch,
                            "model": model.state_dict(),
                            "optimizer": optimizer.state_dict(),
                            "accountant": accountant.state_dict(),
                            "config": config.to_dict(),
                        },
                    )
                    bars.epoch_done(f"acc {acc:.3f}  eps {report.epsilon:.3f}")
            accountant.finish()
            final = _spent(ledger, config)
        finally:
            ledger.close()
    result = DpsgdResult(
        run_dir=str(run_path),
        sigma=sigma,
        epsilon=final.epsilon,
        delta=config.delta,
        method=final.method,
        test_acc=acc,
        epochs=config.epochs,
        steps_per_epoch=steps,
        expected_batch_size=sampler.expected_batch_size,
        accounting=accounting.note,
        partition=plan.describe(),
        calibrated=planned_epsilon is not None,
        seconds=time.perf_counter() - began,
        metrics=metrics,
    )
    atomic_write_json(run_path / RESULT_FILE, result.to_dict())
    return result
