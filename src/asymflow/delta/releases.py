"""The releases of a Delta run's stage 2: residuals (once, every epoch, or in padded slots),
label-DP labels and the test queries, each recorded in the ledger before it leaves and kept
in a file right after (Niu et al., CVPR 2024, arXiv 2312.05264, Sec. 3.4; DESIGN.md sec. 3)."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from asymflow.accounting.events import Gaussian, NonPrivate
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.builders import leaving_split, noise_seed, row_chunks, stage2_views
from asymflow.delta.contract import LABELS_LAYOUT, RESIDUAL_LAYOUT
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
from asymflow.delta.run_state import RunState
from asymflow.delta.runs import PREVIEW_FILE, atomic_write_bytes
from asymflow.delta.sanitize import Release, SanitizedResidual, Sanitizer

TRAINED_BACKBONE = "backbone trained on the private records without noise"
"""The note of the non-private row of ``backbone="trained"``: no per-record bound holds."""


class Releases(RunState):
    """Stage 2's release pass: the epoch's views, what leaves of them (the sanitized residual
    or IR), its mechanism and its ledger rows; a pass may run ahead in a second thread."""

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
        return row_chunks(rows, size)

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
            return Sanitizer(c.clip, self.sigma(), seed=noise_seed(c, name))
        return make_mechanism(
            c.epsilon, c.delta, c.clip, releases=c.residual_releases, seed=noise_seed(c, name)
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
            noise_seed(c, "slots"),
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
            seed=noise_seed(c, name),
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
            seed=noise_seed(c, "labels"),
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
