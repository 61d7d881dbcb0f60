"""AsymflowAccountant in the DP-SGD loop (private_step): BIS and Poisson events, the ledger
(written before the updates), state dicts, refusals."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from opacus import GradSampleModule

from asymflow.accounting import (
    BalancedSampled,
    Gaussian,
    ModelPartitioned,
    PoissonSampled,
    SelfComposed,
    UnsupportedEventError,
    best_epsilon,
)
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.dpsgd.loader import private_loader
from asymflow.dpsgd.opacus_accountant import MECHANISM, AsymflowAccountant
from asymflow.dpsgd.partition import plan_partition
from asymflow.dpsgd.train import private_step
from asymflow.sampling import BalancedIterationSampler, PoissonSampler, ShuffleSampler
from tests.dpsgd.tiny import tiny_cnn, tiny_data

DELTA = 1e-5
RDP = ("rdp",)
NORMALIZER = 5.0
"""The declared batch size B of the runs: a public constant, unlike k N / T."""


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[PrivacyLedger]:
    with PrivacyLedger.for_run(tmp_path / "run") as opened:
        yield opened


def _private_run(sampler, ledger, *, sigma: float, epochs: int):
    """DP-SGD through :func:`private_step` with our sampler and accountant.

    Returns the accountant and, for every parameter update, the number of ledger rows that
    existed when the update was applied."""
    model = tiny_cnn()
    plan = plan_partition(model)
    params = plan.parameters(model)
    module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    optimizer = torch.optim.SGD(params, lr=0.1)
    accountant = AsymflowAccountant(sampler, ledger=ledger)
    rows_at_update: list[int] = []
    inner_step = optimizer.step

    def watched_step(*args, **kwargs):
        rows_at_update.append(len(ledger.entries()))
        return inner_step(*args, **kwargs)

    optimizer.step = watched_step
    loader = private_loader(tiny_data(sampler.num_samples), sampler)
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        for batch in loader:
            private_step(
                module,
                params,
                plan,
                batch,
                optimizer=optimizer,
                accountant=accountant,
                clip=1.0,
                sigma=sigma,
                normalizer=NORMALIZER,
                generator=generator,
            )
    accountant.finish()
    return accountant, rows_at_update


def test_bis_training_ledger_epsilon_equals_sampler_event(ledger: PrivacyLedger) -> None:
    """Two BIS passes of DP-SGD record two pass events, each before the pass's first update,
    and the ledger's epsilon (RDP and PLD) equals the sampler's own event's."""
    sigma, k, steps, passes = 2.0, 2, 8, 2
    sampler = BalancedIterationSampler(24, k, steps, seed=3)
    accountant, rows_at_update = _private_run(sampler, ledger, sigma=sigma, epochs=passes)
    assert rows_at_update == [1] * steps + [2] * steps  # each pass recorded before its updates
    entries = ledger.entries()
    assert [e.event for e in entries] == [BalancedSampled(k, steps, Gaussian(sigma))] * passes
    assert {e.status for e in entries} == {"released"}
    reference = BalancedIterationSampler(24, k, steps, seed=0, passes=passes)
    want = best_epsilon(reference.privacy_event(Gaussian(sigma)), DELTA)
    got = ledger.epsilon(DELTA)
    assert got.by_method["rdp"] == pytest.approx(want.by_method["rdp"], rel=1e-9)
    assert got.by_method["pld"] == pytest.approx(want.by_method["pld"], rel=1e-6)
    accountant.methods = RDP
    assert accountant.get_epsilon(DELTA) == pytest.approx(want.by_method["rdp"], rel=1e-9)
    assert len(accountant) == passes * steps


def test_poisson_records_one_row_per_epoch_before_its_steps(ledger: PrivacyLedger) -> None:
    sampler = PoissonSampler(24, 0.25, 4, seed=1)
    accountant, rows_at_update = _private_run(sampler, ledger, sigma=1.5, epochs=2)
    accountant.methods = RDP
    assert rows_at_update == [1] * 4 + [2] * 4
    assert [(e.event, e.count) for e in ledger.entries()] == [
        (PoissonSampled(0.25, Gaussian(1.5)), 4)
    ] * 2
    want = best_epsilon(SelfComposed(PoissonSampled(0.25, Gaussian(1.5)), 8), DELTA, RDP)
    got = best_epsilon(ledger.composed_event(), DELTA, RDP)
    assert got.epsilon == pytest.approx(want.epsilon, rel=1e-9)
    assert accountant.epsilon_report(DELTA).epsilon == pytest.approx(got.epsilon, rel=1e-9)


def test_state_dict_round_trips(ledger: PrivacyLedger) -> None:
    sampler = BalancedIterationSampler(24, 2, 4, seed=0)
    first = AsymflowAccountant(sampler, ledger=ledger, methods=RDP)
    for _ in range(6):
        first.step(noise_multiplier=1.2, sample_rate=0.25)
    state = first.state_dict()
    assert state["mechanism"] == MECHANISM == AsymflowAccountant.mechanism()
    assert state["history"] == [(1.2, 0.5, 6)]
    second = AsymflowAccountant(sampler, methods=RDP)
    second.load_state_dict(state)
    assert second.history == first.history and len(second) == 6
    assert second.get_epsilon(DELTA) == first.get_epsilon(DELTA)
    assert second.state_dict() == state
    # continuing after the restore: steps 7-8 finish the second pass, step 9 starts a third
    for acc in (first, second):
        for _ in range(3):
            acc.step(noise_multiplier=1.2, sample_rate=0.25)
    assert second.event() == first.event()
    assert len(first.blocks) == 3


def test_state_dict_of_another_sampler_or_mechanism_is_refused() -> None:
    accountant = AsymflowAccountant(BalancedIterationSampler(24, 2, 4, seed=0), methods=RDP)
    state = accountant.state_dict()
    other = AsymflowAccountant(BalancedIterationSampler(24, 1, 4, seed=0), methods=RDP)
    with pytest.raises(ValueError, match="state_dict sampler must be"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="cannot be loaded"):
        accountant.load_state_dict({**state, "mechanism": "rdp"})


def test_shuffle_sampler_is_refused() -> None:
    with pytest.raises(ValueError, match="Chua et al"):
        AsymflowAccountant(ShuffleSampler(24, 4, seed=0))


def test_partition_amplification_with_bis_is_refused() -> None:
    with pytest.raises(UnsupportedEventError, match="no partition amplification"):
        AsymflowAccountant(
            BalancedIterationSampler(24, 2, 4, seed=0),
            step_event=lambda s: ModelPartitioned(2, Gaussian(s)),
        )


def test_noise_change_inside_a_bis_pass_is_refused() -> None:
    accountant = AsymflowAccountant(BalancedIterationSampler(24, 2, 4, seed=0), methods=RDP)
    accountant.step(noise_multiplier=1.0, sample_rate=0.25)
    with pytest.raises(ValueError, match="must stay constant within a BIS pass"):
        accountant.step(noise_multiplier=2.0, sample_rate=0.25)


def test_an_abandoned_pass_is_not_merged_into_the_next(ledger: PrivacyLedger) -> None:
    """Three passes begun and each abandoned after one step are three pass events."""
    sampler = BalancedIterationSampler(24, 1, 4, seed=0)
    accountant = AsymflowAccountant(sampler, ledger=ledger, methods=RDP)
    for _ in range(3):
        next(iter(sampler))
        accountant.step(noise_multiplier=1.0, sample_rate=0.25)
    assert len(ledger.entries()) == 3
    assert accountant.event() == ledger.composed_event()
