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
"""

from __future__ import annotations

import io
import json
import math
import os
import secrets
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from torch import Tensor, nn
from torch.nn import functional

from asymflow.accounting.events import Gaussian, NonPrivate
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.data import ImageData, TensorImageDataset, augment_batch, load_data, load_digits
from asymflow.delta.contract import (
    LABELS_LAYOUT,
    RESIDUAL_LAYOUT,
    Layout,
    PublicSide,
    ensemble_logits,
)
from asymflow.delta.label_steps import (
    check_stepwise,
    label_gradient_releases,
    label_gradient_sigma,
    train_on_label_gradients,
)
from asymflow.delta.labels import NoisyLabels, release_labels
from asymflow.delta.padded import SlotPlan, padded_chunks, padded_event, padded_sigma, slot_labels
from asymflow.delta.private import (
    PrivateModel,
    ReleaseMechanism,
    calibrated_sigma,
    concat_released,
    make_mechanism,
    release_chunk_rows,
    release_tensors,
)
from asymflow.delta.runs import (
    CONFIG_FILE,
    PREVIEW_FILE,
    RESULT_FILE,
    DeltaConfig,
    append_metrics,
    atomic_write_bytes,
    atomic_write_json,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_release,
    prune_checkpoints,
    read_config,
    read_metrics,
    release_digest,
    release_file,
    save_checkpoint,
    save_release,
    truncate_metrics,
    write_config,
)
from asymflow.delta.sanitize import Release, SanitizedResidual, Sanitizer
from asymflow.models import Backbone, build_private_model, count_macs, original_model, public_model
from asymflow.public.local import LocalPublic
from asymflow.runfiles import check_resumable
from asymflow.threads import torch_threads

__all__ = [
    "DeltaConfig",
    "RunResult",
    "build_private",
    "build_public_factory",
    "fork_stage1",
    "load_run_data",
    "read_result",
    "train_delta",
]

TRAINED_BACKBONE = "backbone trained on the private records without noise"
"""The note of the non-private row of ``backbone="trained"``: no per-record bound holds."""
CHECKPOINT_FORMAT = 2
"""2: the trust weight w in the model's state; releases referenced by file and SHA-256
(format 1 embedded a copy of every cached release and had no w, i.e. w = 1)."""
PREDICTION_HEAD = {
    "delta": "combined",
    "main-only": "main",
    "naive-dp": "public",
    "original": "combined",
}
"""Which head is the variant's prediction."""


# ------------------------------------------------------------------------- builders


def load_run_data(config: DeltaConfig) -> ImageData:
    """The run's data set; ``digits`` is resized to ``config.image_size``. Its images must
    tile into t x t DCT blocks."""
    if config.data.strip().lower() == "digits":
        data = load_digits(size=config.image_size)
    else:
        data = load_data(config.data, progress=False)
    h, w, _ = data.train.image_shape
    if h % config.t or w % config.t:
        raise ValueError(
            f"t must divide the image height and width ({h}x{w}) for the block DCT, "
            f"got t={config.t}"
        )
    return data


def build_private(config: DeltaConfig, in_channels: int, num_classes: int) -> PrivateModel:
    """M_bb (conv3x3 -> ir_channels, BN, PReLU) and the low-rank M_main on r channels."""
    torch.manual_seed(config.seed)
    backbone = Backbone(in_channels, config.ir_channels)
    main = build_private_model(
        config.r, num_classes, widths=config.private_widths, ranks=config.private_ranks
    )
    return PrivateModel(backbone, main, r=config.r, t=config.t, t_low=config.t_low)


def build_public_factory(config: DeltaConfig, num_classes: int) -> Callable[[], nn.Module]:
    """A zero-argument factory of M_res: ``public_arch`` without its stem, on the payload's
    channels (ir_channels, or 1 for ``payload="channel-mean"``)."""
    channels = 1 if config.payload == "channel-mean" else config.ir_channels

    def factory() -> nn.Module:
        torch.manual_seed(config.seed + 1)
        return public_model(config.public_arch, channels, num_classes, width=config.public_width)

    return factory


PUBLIC_STATS = (0.5, 0.25)
"""Per-channel mean and std of a frozen-backbone run's inputs: fixed constants, so that the
normalization, like M_bb, does not depend on the training set."""


