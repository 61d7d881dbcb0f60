"""A Flower strategy wrapper for client-level DP with random subnetworks and our sampling.

:class:`ClientLevelDp` composes around a Flower ``Strategy`` (normally ``FedAvg``) instead of
forking it: the wrapped strategy still waits for the nodes, builds the training messages and
runs evaluation; the wrapper changes which nodes get a message, adds each one's block to its
config, and replaces the aggregation of the replies by the private one of
:mod:`asymflow.federated.aggregate`, with the ledger written first.

Why not Flower's ``DifferentialPrivacyServerSideFixedClipping`` (flwr 1.41)? It clips each
client's model update to C and adds N(0, (sigma C / n)^2) to every coordinate of the wrapped
strategy's aggregate, n = ``num_sampled_clients``; noise on all coordinates is what we need.
But the aggregate it noises is FedAvg's mean over the REALIZED replies, weighted by the
example counts the clients report, so (1) with Poisson or BIS sampling the denominator is the
realized number of clients, which changes with the presence of a client, instead of the fixed
expected number (McMahan et al. 2018 use the fixed qW); (2) unequal reported weights change the
sensitivity (its accounted mode therefore demands equal weights), and the count itself is a
client-data statistic we do not want sent; (3) a round in which no client was sampled yields
no aggregate, hence no noisy release, which reveals the empty round; (4) its accountant only
supports ``no-amplification`` sampling; and (5) it cannot mask an update to the block the
server assigned. So a small wrapper does the aggregation itself and composes around FedAvg for
the rest.

Evaluation on clients' data is off (the wrapped FedAvg gets ``fraction_evaluate=0``): client
metrics would be releases the ledger does not cover. The server evaluates on its test split.

Determinism and resume: before the first round the server asks every node for its
``partition-id`` (a query message; the node's public config, nothing computed on its data)
and numbers the clients by it, so client i is the same data shard in every session whatever
node ids the runtime draws. Updates are summed in client order, and the noise of round r comes
from (noise seed, r). A run resumed after round c (``first_round = c + 1``: Flower's round 1 is
round c + 1) therefore redoes rounds c+1.. exactly as an uninterrupted run would when both
seeds are fixed; with the seeds None every session draws new secret ones.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy
from flwr.supercore import log

from asymflow.accounting.best import EpsilonReport
from asymflow.dpsgd.partition import PartitionPlan
from asymflow.federated.aggregate import (
    ClientUpdate,
    InvalidUpdateError,
    apply_update,
    check_update,
    noisy_mean_update,
)
from asymflow.federated.config import FederatedConfig
from asymflow.federated.privacy import ClientLevelAccountant
from asymflow.federated.selection import ClientSelector, RoundAssignment

__all__ = [
    "ARRAYS_KEY",
    "BLOCK_KEY",
    "CONFIG_KEY",
    "PARTITION_KEY",
    "ROUND_KEY",
    "UPDATE_KEY",
    "ClientLevelDp",
    "arrays_to_weights",
    "round_noise",
    "weights_to_arrays",
]

ARRAYS_KEY = "arrays"
CONFIG_KEY = "config"
UPDATE_KEY = "update"
BLOCK_KEY = "block"
ROUND_KEY = "server-round"
PARTITION_KEY = "partition-id"


def round_noise(noise_seed: int | None, server_round: int) -> torch.Generator:
    """The generator of round ``server_round``'s noise: seeded from (noise_seed, round) by
    numpy's SeedSequence, so a redone round draws what it drew the first time; from the OS's
    secure source when ``noise_seed`` is None."""
    if noise_seed is None:
        return torch.Generator().manual_seed(secrets.randbits(63))
    (seed,) = np.random.SeedSequence((noise_seed, server_round)).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(seed))


def weights_to_arrays(weights: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Named tensors as an ``ArrayRecord`` (order kept)."""
    return ArrayRecord(torch_state_dict={n: t.detach().cpu() for n, t in weights.items()})


