"""Two-stage Delta training in one process, the public side behind :class:`PublicSide`.

Niu et al., "All Rivers Run to the Sea: Private Learning with Asymmetric Flows", CVPR 2024,
arXiv 2312.05264, Sec. 3.4 (DESIGN.md sec. 3):

- Stage 1: M_bb and M_main learn from the main part only,
  loss = CE(M_main(features(x)), y) + alpha * sum ||A A^T - I||_F^2. Nothing leaves.
- Stage 2: M_bb is frozen; the residuals of the un-augmented training set are sanitized
  (clip C, N(0, sigma^2 C^2), 1 bit) once or every epoch, each release recorded in the ledger
  before it happens; the labels leave once through randomized response. The public side trains
  M_res on (bits, noisy labels) by itself; the private side minimizes
  L(M_main, w) = CE(z_main + w log_softmax(z_res), y) with the true labels and out-of-fold
  z_res = M_res(released bits) (post-processing), by block-coordinate descent: each epoch, once
  the public models have moved, w is fitted exactly for the new z_res and the current M_main
  (w >= 0, starting at 0: the main-only prediction), then M_main takes an SGD epoch with that
  w (continuing from stage 1 at the lower ``stage2_lr``). The prediction is
  z_main + w log_softmax(z_res) with the w that M_main was trained with.

Variants of the same code: ``delta``; ``main-only`` (stage 2 without z_res, nothing leaves);
``naive-dp`` (the whole IR is sanitized at the same epsilon and the prediction is z_res);
``original`` (M_bb + M_res trained as one non-private network, nothing leaves).

A run is one object assembled from its parts: :mod:`~asymflow.delta.run_state` (data, models,
ledger, checkpoints, release cache, evaluation), :mod:`~asymflow.delta.stage1`,
:mod:`~asymflow.delta.releases` (stage 2's release pass) and :mod:`~asymflow.delta.stage2`;
what they are built from is :mod:`~asymflow.delta.builders`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from asymflow.delta.builders import (
    build_original,
    build_private,
    build_public_factory,
    holdout_split,
    input_stats,
    load_run_data,
    payload_view,
)
from asymflow.delta.contract import PublicSide
from asymflow.delta.private import PrivateModel
from asymflow.delta.releases import TRAINED_BACKBONE
from asymflow.delta.run_state import CHECKPOINT_FORMAT, PREDICTION_HEAD
from asymflow.delta.runs import (
    CONFIG_FILE,
    RESULT_FILE,
    DeltaConfig,
    append_metrics,
    atomic_write_json,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    read_config,
    read_metrics,
    save_checkpoint,
    truncate_metrics,
    write_config,
)
from asymflow.delta.stage1 import Stage1
from asymflow.delta.stage2 import Stage2
from asymflow.models import count_macs
from asymflow.progress import EpochBars
from asymflow.runfiles import check_resumable, jsonable
from asymflow.threads import torch_threads

__all__ = [
    "TRAINED_BACKBONE",
    "DeltaConfig",
    "RunResult",
    "build_original",
    "build_private",
    "build_public_factory",
    "fork_stage1",
    "holdout_split",
    "input_stats",
    "load_run_data",
    "payload_view",
    "read_result",
    "train_delta",
]
"""The builders are those of :mod:`asymflow.delta.builders`, kept importable from here."""


# ------------------------------------------------------------------------- result


@dataclass(frozen=True)
class RunResult:
    """Summary of a finished run (also written to ``result.json``)."""

    run_dir: Path
    config: DeltaConfig
    final: dict[str, float | None]
    epsilon: float
    epsilon_method: str
    epsilon_by_method: dict[str, float]
    sigma: float | None
    private_macs: int
    public_macs: int
    bytes_per_sample: int
    energy_fraction: float | None
    seconds: float
    residual_weight: float | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float | None:
        """Test accuracy of the variant's prediction head."""
        return self.final.get(f"test_acc_{PREDICTION_HEAD[self.config.variant]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (:func:`~asymflow.runfiles.jsonable`: "inf" for infinities)."""
        return {
            "run_dir": str(self.run_dir),
            "variant": self.config.variant,
            "config": self.config.to_dict(),
            "final": jsonable(self.final),
            "accuracy": self.accuracy,
            "epsilon": jsonable(self.epsilon),
            "epsilon_method": self.epsilon_method,
            "epsilon_by_method": jsonable(self.epsilon_by_method),
            "delta": self.config.delta,
            "sigma": self.sigma,
            "private_macs": self.private_macs,
            "public_macs": self.public_macs,
            "bytes_per_sample": self.bytes_per_sample,
            "energy_fraction": self.energy_fraction,
            "residual_weight": self.residual_weight,
            "seconds": self.seconds,
        }


# ------------------------------------------------------------------------- the run


class _Run(Stage2, Stage1):
    """One training run: stage 1, the releases, stage 2 and its summary."""

    def result(self, seconds: float) -> RunResult:
        c = self.config
        report = self.ledger.epsilon(c.delta, dataset=c.data, scope="train")
        shape = (self.in_channels, self.height, self.width)
        ir_shape = (c.ir_channels, self.height, self.width)
        if isinstance(self.model, PrivateModel):
            feat = (c.r, self.height * c.t_low // c.t, self.width * c.t_low // c.t)
            bb_macs = count_macs(self.model.backbone, shape)
            private_macs = bb_macs
            if c.variant != "naive-dp":
                private_macs += count_macs(self.model.main, feat)
        else:
            private_macs = count_macs(self.model, shape)
        sent_shape = (1 if c.payload == "channel-mean" else c.ir_channels, *ir_shape[1:])
        public_macs = 0
        if c.releases_residual:
            public_macs = count_macs(build_public_factory(c, self.classes)(), sent_shape)
        last = self.metrics_rows[-1] if self.metrics_rows else {}
        final = {
            k: last.get(k)
            for k in ("test_acc_main", "test_acc_public", "test_acc_combined", "test_acc")
        }
        sigma = self.sigma() if c.releases_residual else None
        energy = None
        weight = None
        if isinstance(self.model, PrivateModel):
            _, energy = self.eval_private()
            if c.variant == "delta":
                weight = self.model.residual_weight.value
        return RunResult(
            run_dir=self.run_dir,
            config=c,
            final=final,
            epsilon=float(report.epsilon),
            epsilon_method=report.method,
            epsilon_by_method=dict(report.by_method),
            sigma=sigma,
            private_macs=private_macs,
            public_macs=public_macs,
            bytes_per_sample=math.ceil(math.prod(sent_shape) / 8) if c.releases_residual else 0,
            energy_fraction=energy,
            seconds=seconds,
            residual_weight=weight,
            metrics=list(self.metrics_rows),
        )


def train_delta(
    config: DeltaConfig,
    run_dir: str | os.PathLike[str],
    *,
    progress: bool = True,
    resume: bool = False,
    public: PublicSide | None = None,
    overlap: bool = True,
) -> RunResult:
    """Train ``config.variant`` into ``run_dir`` (see the module docstring); return the summary.

    ``resume=True`` continues from the latest checkpoint of an existing run with the same
    configuration; cached releases are reused, never released again without a new ledger row.
    ``public`` replaces the in-process :class:`LocalPublic` (e.g. a remote client); with
    ``overlap`` (and a per-epoch or padded release), the private side then prepares each
    stage-2 epoch's release in a second thread while the public side trains on the previous
    one. The result is the same bit for bit; only the wall time changes.
    """
    if not isinstance(config, DeltaConfig):
        raise TypeError(f"config must be a DeltaConfig, got {type(config).__name__}")
    run_dir = Path(run_dir)
    began = time.perf_counter()
    check_resumable(run_dir, config, resume)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, config)
    with torch_threads(config.threads), EpochBars(progress, run_dir.name or config.variant) as bars:
        run = _Run(config, run_dir, public, bars, overlap=overlap)
        try:
            found = latest_checkpoint(run_dir) if resume else None
            state: dict[str, Any] | None = None
            stage, epoch = 1, 0
            if found is not None:
                stage, epoch, path = found
                state = load_checkpoint(path)
                if state.get("format") != CHECKPOINT_FORMAT:
                    raise ValueError(
                        f"checkpoint {path} must have format {CHECKPOINT_FORMAT} to resume, got "
                        f"{state.get('format')} (written by an older version; start a new run)"
                    )
                run.model.load_state_dict(state["model"])
                if run.public is not None and state["public"] is not None:
                    run.public.load_state_dict(state["public"])
                run.restore_references(state["released"])
                torch.set_rng_state(state["rng"]["torch"])
                truncate_metrics(run_dir, stage, epoch)
                run.metrics_rows = read_metrics(run_dir)
            elif resume:
                truncate_metrics(run_dir, 0, 0)
            if stage == 1:
                run.run_stage1(epoch + 1, state)
                if config.variant != "original" and config.epochs_stage2 > 0:
                    run.run_stage2(1, None)
            elif config.variant != "original":
                run.run_stage2(epoch + 1, state)
            result = run.result(time.perf_counter() - began)
            atomic_write_json(run_dir / RESULT_FILE, result.to_dict())
            return result
        finally:
            run.ledger.close()


STAGE2_FIELDS = frozenset(
    {
        "variant",
        "epsilon",
        "delta",
        "clip",
        "label_epsilon",
        "labels",
        "release",
        "sample_k",
        "slots",
        "payload",
        "combine",
        "public_arch",
        "public_width",
        "public_lr",
        "public_augment",
        "public_folds",
        "public_epochs",
        "stage2_lr",
        "epochs_stage2",
        "noise_seed",
    }
)
"""Config fields that do not influence stage 1 (which releases nothing)."""


def fork_stage1(
    source_run_dir: str | os.PathLike[str], run_dir: str | os.PathLike[str], config: DeltaConfig
) -> None:
    """Start a new run from the finished stage 1 of another run with the same stage-1 settings
    (same data, models, seed, epochs): copy the last stage-1 checkpoint and its metric rows,
    then call :func:`train_delta` with ``resume=True``. Stage 1 releases nothing, so the new
    run's ledger starts empty. Used by the demo to train stage 1 once for several variants.
    """
    source = Path(source_run_dir)
    target = Path(run_dir)
    base = read_config(source)
    if "original" in (base.variant, config.variant):
        raise ValueError("variant must use the two-stage pipeline to fork stage 1, not 'original'")
    differ = sorted(
        k for k, v in base.to_dict().items() if k not in STAGE2_FIELDS and config.to_dict()[k] != v
    )
    if differ:
        raise ValueError(f"config must match the source's stage-1 settings; differing: {differ}")
    if (target / CONFIG_FILE).exists():
        raise FileExistsError(f"run_dir already holds a run ({target})")
    src_ckpt = checkpoint_path(source, 1, config.epochs_stage1)
    if not src_ckpt.is_file():
        raise FileNotFoundError(f"source_run_dir must hold a finished stage 1 ({src_ckpt})")
    state = load_checkpoint(src_ckpt)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"source checkpoint {src_ckpt} must have format {CHECKPOINT_FORMAT}, "
            f"got {state.get('format')}"
        )
    state["public"] = None
    state["released"] = {}
    state["config"] = json.dumps(config.to_dict())
    target.mkdir(parents=True, exist_ok=True)
    save_checkpoint(checkpoint_path(target, 1, config.epochs_stage1), state)
    head = PREDICTION_HEAD[config.variant]
    for row in read_metrics(source):
        if row["stage"] == 1:
            row = {**row, "variant": config.variant}
            row["test_acc"] = None if head == "public" else row.get("test_acc_main")
            append_metrics(target, row)
    write_config(target, config)


def read_result(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``result.json`` of a finished run."""
    path = Path(run_dir) / RESULT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"run_dir must hold a finished run ({RESULT_FILE}), got {run_dir}")
    return json.loads(path.read_text())
