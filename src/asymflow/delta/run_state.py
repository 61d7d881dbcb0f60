"""The state of one Delta training run, shared by its stages: data, models, the ledger and
the public side; checkpoints and the cache of released payloads (each kept in a file right
after its release, :mod:`asymflow.delta.runs`); evaluation on the test set."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.data import TensorImageDataset, augment_batch
from asymflow.delta.builders import (
    build_original,
    build_private,
    build_public_factory,
    holdout_split,
    input_stats,
    load_run_data,
    row_chunks,
)
from asymflow.delta.contract import Layout, PublicSide
from asymflow.delta.padded import SlotPlan
from asymflow.delta.private import PrivateModel
from asymflow.delta.runs import (
    DeltaConfig,
    append_metrics,
    checkpoint_path,
    load_release,
    prune_checkpoints,
    release_digest,
    release_file,
    save_checkpoint,
    save_release,
)
from asymflow.progress import EpochBars
from asymflow.public.local import LocalPublic

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


def release_reference(name: str, digest: str, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """What a checkpoint keeps of a cached release: its file name, the file's SHA-256 and
    its privacy event (JSON; enough for inference to sanitize queries alike)."""
    return {
        "file": release_file(Path("."), name).name,
        "sha256": digest,
        "event": str(arrays["event"]),
    }


def mean_of(rows: list[dict[str, float]], key: str) -> float | None:
    values = [float(r[key]) for r in rows if key in r]
    return float(np.mean(values)) if values else None


def accuracy(logits: Tensor | None, labels: Tensor) -> float | None:
    if logits is None:
        return None
    return float((logits.argmax(1) == labels).float().mean())


class RunState:
    """State of one training run (private side, public side, ledger, caches), its
    checkpoints and its evaluation."""

    def __init__(
        self,
        config: DeltaConfig,
        run_dir: Path,
        public: PublicSide | None,
        bars: EpochBars,
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

    def meta(self) -> dict[str, Any]:
        """What inference needs besides the weights: classes, image shape, normalization."""
        return {
            "classes": self.classes,
            "image_shape": [self.height, self.width, self.in_channels],
            "mean": self.stats[0],
            "std": self.stats[1],
        }

    def save(self, stage: int, epoch: int, opt: Optimizer, sched: LRScheduler) -> None:
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
        self.release_refs[name] = release_reference(name, digest, arrays)
        return arrays

    def keep(self, name: str, layout: Layout, payload: object, row: int) -> None:
        """Persist a release immediately (file: its layout's arrays and its ledger row),
        referenced by every later checkpoint."""
        arrays = {**layout.to_arrays(payload), "ledger_row": np.asarray(row, dtype=np.int64)}
        digest = save_release(self.run_dir, name, arrays)
        self.released[name] = arrays
        self.release_refs[name] = release_reference(name, digest, arrays)

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

    @torch.no_grad()
    def eval_private(self) -> tuple[Tensor, float]:
        """z_main on the test set and the mean energy fraction ||main||^2/||X||^2."""
        assert isinstance(self.model, PrivateModel)
        self.model.eval()
        logits, energy = [], []
        for idx in row_chunks(len(self.test), self.config.eval_batch_size):
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
                for idx in row_chunks(len(self.test), self.config.eval_batch_size)
            ]
        )

    def sgd_step(
        self, z: Tensor, y: Tensor, opt: Optimizer, sched: LRScheduler
    ) -> tuple[float, int]:
        """One step on CE(z, y), plus alpha ||A A^T - I||_F^2 over M_main's factorized layers for
        a private model: (the loss, the correct predictions); the progress bar shows the loss."""
        loss = functional.cross_entropy(z, y)
        if isinstance(self.model, PrivateModel) and self.config.alpha > 0:
            loss = loss + self.model.main.orthogonality_penalty(self.config.alpha)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        value = float(loss.detach())
        self.bars.batch(f"loss {value:.3f}")
        return value, int((z.argmax(1) == y).sum())

    def record_metrics(self, row: dict[str, Any]) -> None:
        head = PREDICTION_HEAD[self.config.variant]
        row.setdefault("test_acc", row.get(f"test_acc_{head}"))
        row["variant"] = self.config.variant
        append_metrics(self.run_dir, row)
        self.metrics_rows.append(row)
