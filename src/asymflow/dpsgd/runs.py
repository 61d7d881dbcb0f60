"""DP-SGD run configuration and run-directory files.

A run directory holds (DESIGN.md sec. 1): ``config.json`` (:class:`DpsgdConfig`),
``metrics.jsonl`` (one row per epoch: test accuracy and the ledger's certified epsilon so
far), ``ledger.sqlite`` (one row per BIS pass or Poisson epoch, written before its first
update), ``ckpt/epoch{N}.pt`` (the latest epoch's model, optimizer and accountant state,
written after that epoch's metrics row; a resume continues from it) and ``result.json``. No
metric is computed on the private training data: a training loss or batch size would be a
release the ledger does not cover.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asymflow.accounting.best import CERTIFIED_METHODS, DEFAULT_METHODS
from asymflow.dpsgd.partition import UNITS, PartitionSpec
from asymflow.runfiles import (
    CONFIG_FILE,
    METRICS_FILE,
    append_metrics,
    atomic_write_bytes,
    atomic_write_json,
    check_choice,
    check_int,
    check_noise,
    check_number,
    config_from_dict,
    config_to_dict,
    read_metrics,
    write_metrics,
)
from asymflow.runfiles import read_config as _read_config

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "MODELS",
    "RESULT_FILE",
    "SAMPLERS",
    "DpsgdConfig",
    "append_metrics",
    "atomic_write_json",
    "latest_checkpoint",
    "load_checkpoint",
    "read_config",
    "read_metrics",
    "save_checkpoint",
    "truncate_metrics",
]

RESULT_FILE = "result.json"
CKPT_DIR = "ckpt"
SAMPLERS: tuple[str, ...] = ("balanced", "poisson", "shuffle")
MODELS: tuple[str, ...] = ("resnet20", "resnet18", "resnet34")
NORMS: tuple[str, ...] = ("group", "batch")
_CKPT_NAME = re.compile(r"epoch(\d+)\.pt")


@dataclass(frozen=True)
class DpsgdConfig:
    """Everything that defines a DP-SGD run; the defaults fit the digits demo on a CPU.

    Sampling: ``sampler="balanced"`` is BIS(k, T) with T = ``steps`` steps per pass (default
    round(k N / batch_size)); ``"poisson"`` uses q (default k/T) for T steps per epoch;
    ``"shuffle"`` is refused at run time (no certified bound). Every update divides the noisy
    gradient sum by ``batch_size`` (declared, public), never by the expected or the realized
    batch size. Either ``sigma`` or ``target_epsilon`` (at ``delta``, for all ``epochs``) must
    be given. ``clip`` is C (the split part's C with partial splitting), ``shared_clip`` is
    C_shared (default ``clip``).
    ``partition`` is ``none``, ``split:d`` or ``dropout:0.5``; ``shared`` lists parameter-name
    prefixes that every record updates. ``sampler_seed``/``noise_seed`` = None (production)
    draw from the OS's secure source and are never stored; the sampling and the noise must
    stay secret for the guarantee to hold.
    """

    data: str = "digits"
    model: str = "resnet20"
    width: float = 0.25
    norm: str = "group"
    sampler: str = "balanced"
    k: int = 1
    steps: int | None = None
    batch_size: int = 64
    q: float | None = None
    epochs: int = 5
    sigma: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    clip: float = 1.0
    shared_clip: float | None = None
    partition: str = "none"
    shared: tuple[str, ...] = ()
    partition_unit: str = "layer"
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0
    augment: bool = False
    eval_batch_size: int = 256
    seed: int = 0
    sampler_seed: int | None = None
    noise_seed: int | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    threads: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be a data spec such as 'digits', got {self.data!r}")
        check_choice("model", self.model, MODELS)
        check_choice("norm", self.norm, NORMS)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("partition_unit", self.partition_unit, UNITS)
        check_number("width", self.width, 0.0, 16.0, open_low=True)
        check_int("k", self.k, 1)
        if self.steps is not None:
            check_int("steps", self.steps, 1)
            if self.k > self.steps:
                raise ValueError(
                    f"k must satisfy 1 <= k <= steps, got k={self.k}, steps={self.steps}"
                )
        check_int("batch_size", self.batch_size, 1)
        if self.q is not None:
            check_number("q", self.q, 0.0, 1.0, open_low=True)
            if self.sampler != "poisson":
                raise ValueError(f"q applies to sampler 'poisson' only, got sampler={self.sampler}")
        check_int("epochs", self.epochs, 1)
        check_noise(self.sigma, self.target_epsilon, self.delta, self.clip)
        if self.shared_clip is not None:
            check_number("shared_clip", self.shared_clip, 0.0, 1e6, open_low=True)
        PartitionSpec.parse(self.partition)
        object.__setattr__(self, "shared", tuple(self.shared))
        if any(not isinstance(s, str) or not s for s in self.shared):
            raise ValueError(f"shared must list non-empty name prefixes, got {self.shared!r}")
        if self.shared and PartitionSpec.parse(self.partition).kind == "none":
            raise ValueError("shared parameters need partition 'split:d' or 'dropout:0.5'")
        check_number("lr", self.lr, 0.0, 100.0, open_low=True)
        check_number("momentum", self.momentum, 0.0, 0.999)
        check_number("weight_decay", self.weight_decay, 0.0, 1.0)
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be a bool, got augment={self.augment!r}")
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("seed", self.seed, 0)
        for name in ("sampler_seed", "noise_seed"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0)
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.methods or any(m not in CERTIFIED_METHODS for m in self.methods):
            raise ValueError(
                f"methods must be a non-empty subset of {sorted(CERTIFIED_METHODS)}, "
                f"got methods={self.methods!r}"
            )
        check_int("threads", self.threads, 1)

    @property
    def partition_spec(self) -> PartitionSpec:
        """The parsed ``partition``."""
        return PartitionSpec.parse(self.partition)

    def steps_for(self, num_samples: int) -> int:
        """T, the steps per pass or epoch: ``steps``, else max(k, round(k N / batch_size))."""
        if self.steps is not None:
            return self.steps
        return max(self.k, round(self.k * num_samples / self.batch_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DpsgdConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        return config_from_dict(cls, data)


def read_config(run_dir: str | os.PathLike[str]) -> DpsgdConfig:
    """``config.json`` of a run directory."""
    return _read_config(run_dir, DpsgdConfig.from_dict)


def save_checkpoint(run_dir: Path, epoch: int, state: Mapping[str, Any]) -> Path:
    """Write ``ckpt/epoch{epoch}.pt`` atomically and delete older epochs' checkpoints."""
    directory = run_dir / CKPT_DIR
    path = directory / f"epoch{epoch}.pt"
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    for old in directory.glob("epoch*.pt"):
        if old != path:
            old.unlink(missing_ok=True)
    return path


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[int, Path] | None:
    """(epoch, path) of the latest ``ckpt/epoch{N}.pt``, or None."""
    directory = Path(run_dir) / CKPT_DIR
    if not directory.is_dir():
        return None
    found = [
        (int(match.group(1)), path)
        for path in directory.iterdir()
        if (match := _CKPT_NAME.fullmatch(path.name))
    ]
    return max(found) if found else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def truncate_metrics(run_dir: Path, epoch: int) -> None:
    """Keep the metric rows of epochs <= ``epoch`` (the checkpoint a resume continues from), so
    that an epoch redone after a crash is listed once."""
    write_metrics(run_dir, [row for row in read_metrics(run_dir) if row["epoch"] <= epoch])
