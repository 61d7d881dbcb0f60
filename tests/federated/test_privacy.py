"""Client-level events, write-ahead ledger rows and noise calibration of federated runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from asymflow.accounting import (
    BalancedSampled,
    Gaussian,
    ModelPartitioned,
    PoissonSampled,
    SelfComposed,
    best_epsilon,
)
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.federated.config import FederatedConfig
from asymflow.federated.privacy import (
    ClientLevelAccountant,
    block_event,
    compacted_event,
    expected_event,
    run_noise,
)

RDP = ("rdp",)


def test_poisson_split_round_claims_partition_amplification() -> None:
    config = FederatedConfig(sigma=2.0, sampler="poisson", q=0.1, subnetwork="split:4")
    assert block_event(config, 2.0) == PoissonSampled(0.1, ModelPartitioned(4, Gaussian(2.0)))
    plain = FederatedConfig(sigma=2.0, sampler="poisson", q=0.1)
    assert block_event(plain, 2.0) == PoissonSampled(0.1, Gaussian(2.0))


def test_balanced_split_is_accounted_without_partition_amplification() -> None:
    config = FederatedConfig(sigma=2.0, sampler="balanced", k=2, period=5, subnetwork="split:4")
    assert block_event(config, 2.0) == BalancedSampled(2, 5, Gaussian(2.0))
    assert expected_event(config, 2.0, rounds=6) == SelfComposed(
        BalancedSampled(2, 5, Gaussian(2.0)), 2
    )


def test_ledger_rows_are_written_per_poisson_round_and_per_bis_pass(tmp_path: Path) -> None:
    config = FederatedConfig(
        sigma=1.5, sampler="balanced", k=1, period=3, rounds=7, clients=4, methods=RDP
    )
    with PrivacyLedger.for_run(tmp_path / "bis") as ledger:
        accountant = ClientLevelAccountant(config, 1.5, ledger)
        written = []
        for r in range(1, 8):
            accountant.before_release(r)
            written.append(len(ledger.entries()))
            accountant.after_release()
        assert written == [1, 1, 1, 2, 2, 2, 3]  # rows before rounds 1, 4, 7 are released
        assert all(e.status == "released" for e in ledger.entries())
        want = best_epsilon(expected_event(config, 1.5), config.delta, RDP).epsilon
        assert accountant.epsilon().epsilon == pytest.approx(want, rel=1e-12)
    poisson = FederatedConfig(sigma=1.5, sampler="poisson", q=0.25, rounds=3, methods=RDP)
    with PrivacyLedger.for_run(tmp_path / "poisson") as ledger:
        accountant = ClientLevelAccountant(poisson, 1.5, ledger)
        for r in range(1, 4):
            accountant.before_release(r)
        assert [e.event for e in ledger.entries()] == [PoissonSampled(0.25, Gaussian(1.5))] * 3
        assert accountant.event() == compacted_event(ledger.entries())
        merged = compacted_event(ledger.entries())
        assert merged.events == (SelfComposed(PoissonSampled(0.25, Gaussian(1.5)), 3),)
        want = best_epsilon(ledger.composed_event(), poisson.delta, RDP).epsilon
        assert accountant.epsilon().epsilon == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sampler": "poisson", "q": 0.2, "rounds": 10, "subnetwork": "split:2"},
        {"sampler": "balanced", "k": 1, "period": 5, "rounds": 10},
    ],
)
def test_calibrated_sigma_meets_the_target(kwargs: dict[str, object]) -> None:
    config = FederatedConfig(target_epsilon=4.0, methods=RDP, **kwargs)  # type: ignore[arg-type]
    noise = run_noise(config)
    assert noise.planned_epsilon is not None and noise.planned_epsilon <= 4.0
    eps = best_epsilon(expected_event(config, noise.sigma), config.delta, RDP).epsilon
    assert eps == pytest.approx(noise.planned_epsilon, rel=1e-9)
    assert best_epsilon(expected_event(config, noise.sigma * 0.98), config.delta, RDP).epsilon > 4.0
