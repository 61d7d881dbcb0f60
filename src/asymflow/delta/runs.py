"""Delta run directories: the configuration, metrics, checkpoints and the release cache.

A run directory holds (DESIGN.md sec. 1):

- ``config.json``: the :class:`DeltaConfig`;
- ``metrics.jsonl``: one JSON object per epoch and stage;
- ``ledger.sqlite``: the privacy ledger (:mod:`asymflow.accounting.ledger`);
- ``ckpt/stage{1,2}_epoch{N}.pt``: checkpoints, written atomically (temp file + ``os.replace``);
- ``released*.npz``: every payload that left the private side, saved right after its release,
  so that a resumed run reuses it instead of releasing again (Niu et al., CVPR 2024,
  arXiv 2312.05264, cache the sanitized residual once); checkpoints refer to these files by
  name and SHA-256 (and their privacy event) instead of embedding them;
- ``result.json``: the final accuracies, epsilon, MACs and traffic.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asymflow.checks import (
    check_bool,
    check_bounded_number,
    check_choice,
    check_delta,
    check_int,
    check_int_pairs,
    check_positive,
)
from asymflow.delta.contract import fold_model_names
from asymflow.models import DEMO_PRIVATE_RANKS, DEMO_PRIVATE_WIDTHS
from asymflow.models.resnet import ARCHS
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
from asymflow.runfiles import write_config as _write_config
from asymflow.settings import setting

__all__ = [
    "BACKBONES",
    "CKPT_DIR",
    "COMBINE_MODES",
    "CONFIG_FILE",
    "LABEL_MODES",
    "METRICS_FILE",
    "PAYLOADS",
    "PREVIEW_FILE",
    "RELEASE_MODES",
    "RESULT_FILE",
    "VARIANTS",
    "DeltaConfig",
    "append_metrics",
    "atomic_write_bytes",
    "atomic_write_json",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "load_release",
    "prune_checkpoints",
    "read_config",
    "read_metrics",
    "release_digest",
    "release_file",
    "save_checkpoint",
    "save_release",
    "truncate_metrics",
    "write_config",
]

RESULT_FILE = "result.json"
PREVIEW_FILE = "preview.npz"
CKPT_DIR = "ckpt"

VARIANTS: tuple[str, ...] = ("delta", "original", "main-only", "naive-dp")
LABEL_MODES: tuple[str, ...] = ("rr", "grad", "clear")
RELEASE_MODES: tuple[str, ...] = ("once", "per-epoch", "padded")
PAYLOADS: tuple[str, ...] = ("full", "channel-mean")
COMBINE_MODES: tuple[str, ...] = ("weighted", "sum")
BACKBONES: tuple[str, ...] = ("frozen", "trained")

_CKPT_NAME = re.compile(r"^stage([12])_epoch(\d+)\.pt$")

# Help panels of the fields' command-line options (asymflow delta train).
_DATA = "Data"
_MODELS = "Decomposition and models"
_TRAINING = "Training"
_PRIVACY = "Privacy"
_RUN = "Run"


@dataclass(frozen=True)
class DeltaConfig(JsonFields):
    """Everything that defines a Delta run; defaults fit the bundled digits demo on a CPU.

    ``data`` is a data spec (``asymflow.data.load_data``); ``image_size`` applies to
    ``digits`` only. Stage 1 runs ``epochs_stage1`` epochs at ``lr``, stage 2
    ``epochs_stage2`` epochs of M_main at ``stage2_lr`` and of M_res at ``public_lr``
    (``original`` trains for the sum of both at ``lr``).

    ``epsilon`` is the target epsilon of the residual release(s) at ``delta`` (``math.inf``:
    sign bits of the raw residual, no noise, recorded as a non-private release);
    ``label_epsilon`` is the epsilon of the labels at ``delta``: of randomized response
    (``labels="rr"``, once), or of all of a record's noisy label gradients over the run
    (``labels="grad"``: M_res learns from softmax(z_res) - y + Gaussian noise, one round trip
    per step); ``labels="clear"`` sends them without noise (epsilon = inf).
    ``augment`` is a random crop with black padding (and a mirror if ``flip``: off by default,
    digits are not mirror-symmetric); ``public_augment`` crops the public side's bit maps too
    (off by default: with few epochs and noisy labels it slows M_res down).
    ``public_folds`` = K > 1 trains K public models, model k on the rows outside fold k, so
    that M_main learns from out-of-fold z_res (cross-fitting, as in stacked generalization,
    Wolpert 1992): z_res of a model on its own training rows is memorized and would teach
    M_main to trust it more than it deserves on new data; at test time z_res is their mean.
    ``public_epochs``: epochs of M_res per stage-2 epoch (the public side is the fast one).

    ``release`` says which views of the training images leave, and M_main's stage 2 trains on
    exactly those views, so that each z_res is added to the z_main of the same input:
    ``"once"``: the un-augmented images, released once (cached, as in the paper);
    ``"per-epoch"``: a fresh augmented view of every image in every stage-2 epoch (the
    reference code's protocol), ``epochs_stage2`` releases per record calibrated jointly;
    ``"padded"``: a fresh view per epoch in ``slots`` padded slots, each record's slot carrying
    its residual in exactly ``sample_k`` of the ``epochs_stage2`` epochs and pure noise in the
    others (:mod:`asymflow.delta.padded`), accounted as balanced sampling. ``slots`` = 0 uses
    the training-set size, which is then treated as public.
    ``payload``: ``"full"`` releases the c x h x w residual, ``"channel-mean"`` its 1 x h x w
    mean over channels (what the reference code sends): the same clip and noise, fewer
    dimensions. ``combine``: ``"weighted"`` predicts z_main + w log_softmax(z_res) with w >= 0
    fitted on the ``holdout`` rows; ``"sum"`` fixes w = 1, i.e. the plain sum z_main + z_res
    (log_softmax shifts a sample's logits by a constant), M_main trained on the combined loss.
    ``holdout``: the fraction of training rows that no private model trains on (either stage,
    every variant), on which w is fitted, so that both heads are out of sample there.
    ``backbone``: ``"frozen"`` keeps M_bb at its seeded initialization (batch norm with its
    initial statistics), a function of the seed only, so that each released residual depends
    on its own record alone and the sanitizer's sensitivity C is the whole story;
    ``"trained"`` trains M_bb in stage 1 as the paper does, but then every residual depends on
    every training record through M_bb's weights, no per-record bound holds, and the run's
    ledger records that as a non-private release (epsilon = inf).
    ``noise_seed=None`` draws the sanitizer and randomized-response noise from the OS's
    secure source; a fixed value makes the run reproducible (tests only).
    """

    variant: str = setting(
        "delta",
        "delta; original (non-private baseline); main-only (M_main alone, nothing leaves); "
        "naive-dp (the whole IR sanitized).",
        _DATA,
        choices=VARIANTS,
    )
    data: str = setting(
        "digits",
        "digits, synthetic[:N], folder:PATH, cifar10:PATH or cifar100:PATH.",
        _DATA,
        metavar="SPEC",
    )
    image_size: int = setting(16, "Side of the digits images (digits only).", _DATA)
    ir_channels: int = setting(
        32, "Channels c of the intermediate representation X (M_bb's output), >= r.", _MODELS
    )
    r: int = setting(8, "Singular triplets kept private, 1 <= r <= ir_channels.", _MODELS)
    t: int = setting(16, "DCT block size t; must divide the image height and width.", _MODELS)
    t_low: int = setting(8, "Low-frequency band t' kept per block, 1 <= t' <= t.", _MODELS)
    private_widths: tuple[int, ...] = setting(
        DEMO_PRIVATE_WIDTHS,
        "Output channels n of M_main's factorized stages.",
        _MODELS,
        metavar="N,N,...",
    )
    private_ranks: tuple[int, ...] = setting(
        DEMO_PRIVATE_RANKS,
        "Kernels q of each factorized conv, one per stage.",
        _MODELS,
        metavar="Q,Q,...",
    )
    public_arch: str = setting(
        "resnet20", "M_res: this network without its stem.", _MODELS, choices=tuple(ARCHS)
    )
    public_width: float = setting(0.5, "Width multiplier of M_res, in [0.001, 16].", _MODELS)
    epochs_stage1: int = setting(
        6, "Stage-1 epochs (M_bb + M_main on the main part), >= 0.", _TRAINING
    )
    epochs_stage2: int = setting(
        6, "Stage-2 epochs (M_main privately, M_res publicly), >= 0.", _TRAINING
    )
    batch_size: int = setting(64, "Training batch size, >= 1.", _TRAINING)
    eval_batch_size: int = setting(256, "Evaluation batch size, >= 1.", _TRAINING)
    lr: float = setting(
        0.05, "Learning rate of stage 1 (and of original), 0 < lr <= 10.", _TRAINING
    )
    stage2_lr: float = setting(0.02, "Learning rate of M_main in stage 2, 0 < lr <= 10.", _TRAINING)
    public_lr: float = setting(0.1, "Learning rate of M_res, 0 < lr <= 10.", _TRAINING)
    public_augment: bool = setting(False, "Random crops of the public side's bit maps.", _TRAINING)
    public_folds: int = setting(
        2,
        "Cross-fitted public models, 1..10 (M_main learns from out-of-fold z_res).",
        _MODELS,
    )
    public_epochs: int = setting(3, "Epochs of M_res per stage-2 epoch, >= 1.", _TRAINING)
    momentum: float = setting(0.9, "SGD momentum, in [0, 0.999].", _TRAINING)
    weight_decay: float = setting(5e-4, "Weight decay, in [0, 1].", _TRAINING)
    alpha: float = setting(
        1e-3, "Kernel-orthogonality weight α of ||WWᵀ-I||², in [0, 100].", _TRAINING
    )
    augment: bool = setting(True, "Random crops (black padding) of the private inputs.", _TRAINING)
    flip: bool = setting(
        False, "Random mirroring too (digits are not mirror-symmetric).", _TRAINING
    )
    epsilon: float = setting(
        1.4,
        "Target ε of the residual release(s), 0 < ε <= inf ('inf': sign bits without noise, "
        "recorded as a non-private release).",
        _PRIVACY,
    )
    delta: float = setting(1e-5, "δ of the releases, 0 < δ < 1.", _PRIVACY)
    clip: float = setting(1.0, "Per-sample L2 clip norm C of the residual, finite > 0.", _PRIVACY)
    label_epsilon: float = setting(
        2.0, "ε of the labels (rr, or all noisy gradients of a record), finite > 0.", _PRIVACY
    )
    labels: str = setting(
        "rr",
        "How labels reach the public side: rr (randomized response, once), grad (noisy "
        "per-step gradients softmax(z_res)-y, one round trip per step), or clear (a "
        "non-private release).",
        _PRIVACY,
        choices=LABEL_MODES,
    )
    release: str = setting(
        "per-epoch",
        "Release the residuals of the un-augmented images once (cached), of a fresh augmented "
        "view every stage-2 epoch, or in padded slots: each record in exactly --sample-k of "
        "the stage-2 epochs, pure noise in the others (accounted as balanced sampling).",
        _PRIVACY,
        choices=RELEASE_MODES,
    )
    sample_k: int = setting(
        1,
        "With --release padded: epochs in which each record's slot carries its residual, "
        "1 <= k <= --epochs-stage2.",
        _PRIVACY,
    )
    slots: int = setting(
        0,
        "With --release padded: slots per epoch, a public constant >= the record count (0: "
        "the record count, then treated as public).",
        _PRIVACY,
    )
    payload: str = setting(
        "full",
        "What is released: the c x h x w residual, or its 1 x h x w mean over channels (same "
        "clip and noise, fewer dimensions).",
        _PRIVACY,
        choices=PAYLOADS,
    )
    combine: str = setting(
        "weighted",
        "Prediction: z_main + w log_softmax(z_res) with w >= 0 fitted on held-out rows, or "
        "the plain sum z_main + z_res.",
        _TRAINING,
        choices=COMBINE_MODES,
    )
    holdout: float = setting(
        0.1,
        "Fraction of training rows no private model trains on (w is fitted there), "
        "0 <= holdout <= 0.5 (> 0 with --combine weighted).",
        _TRAINING,
    )
    backbone: str = setting(
        "frozen",
        "M_bb kept at its seeded initialization (each residual depends on its own record "
        "only), or trained in stage 1 as in the paper (then no per-record bound holds and the "
        "ledger records epsilon = inf).",
        _PRIVACY,
        choices=BACKBONES,
    )
    seed: int = setting(0, "Seed of initialization, shuffling and crops, >= 0.", _RUN)
    noise_seed: int | None = setting(
        None,
        "Seed of the sanitizer and randomized-response noise, for reproducible tests only.",
        _RUN,
        unset="the OS's secure source",
    )
    threads: int = setting(1, "torch threads, >= 1.", _RUN)

    def __post_init__(self) -> None:
        check_choice("variant", self.variant, VARIANTS)
        check_choice("labels", self.labels, LABEL_MODES)
        check_choice("release", self.release, RELEASE_MODES)
        check_choice("payload", self.payload, PAYLOADS)
        check_choice("combine", self.combine, COMBINE_MODES)
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("public_arch", self.public_arch, tuple(ARCHS))
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be a data spec such as 'digits', got {self.data!r}")
        for name in ("image_size", "ir_channels", "r", "t", "t_low", "batch_size"):
            check_int(name, getattr(self, name), 1)
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("epochs_stage1", self.epochs_stage1, 0)
        check_int("epochs_stage2", self.epochs_stage2, 0)
        check_int("seed", self.seed, 0)
        check_int("threads", self.threads, 1)
        check_int("public_folds", self.public_folds, 1)
        check_int("public_epochs", self.public_epochs, 1)
        check_int("slots", self.slots, 0)
        check_int("sample_k", self.sample_k, 1)
        if self.release == "padded":
            if self.sample_k > max(1, self.epochs_stage2):
                raise ValueError(
                    "sample_k must satisfy 1 <= sample_k <= epochs_stage2="
                    f"{self.epochs_stage2}, got sample_k={self.sample_k}"
                )
            if self.labels == "grad":
                raise ValueError(
                    "labels must be 'rr' or 'clear' with release='padded' (a padded slot "
                    "carries its record's label release), got labels='grad'"
                )
        holdout = check_bounded_number("holdout", self.holdout, low=0, high=0.5)
        if self.combine == "weighted" and self.variant == "delta" and holdout == 0:
            raise ValueError(
                "holdout must satisfy 0 < holdout <= 0.5 with combine='weighted' (w is fitted "
                "on held-out rows), got holdout=0"
            )
        if self.public_folds > 10:
            raise ValueError(
                f"public_folds must satisfy 1 <= public_folds <= 10, got {self.public_folds}"
            )
        if self.noise_seed is not None:
            check_int("noise_seed", self.noise_seed, 0)
        if self.t_low > self.t:
            raise ValueError(f"t_low must satisfy 1 <= t_low <= t={self.t}, got {self.t_low}")
        if self.r > self.ir_channels:
            raise ValueError(
                f"r must satisfy 1 <= r <= ir_channels={self.ir_channels}, got r={self.r}"
            )
        object.__setattr__(self, "private_widths", tuple(self.private_widths))
        object.__setattr__(self, "private_ranks", tuple(self.private_ranks))
        check_int_pairs("private_widths", self.private_widths, "private_ranks", self.private_ranks)
        check_bounded_number("public_width", self.public_width, low=1e-3, high=16)
        for name in ("lr", "stage2_lr", "public_lr"):
            check_bounded_number(name, getattr(self, name), low=0, high=10, open_low=True)
        check_bounded_number("momentum", self.momentum, low=0, high=0.999)
        check_bounded_number("weight_decay", self.weight_decay, low=0, high=1)
        check_bounded_number("alpha", self.alpha, low=0, high=100)
        for name in ("augment", "flip", "public_augment"):
            check_bool(name, getattr(self, name))
        eps = check_bounded_number("epsilon", self.epsilon, low=0, open_low=True)
        check_delta("delta", self.delta)
        check_positive("clip", self.clip)
        if self.release == "padded" and math.isinf(eps):
            raise ValueError(
                "epsilon must be finite with release='padded' (padding hides who is sampled "
                "behind noise), got epsilon=inf"
            )
        check_positive("label_epsilon", self.label_epsilon)

    @property
    def releases_residual(self) -> bool:
        """True if the variant sends sanitized representations to the public side."""
        return self.variant in ("delta", "naive-dp")

    @property
    def public_models(self) -> tuple[str, ...]:
        """Names of the public models: one per cross-fitting fold for Delta (the private side
        trains on out-of-fold z_res), a single model for naive-DP (no private training)."""
        return fold_model_names(1 if self.variant == "naive-dp" else self.public_folds)

    @property
    def residual_releases(self) -> int:
        """Number of releases of each training record's residual (1, or one per epoch)."""
        if not self.releases_residual:
            return 0
        return 1 if self.release == "once" else max(1, self.epochs_stage2)

    def replace(self, **changes: Any) -> DeltaConfig:
        """A copy with ``changes`` applied (validated again)."""
        return type(self)(**{**asdict(self), **changes})


# ------------------------------------------------------------------------------ files


def write_config(run_dir: Path, config: DeltaConfig) -> None:
    """Write ``config.json``."""
    _write_config(run_dir, config)


def read_config(run_dir: str | os.PathLike[str]) -> DeltaConfig:
    """Read ``config.json`` of a run directory."""
    return _read_config(run_dir, DeltaConfig.from_dict)


def truncate_metrics(run_dir: Path, stage: int, epoch: int) -> None:
    """Keep only metric rows up to (stage, epoch): the position of the checkpoint resumed from,
    so epochs redone after a crash are not listed twice."""
    rows = [r for r in read_metrics(run_dir) if (r["stage"], r["epoch"]) <= (stage, epoch)]
    write_metrics(run_dir, rows)


def checkpoint_path(run_dir: Path, stage: int, epoch: int) -> Path:
    """``ckpt/stage{stage}_epoch{epoch}.pt``."""
    return run_dir / CKPT_DIR / f"stage{stage}_epoch{epoch}.pt"


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> tuple[int, int, Path] | None:
    """(stage, epoch, path) of the most advanced checkpoint, or None."""
    directory = Path(run_dir) / CKPT_DIR
    found = []
    if directory.is_dir():
        for path in directory.iterdir():
            match = _CKPT_NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), int(match.group(2)), path))
    return max(found) if found else None


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """``torch.save`` to memory, then :func:`atomic_write_bytes`."""
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def prune_checkpoints(run_dir: Path, keep: Iterable[Path]) -> None:
    """Delete the checkpoints not in ``keep`` (the latest one is all a resume needs)."""
    keep_set = {p.resolve() for p in keep}
    directory = run_dir / CKPT_DIR
    if directory.is_dir():
        for path in directory.iterdir():
            if _CKPT_NAME.match(path.name) and path.resolve() not in keep_set:
                path.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ releases


def release_file(run_dir: Path, name: str) -> Path:
    """The file of the cached release ``name``: ``released.npz`` for the training residual,
    ``released_{name}.npz`` otherwise (labels, per-epoch residuals, evaluation queries)."""
    return run_dir / ("released.npz" if name == "train" else f"released_{name}.npz")


def save_release(run_dir: Path, name: str, arrays: Mapping[str, np.ndarray]) -> str:
    """Write a released payload atomically, right after the release; return the SHA-256 of
    the file (what checkpoints refer to instead of embedding the payload)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    atomic_write_bytes(release_file(run_dir, name), payload)
    return hashlib.sha256(payload).hexdigest()


def release_digest(run_dir: Path, name: str) -> str | None:
    """SHA-256 of the cached release file ``name`` (read in chunks), or None if absent."""
    path = release_file(run_dir, name)
    if not path.is_file():
        return None
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def load_release(run_dir: Path, name: str) -> dict[str, np.ndarray] | None:
    """The cached payload ``name``, or None if it was never saved."""
    path = release_file(run_dir, name)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
