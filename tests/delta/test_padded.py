"""Padded slots and the stage-2 protocol: which views leave, who owns which slot, what the
ledger records, refusals, and the held-out trust weight."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import (
    BalancedSampled,
    Composed,
    Gaussian,
    NonPrivate,
    PoissonSampled,
    RandomizedResponse,
    SelfComposed,
)
from asymflow.accounting.ledger import LEDGER_FILENAME, PrivacyLedger
from asymflow.delta.padded import SlotPlan, padded_chunks, padded_sigma, slot_labels
from asymflow.delta.runs import latest_checkpoint, release_file
from asymflow.delta.sanitize import Sanitizer
from asymflow.delta.train import TRAINED_BACKBONE, _Run, holdout_split, train_delta
from asymflow.progress import EpochBars
from tests.delta.test_train import CrashingPublic, RecordingPublic, _CrashError


def _entries(run_dir: Path) -> list[Any]:
    with PrivacyLedger(run_dir / LEDGER_FILENAME) as ledger:
        return ledger.entries()


@pytest.mark.parametrize(
    "sampling", [BalancedSampled(2, 10, Gaussian(1.0)), PoissonSampled(0.1, Gaussian(1.0))]
)
def test_an_unpadded_subsampled_release_is_refused(sampling):
    # Each record's residual leaves on its own: a sampled record's element cannot exist
    # without it (delta >= q), so only a padded release may claim the sampled event.
    with pytest.raises(ValueError, match="sampling must be None for an unpadded release"):
        Sanitizer(1.0, 1.0, sampling=sampling)
    with pytest.raises(ValueError, match="sampling must be"):
        Sanitizer(1.0, 1.0, sampling=BalancedSampled(2, 10, Gaussian(2.0)), padded_slots=100)
    with pytest.raises(ValueError, match="padded_slots"):
        Sanitizer(1.0, 1.0, padded_slots=100)
    assert Sanitizer(1.0, 1.0, sampling=sampling, padded_slots=100).event == sampling


def test_slot_plan_gives_each_record_one_slot_and_exactly_k_epochs():
    plan = SlotPlan.draw(records=50, slots=80, k=3, epochs=7, classes=10, row=1, seed=0)
    assert plan.slots == 80 and plan.k == 3 and plan.epochs == 7
    assert sorted(plan.owner[plan.owner >= 0].tolist()) == list(range(50))
    assert (plan.sampled.sum(0) == 3).all()
    assert (plan.owner[plan.slot_of()] == np.arange(50)).all()
    # Uniform k-subsets: every epoch is chosen with probability k/T (6 sd band).
    many = SlotPlan.draw(records=20_000, slots=20_000, k=3, epochs=7, classes=10, row=1, seed=1)
    rate = many.sampled.mean(1)
    assert np.abs(rate - 3 / 7).max() < 6 * math.sqrt((3 / 7) * (4 / 7) / 20_000)
    with pytest.raises(ValueError, match="slots must be >="):
        SlotPlan.draw(records=50, slots=49, k=1, epochs=2, classes=10, row=1)
    with pytest.raises(ValueError, match="k must satisfy"):
        SlotPlan.draw(records=5, slots=5, k=3, epochs=2, classes=10, row=1)


def test_padded_chunks_carry_sampled_records_and_zeros_elsewhere():
    plan = SlotPlan.draw(records=6, slots=10, k=1, epochs=3, classes=10, row=1, seed=2)
    values = torch.arange(1, 7, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 2, 2, 2)
    for epoch in (1, 2, 3):
        out = torch.cat(
            list(padded_chunks(plan, epoch, lambda r: values[torch.from_numpy(r)], (2, 2, 2), 4))
        )
        assert out.shape == (10, 2, 2, 2)
        for slot in range(10):
            record = plan.owner[slot]
            live = record >= 0 and plan.sampled[epoch - 1, record]
            expected = values[record] if live else torch.zeros(2, 2, 2)
            torch.testing.assert_close(out[slot], expected)


def test_an_empty_slot_is_pure_noise_and_carries_a_uniform_label(tmp_path):
    sanitizer = Sanitizer(1.0, 0.5, seed=0)
    with PrivacyLedger.for_run(tmp_path) as ledger:
        release = sanitizer.record_release(ledger, dataset="d", scope="slots")
        bits = (sanitizer.sanitize(torch.zeros(200, 4, 8, 8), release).unpack() > 0).float()
    assert abs(float(bits.mean()) - 0.5) < 6 * math.sqrt(0.25 / bits.numel())
    plan = SlotPlan.draw(records=10, slots=20_010, k=1, epochs=2, classes=3, row=1, seed=3)
    labels = slot_labels(plan, np.arange(10) % 3)
    owned = plan.owner >= 0
    assert (labels[owned] == plan.owner[owned] % 3).all()
    counts = np.bincount(labels[~owned], minlength=3) / (~owned).sum()
    assert np.abs(counts - 1 / 3).max() < 0.02
    # The same in every epoch: a label that changed would tell an unowned slot from an owned one.
    assert (slot_labels(plan, np.arange(10) % 3) == labels).all()


def test_holdout_rows_are_disjoint_seeded_and_never_empty():
    fit, held = holdout_split(100, 0.1, seed=0)
    assert len(held) == 10 and not set(fit) & set(held) and len(fit) + len(held) == 100
    assert (holdout_split(100, 0.1, seed=0)[1] == held).all()
    assert len(holdout_split(5, 0.01, seed=0)[1]) == 1
    assert len(holdout_split(5, 0.0, seed=0)[1]) == 0


def test_a_padded_run_records_one_balanced_row_before_any_bits_leave(tmp_path, tiny):
    config = tiny(release="padded", epochs_stage2=3, sample_k=1, slots=200)
    run_dir = tmp_path / "run"
    public = RecordingPublic(config, run_dir)
    result = train_delta(config, run_dir, progress=False, public=public)
    sigma = padded_sigma(config.epsilon, config.delta, 1, 3)
    event = BalancedSampled(1, 3, Gaussian(sigma))
    (row,) = [e for e in _entries(run_dir) if e.note.startswith("residual release (padded")]
    assert row.event == event and row.scope == "train" and row.count == 1
    assert len(public.received) == 3
    plan = SlotPlan.load(run_dir)
    assert plan is not None and plan.started == (1, 2, 3)
    first_labels = public.received[0][1]
    for data, labels in public.received:
        assert len(data) == 200 and labels is not None and len(labels) == 200
        assert np.array_equal(labels.labels, first_labels.labels)  # one label per slot
        assert data.event == event  # every epoch's payload carries the pass's event
    assert all(row in rows for rows in public.rows_at_upload)  # recorded before the first
    expected = Composed((SelfComposed(RandomizedResponse(2.0, 10), 1), SelfComposed(event, 1)))
    assert result.epsilon == pytest.approx(best_epsilon(expected, config.delta).epsilon)
    assert result.sigma == pytest.approx(sigma)
    # Balanced sampling lets each release carry less noise than a release every epoch.
    per_epoch = train_delta(config.replace(release="per-epoch"), tmp_path / "pe", progress=False)
    assert sigma < per_epoch.sigma


def test_a_padded_run_resumes_bit_identically_without_a_second_pass_row(tmp_path, tiny):
    config = tiny(release="padded", epochs_stage2=2, sample_k=1, slots=180)
    whole = train_delta(config, tmp_path / "whole", progress=False)
    run_dir = tmp_path / "cut"
    with pytest.raises(_CrashError):
        train_delta(config, run_dir, progress=False, public=CrashingPublic(config, run_dir))
    resumed = train_delta(config, run_dir, progress=False, resume=True)
    assert resumed.final == whole.final
    assert resumed.residual_weight == whole.residual_weight
    padded_rows = [e for e in _entries(run_dir) if "padded" in e.note]
    assert len(padded_rows) == 1  # epoch 2 was saved before the crash: not released again


def test_a_padded_epoch_lost_before_it_was_saved_is_recorded_again(tmp_path, tiny):
    config = tiny(release="padded", epochs_stage2=2, sample_k=1)
    run_dir = tmp_path / "run"
    train_delta(config, run_dir, progress=False)
    (run_dir / "released_train_epoch2.npz").unlink()
    (run_dir / "ckpt" / "stage2_epoch2.pt").unlink()
    (run_dir / "result.json").unlink()
    train_delta(config, run_dir, progress=False, resume=True)
    again = [e for e in _entries(run_dir) if "again after a restart" in e.note]
    assert len(again) == 1 and isinstance(again[0].event, Gaussian)


def test_each_epoch_releases_the_views_m_main_trains_on(tmp_path, tiny):
    config = tiny(release="per-epoch", epochs_stage2=2, epsilon=math.inf, noise_seed=None)
    run_dir = tmp_path / "run"
    public = RecordingPublic(config, run_dir)
    train_delta(config, run_dir, progress=False, public=public)
    with EpochBars(False, "x") as bars:
        run = _Run(config, tmp_path / "probe", None, bars)
        run.model.load_state_dict(
            torch.load(run_dir / "ckpt" / "stage2_epoch2.pt", weights_only=True)["model"]
        )
        run.model.freeze_backbone()
        for epoch, (data, _) in enumerate(public.received, start=1):
            views = run.epoch_views(epoch)
            signs = torch.cat(list(run.chunked(views))) >= 0
            assert torch.equal(data.unpack() > 0, signs)  # the residual of this epoch's views
        assert not torch.equal(run.epoch_views(1), run.epoch_views(2))  # fresh augmented views
        run.ledger.close()


def test_combine_sum_is_the_plain_sum_with_weight_one(tmp_path, tiny):
    result = train_delta(tiny(combine="sum", holdout=0.0), tmp_path / "run", progress=False)
    assert result.residual_weight == 1.0
    assert all("residual_weight" not in m for m in result.metrics)


def test_the_trust_weight_is_fitted_on_held_out_rows(tmp_path, tiny):
    result = train_delta(tiny(epochs_stage2=2), tmp_path / "run", progress=False)
    rows = [m for m in result.metrics if m["stage"] == 2]
    for row in rows:
        assert row["residual_weight"] >= 0.0
        assert row["holdout_loss_combined"] <= row["holdout_loss_main_only"] + 1e-12
    assert result.residual_weight == pytest.approx(rows[-1]["residual_weight"])


def test_channel_mean_payload_sends_one_bit_per_pixel(tmp_path, tiny):
    config = tiny(payload="channel-mean")
    public = RecordingPublic(config, tmp_path / "run")
    result = train_delta(config, tmp_path / "run", progress=False, public=public)
    data, _ = public.received[0]
    assert data.shape == (1, 16, 16) and result.bytes_per_sample == 16 * 16 // 8


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"release": "padded", "labels": "grad"}, "labels must be"),
        ({"release": "padded", "epsilon": math.inf}, "epsilon must be finite"),
        ({"release": "padded", "sample_k": 7, "epochs_stage2": 6}, "sample_k must satisfy"),
        ({"sample_k": 0}, "sample_k"),
        ({"slots": -1}, "slots"),
        ({"payload": "half"}, "payload"),
        ({"combine": "max"}, "combine"),
        ({"holdout": 0.6}, "holdout"),
        ({"holdout": 0.0}, "holdout must satisfy 0 < holdout"),
    ],
)
def test_new_options_are_refused_with_their_range(changes, match):
    from asymflow.delta.runs import DeltaConfig

    with pytest.raises(ValueError, match=match):
        DeltaConfig(**changes)


def test_the_default_backbone_is_data_independent(tmp_path, tiny):
    # The residual's sensitivity C assumes M_bb does not depend on the data: frozen at its
    # seeded initialization, it is the same after training on two different data sets.
    a = train_delta(tiny(), tmp_path / "a", progress=False)
    b = train_delta(tiny(data="synthetic:200"), tmp_path / "b", progress=False)
    state_a = torch.load(latest_checkpoint(a.run_dir)[2], weights_only=True)["model"]
    state_b = torch.load(latest_checkpoint(b.run_dir)[2], weights_only=True)["model"]
    backbone = [k for k in state_a if k.startswith("backbone.")]
    assert backbone and all(torch.equal(state_a[k], state_b[k]) for k in backbone)
    assert math.isfinite(a.epsilon)


def test_a_trained_backbone_is_recorded_as_a_non_private_release(tmp_path, tiny):
    result = train_delta(tiny(backbone="trained"), tmp_path / "run", progress=False)
    rows = [e for e in _entries(tmp_path / "run") if e.note == TRAINED_BACKBONE]
    assert len(rows) == 1 and isinstance(rows[0].event, NonPrivate)
    assert math.isinf(result.epsilon)


class WaitingPublic(RecordingPublic):
    """RecordingPublic whose training waits (up to 30 s) for the next epoch's payload file: it
    returns early only if the private side releases epoch e+1 while epoch e trains."""

    def __init__(self, config: Any, run_dir: Path, epochs: int) -> None:
        super().__init__(config, run_dir)
        self.epochs = epochs
        self.overlapped: list[bool] = []

    def train(self, dataset_id: str, epochs: int, **kwargs: Any) -> dict[str, float]:
        epoch = len(self.received)
        if epoch < self.epochs and len(self.trained) % 2 == 0:  # once per epoch (2 folds)
            ahead = release_file(self.run_dir, f"train_epoch{epoch + 1}")
            deadline = time.monotonic() + 30
            while not ahead.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
            self.overlapped.append(ahead.exists())
        return super().train(dataset_id, epochs, **kwargs)


@pytest.mark.parametrize("release", ["per-epoch", "padded"])
def test_overlap_releases_the_next_epoch_during_public_training_with_the_same_result(
    tmp_path, tiny, release
):
    config = tiny(release=release, epochs_stage2=3, sample_k=2, epsilon=4.0, public_folds=2)
    runs = {}
    for overlap in (False, True):
        run_dir = tmp_path / f"overlap-{overlap}"
        public = RecordingPublic(config, run_dir) if not overlap else None
        public = public or WaitingPublic(config, run_dir, config.epochs_stage2)
        result = train_delta(config, run_dir, progress=False, public=public, overlap=overlap)
        runs[overlap] = (result, public, run_dir)
    (plain, seq_public, seq_dir), (fast, par_public, par_dir) = runs[False], runs[True]
    assert par_public.overlapped == [True, True]  # epochs 2 and 3 released ahead
    assert fast.final == plain.final and fast.epsilon == plain.epsilon
    for (a, _), (b, _) in zip(seq_public.received, par_public.received, strict=True):
        assert torch.equal(a.unpack(), b.unpack())  # the same bits, epoch by epoch
    rows = [[(e.event, e.note, e.status) for e in _entries(d)] for d in (seq_dir, par_dir)]
    assert sorted(rows[0], key=repr) == sorted(rows[1], key=repr)  # same rows, every one released
    model = [
        torch.load(d / "ckpt" / "stage2_epoch3.pt", weights_only=True)["model"]
        for d in (seq_dir, par_dir)
    ]
    assert all(torch.equal(model[0][k], model[1][k]) for k in model[0])
