"""Plain Opacus DP-SGD with our samplers, our accountant and a declared batch size.

For users of ``opacus.PrivacyEngine`` who keep Opacus's ``DPOptimizer`` (plain DP-SGD, no model
partitioning; :mod:`asymflow.dpsgd.train` uses its own aggregation step for both).
:func:`make_private_with_sampler` wires three things Opacus 1.6 does not do by itself:

1. the accountant: Opacus builds accountants by name only, so ours is assigned to
   ``privacy_engine.accountant`` before ``make_private`` attaches its step hook;
2. the sampler: ``make_private(..., poisson_sampling=False)`` keeps our ``batch_sampler``
   (Poisson or BIS) in the DataLoader, with a collate that turns empty batches into
   zero-length tensors, so an empty step still runs and adds its noise;
3. the normalization: ``DPOptimizer`` divides the noisy sum by ``expected_batch_size``, which
   ``make_private`` sets to ``int(N / len(data_loader))``: for BIS N/T, wrong by a factor k,
   and for any sampler a function of the record count N, which add/remove DP does not treat as
   public. We set it to ``normalizer``, the batch size the caller declares (a public constant),
   so the division is post-processing of the Gaussian mechanism on the sum (Abadi et al., CCS
   2016, Alg. 1). The realized batch size is never used: with ``loss_reduction="mean"`` Opacus
   rescales per-sample gradients by it before clipping, which exactly undoes the mean.
"""

from __future__ import annotations

from typing import Any

from opacus import GradSampleModule, PrivacyEngine
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn, optim
from torch.utils.data import DataLoader, Dataset

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.dpsgd.aggregate import check_positive
from asymflow.dpsgd.loader import private_loader
from asymflow.dpsgd.opacus_accountant import AccountedSampler, AsymflowAccountant

__all__ = ["make_private_with_sampler", "validate_model"]


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


def make_private_with_sampler(
    *,
    privacy_engine: PrivacyEngine,
    module: nn.Module,
    optimizer: optim.Optimizer,
    dataset: Dataset[Any],
    sampler: AccountedSampler,
    normalizer: float,
    noise_multiplier: float,
    max_grad_norm: float,
    ledger: PrivacyLedger | None = None,
    ledger_dataset: str = "train",
    loss_reduction: str = "mean",
    noise_generator: Any = None,
) -> tuple[GradSampleModule, DPOptimizer, DataLoader[Any], AsymflowAccountant]:
    """``privacy_engine.make_private`` with ``sampler`` batches and :class:`AsymflowAccountant`.

    ``normalizer`` is the declared batch size B that the noisy sum is divided by (see the module
    docstring). Returns (module, optimizer, data_loader, accountant). Every
    ``optimizer.step()`` is accounted (and a new pass or epoch recorded in ``ledger``) before
    the parameters change.
    """
    normalizer = check_positive("normalizer", normalizer)
    validate_model(module)
    accountant = AsymflowAccountant(sampler, ledger=ledger, dataset=ledger_dataset)
    privacy_engine.accountant = accountant
    loader = private_loader(dataset, sampler)
    private_module, private_optimizer, private_data = privacy_engine.make_private(
        module=module,
        optimizer=optimizer,
        data_loader=loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        poisson_sampling=False,
        loss_reduction=loss_reduction,
        noise_generator=noise_generator,
    )
    private_optimizer.expected_batch_size = normalizer
    if not isinstance(private_module, GradSampleModule):  # pragma: no cover - wrap_model=True
        raise TypeError("make_private must return a GradSampleModule")
    return private_module, private_optimizer, private_data, accountant
