"""The ServerApp logic and the real ClientApp in one process, through a Grid that calls the
ClientApp directly (no Ray): sampling per node, the messages' contents, the replies, the
ledger and the run directory."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from asymflow.accounting import BalancedSampled, Gaussian, SelfComposed, best_epsilon
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.federated.client_app import app as client_app
from asymflow.federated.config import FederatedConfig
from asymflow.federated.network import build_network, partition_plan
from asymflow.federated.runs import read_metrics
from asymflow.federated.server_app import serve
from asymflow.federated.strategy import BLOCK_KEY
from tests.federated.direct import DirectGrid, set_task_identity

RDP = ("rdp",)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    set_task_identity(monkeypatch)


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

    population = [907, 13, 450]  # the nodes of partitions 0, 1, 2
    assert grid.queries == 4  # every node was asked for its partition-id, once
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
