"""Which clients take part in each round, and which parameter block each one trains.

Clients are numbered 0..N-1 (the server sorts the connected node ids once and keeps the first
N). The samplers of :mod:`asymflow.sampling` are reused with clients in place of records and
rounds in place of steps:

- Poisson(q): :class:`asymflow.sampling.PoissonSampler` over N clients for R rounds; each
  client joins each round independently with probability q.
- Balanced Iteration Subsampling BIS(k, T): :class:`asymflow.sampling.BalancedIterationSampler`
  over N clients with T = ``period`` rounds per pass; every client joins exactly k rounds of
  every pass, a uniformly random k-subset, independently of the other clients (Dong, Chen,
  Ozgur, ICML 2025, arXiv 2503.03043). R rounds use the first R batches of ceil(R/T) passes.

Random subnetworks (Dong, Chen, Ozgur 2025, Sec. 3): every sampled client of every round gets
a block b ~ U{0..d-1}, independent of everything else. The sampling and the blocks come from a
secret seed; the accounting assumes the adversary does not know them.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from asymflow.federated.config import FederatedConfig
from asymflow.sampling import BalancedIterationSampler, PoissonSampler

__all__ = ["ClientSelector", "RoundAssignment"]


@dataclass(frozen=True, slots=True)
class RoundAssignment:
    """Round ``round`` (1-based): the sampled ``clients`` (sorted) and each one's ``blocks``."""

    round: int
    clients: tuple[int, ...]
    blocks: tuple[int, ...]


class ClientSelector:
    """Iterates over the R rounds of ``config``: one :class:`RoundAssignment` per round.

    ``seed`` = None draws a secret seed from the OS (the production setting).
    """

    def __init__(self, config: FederatedConfig, *, seed: int | None = None) -> None:
        self.config = config
        seed = secrets.randbits(63) if seed is None else int(seed)
        n = config.clients
        self.sampler: PoissonSampler | BalancedIterationSampler
        if config.sampler == "poisson":
            self.sampler = PoissonSampler(n, config.rate, config.rounds, seed=seed)
        else:
            self.sampler = BalancedIterationSampler(
                n, config.k, config.period, seed=seed, passes=config.passes
            )
        # Blocks come from their own stream, so the sampled sets do not depend on d.
        self._blocks = torch.Generator().manual_seed((seed ^ 0x9E3779B97F4A7C15) & (2**63 - 1))

    def __iter__(self) -> Iterator[RoundAssignment]:
        parts = self.config.parts
        batches = iter(self.sampler)
        for r in range(1, self.config.rounds + 1):
            clients = tuple(sorted(next(batches)))
            if parts > 1:
                drawn = torch.randint(0, parts, (len(clients),), generator=self._blocks)
                blocks = tuple(int(b) for b in drawn)
            else:
                blocks = (0,) * len(clients)
            yield RoundAssignment(r, clients, blocks)

    def __len__(self) -> int:
        return self.config.rounds
