"""Client sampling over rounds: BIS puts every client in exactly k rounds of each pass,
Poisson samples at rate q, blocks are uniform over the d parts."""

from __future__ import annotations

import math
from collections import Counter

import pytest

from asymflow.federated.config import FederatedConfig
from asymflow.federated.selection import ClientSelector


def _config(**kwargs: object) -> FederatedConfig:
    return FederatedConfig(sigma=1.0, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("k", "period", "passes"), [(1, 4, 3), (2, 5, 2), (5, 5, 1)])
def test_balanced_every_client_joins_exactly_k_rounds_per_pass(
    k: int, period: int, passes: int
) -> None:
    config = _config(clients=37, rounds=period * passes, sampler="balanced", k=k, period=period)
    rounds = list(ClientSelector(config, seed=11))
    assert [r.round for r in rounds] == list(range(1, config.rounds + 1))
    for p in range(passes):
        counts = Counter(c for r in rounds[p * period : (p + 1) * period] for c in r.clients)
        assert counts == Counter({c: k for c in range(37)})


def test_balanced_partial_last_pass_is_a_prefix_of_a_full_pass() -> None:
    config = _config(clients=9, rounds=6, sampler="balanced", k=1, period=4)
    rounds = list(ClientSelector(config, seed=5))
    assert len(rounds) == 6
    first_pass = Counter(c for r in rounds[:4] for c in r.clients)
    assert first_pass == Counter({c: 1 for c in range(9)})
    assert max(Counter(c for r in rounds[4:] for c in r.clients).values(), default=0) <= 1


def test_poisson_rate_matches_q() -> None:
    config = _config(clients=50, rounds=200, sampler="poisson", q=0.3)
    total = sum(len(r.clients) for r in ClientSelector(config, seed=3))
    n = 50 * 200
    # Binomial(10000, 0.3): 6 standard deviations
    assert abs(total - 0.3 * n) < 6 * math.sqrt(n * 0.3 * 0.7)


def test_blocks_are_uniform_over_the_parts_and_absent_without_split() -> None:
    config = _config(clients=40, rounds=50, sampler="poisson", q=0.5, subnetwork="split:4")
    blocks = Counter(b for r in ClientSelector(config, seed=8) for b in r.blocks)
    total = sum(blocks.values())
    assert set(blocks) == {0, 1, 2, 3}
    for count in blocks.values():  # Binomial(total, 1/4): 6 standard deviations
        assert abs(count - total / 4) < 6 * math.sqrt(total * 0.25 * 0.75)
    plain = _config(clients=40, rounds=5, sampler="poisson", q=0.5)
    assert all(set(r.blocks) <= {0} for r in ClientSelector(plain, seed=8))


def test_same_seed_same_rounds_and_blocks() -> None:
    config = _config(clients=12, rounds=8, sampler="balanced", k=2, period=4, subnetwork="split:2")
    assert list(ClientSelector(config, seed=1)) == list(ClientSelector(config, seed=1))
    assert list(ClientSelector(config, seed=1)) != list(ClientSelector(config, seed=2))
