"""``serve(..., resume=True)`` in one process (the real ClientApp through DirectGrid, no Ray):
a run cut after a round's release but before its checkpoint continues from the last completed
round, equals an uninterrupted run bit for bit with fixed seeds, and its ledger keeps the cut
round's row (one extra Poisson round, or one extra BIS pass)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import SelfComposed
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.federated import runs, server_app
from asymflow.federated.client_app import app as client_app
from asymflow.federated.config import FederatedConfig
from asymflow.federated.privacy import block_event
from asymflow.federated.runs import FINAL_CHECKPOINT, latest_round, read_metrics
from asymflow.federated.server_app import serve
from asymflow.runfiles import SAMPLING_NOISE_SEEDS
from tests.federated.direct import DirectGrid, set_task_identity

NODES = [907, 13, 450, 77]
BASE = FederatedConfig(
    data="synthetic:30",
    clients=3,
    rounds=4,
    subnetwork="split:2",
    sigma=1.0,
    methods=("rdp",),
    batch_size=8,
    sampler_seed=123,
    noise_seed=456,
)


class CutError(Exception):
    """Stands for the kill."""


def _final(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / FINAL_CHECKPOINT, weights_only=True)["model"]


def _ledger_events(run: Path) -> list[object]:
    with PrivacyLedger(run / "ledger.sqlite") as ledger:
        return [e.event for e in ledger.entries()]


@pytest.mark.parametrize(
    ("config", "cut", "extra"),
    [
        (replace(BASE, q=0.5), 2, 1),  # Poisson: round 2 redone, its row twice
        # BIS, cut in the middle of pass 1: the resumed process records a pass of its own.
        (replace(BASE, sampler="balanced", k=1, period=2), 2, 1),
    ],
    ids=["poisson", "balanced-mid-pass"],
)
def test_a_run_cut_before_its_checkpoint_resumes_to_the_uninterrupted_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: FederatedConfig, cut: int, extra: int
) -> None:
    set_task_identity(monkeypatch)
    whole = serve(DirectGrid(client_app, NODES), config, tmp_path / "whole")

    save = runs.save_round

    def save_or_die(run_dir: Path, server_round: int, *args: object) -> Path:
        if server_round == cut:
            raise CutError  # released and in metrics.jsonl, not yet checkpointed
        return save(run_dir, server_round, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(server_app, "save_round", save_or_die)
    run = tmp_path / "run"
    with pytest.raises(CutError):
        serve(DirectGrid(client_app, list(reversed(NODES))), config, run)
    assert latest_round(run) is not None and latest_round(run)[0] == cut - 1  # type: ignore[index]
    assert [m["round"] for m in read_metrics(run)] == list(range(cut + 1))
    with pytest.raises(FileExistsError, match="run_dir already holds a run"):
        serve(DirectGrid(client_app, NODES), config, run)
    monkeypatch.setattr(server_app, "save_round", save)
    resumed = serve(DirectGrid(client_app, NODES), config, run, resume=True)

    final, reference = _final(run), _final(tmp_path / "whole")
    assert all(torch.equal(final[n], reference[n]) for n in reference)
    got, want = read_metrics(run), read_metrics(tmp_path / "whole")
    assert [(m["round"], m["test_acc"]) for m in got] == [(m["round"], m["test_acc"]) for m in want]
    events = _ledger_events(run)
    assert len(events) == len(_ledger_events(tmp_path / "whole")) + extra
    assert set(events) == {block_event(config, 1.0)}
    spent = best_epsilon(
        SelfComposed(block_event(config, 1.0), len(events)), config.delta, ("rdp",)
    )
    assert resumed.epsilon == pytest.approx(spent.epsilon, rel=1e-12)
    assert resumed.epsilon > whole.epsilon  # over-counts by the cut work, never under-counts
    again = serve(DirectGrid(client_app, NODES), config, run, resume=True)
    assert again.epsilon == resumed.epsilon  # a finished run is summarized, not rerun
    assert len(_ledger_events(run)) == len(events)


def test_resume_refuses_another_config_and_half_fixed_seeds(tmp_path: Path) -> None:
    half = replace(BASE, noise_seed=None)
    runs.atomic_write_json(tmp_path / "config.json", half.to_dict())
    with pytest.raises(ValueError, match=r"differing fields: \['noise_seed'\]"):
        runs.check_resumable(tmp_path, BASE, True, seed_pair=SAMPLING_NOISE_SEEDS)
    with pytest.raises(ValueError, match="sampler_seed and noise_seed must both be set"):
        runs.check_resumable(tmp_path, half, True, seed_pair=SAMPLING_NOISE_SEEDS)
    assert runs.check_resumable(tmp_path / "new", half, True) is False
