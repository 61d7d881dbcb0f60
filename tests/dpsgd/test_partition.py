"""Partition plans, partition specs, and how a partitioned step is accounted."""

from __future__ import annotations

import math

import numpy as np
import pytest

from asymflow.accounting import (
    Composed,
    Dropout,
    Gaussian,
    ModelPartitioned,
    PoissonSampled,
    RdpAccountant,
    SelfComposed,
    best_epsilon,
)
from asymflow.dpsgd.partition import SHARED, PartitionSpec, plan_partition, step_accounting
from asymflow.models import resnet20
from tests.dpsgd.tiny import tiny_cnn


def test_parse_partition_specs() -> None:
    assert PartitionSpec.parse("none") == PartitionSpec()
    assert PartitionSpec.parse("split:4") == PartitionSpec("split", 4)
    assert PartitionSpec.parse("dropout:0.5") == PartitionSpec("dropout", 2)
    assert str(PartitionSpec.parse("split:3")) == "split:3"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("split:1", "split:d needs an integer d >= 2"),
        ("split:x", "split:d needs an integer d >= 2"),
        ("dropout:0.3", "only supported at r = 0.5"),
        ("blocks:2", "must be 'none', 'split:d'"),
    ],
)
def test_bad_partition_specs_are_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PartitionSpec.parse(text)


def test_split_plan_is_disjoint_complete_and_balanced_by_parameter_count() -> None:
    model = resnet20(norm="group", width=0.25)
    plan = plan_partition(model, "split:4", unit="tensor")
    names = [n for block in plan.blocks for n in block]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(set(names)) == len(names)
    sizes = plan.block_sizes
    assert sum(sizes) == sum(p.numel() for p in model.parameters())
    largest_unit = max(p.numel() for p in model.parameters())
    assert max(sizes) - min(sizes) <= largest_unit  # greedy balance


def test_layer_units_keep_weight_and_bias_together() -> None:
    plan = plan_partition(tiny_cnn(), "split:3", unit="layer")
    block_of = dict(zip(plan.names, plan.block_of, strict=True))
    for layer in ("0", "1", "5"):
        assert block_of[f"{layer}.weight"] == block_of[f"{layer}.bias"]
    assert sorted(plan.block_sizes) == [8, 15, 112]


def test_more_parts_than_units_is_refused() -> None:
    with pytest.raises(ValueError, match=r"parts must satisfy 2 <= parts <= 3"):
        plan_partition(tiny_cnn(), "split:4", unit="layer")


def test_shared_prefixes_must_match_and_leave_something_to_split() -> None:
    plan = plan_partition(tiny_cnn(), "split:2", shared=("0",))
    assert plan.shared == ("0.weight", "0.bias")
    roles = dict(zip(plan.names, plan.block_of, strict=True))
    assert all(b != SHARED for n, b in roles.items() if not n.startswith("0."))
    with pytest.raises(ValueError, match="shared prefix 'nope' must match"):
        plan_partition(tiny_cnn(), "split:2", shared=("nope",))
    with pytest.raises(ValueError, match="at least one trainable parameter to split"):
        plan_partition(tiny_cnn(), "dropout:0.5", shared=("0", "1", "5"))
    with pytest.raises(ValueError, match="shared parameters need partition"):
        plan_partition(tiny_cnn(), "none", shared=("0",))


def test_poisson_split_claims_partition_amplification() -> None:
    acc = step_accounting(PartitionSpec("split", 4), "poisson", has_shared=False)
    assert acc.event(2.0) == ModelPartitioned(4, Gaussian(2.0))
    dropout = step_accounting(PartitionSpec("dropout", 2), "poisson", has_shared=False)
    assert dropout.event(2.0) == Dropout(0.5, Gaussian(2.0))
    assert dropout.parts == 2


def test_balanced_split_is_accounted_without_amplification() -> None:
    acc = step_accounting(PartitionSpec("split", 4), "balanced", has_shared=False)
    assert acc.event(2.0) == Gaussian(2.0)
    assert "without partition amplification" in acc.note


def test_partial_split_under_bis_is_one_gaussian_with_joint_sensitivity_sqrt2() -> None:
    acc = step_accounting(PartitionSpec("split", 2), "balanced", has_shared=True)
    assert acc.event(2.0) == Gaussian(2.0 / math.sqrt(2.0))


def test_partial_split_under_poisson_is_the_joint_step_and_is_not_under_reported() -> None:
    acc = step_accounting(PartitionSpec("split", 2), "poisson", has_shared=True)
    event = acc.event(2.0)
    assert event == Composed((Gaussian(2.0), ModelPartitioned(2, Gaussian(2.0))))
    # The joint step is bounded at least as high as its unsplit part alone would be under the
    # same sampling, and no higher than the fully conservative single Gaussian at sigma/sqrt(2).
    q = 0.05
    joint = best_epsilon(SelfComposed(PoissonSampled(q, event), 50), 1e-5).epsilon
    shared_only = best_epsilon(SelfComposed(PoissonSampled(q, Gaussian(2.0)), 50), 1e-5).epsilon
    worst = best_epsilon(
        SelfComposed(PoissonSampled(q, Gaussian(2.0 / math.sqrt(2))), 50), 1e-5
    ).epsilon
    assert shared_only < joint <= worst * 1.01


def test_composing_separately_subsampled_parts_would_under_report() -> None:
    """Why partial splitting is not accounted as two composed subsampled events: with both
    parts on the same Poisson batch, two Gaussian parts (clip C each, noise sigma C each) are
    exactly one subsampled Gaussian at sigma/sqrt(2), whose RDP exceeds the sum of two
    subsampled Gaussians at sigma (for small q: q^2(e^{2/s^2}-1) > 2 q^2 (e^{1/s^2}-1))."""
    q, sigma = 0.01, 1.0
    joint = RdpAccountant().compose(PoissonSampled(q, Gaussian(sigma / math.sqrt(2))))
    separate = RdpAccountant().compose(
        Composed((PoissonSampled(q, Gaussian(sigma)), PoissonSampled(q, Gaussian(sigma))))
    )
    assert np.all(joint.curves()[0] > separate.curves()[0])
    assert joint.epsilon(1e-5) > separate.epsilon(1e-5)
