"""Stage 1 of a Delta run: M_bb and M_main learn from the main part only,
loss = CE(M_main(features(x)), y) + alpha * sum ||A A^T - I||_F^2; nothing leaves (Niu et al.,
CVPR 2024, arXiv 2312.05264, Sec. 3.4). The ``original`` variant trains its whole network here."""

from __future__ import annotations

import time
from typing import Any

import torch

from asymflow.delta.builders import epoch_generator, epoch_order
from asymflow.delta.private import PrivateModel
from asymflow.delta.run_state import RunState, accuracy


class Stage1(RunState):
    """Stage 1: M_bb and M_main (or the whole original network) on the main part only."""

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
            gen = epoch_generator(c.seed, 1, epoch)
            self.model.train()
            loss_sum, correct = 0.0, 0
            self.bars.start_batches(f"epoch {epoch}", self.steps)
            order = self.fit_rows[epoch_order(len(self.fit_rows), c.seed, 1, epoch)]
            for i in range(self.steps):
                idx = order[i * c.batch_size : (i + 1) * c.batch_size]
                x, y = self.train_batch(idx, gen)
                loss, right = self.sgd_step(self.model(x), y, opt, sched)
                loss_sum += loss * len(idx)
                correct += right
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
                row["test_acc_main"] = accuracy(z_main, self.test_labels)
                row["energy_fraction"] = energy
                # z_main is the prediction so far; naive-dp's (z_res) exists from stage 2 on
                row["test_acc"] = None if c.variant == "naive-dp" else row["test_acc_main"]
            else:
                row["test_acc_combined"] = accuracy(self.eval_original(), self.test_labels)
            row["seconds"] = time.perf_counter() - began
            self.record_metrics(row)  # before the checkpoint: a resume truncates later rows
            self.save(1, epoch, opt, sched)
            acc = row.get("test_acc_main", row.get("test_acc_combined"))
            self.bars.epoch_done(f"test acc {acc:.3f}")
