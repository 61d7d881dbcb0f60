"""Run directory of a federated run (DESIGN.md sec. 1).

- ``config.json``: the :class:`asymflow.federated.FederatedConfig`;
- ``metrics.jsonl``: one JSON line per round (round 0 is the initial model): test accuracy on
  the server's test split and the certified client-level epsilon so far;
- ``ledger.sqlite``: one row per Poisson round or BIS pass, written before its release;
- ``ckpt/round{N}.pt``: the global model after round N, the latest completed round (written
  atomically after that round's metrics row; ``--resume`` continues from it);
- ``ckpt/final.pt``: the final global model (a released object);
- ``result.json``, ``report.md`` and ``report.png``.

Nothing computed on client data is stored: no training loss, and not the number of clients that
took part in a round (under add/remove of a client that count reveals presence; only the noisy
models are covered by the accounting).
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asymflow.federated.config import FederatedConfig
from asymflow.runfiles import (
    CONFIG_FILE,
    METRICS_FILE,
    JsonFields,
    append_metrics,
    atomic_write_bytes,
    atomic_write_json,
    check_resumable,
    read_metrics,
    write_metrics,
)
from asymflow.runfiles import read_config as _read_config

__all__ = [
    "CONFIG_FILE",
    "FINAL_CHECKPOINT",
    "METRICS_FILE",
    "RESULT_FILE",
    "FederatedResult",
    "append_metrics",
    "atomic_write_json",
    "check_resumable",
    "latest_round",
    "load_round",
    "read_config",
    "read_metrics",
    "read_result",
    "save_final_model",
    "save_round",
    "truncate_metrics",
]

RESULT_FILE = "result.json"
CKPT_DIR = "ckpt"
FINAL_CHECKPOINT = Path(CKPT_DIR) / "final.pt"
_ROUND_NAME = re.compile(r"round(\d+)\.pt")


@dataclass(frozen=True)
class FederatedResult(JsonFields):
    """Summary of a federated run; ``epsilon`` is the client-level epsilon recomputed from the
    ledger (the source of truth) at ``delta``."""

    run_dir: str
    sigma: float
    epsilon: float
    delta: float
    method: str
    test_acc: float
    rounds: int
    clients: int
    expected_clients: float
    sampler: str
    subnetwork: str
    accounting: str
    calibrated: bool
    seconds: float
    metrics: list[dict[str, Any]] = field(default_factory=list)


def read_config(run_dir: str | os.PathLike[str]) -> FederatedConfig:
    """``config.json`` of a federated run directory."""
    return _read_config(run_dir, FederatedConfig.from_dict)


def read_result(run_dir: str | os.PathLike[str]) -> FederatedResult:
    """``result.json`` of a finished federated run."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"run_dir must hold a finished run ({RESULT_FILE}), got {run_dir}")
    return FederatedResult.from_dict(json.loads(path.read_text()))


def save_final_model(
    run_dir: Path, weights: dict[str, torch.Tensor], config: FederatedConfig
) -> Path:
    """Write ``ckpt/final.pt`` (weights and config) atomically."""
    buffer = io.BytesIO()
    torch.save({"model": weights, "config": config.to_dict()}, buffer)
    path = run_dir / FINAL_CHECKPOINT
    atomic_write_bytes(path, buffer.getvalue())
    return path


def save_round(
    run_dir: Path, server_round: int, weights: dict[str, torch.Tensor], config: FederatedConfig
) -> Path:
    """Write ``ckpt/round{N}.pt`` (the global model after round N) atomically, then delete the
    older rounds' checkpoints."""
    buffer = io.BytesIO()
    torch.save({"round": server_round, "model": weights, "config": config.to_dict()}, buffer)
    path = run_dir / CKPT_DIR / f"round{server_round}.pt"
    atomic_write_bytes(path, buffer.getvalue())
    for old in path.parent.glob("round*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def latest_round(run_dir: Path) -> tuple[int, Path] | None:
    """(N, path) of the latest ``ckpt/round{N}.pt``, or None."""
    directory = run_dir / CKPT_DIR
    if not directory.is_dir():
        return None
    found = [
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if (match := _ROUND_NAME.fullmatch(path.name))
    ]
    return max(found) if found else None


def load_round(path: Path, config: FederatedConfig) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint written by :func:`save_round` for ``config``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config"] != config.to_dict():
        raise ValueError(f"checkpoint {path} must hold this run's config to resume")
    return dict(state["model"])


def truncate_metrics(run_dir: Path, server_round: int) -> None:
    """Keep the metric rows of rounds <= ``server_round`` (the checkpoint a resume continues
    from), so that a round redone after a crash is listed once."""
    write_metrics(run_dir, [row for row in read_metrics(run_dir) if row["round"] <= server_round])
