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

from asymflow.accounting.best import DEFAULT_METHODS, check_methods
from asymflow.checks import check_bool, check_choice, check_int, check_noise, check_number
from asymflow.dpsgd.partition import UNITS, PartitionSpec
from asymflow.runfiles import (
    CONFIG_FILE,
    METRICS_FILE,
    JsonFields,
    append_metrics,
    atomic_write_bytes,
    atomic_write_json,
    read_metrics,
    write_metrics,
)
from asymflow.runfiles import read_config as _read_config
from asymflow.settings import setting

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

# Help panels of the fields' command-line options (asymflow dpsgd train).
_SAMPLING = "Sampling"
_NOISE = "Noise and partitioning"
_MODEL = "Data and model"
_RUN = "Run"


@dataclass(frozen=True)
class DpsgdConfig(JsonFields):
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

    data: str = setting(
        "digits",
        "digits, synthetic[:N], folder:PATH, cifar10:PATH or cifar100:PATH.",
        _MODEL,
        metavar="SPEC",
    )
    model: str = setting("resnet20", "Network (GroupNorm).", _MODEL, choices=MODELS)
    width: float = setting(0.25, "Width multiplier, in (0, 16].", _MODEL)
    norm: str = "group"
    sampler: str = setting(
        "balanced",
        "balanced (BIS: each record in exactly k of T steps per pass) or poisson (rate q); "
        "shuffle is refused (no certified ε).",
        _SAMPLING,
        choices=SAMPLERS,
    )
    k: int = setting(
        1, "Steps each record joins per pass, 1 <= k <= T (Poisson: q = k/T).", _SAMPLING
    )
    steps: int | None = setting(
        None, "Steps T per pass, >= k.", _SAMPLING, unset="max(k, round(k N / batch size))"
    )
    batch_size: int = setting(
        64, "Expected batch size, used to choose T when --steps is not given.", _SAMPLING
    )
    q: float | None = setting(
        None, "Poisson rate 0 < q <= 1 (--sampler poisson only).", _SAMPLING, unset="k/T"
    )
    epochs: int = setting(5, "Passes over the data, >= 1.", _SAMPLING)
    sigma: float | None = setting(
        None, "Noise multiplier σ in (0, 1e6]. Give --sigma or --target-epsilon.", _NOISE
    )
    target_epsilon: float | None = setting(
        None,
        "Calibrate σ so that the certified ε of all epochs is at most this, in (0, 1e4]. Give "
        "--sigma or --target-epsilon.",
        _NOISE,
    )
    delta: float = setting(1e-5, "Target δ, 0 < δ < 1.", _NOISE)
    clip: float = setting(
        1.0, "Per-sample clip norm C (of the split part with --shared), in (0, 1e6].", _NOISE
    )
    shared_clip: float | None = setting(
        None, "Clip norm of the --shared part, in (0, 1e6].", _NOISE, unset="--clip"
    )
    partition: str = setting(
        "none",
        "Each record updates one of d parameter blocks per step (split:d, d >= 2), or a random "
        "half of the coordinates (dropout:0.5).",
        _NOISE,
        metavar="[none|split:d|dropout:0.5]",
    )
    shared: tuple[str, ...] = setting(
        (),
        "Parameter-name prefix that every record updates (partial splitting); repeat or "
        "comma-separate. Needs --partition split:d or dropout:0.5.",
        _NOISE,
        metavar="PREFIX",
    )
    partition_unit: str = setting(
        "layer", "Blocks are made of whole layers or whole tensors.", _NOISE, choices=UNITS
    )
    lr: float = setting(0.5, "Learning rate, in (0, 100].", _MODEL)
    momentum: float = setting(0.0, "SGD momentum, in [0, 0.999].", _MODEL)
    weight_decay: float = setting(0.0, "Weight decay, in [0, 1].", _MODEL)
    augment: bool = setting(False, "Random crops of the training images.", _MODEL)
    eval_batch_size: int = 256
    seed: int = setting(0, "Seed of the initialization and augmentation, >= 0.", _RUN)
    sampler_seed: int | None = setting(
        None,
        "Seed of the batch sampler, for reproducible tests only.",
        _RUN,
        unset="the OS's secure source",
    )
    noise_seed: int | None = setting(
        None,
        "Seed of the gradient noise, for reproducible tests only.",
        _RUN,
        unset="the OS's secure source",
    )
    methods: tuple[str, ...] = DEFAULT_METHODS
    threads: int = setting(1, "torch threads, >= 1.", _RUN)

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
        check_bool("augment", self.augment)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("seed", self.seed, 0)
        for name in ("sampler_seed", "noise_seed"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0)
        object.__setattr__(self, "methods", check_methods(self.methods))
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
