"""Statistical and contract tests for the batch samplers in ``asymflow.sampling``.

Fixed seeds make every test deterministic; the thresholds (p > 1e-4, several standard
errors) are the margins a correct sampler passes for all but a negligible set of seeds.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from itertools import combinations

import pytest
import torch
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from asymflow.accounting.events import (
    BalancedSampled,
    Gaussian,
    PoissonSampled,
    SelfComposed,
)
from asymflow.sampling import BalancedIterationSampler, PoissonSampler, ShuffleSampler

P_MIN = 1e-4


def _passes(batches: list[list[int]], steps: int) -> list[list[list[int]]]:
    return [batches[i : i + steps] for i in range(0, len(batches), steps)]


# --- Balanced Iteration Subsampling ---------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "k", "steps"),
    [(500, 1, 10), (500, 3, 10), (400, 7, 10), (300, 10, 10), (200, 5, 5), (1000, 4, 64)],
)
def test_balanced_puts_every_record_in_exactly_k_distinct_steps_per_pass(
    n: int, k: int, steps: int
) -> None:
    sampler = BalancedIterationSampler(n, k, steps, seed=11, passes=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 3 * steps
    for one_pass in _passes(batches, steps):
        counts = Counter(i for batch in one_pass for i in batch)
        assert set(counts) == set(range(n))
        assert set(counts.values()) == {k}
        for batch in one_pass:
            assert len(batch) == len(set(batch))
            assert batch == sorted(batch)


def test_balanced_batch_sizes_are_binomial_in_mean_and_variance() -> None:
    n, k, steps, passes = 2000, 3, 20, 10
    p = k / steps
    sampler = BalancedIterationSampler(n, k, steps, seed=5, passes=passes)
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    mean = n * p
    var = n * p * (1 - p)
    assert sampler.expected_batch_size == pytest.approx(mean)
    # Batch sizes within one pass are negatively correlated (they sum to k N), so the mean
    # is even closer than the i.i.d. standard error used here.
    assert abs(sizes.mean().item() - mean) < 4 * math.sqrt(var / sizes.numel())
    assert 0.7 * var < sizes.var().item() < 1.3 * var


def test_balanced_k1_step_of_each_record_is_uniform() -> None:
    n, steps = 20_000, 10
    batches = list(BalancedIterationSampler(n, 1, steps, seed=2024))
    observed = [len(b) for b in batches]
    assert stats.chisquare(observed).pvalue > P_MIN


def test_balanced_k1_records_choose_independently() -> None:
    n, steps = 20_000, 10
    step_of = [0] * n
    for s, batch in enumerate(BalancedIterationSampler(n, 1, steps, seed=99)):
        for i in batch:
            step_of[i] = s
    pairs = Counter(step_of[2 * i] * steps + step_of[2 * i + 1] for i in range(n // 2))
    observed = [pairs.get(c, 0) for c in range(steps * steps)]
    assert stats.chisquare(observed).pvalue > P_MIN


def test_balanced_k1_one_record_is_uniform_across_passes() -> None:
    steps, passes = 8, 2000
    sampler = BalancedIterationSampler(3, 1, steps, seed=7, passes=passes)
    batches = list(sampler)
    where = Counter(s % steps for s, batch in enumerate(batches) if 0 in batch)
    assert sum(where.values()) == passes
    assert stats.chisquare([where[s] for s in range(steps)]).pvalue > P_MIN


@pytest.mark.parametrize(("k", "steps"), [(2, 6), (3, 5), (4, 6), (5, 6)])
def test_balanced_subset_of_each_record_is_uniform_over_all_k_subsets(k: int, steps: int) -> None:
    # (2, 6) draws k steps by Floyd's algorithm; (3, 5), (4, 6), (5, 6) draw the complement.
    n = 6000
    chosen: list[list[int]] = [[] for _ in range(n)]
    for s, batch in enumerate(BalancedIterationSampler(n, k, steps, seed=314)):
        for i in batch:
            chosen[i].append(s)
    subsets = list(combinations(range(steps), k))
    counts = Counter(tuple(c) for c in chosen)
    assert set(counts) <= set(subsets)
    assert stats.chisquare([counts.get(c, 0) for c in subsets]).pvalue > P_MIN


def test_balanced_large_pass_is_fast_and_exact() -> None:
    n, k, steps = 50_000, 1, 10_000
    sampler = BalancedIterationSampler(n, k, steps, seed=1)
    steps_of = torch.cat([torch.tensor(b, dtype=torch.int64) for b in sampler])
    assert steps_of.numel() == n * k
    assert torch.equal(torch.bincount(steps_of, minlength=n), torch.full((n,), k))


def test_balanced_privacy_event_composes_passes() -> None:
    noise = Gaussian(1.0)
    sampler = BalancedIterationSampler(100, 4, 20, seed=0, passes=3)
    assert sampler.privacy_event(noise) == SelfComposed(BalancedSampled(4, 20, noise), 3)


# --- Poisson --------------------------------------------------------------------------------


def test_poisson_batch_sizes_have_binomial_mean_and_variance() -> None:
    n, q, steps = 1000, 0.05, 400
    sampler = PoissonSampler(n, q, steps, seed=17)
    batches = list(sampler)
    assert len(batches) == len(sampler) == steps
    sizes = torch.tensor([len(b) for b in batches], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert sampler.expected_batch_size == pytest.approx(mean)
    assert abs(sizes.mean().item() - mean) < 4 * math.sqrt(var / steps)
    assert 0.7 * var < sizes.var().item() < 1.3 * var
    for batch in batches:
        assert batch == sorted(set(batch))
        assert all(0 <= i < n for i in batch)


def test_poisson_each_record_joins_with_probability_q() -> None:
    n, q, steps = 50, 0.2, 2000
    counts = Counter(i for b in PoissonSampler(n, q, steps, seed=3) for i in b)
    per_record = torch.tensor([counts[i] for i in range(n)], dtype=torch.float64)
    sd = math.sqrt(steps * q * (1 - q))
    assert (per_record - steps * q).abs().max().item() < 4.5 * sd


def test_poisson_with_q_one_takes_everything() -> None:
    assert list(PoissonSampler(4, 1.0, 2, seed=0)) == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_poisson_privacy_event_composes_steps() -> None:
    noise = Gaussian(0.8)
    event = PoissonSampler(100, 0.01, 50, seed=0).privacy_event(noise)
    assert event == SelfComposed(PoissonSampled(0.01, noise), 50)


# --- Shuffle --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "batch", "drop_last"), [(10, 3, False), (10, 3, True), (12, 4, False)]
)
def test_shuffle_covers_every_index_once_per_epoch(n: int, batch: int, drop_last: bool) -> None:
    sampler = ShuffleSampler(n, batch, seed=8, drop_last=drop_last)
    epochs = [list(sampler) for _ in range(3)]
    for batches in epochs:
        assert len(batches) == len(sampler)
        flat = [i for b in batches for i in b]
        assert len(flat) == len(set(flat))
        if drop_last:
            assert all(len(b) == batch for b in batches)
            assert len(flat) == (n // batch) * batch
        else:
            assert sorted(flat) == list(range(n))
            assert all(len(b) == batch for b in batches[:-1])
    assert epochs[0] != epochs[1]


def test_shuffle_has_no_privacy_event_and_points_to_balanced() -> None:
    with pytest.raises(ValueError, match=r"Chua et al.*BalancedIterationSampler"):
        ShuffleSampler(100, 10, seed=0).privacy_event(Gaussian(1.0))


# --- Shared contract ------------------------------------------------------------------------

AnySampler = PoissonSampler | BalancedIterationSampler | ShuffleSampler
MakeSampler = Callable[[int], AnySampler]

SAMPLERS: list[MakeSampler] = [
    lambda seed: PoissonSampler(300, 0.1, 12, seed=seed),
    lambda seed: BalancedIterationSampler(300, 2, 12, seed=seed, passes=2),
    lambda seed: ShuffleSampler(300, 32, seed=seed),
]


@pytest.mark.parametrize("make", SAMPLERS)
def test_same_seed_reproduces_the_same_batches(make: MakeSampler) -> None:
    a, b = make(123), make(123)
    assert [list(a), list(a)] == [list(b), list(b)]


@pytest.mark.parametrize("make", SAMPLERS)
def test_different_seeds_and_epochs_give_different_batches(make: MakeSampler) -> None:
    sampler = make(1)
    first, second = list(sampler), list(sampler)
    assert first != second
    assert first != list(make(2))


@pytest.mark.parametrize("make", SAMPLERS)
def test_set_epoch_replays_a_given_pass(make: MakeSampler) -> None:
    running = make(42)
    _, _, third = list(running), list(running), list(running)
    jumped = make(42)
    jumped.set_epoch(2)
    assert jumped.epoch == 2
    assert list(jumped) == third
    assert jumped.epoch == 3


@pytest.mark.parametrize("make", SAMPLERS)
def test_works_as_a_dataloader_batch_sampler(make: MakeSampler) -> None:
    data = TensorDataset(torch.arange(300) * 10)
    sampler = make(9)
    loader = DataLoader(data, batch_sampler=sampler)
    assert len(loader) == len(sampler)
    expected = list(make(9))
    got = [batch[0].tolist() for batch in loader]
    assert got == [[10 * i for i in b] for b in expected]


def test_privacy_event_requires_an_event() -> None:
    with pytest.raises(TypeError, match="noise must be an Event"):
        PoissonSampler(10, 0.5, 2, seed=0).privacy_event(1.0)  # type: ignore[arg-type]


# --- Validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: PoissonSampler(0, 0.1, 5, seed=0), "num_samples must satisfy 1 <= num_samples"),
        (lambda: PoissonSampler(10, 0.0, 5, seed=0), "q must satisfy 0 < q <= 1"),
        (lambda: PoissonSampler(10, 1.5, 5, seed=0), "q must satisfy 0 < q <= 1"),
        (lambda: PoissonSampler(10, math.nan, 5, seed=0), "q must satisfy 0 < q <= 1"),
        (lambda: PoissonSampler(10, True, 5, seed=0), "q must be a number, not a bool"),
        (lambda: PoissonSampler(10, 0.1, 0, seed=0), "steps must satisfy 1 <= steps"),
        (lambda: PoissonSampler(True, 0.1, 5, seed=0), "num_samples must be an integer"),
        (lambda: PoissonSampler(10, 0.1, 5, seed=False), "seed must be an integer"),
        (lambda: BalancedIterationSampler(10, 12, 10, seed=0), "k must satisfy 1 <= k <= steps"),
        (lambda: BalancedIterationSampler(10, 0, 10, seed=0), "k must satisfy 1 <= k"),
        (lambda: BalancedIterationSampler(10, 1, 0, seed=0), "steps must satisfy 1 <= steps"),
        (lambda: BalancedIterationSampler(10, 1, 5, seed=0, passes=0), "passes must satisfy"),
        (lambda: BalancedIterationSampler(10, True, 5, seed=0), "k must be an integer"),
        (lambda: ShuffleSampler(10, 0, seed=0), "batch_size must satisfy 1 <= batch_size"),
        (
            lambda: ShuffleSampler(10, 11, seed=0, drop_last=True),
            "batch_size must satisfy 1 <= batch_size <= num_samples",
        ),
    ],
)
def test_invalid_parameters_are_rejected_with_the_parameter_named(
    build: Callable[[], object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_non_numbers_are_type_errors() -> None:
    with pytest.raises(TypeError, match="k must be an integer"):
        BalancedIterationSampler(10, 2.5, 5, seed=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="q must be a number"):
        PoissonSampler(10, "0.1", 5, seed=0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="epoch must satisfy 0 <= epoch"):
        ShuffleSampler(10, 2, seed=0).set_epoch(-1)
