"""The ServerApp logic and the real ClientApp in one process, through a Grid that calls the
ClientApp directly (no Ray): sampling per node, the messages' contents, the replies, the
ledger and the run directory."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from asymflow.accounting import BalancedSampled, Gaussian, SelfComposed, best_epsilon
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.federated.client_app import app as client_app
from asymflow.federated.config import FederatedConfig
from asymflow.federated.network import build_network, partition_plan
from asymflow.federated.runs import read_metrics
from asymflow.federated.server_app import serve
from asymflow.federated.strategy import BLOCK_KEY, CONFIG_KEY, UPDATE_KEY

RDP = ("rdp",)


class DirectGrid(Grid):
    """A Grid whose nodes run ``app`` in this process; it records every exchange (one call
    per round for training, then one for client evaluation, which is always empty here)."""

    def __init__(self, app: ClientApp, node_ids: list[int]) -> None:
        self.app = app
        self.node_ids = node_ids
        self.calls: list[list[tuple[int, dict[str, Any], set[str]]]] = []

    def set_run(self, run: Any) -> None:  # pragma: no cover - unused
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover - unused
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        replies, exchanged = [], []
        partition = {node: i for i, node in enumerate(self.node_ids)}
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = message.metadata.dst_node_id
            context = Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": partition[node], "num-partitions": len(partition)},
                state=RecordDict(),
                run_config={},
            )
            reply = self.app(message, context)
            assert reply.metadata.src_node_id == node
            config = dict(message.content.config_records[CONFIG_KEY])
            exchanged.append((node, config, set(reply.content.array_records[UPDATE_KEY])))
            replies.append(reply)
        self.calls.append(exchanged)
        return replies


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages need the process's task identity, which Flower's runtimes set."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)


@pytest.mark.usefixtures("task_identity")
def test_balanced_split_run_in_process_samples_accounts_and_masks(tmp_path: Path) -> None:
    config = FederatedConfig(
        data="synthetic:30",
        clients=3,
        rounds=4,
        sampler="balanced",
        k=1,
        period=2,
        subnetwork="split:2",
        sigma=1.0,
        methods=RDP,
        batch_size=8,
        sampler_seed=123,
        noise_seed=456,
    )
    grid = DirectGrid(client_app, node_ids=[907, 13, 450, 77])  # one node more than needed
    result = serve(grid, config, tmp_path / "run")

    population = [13, 77, 450]  # the first three sorted node ids
    assert len(grid.calls) == 8 and grid.calls[1::2] == [[]] * 4  # no client evaluation
    rounds = grid.calls[::2]
    for p in range(2):  # BIS over rounds: each client in exactly one round of each pass
        nodes = Counter(n for r in rounds[2 * p : 2 * p + 2] for n, _, _ in r)
        assert nodes == Counter({n: 1 for n in population})
    model = build_network(config, num_classes=10, in_channels=3)
    blocks = partition_plan(model, config).blocks
    for exchanged in rounds:
        for _node, sent, replied_names in exchanged:
            assert "sampler-seed" not in sent and "noise-seed" not in sent
            assert replied_names == set(blocks[int(sent[BLOCK_KEY])])

    want = best_epsilon(SelfComposed(BalancedSampled(1, 2, Gaussian(1.0)), 2), config.delta, RDP)
    assert result.epsilon == pytest.approx(want.epsilon, rel=1e-12)
    assert result.accounting.startswith("split:2 with balanced sampling")
    run = tmp_path / "run"
    metrics = read_metrics(run)
    assert [m["round"] for m in metrics] == [0, 1, 2, 3, 4]
    assert metrics[-1]["epsilon"] == pytest.approx(want.epsilon, rel=1e-12)
    assert metrics[1]["epsilon"] == metrics[2]["epsilon"]  # a started pass counts in full
    with PrivacyLedger(run / "ledger.sqlite") as ledger:
        assert [e.event for e in ledger.entries()] == [BalancedSampled(1, 2, Gaussian(1.0))] * 2
    for name in ("config.json", "result.json", "report.md", "report.png", "ckpt/final.pt"):
        assert (run / name).is_file(), name
    assert json.loads((run / "result.json").read_text())["epsilon"] == result.epsilon