def arrays_to_weights(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Inverse of :func:`weights_to_arrays` (float32 copies)."""
    return {
        n: torch.from_numpy(np.array(a.numpy(), dtype=np.float32, copy=True))
        for n, a in record.items()
    }


class ClientLevelDp(Strategy):
    """Client-level DP wrapper around ``strategy`` (see the module docstring).

    ``selector`` gives the sampled clients and their blocks per round; ``plan`` the blocks;
    ``accountant`` writes the ledger. ``client_config`` is merged into every training config
    (it must hold nothing secret: no seeds). ``noise_seed`` seeds the server's secret noise
    (:func:`round_noise`). ``first_round`` is the run's round number of Flower's round 1 (> 1
    when resuming). The population is the first ``config.clients`` nodes ordered by their
    reported partition-id (then node id), fixed at the first round.
    """

    def __init__(
        self,
        strategy: FedAvg,
        *,
        config: FederatedConfig,
        sigma: float,
        plan: PartitionPlan,
        selector: ClientSelector,
        accountant: ClientLevelAccountant,
        noise_seed: int | None,
        client_config: Mapping[str, Any],
        first_round: int = 1,
    ) -> None:
        super().__init__()
        if not isinstance(strategy, FedAvg):
            raise TypeError(f"strategy must be a FedAvg, got {type(strategy).__name__}")
        if strategy.fraction_evaluate != 0.0:
            raise ValueError(
                "strategy must have fraction_evaluate=0: client-side evaluation metrics are "
                "not covered by the client-level accounting"
            )
        self.strategy = strategy
        self.config = config
        self.sigma = float(sigma)
        self.plan = plan
        self.accountant = accountant
        self.noise_seed = noise_seed
        self.client_config = dict(client_config)
        for secret in ("sampler-seed", "noise-seed"):
            if secret in self.client_config:
                raise ValueError(f"client_config must not hold the secret {secret!r}")
        if isinstance(first_round, bool) or not 1 <= first_round <= config.rounds:
            raise ValueError(
                f"first_round must satisfy 1 <= first_round <= rounds={config.rounds}, "
                f"got first_round={first_round!r}"
            )
        self.first_round = first_round
        self._rounds: Iterator[RoundAssignment] = islice(selector, first_round - 1, None)
        self._population: list[int] | None = None
        self._assigned: dict[int, int] = {}
        self._current: dict[str, torch.Tensor] = {}
        self._shapes: dict[str, torch.Size] = {}
        self.last_epsilon: EpsilonReport | None = None
        self.dropped_replies = 0

    def __repr__(self) -> str:
        return f"ClientLevelDp({self.strategy!r}, sigma={self.sigma:.4g}, C={self.config.clip})"

    def summary(self) -> None:
        """Log the DP settings, then the wrapped strategy's summary."""
        c = self.config
        log(INFO, "\t├──> Client-level DP (asymflow):")
        log(
            INFO,
            "\t│\t├── sampler: %s, rate %.4g, expected clients %.4g",
            c.sampler,
            c.rate,
            c.expected_clients,
        )
        log(INFO, "\t│\t├── subnetwork: %s", c.subnetwork)
        log(INFO, "\t│\t└── noise multiplier %.4g, clip %.4g", self.sigma, c.clip)
        self.strategy.summary()

    @property
    def population(self) -> list[int]:
        """The node ids of clients 0..N-1 (empty before the first round)."""
        return list(self._population or [])

    def _order_population(self, grid: Grid, nodes: list[int]) -> list[int]:
        """``nodes`` ordered by the partition-id each reports (then by node id; a node that
        does not answer goes last), so client numbers do not depend on the runtime's ids."""
        queries = [
            Message(
                content=RecordDict({CONFIG_KEY: ConfigRecord({})}),
                dst_node_id=node,
                message_type=MessageType.QUERY,
                group_id="population",
            )
            for node in nodes
        ]
        reported: dict[int, float] = {}
        for reply in grid.send_and_receive(queries, timeout=self.config.round_timeout):
            if reply.has_error() or CONFIG_KEY not in reply.content.config_records:
                continue
            value = reply.content.config_records[CONFIG_KEY].get(PARTITION_KEY)
            if isinstance(value, int) and not isinstance(value, bool):
                reported[int(reply.metadata.src_node_id)] = value
        return sorted(nodes, key=lambda n: (reported.get(n, math.inf), n))

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The wrapped strategy's messages, kept for the sampled clients only, each with its
        block and the run's round number in the config."""
        base = list(self.strategy.configure_train(server_round, arrays, config, grid))
        run_round = self.first_round + server_round - 1
        if self._population is None:
            nodes = sorted({int(m.metadata.dst_node_id) for m in base})
            if len(nodes) < self.config.clients:
                raise RuntimeError(
                    f"need {self.config.clients} connected nodes (clients), got {len(nodes)}"
                )
            self._population = self._order_population(grid, nodes)[: self.config.clients]
        assignment = next(self._rounds)
        if assignment.round != run_round:
            raise RuntimeError(
                f"rounds must run in order: expected round {assignment.round}, got {run_round}"
            )
        self._current = arrays_to_weights(arrays)
        self._shapes = {n: t.shape for n, t in self._current.items()}
        if set(self._shapes) != set(self.plan.names):
            raise ValueError("arrays must hold exactly the model's parameters")
        inherited: dict[str, Any] = {}
        if base:
            inherited = dict(base[0].content[self.strategy.configrecord_key])
        self._assigned = {}
        messages = []
        for client, block in zip(assignment.clients, assignment.blocks, strict=True):
            node = self._population[client]
            self._assigned[node] = block
            record = ConfigRecord(
                {**inherited, **self.client_config, BLOCK_KEY: block, ROUND_KEY: run_round}
            )
            content = RecordDict({self.strategy.arrayrecord_key: arrays, CONFIG_KEY: record})
            messages.append(
                Message(
                    content=content,
                    dst_node_id=node,
                    message_type=MessageType.TRAIN,
                    group_id=str(run_round),
                )
            )
        return messages

    def _updates(self, replies: Iterable[Message]) -> list[ClientUpdate]:
        """The usable updates, in client order (a fixed order of the floating-point sum)."""
        updates: dict[int, ClientUpdate] = {}
        for message in replies:
            node = int(message.metadata.src_node_id)
            if message.has_error() or node not in self._assigned or node in updates:
                self.dropped_replies += 1
                continue
            try:
                record = message.content.array_records[UPDATE_KEY]
                update = ClientUpdate(self._assigned[node], arrays_to_weights(record))
                check_update(update, self.plan, self._shapes)
            except (KeyError, TypeError, ValueError, InvalidUpdateError) as err:
                log(WARNING, "dropping an unusable client update (counted as zero): %s", err)
                self.dropped_replies += 1
                continue
            updates[node] = update
        order = {node: i for i, node in enumerate(self.population)}
        return [updates[node] for node in sorted(updates, key=order.__getitem__)]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Ledger row first, then w + eta * (sum of masked clipped updates + noise) / m."""
        run_round = self.first_round + server_round - 1
        updates = self._updates(replies)
        self.accountant.before_release(run_round)  # write-ahead, before any release
        mean = noisy_mean_update(
            updates,
            self.plan,
            self._shapes,
            clip=self.config.clip,
            sigma=self.sigma,
            expected_clients=self.config.expected_clients,
            generator=round_noise(self.noise_seed, run_round),
        )
        weights = apply_update(self._current, mean, server_lr=self.config.server_lr)
        self.accountant.after_release()
        self.last_epsilon = self.accountant.epsilon()
        self._assigned = {}
        return weights_to_arrays(weights), MetricRecord({"epsilon": self.last_epsilon.epsilon})

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Delegated (no client-side evaluation: the wrapped FedAvg has fraction 0)."""
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Delegated."""
        return self.strategy.aggregate_evaluate(server_round, replies)