def input_stats(config: DeltaConfig, data: ImageData) -> tuple[tuple[float, ...], ...]:
    """Per-channel (mean, std) of the input normalization: the training set's own statistics
    with ``backbone="trained"`` (as in the paper), else :data:`PUBLIC_STATS` (a data set's
    statistics would make every released residual depend on every record)."""
    if config.backbone == "trained":
        return data.channel_stats()
    c = data.train.image_shape[2]
    return (PUBLIC_STATS[0],) * c, (PUBLIC_STATS[1],) * c


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows) of ``n``: a seeded ``fraction`` is held out from every
    private model (at least one row if ``fraction`` > 0), both sorted."""
    held = min(n - 1, math.ceil(fraction * n)) if fraction > 0 else 0
    order = np.random.default_rng([seed, 0x401D]).permutation(n)
    return np.sort(order[held:]), np.sort(order[:held])


def stage2_views(
    config: DeltaConfig, images: np.ndarray, epoch: int, mean: Tensor, std: Tensor
) -> Tensor:
    """The normalized views (N, C, H, W) of uint8 NHWC ``images`` in stage-2 epoch ``epoch``:
    a fresh augmented view of every image (crop with black padding h/8, mirror if
    ``flip``), except for a residual released once (then the un-augmented images, whose
    residual it is). The release of the epoch and M_main's epoch use these same views, so
    each z_res is added to the z_main of its own input."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    if config.augment and not (config.releases_residual and config.release == "once"):
        gen = _generator(config.seed, 2, epoch, stream=2)
        x = augment_batch(x, gen, padding=max(1, images.shape[1] // 8), flip=config.flip)
    return (x - mean) / std


def payload_view(tensor: Tensor, config: DeltaConfig) -> Tensor:
    """The (B, c, h, w) tensor that leaves, or its (B, 1, h, w) mean over channels with
    ``payload="channel-mean"``."""
    return tensor.mean(1, keepdim=True) if config.payload == "channel-mean" else tensor


@torch.no_grad()
def leaving_split(model: PrivateModel, x: Tensor, config: DeltaConfig) -> tuple[Tensor, Tensor]:
    """(what the sanitizer gets, M_main's features) for images ``x``: the residual X - main
    (delta) or the whole IR X (naive-dp), through :func:`payload_view`, and the features of
    the same decomposition (empty for naive-dp, which decomposes nothing)."""
    if config.variant == "naive-dp":
        ir = model.ir(x)
        return payload_view(ir, config), ir.new_empty((len(ir), 0))
    split = model.decompose(x)
    return payload_view(split.residual, config), split.features


def build_original(config: DeltaConfig, in_channels: int, num_classes: int) -> nn.Module:
    """The non-private baseline: M_bb followed by M_res, one network."""
    torch.manual_seed(config.seed)
    return original_model(
        config.public_arch,
        num_classes,
        in_channels=in_channels,
        ir_channels=config.ir_channels,
        width=config.public_width,
    )


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
        """JSON-ready summary (infinities as ``"inf"``)."""

        def clean(v: Any) -> Any:
            if isinstance(v, float) and math.isinf(v):
                return "inf"
            if isinstance(v, dict):
                return {k: clean(x) for k, x in v.items()}
            return v

        return {
            "run_dir": str(self.run_dir),
            "variant": self.config.variant,
            "config": self.config.to_dict(),
            "final": clean(self.final),
            "accuracy": self.accuracy,
            "epsilon": clean(self.epsilon),
            "epsilon_method": self.epsilon_method,
            "epsilon_by_method": clean(self.epsilon_by_method),
            "delta": self.config.delta,
            "sigma": self.sigma,
            "private_macs": self.private_macs,
            "public_macs": self.public_macs,
            "bytes_per_sample": self.bytes_per_sample,
            "energy_fraction": self.energy_fraction,
            "residual_weight": self.residual_weight,
            "seconds": self.seconds,
        }


# ------------------------------------------------------------------------- helpers


class _Bars:
    """Rich progress bars on stderr: one for the epochs of a stage, one for its batches."""

    def __init__(self, enabled: bool, title: str) -> None:
        self.title = title
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=Console(stderr=True),
            disable=not enabled,
        )
        self.epochs: TaskID | None = None
        self.batches: TaskID | None = None

    def __enter__(self) -> _Bars:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(None, None, None)

    def stage(self, name: str, total: int, done: int) -> None:
        if self.batches is not None:
            self.progress.remove_task(self.batches)
            self.batches = None
        self.epochs = self.progress.add_task(
            f"{self.title} {name}", total=total, completed=done, info=""
        )

    def start_batches(self, what: str, total: int) -> None:
        if self.batches is not None:
            self.progress.remove_task(self.batches)
        self.batches = self.progress.add_task(f"  {what}", total=total, info="")

    def batch(self, info: str = "") -> None:
        if self.batches is not None:
            self.progress.update(self.batches, advance=1, info=info)

    def epoch_done(self, info: str) -> None:
        if self.epochs is not None:
            self.progress.update(self.epochs, advance=1, info=info)


def _generator(seed: int, stage: int, epoch: int, stream: int = 0) -> torch.Generator:
    """A generator for (stage, epoch): a resumed run redraws the same shuffles and crops."""
    return torch.Generator().manual_seed(((seed * 7919 + stage) * 100_003 + epoch) * 8 + stream)


def _order(n: int, seed: int, stage: int, epoch: int) -> np.ndarray:
    return torch.randperm(n, generator=_generator(seed, stage, epoch, stream=1)).numpy()


def _chunks(n: int, size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


def _noise_seed(config: DeltaConfig, name: str) -> int | None:
    if config.noise_seed is None:
        return None
    return config.noise_seed * 1_000_003 + zlib.crc32(name.encode())


def _reference(name: str, digest: str, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """What a checkpoint keeps of a cached release: its file name, the file's SHA-256 and
    its privacy event (JSON; enough for inference to sanitize queries alike)."""
    return {
        "file": release_file(Path("."), name).name,
        "sha256": digest,
        "event": str(arrays["event"]),
    }


def _mean_of(rows: list[dict[str, float]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if key in r]
    return float(np.mean(values)) if values else None


def _accuracy(logits: Tensor | None, labels: Tensor) -> float | None:
    if logits is None:
        return None
    return float((logits.argmax(1) == labels).float().mean())


# ------------------------------------------------------------------------- the run


class _Run:
    """State of one training run (private side, public side, ledger, caches)."""

    def __init__(
        self,
        config: DeltaConfig,
        run_dir: Path,
        public: PublicSide | None,
        bars: _Bars,
        overlap: bool = False,
    ) -> None:
        self.config = config
        self.run_dir = run_dir
        self.bars = bars
        self.ledger = PrivacyLedger.for_run(run_dir)
        self.local = threading.local()  # release_ahead's own ledger connection
        self.data = load_run_data(config)
        self.classes = len(self.data.classes)
        mean, std = input_stats(config, self.data)
        self.stats = (list(mean), list(std))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.padding = max(1, self.data.train.image_shape[0] // 8)
        self.test = TensorImageDataset(self.data.test, train=False, mean=mean, std=std)
        self.test_labels = torch.from_numpy(self.data.test.labels)
        self.n_train = len(self.data.train)
        self.fit_rows, self.held_rows = holdout_split(self.n_train, config.holdout, config.seed)
        self.steps = math.ceil(len(self.fit_rows) / config.batch_size)
        h, w, c = self.data.train.image_shape
        self.in_channels, self.height, self.width = c, h, w
        if config.variant == "original":
            self.model: nn.Module = build_original(config, c, self.classes)
        else:
            self.model = build_private(config, c, self.classes)
            if config.backbone == "frozen":
                self.model.freeze_backbone()  # data-independent: a function of the seed
        self.public: PublicSide | None = public
        self.overlap = overlap and public is not None  # an in-process public shares our threads
        if public is None and config.releases_residual:
            self.public = LocalPublic(
                build_public_factory(config, self.classes),
                momentum=config.momentum,
                weight_decay=config.weight_decay,
                augment=config.public_augment,
                flip=config.flip,
                eval_batch_size=config.eval_batch_size,
            )
        self.released: dict[str, dict[str, np.ndarray]] = {}  # cached releases, in memory
        self.release_refs: dict[str, dict[str, str]] = {}  # what checkpoints refer to
        self.metrics_rows: list[dict[str, Any]] = []
        self.plan: SlotPlan | None = None  # the padded release's slot plan, once drawn

    def train_batch(self, idx: np.ndarray, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Training images: random crop (black padding) and, if ``config.flip``, mirror, on
        x/255 before the per-channel normalization; labels."""
        x = torch.from_numpy(self.data.train.images[idx]).permute(0, 3, 1, 2).float() / 255.0
        if self.config.augment:
            x = augment_batch(x, gen, padding=self.padding, flip=self.config.flip)
        return (x - self.mean) / self.std, torch.from_numpy(self.data.train.labels[idx])

    # -------------------------------------------------------------- checkpoints

    def meta(self) -> dict[str, Any]:
        """What inference needs besides the weights: classes, image shape, normalization."""
        return {
            "classes": self.classes,
            "image_shape": [self.height, self.width, self.in_channels],
            "mean": self.stats[0],
            "std": self.stats[1],
        }

    def save(self, stage: int, epoch: int, opt: Any, sched: Any) -> None:
        state = {
            "format": CHECKPOINT_FORMAT,
            "stage": stage,
            "epoch": epoch,
            "config": json.dumps(self.config.to_dict()),
            "model": self.model.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "public": self.public.state_dict() if self.public is not None else None,
            "released": {k: dict(v) for k, v in self.release_refs.items()},
            "rng": {"torch": torch.get_rng_state()},
            "meta": self.meta(),
        }
        path = checkpoint_path(self.run_dir, stage, epoch)
        save_checkpoint(path, state)
        keep = [path]
        if stage == 2:
            last1 = checkpoint_path(self.run_dir, 1, self.config.epochs_stage1)
            keep.append(last1)
        prune_checkpoints(self.run_dir, keep)

    def cached(self, name: str) -> dict[str, np.ndarray] | None:
        """A cached release: from memory, else from its file (written right after the
        release, possibly after the last checkpoint). A file that a checkpoint refers to must
        be there unchanged: a missing or altered payload raises instead of being released
        again, since the restored public models were trained on that very payload."""
        if name in self.released:
            return self.released[name]
        ref = self.release_refs.get(name)
        digest = release_digest(self.run_dir, name)
        if ref is not None and digest != ref["sha256"]:
            path = release_file(self.run_dir, name)
            what = "missing" if digest is None else f"altered (sha256 {digest})"
            message = (
                f"the checkpoint refers to the released payload {path} with sha256 "
                f"{ref['sha256']}, but the file is {what}; restore it, or delete the stage-2 "
                "checkpoints to resume from stage 1 (which releases again, in a new ledger row)"
            )
            if digest is None:
                raise FileNotFoundError(message)
            raise ValueError(message)
        if digest is None:
            return None
        arrays = load_release(self.run_dir, name)
        assert arrays is not None
        self.released[name] = arrays
        self.release_refs[name] = _reference(name, digest, arrays)
        return arrays

    def keep(self, name: str, layout: Layout, payload: object, row: int) -> None:
        """Persist a release immediately (file: its layout's arrays and its ledger row),
        referenced by every later checkpoint."""
        arrays = {**layout.to_arrays(payload), "ledger_row": np.asarray(row, dtype=np.int64)}
        digest = save_release(self.run_dir, name, arrays)
        self.released[name] = arrays
        self.release_refs[name] = _reference(name, digest, arrays)

    def restore_references(self, refs: dict[str, Any]) -> None:
        """The release references of a resumed checkpoint (files are read when needed)."""
        for name, ref in refs.items():
            if not isinstance(ref, dict) or not {"file", "sha256", "event"} <= set(ref):
                raise ValueError(f"checkpoint release reference {name!r} is malformed: {ref!r}")
            self.release_refs[name] = {k: str(ref[k]) for k in ("file", "sha256", "event")}

    def forget_release(self, name: str) -> None:
        """Drop a spent release from memory and from later checkpoints (its file stays)."""
        self.released.pop(name, None)
        self.release_refs.pop(name, None)

    # -------------------------------------------------------------- evaluation

    @torch.no_grad()
    def eval_private(self) -> tuple[Tensor, float]:
        """z_main on the test set and the mean energy fraction ||main||^2/||X||^2."""
        assert isinstance(self.model, PrivateModel)
        self.model.eval()
        logits, energy = [], []
        for idx in _chunks(len(self.test), self.config.eval_batch_size):
            x, _ = self.test.get_batch(idx)
            dec = self.model.decompose(x)
            logits.append(self.model.main(dec.features))
            energy.append(dec.energy_fraction)
        return torch.cat(logits), float(torch.cat(energy).mean())

    @torch.no_grad()
    def eval_original(self) -> Tensor:
        self.model.eval()
        return torch.cat(
            [
                self.model(self.test.get_batch(idx)[0])
                for idx in _chunks(len(self.test), self.config.eval_batch_size)
            ]
        )

    def record_metrics(self, row: dict[str, Any]) -> None:
        head = PREDICTION_HEAD[self.config.variant]
        row.setdefault("test_acc", row.get(f"test_acc_{head}"))
        row["variant"] = self.config.variant
        append_metrics(self.run_dir, row)
        self.metrics_rows.append(row)

    # -------------------------------------------------------------- stage 1

    def stage1_epochs(self) -> int:
        c = self.config
        return c.epochs_stage1 + c.epochs_stage2 if c.variant == "original" else c.epochs_stage1

    def run_stage1(self, start: int, state: dict[str, Any] | None) -> None:
        c = self.config
        total = self.stage1_epochs()
        if start > total:
            return  # finished before a resume (or forked from another run)
        opt = torch.optim.SGD(
            self.model.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total * self.steps))
        if state is not None:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        name = "(whole network)" if c.variant == "original" else "stage 1 (main part only)"
        self.bars.stage(name, total, start - 1)
        for epoch in range(start, total + 1):
            began = time.perf_counter()
            gen = _generator(c.seed, 1, epoch)
            self.model.train()
            loss_sum, correct = 0.0, 0
            self.bars.start_batches(f"epoch {epoch}", self.steps)
            order = self.fit_rows[_order(len(self.fit_rows), c.seed, 1, epoch)]
            for i in range(self.steps):
                idx = order[i * c.batch_size : (i + 1) * c.batch_size]
                x, y = self.train_batch(idx, gen)
                z = self.model(x)
                loss = functional.cross_entropy(z, y)
                if isinstance(self.model, PrivateModel) and c.alpha > 0:
                    loss = loss + self.model.main.orthogonality_penalty(c.alpha)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += float(loss.detach()) * len(idx)
                correct += int((z.argmax(1) == y).sum())
                self.bars.batch(f"loss {float(loss.detach()):.3f}")
            row: dict[str, Any] = {
                "stage": 1,
                "epoch": epoch,
                "global_epoch": epoch,
                "train_loss": loss_sum / len(self.fit_rows),
                "train_acc": correct / len(self.fit_rows),
                "lr": float(sched.get_last_lr()[0]),
            }
            if isinstance(self.model, PrivateModel):
                z_main, energy = self.eval_private()
                row["test_acc_main"] = _accuracy(z_main, self.test_labels)
                row["energy_fraction"] = energy
                # z_main is the prediction so far; naive-dp's (z_res) exists from stage 2 on
                row["test_acc"] = None if c.variant == "naive-dp" else row["test_acc_main"]
            else:
                row["test_acc_combined"] = _accuracy(self.eval_original(), self.test_labels)
            row["seconds"] = time.perf_counter() - began
            self.record_metrics(row)  # before the checkpoint: a resume truncates later rows
            self.save(1, epoch, opt, sched)
            acc = row.get("test_acc_main", row.get("test_acc_combined"))
            self.bars.epoch_done(f"test acc {acc:.3f}")

    # -------------------------------------------------------------- stage 2 releases

    def epoch_views(self, epoch: int) -> Tensor:
        """:func:`stage2_views` of the training images."""
        return stage2_views(self.config, self.data.train.images, epoch, self.mean, self.std)

    @torch.no_grad()
    def leaving(self, x: Tensor) -> Tensor:
        """What the sanitizer gets for images ``x``: the residual (delta) or the whole IR
        (naive-dp), or its mean over channels with ``payload="channel-mean"``."""
        assert isinstance(self.model, PrivateModel)
        return leaving_split(self.model, x, self.config)[0]

    def view_chunks(self, rows: int) -> Iterator[np.ndarray]:
        """Row chunks of a pass over ``rows`` views: cache-sized (M_bb, SVD, sanitizer)."""
        c = self.config
        size = release_chunk_rows(c.ir_channels * self.height * self.width, c.eval_batch_size)
        return _chunks(rows, size)

    def chunked(self, views: Tensor, features: list[Tensor] | None = None) -> Iterator[Tensor]:
        """Lazily :meth:`leaving` of ``views``, in row order; the same decomposition's M_main
        features are appended to ``features`` (for :meth:`view_features`). Stage 2 only: M_bb
        is frozen in evaluation mode, so this touches no module's mode and may run beside
        M_main's training (:meth:`release_ahead`)."""
        assert isinstance(self.model, PrivateModel) and self.model.backbone_frozen
        for idx in self.view_chunks(len(views)):
            leaving, feats = leaving_split(self.model, views[torch.from_numpy(idx)], self.config)
            if features is not None:
                features.append(feats)
            yield leaving

    @torch.no_grad()
    def view_features(self, views: Tensor, kept: list[Tensor]) -> Tensor:
        """M_main's input for every row of ``views``: the features the epoch's release pass
        kept, or (main-only, padded, a release read back after a restart) the same pass
        without the sanitizer. Both run :meth:`view_chunks` in row order on the same frozen
        M_bb, so they are the same tensors bit for bit, and stage 2 decomposes each view
        once instead of twice."""
        if kept and sum(len(f) for f in kept) == len(views):
            return torch.cat(kept)
        model = self.model
        assert isinstance(model, PrivateModel)
        model.eval()
        return torch.cat(
            [model.features(views[torch.from_numpy(idx)]) for idx in self.view_chunks(len(views))]
        )

    def sigma(self) -> float:
        """Noise multiplier of the residual releases (0 for epsilon = inf)."""
        c = self.config
        if math.isinf(c.epsilon):
            return 0.0
        if c.release == "padded":
            return padded_sigma(float(c.epsilon), float(c.delta), c.sample_k, c.epochs_stage2)
        return calibrated_sigma(float(c.epsilon), float(c.delta), c.residual_releases)

    def mechanism(self, name: str) -> ReleaseMechanism:
        """The sanitizer of release ``name``; a padded run's queries and test set are plain
        Gaussian releases at the pass's sigma."""
        c = self.config
        if c.release == "padded":
            return Sanitizer(c.clip, self.sigma(), seed=_noise_seed(c, name))
        return make_mechanism(
            c.epsilon, c.delta, c.clip, releases=c.residual_releases, seed=_noise_seed(c, name)
        )

    def residuals(
        self,
        name: str,
        views: Tensor,
        dataset: str,
        scope: str,
        features: list[Tensor] | None = None,
    ) -> SanitizedResidual:
        """The released payload ``name`` of ``views``: from the cache, or released now (ledger
        row first, the pass's M_main features appended to ``features``).

        A release whose payload was not saved (crash in between) is released again under a
        new ledger row: the ledger may over-count, never under-count.
        """
        arrays = self.cached(name)
        if arrays is not None:
            return RESIDUAL_LAYOUT.from_arrays(arrays)
        what = "IR" if self.config.variant == "naive-dp" else "residual"
        payload, release = release_tensors(
            self.mechanism(name),
            self.chunked(views, features),
            ledger=self.writer,
            dataset=dataset,
            scope=scope,
            note=f"{what} release ({name})",
        )
        self.keep(name, RESIDUAL_LAYOUT, payload, release.row_id)
        release.done()
        return payload

    def record_trained_backbone(self) -> None:
        """``backbone="trained"``: M_bb learned from every training record without noise, so a
        record also shapes everybody else's released residual; one non-private ledger row
        (before the first release, once) says so."""
        c = self.config
        if not any(e.note == TRAINED_BACKBONE for e in self.ledger.entries(dataset=c.data)):
            self.ledger.record(
                NonPrivate(TRAINED_BACKBONE), dataset=c.data, scope="train", note=TRAINED_BACKBONE
            )

    def slot_plan(self) -> SlotPlan:
        """The padded run's slot plan: from the run directory, or drawn now after the pass's
        ledger row BalancedSampled(k, T, Gaussian(sigma)) is recorded."""
        plan = self.plan or SlotPlan.load(self.run_dir)
        if plan is not None:
            self.plan = plan
            return plan
        c = self.config
        what = "IR" if c.variant == "naive-dp" else "residual"
        row = self.writer.record(
            padded_event(self.sigma(), c.sample_k, c.epochs_stage2),
            dataset=c.data,
            scope="train",
            note=f"{what} release (padded slots, {c.epochs_stage2} epochs)",
        )
        slots = c.slots or self.n_train
        plan = SlotPlan.draw(
            self.n_train,
            slots,
            c.sample_k,
            c.epochs_stage2,
            self.classes,
            row,
            _noise_seed(c, "slots"),
        )
        plan.save(self.run_dir)
        self.plan = plan
        return plan

    def padded_residuals(self, epoch: int, views: Tensor) -> SanitizedResidual:
        """Epoch ``epoch`` of the padded release (:mod:`asymflow.delta.padded`), covered by
        the pass's ledger row. An epoch whose release began before a crash and was not saved
        is released again only after a new Gaussian(sigma) row for it (an over-count)."""
        name = f"train_epoch{epoch}"
        arrays = self.cached(name)
        if arrays is not None:
            return RESIDUAL_LAYOUT.from_arrays(arrays)
        c = self.config
        plan = self.slot_plan()
        sigma = self.sigma()
        if epoch in plan.started:
            self.writer.record(
                Gaussian(sigma),
                dataset=c.data,
                scope="train",
                note=f"residual release (padded epoch {epoch}, again after a restart)",
            )
        self.plan = plan.with_started(epoch)
        self.plan.save(self.run_dir)
        mechanism = Sanitizer(
            c.clip,
            sigma,
            seed=_noise_seed(c, name),
            sampling=padded_event(sigma, c.sample_k, c.epochs_stage2),
            padded_slots=plan.slots,
        )
        release = Release(plan.row, mechanism.event, self.writer)
        assert isinstance(self.model, PrivateModel) and self.model.backbone_frozen
        shape = tuple(self.leaving(views[:1]).shape[1:])
        chunks = padded_chunks(
            plan,
            epoch,
            lambda records: self.leaving(views[torch.from_numpy(records)]),
            shape,  # type: ignore[arg-type]
            c.eval_batch_size,
        )
        payload = concat_released([mechanism.sanitize(chunk, release) for chunk in chunks])
        self.keep(name, RESIDUAL_LAYOUT, payload, plan.row)
        release.done()
        return payload

    def noisy_labels(self) -> NoisyLabels:
        """The label-DP labels: cached, or released now (ledger row first)."""
        arrays = self.cached("labels")
        if arrays is not None:
            return LABELS_LAYOUT.from_arrays(arrays)
        c = self.config
        labels, row = release_labels(
            self.data.train.labels,
            mode=c.labels,
            epsilon=c.label_epsilon,
            classes=self.classes,
            ledger=self.ledger,
            dataset=c.data,
            scope="train",
            seed=_noise_seed(c, "labels"),
        )
        self.keep("labels", LABELS_LAYOUT, labels, row)
        self.ledger.mark_released(row)
        return labels

    def uploaded_labels(self, labels: NoisyLabels) -> NoisyLabels:
        """The labels of the payload's rows: the released labels themselves, or with padded
        slots each slot's record's released label (uniform in unowned slots)."""
        if self.config.release != "padded":
            return labels
        values = slot_labels(self.slot_plan(), labels.labels)
        return NoisyLabels(values, labels.classes, labels.event)

    def payload_rows(self) -> np.ndarray:
        """(N,) the payload row of every training record: itself, or its padded slot."""
        if self.config.release == "padded":
            return self.slot_plan().slot_of()
        return np.arange(self.n_train)

    def save_preview(self, payload: SanitizedResidual) -> None:
        """A few training images next to the bits of their first channels (for the report)."""
        if (self.run_dir / PREVIEW_FILE).exists():
            return
        k = min(4, self.n_train)
        rows = self.payload_rows()[:k]
        bits = payload.subset(rows).unpack()[:, :4].numpy().astype(np.int8)
        buffer = io.BytesIO()
        np.savez(buffer, images=self.data.train.images[:k], bits=bits)
        atomic_write_bytes(self.run_dir / PREVIEW_FILE, buffer.getvalue())

    # -------------------------------------------------------------- stage 2

    def run_stage2(self, start: int, state: dict[str, Any] | None) -> None:
        c = self.config
        model = self.model
        assert isinstance(model, PrivateModel)
        model.freeze_backbone()
        opt = torch.optim.SGD(
            model.main.parameters(),
            lr=c.stage2_lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
        )
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(
            opt, T_max=max(1, c.epochs_stage2 * self.steps)
        )
        if state is not None and state["stage"] == 2:
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
        if c.releases_residual and c.labels == "grad":
            check_stepwise(self.public)  # before anything is released
        if c.releases_residual and c.backbone == "trained":
            self.record_trained_backbone()
        labels: NoisyLabels | None = None
        test_payload: SanitizedResidual | None = None
        if c.releases_residual:
            labels = None if c.labels == "grad" else self.noisy_labels()
            test_views = self.test.get_batch(np.arange(len(self.test)))[0]
            test_payload = self.residuals(
                "test", test_views, dataset=f"{c.data}/test", scope="eval"
            )
        if c.variant == "delta" and c.combine == "sum":
            model.residual_weight.weight.fill_(1.0)
        self.bars.stage("stage 2 (private + public)", c.epochs_stage2, start - 1)
        with ThreadPoolExecutor(1, thread_name_prefix="asymflow-release-ahead") as pool:
            self.stage2_epochs(start, opt, sched, labels, test_payload, pool)

    def stage2_epochs(
        self,
        start: int,
        opt: Any,
        sched: Any,
        labels: NoisyLabels | None,
        test_payload: SanitizedResidual | None,
        pool: ThreadPoolExecutor,
    ) -> None:
        """Stage-2 epochs ``start``..E. With :attr:`overlap`, epoch e+1's release is prepared
        in ``pool`` while the public side trains on epoch e's (:meth:`release_ahead`)."""
        c = self.config
        model = self.model
        assert isinstance(model, PrivateModel)
        uploaded: str | None = None
        ahead: Future[tuple[Tensor, list[Tensor]]] | None = None
        for epoch in range(start, c.epochs_stage2 + 1):
            began = time.perf_counter()
            row: dict[str, Any] = {"stage": 2, "epoch": epoch}
            row["global_epoch"] = c.epochs_stage1 + epoch
            views, kept = ahead.result() if ahead is not None else (self.epoch_views(epoch), [])
            ahead = None
            z_train: Tensor | None = None
            z_test: Tensor | None = None
            if self.public is not None and test_payload is not None:
                payload = self.train_release(epoch, views, kept)
                spent = [
                    k
                    for k in self.release_refs
                    if k.startswith("train_epoch") and k != f"train_epoch{epoch}"
                ]
                for old in spent:
                    self.forget_release(old)  # spent releases stay on disk, not in checkpoints
                self.save_preview(payload)
                models = c.public_models
                self.bars.start_batches(f"epoch {epoch}: public M_res", len(models))
                sent = None if labels is None else self.uploaded_labels(labels)
                dataset_id = self.public.upload(payload, sent)
                if (
                    self.overlap
                    and c.release != "once"
                    and labels is not None
                    and epoch < c.epochs_stage2
                ):
                    ahead = pool.submit(self.release_ahead, epoch + 1)
                if (
                    uploaded is not None
                    and uploaded != dataset_id
                    and hasattr(self.public, "forget")
                ):
                    self.public.forget(uploaded)
                uploaded = dataset_id
                if labels is None:
                    pub_metrics = self.train_public_on_label_gradients(dataset_id, epoch)
                else:
                    pub_metrics = []
                    for fold in self.public_folds(epoch, len(payload)):
                        pub_metrics.append(self.public.train(dataset_id, **fold))
                        self.bars.batch()
                row["public_train_loss"] = _mean_of(pub_metrics, "loss")
                for key in ("acc_on_received_labels", "acc_on_true_labels"):
                    row[f"public_{key}"] = _mean_of(pub_metrics, key)
                z_test = ensemble_logits(self.public, test_payload, models)
                if c.variant == "delta":  # post-processing of the release, no new release
                    z_rows = self.out_of_fold_logits(
                        payload, models, self.folds(len(models), len(payload))
                    )
                    z_train = z_rows[torch.from_numpy(self.payload_rows())]
            if c.variant in ("delta", "main-only"):
                features = self.view_features(views, kept)
                if z_train is not None and c.combine == "weighted":
                    row.update(self.fit_residual_weight(features, z_train))
                row.update(self.train_main_epoch(epoch, opt, sched, features, z_train))
            z_main, energy = self.eval_private()
            row["energy_fraction"] = energy
            row["test_acc_main"] = _accuracy(z_main, self.test_labels)
            row["test_acc_public"] = _accuracy(z_test, self.test_labels)
            if c.variant == "delta" and z_test is not None:
                with torch.no_grad():
                    z_combined = model.combine(z_main, z_test)
                row["test_acc_combined"] = _accuracy(z_combined, self.test_labels)
            elif c.variant == "main-only":
                row["test_acc_combined"] = row["test_acc_main"]
            else:
                row["test_acc_combined"] = row["test_acc_public"]
            if ahead is not None:
                wait([ahead])  # its release reference goes into this checkpoint
            row["seconds"] = time.perf_counter() - began
            self.record_metrics(row)  # before the checkpoint: a resume truncates later rows
            self.save(2, epoch, opt, sched)
            acc = row["test_acc"]
            self.bars.epoch_done("" if acc is None else f"test acc {acc:.3f}")

    def train_release(self, epoch: int, views: Tensor, kept: list[Tensor]) -> SanitizedResidual:
        """The training set's payload of stage-2 epoch ``epoch`` (cached or released now);
        the pass's M_main features go to ``kept``."""
        c = self.config
        if c.release == "padded":
            return self.padded_residuals(epoch, views)
        name = "train" if c.release == "once" else f"train_epoch{epoch}"
        return self.residuals(name, views, c.data, "train", kept)

    @property
    def writer(self) -> PrivacyLedger:
        """The ledger connection of the calling thread: SQLite connections belong to the
        thread that opened them, and the ledger's write transactions serialize writers."""
        ledger: PrivacyLedger | None = getattr(self.local, "ledger", None)
        return self.ledger if ledger is None else ledger

    def release_ahead(self, epoch: int) -> tuple[Tensor, list[Tensor]]:
        """Epoch ``epoch``'s views and release (ledger row first, payload file written), run
        in a worker thread while the public side trains on the previous epoch's. M_bb is
        frozen, so the release does not depend on that training: the same bits as in
        sequence (same views, same noise seed). Nothing else writes the ledger meanwhile:
        overlap is off with label gradients, whose rows the epoch writes."""
        views = self.epoch_views(epoch)
        kept: list[Tensor] = []
        with PrivacyLedger.for_run(self.run_dir) as self.local.ledger:
            try:
                self.train_release(epoch, views, kept)
            finally:
                self.local.ledger = None
        return views, kept

    def label_gradient_sigma(self) -> float:
        """Noise multiplier of the label gradients: all of a record's releases over the run
        (``label_gradient_releases``) cost at most (label_epsilon, delta)."""
        c = self.config
        releases = label_gradient_releases(
            max(1, c.epochs_stage2), c.public_epochs, len(c.public_models)
        )
        return label_gradient_sigma(c.label_epsilon, c.delta, releases)

    def public_folds(self, epoch: int, rows: int) -> list[dict[str, Any]]:
        """The training arguments of each public model in stage-2 epoch ``epoch``: model k
        trains ``public_epochs`` epochs on the payload rows (of ``rows``) outside fold k (all
        rows with one model)."""
        c = self.config
        models = c.public_models
        folds = self.folds(len(models), rows)
        return [
            {
                "epochs": c.public_epochs,
                "batch_size": c.batch_size,
                "lr": c.public_lr,
                "seed": c.seed + k,
                "start_epoch": (epoch - 1) * c.public_epochs,
                "total_epochs": c.epochs_stage2 * c.public_epochs,
                "model": name,
                "indices": None if len(models) == 1 else np.flatnonzero(folds != k),
            }
            for k, name in enumerate(models)
        ]

    def train_public_on_label_gradients(
        self, dataset_id: str, epoch: int
    ) -> list[dict[str, float]]:
        """One stage-2 epoch of every public model on noisy label gradients; the epoch's
        releases are one ledger row, recorded first (a redone epoch records a new one)."""
        c = self.config
        public = check_stepwise(self.public)
        models = c.public_models
        sigma = self.label_gradient_sigma()
        row = self.ledger.record(
            Gaussian(sigma),
            dataset=c.data,
            scope="train",
            count=label_gradient_releases(1, c.public_epochs, len(models)),
            note=f"labels (noisy gradients, epoch {epoch})",
        )
        seed = _noise_seed(c, f"label_gradients_epoch{epoch}")
        noise = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        labels = self.data.train.labels
        out = []
        for fold in self.public_folds(epoch, self.n_train):
            out.append(
                train_on_label_gradients(
                    public, dataset_id, labels, sigma=sigma, noise=noise, **fold
                )
            )
            self.bars.batch()
        self.ledger.mark_released(row)
        return out

    def folds(self, k: int, rows: int) -> np.ndarray:
        """Cross-fitting fold of each of ``rows`` payload rows: a seeded, balanced
        assignment."""
        order = np.random.default_rng(self.config.seed).permutation(rows)
        folds = np.empty(rows, dtype=np.int64)
        folds[order] = np.arange(rows) % k
        return folds

    def out_of_fold_logits(
        self, payload: SanitizedResidual, models: tuple[str, ...], folds: np.ndarray
    ) -> Tensor:
        """z_res of each payload row from the public model that did not train on it."""
        assert self.public is not None
        if len(models) == 1:
            return self.public.logits(payload, model=models[0])
        z = torch.empty(len(payload), self.classes)
        for k, name in enumerate(models):
            rows = np.flatnonzero(folds == k)
            z[torch.from_numpy(rows)] = self.public.logits(payload.subset(rows), model=name)
        return z

    def fit_residual_weight(self, features: Tensor, z_res: Tensor) -> dict[str, float]:
        """w = argmin_{w >= 0} mean_i CE(z_main,i + w log_softmax(z_res,i), y_i) over the
        held-out rows, which no private model trained on, with their out-of-fold z_res and
        z_main of the same views (their M_main ``features``) in evaluation mode: the w-step
        of the block-coordinate descent on Delta's private objective (:class:`ResidualWeight`).
        On training rows z_main is near-perfect and would push w to 0 (in-sample bias).

        Returns w and the held-out losses at w = 0 (main-only) and at the fitted w, which is
        never larger (w = 0 is feasible)."""
        model = self.model
        assert isinstance(model, PrivateModel)
        rows = torch.from_numpy(self.held_rows)
        model.eval()
        with torch.no_grad():
            z_main = torch.cat([model.main(features[rows[i]]) for i in _chunks(len(rows), 512)])
        z_held = z_res[rows]
        labels = torch.from_numpy(self.data.train.labels[self.held_rows])
        weight = model.residual_weight.fit(z_main, z_held, labels)
        return {
            "residual_weight": weight,
            "holdout_loss_main_only": model.residual_weight.loss(z_main, z_held, labels, 0.0),
            "holdout_loss_combined": model.residual_weight.loss(z_main, z_held, labels, weight),
        }

    def train_main_epoch(
        self, epoch: int, opt: Any, sched: Any, features: Tensor, z_res: Tensor | None
    ) -> dict[str, Any]:
        """One epoch of M_main on the ``features`` of the epoch's views of its training rows,
        with the loss CE(z_main + w log_softmax(z_res), y) for w fixed (main-only:
        CE(z_main, y))."""
        c = self.config
        model = self.model
        assert isinstance(model, PrivateModel)
        model.train()
        loss_sum, correct = 0.0, 0
        self.bars.start_batches(f"epoch {epoch}: private M_main", self.steps)
        order = self.fit_rows[_order(len(self.fit_rows), c.seed, 2, epoch)]
        labels = torch.from_numpy(self.data.train.labels)
        for i in range(self.steps):
            idx = torch.from_numpy(order[i * c.batch_size : (i + 1) * c.batch_size])
            y = labels[idx]
            z = model.main(features[idx])
            if z_res is not None:
                z = model.combine(z, z_res[idx])
            loss = functional.cross_entropy(z, y)
            if c.alpha > 0:
                loss = loss + model.main.orthogonality_penalty(c.alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((z.argmax(1) == y).sum())
            self.bars.batch(f"loss {float(loss.detach()):.3f}")
        return {
            "train_loss": loss_sum / len(self.fit_rows),
            "train_acc": correct / len(self.fit_rows),
            "lr": float(sched.get_last_lr()[0]),
        }

    # -------------------------------------------------------------- summary

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
    with torch_threads(config.threads), _Bars(progress, run_dir.name or config.variant) as bars:
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
