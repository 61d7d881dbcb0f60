"""DP-SGD with Opacus's per-sample gradients, our samplers (Poisson, BIS), our accountant and
ledger, and random-subnetwork (partitioned) training (Dong, Chen, Ozgur, ICML 2025, arXiv
2503.03043). One step path for plain and partitioned training: :func:`private_step`.

- :mod:`.opacus_accountant`: :class:`AsymflowAccountant`, an Opacus ``IAccountant``;
- :mod:`.partition`: parameter blocks, per-record masks, and how a step is accounted;
- :mod:`.aggregate`: mask, clip, sum, noise on all coordinates, divide by the declared batch size;
- :mod:`.train`: :func:`private_step` and :func:`train_dpsgd`, the run with its directory and
  ledger.
"""

from asymflow.dpsgd.aggregate import noisy_gradient_sum, set_private_gradients, validate_model
from asymflow.dpsgd.loader import EmptySafeCollate, make_sampler, private_loader
from asymflow.dpsgd.opacus_accountant import AsymflowAccountant
from asymflow.dpsgd.partition import (
    PartitionPlan,
    PartitionSpec,
    StepAccounting,
    plan_partition,
    step_accounting,
)
from asymflow.dpsgd.runs import DpsgdConfig, read_config, read_metrics
from asymflow.dpsgd.train import DpsgdResult, calibrated_sigma, private_step, train_dpsgd

__all__ = [
    "AsymflowAccountant",
    "DpsgdConfig",
    "DpsgdResult",
    "EmptySafeCollate",
    "PartitionPlan",
    "PartitionSpec",
    "StepAccounting",
    "calibrated_sigma",
    "make_sampler",
    "noisy_gradient_sum",
    "plan_partition",
    "private_loader",
    "private_step",
    "read_config",
    "read_metrics",
    "set_private_gradients",
    "step_accounting",
    "train_dpsgd",
    "validate_model",
]
