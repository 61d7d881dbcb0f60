"""Stage 2 of a Delta run: M_bb frozen, the public models trained on the released payload
(by themselves on label-DP labels, or step by step on noisy label gradients, with
cross-fitting folds), and M_main trained on CE(z_main + w log_softmax(z_res), y) with w fitted
on held-out rows (Niu et al., CVPR 2024, arXiv 2312.05264, Sec. 3.4; DESIGN.md sec. 3)."""

from __future__ import annotations

import secrets
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any

import numpy as np
import torch
from torch import Tensor

from asymflow.accounting.events import Gaussian
from asymflow.delta.builders import epoch_order, noise_seed, row_chunks
from asymflow.delta.contract import ensemble_logits
from asymflow.delta.label_steps import (
    check_stepwise,
    label_gradient_releases,
    label_gradient_sigma,
    train_on_label_gradients,
)
from asymflow.delta.labels import NoisyLabels
from asymflow.delta.private import PrivateModel
from asymflow.delta.releases import Releases
from asymflow.delta.run_state import accuracy, mean_of
from asymflow.delta.sanitize import SanitizedResidual


class Stage2(Releases):
    """Stage 2's epochs: the release, the public models' training, the trust weight w and
    M_main's epoch, then evaluation and a checkpoint."""

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
                row["public_train_loss"] = mean_of(pub_metrics, "loss")
                for key in ("acc_on_received_labels", "acc_on_true_labels"):
                    row[f"public_{key}"] = mean_of(pub_metrics, key)
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
            row["test_acc_main"] = accuracy(z_main, self.test_labels)
            row["test_acc_public"] = accuracy(z_test, self.test_labels)
            if c.variant == "delta" and z_test is not None:
                with torch.no_grad():
                    z_combined = model.combine(z_main, z_test)
                row["test_acc_combined"] = accuracy(z_combined, self.test_labels)
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
        seed = noise_seed(c, f"label_gradients_epoch{epoch}")
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
            z_main = torch.cat([model.main(features[rows[i]]) for i in row_chunks(len(rows), 512)])
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
        order = self.fit_rows[epoch_order(len(self.fit_rows), c.seed, 2, epoch)]
        labels = torch.from_numpy(self.data.train.labels)
        for i in range(self.steps):
            idx = torch.from_numpy(order[i * c.batch_size : (i + 1) * c.batch_size])
            y = labels[idx]
            z = model.main(features[idx])
            if z_res is not None:
                z = model.combine(z, z_res[idx])
            loss, right = self.sgd_step(z, y, opt, sched)
            loss_sum += loss * len(idx)
            correct += right
        return {
            "train_loss": loss_sum / len(self.fit_rows),
            "train_acc": correct / len(self.fit_rows),
            "lr": float(sched.get_last_lr()[0]),
        }
