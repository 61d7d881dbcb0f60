"""Delta training: what crosses to the public side, ledger rows before releases, epsilon,
crash-safe resume without silent re-release, the variants and the demo report."""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import (
    Composed,
    Gaussian,
    NonPrivate,
    RandomizedResponse,
    SelfComposed,
)
from asymflow.accounting.ledger import LEDGER_FILENAME, PrivacyLedger
from asymflow.data import load_data
from asymflow.delta.label_steps import label_gradient_releases, label_gradient_sigma
from asymflow.delta.labels import NoisyLabelGradients, NoisyLabels, keep_probability
from asymflow.delta.private import NO_NOISE, ResidualWeight, calibrated_sigma
from asymflow.delta.runs import (
    DeltaConfig,
    latest_checkpoint,
    load_checkpoint,
    read_metrics,
    release_file,
)
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.delta.train import build_public_factory, fork_stage1, read_result, train_delta
from asymflow.public.local import LocalPublic
from asymflow.report import run_demo

SRC = Path(__file__).resolve().parents[2] / "src"


class RecordingPublic:
    """A PublicSide double: checks and records every call before delegating to LocalPublic."""

    def __init__(self, config: DeltaConfig, run_dir: Path, classes: int = 10) -> None:
        self.inner = LocalPublic(build_public_factory(config, classes), augment=False)
        self.run_dir = run_dir
        self.received: list[tuple[SanitizedResidual, NoisyLabels | None]] = []
        self.rows_at_upload: list[list[Any]] = []
        self.logit_calls = 0
        self.trained: list[tuple[str, np.ndarray | None]] = []

    def _ledger_rows(self) -> list[Any]:
        with PrivacyLedger(self.run_dir / LEDGER_FILENAME) as ledger:
            return ledger.entries()

    def upload(self, data: Any, labels: Any = None) -> str:
        assert isinstance(data, SanitizedResidual), type(data)
        assert labels is None or isinstance(labels, NoisyLabels), type(labels)
        rows = self._ledger_rows()
        # The release of these bits and of these labels is already in the ledger.
        assert any(r.event == data.event and r.scope == "train" for r in rows)
        if labels is not None:
            assert any(r.event == labels.event for r in rows)
        self.received.append((data, labels))
        self.rows_at_upload.append(rows)
        return self.inner.upload(data, labels)

    def train(self, dataset_id: str, epochs: int, **kwargs: Any) -> dict[str, float]:
        self.trained.append((kwargs["model"], kwargs.get("indices")))
        return self.inner.train(dataset_id, epochs, **kwargs)

    def logits(self, data: Any, **kwargs: Any) -> torch.Tensor:
        assert isinstance(data, SanitizedResidual), type(data)
        self.logit_calls += 1
        return self.inner.logits(data, **kwargs)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)


class StepwiseRecordingPublic(RecordingPublic):
    """RecordingPublic that also trains step by step; records every released gradient and
    checks that the ledger already holds the epoch's label-gradient row."""

    def __init__(self, config: DeltaConfig, run_dir: Path, classes: int = 10) -> None:
        super().__init__(config, run_dir, classes)
        self.gradients: list[NoisyLabelGradients] = []

    def step_logits(self, dataset_id: str, indices: np.ndarray, **kwargs: Any) -> torch.Tensor:
        return self.inner.step_logits(dataset_id, indices, **kwargs)

    def step_apply(self, gradients: Any, **kwargs: Any) -> None:
        assert isinstance(gradients, NoisyLabelGradients), type(gradients)
        rows = [r for r in self._ledger_rows() if r.note.startswith("labels (noisy gradients")]
        assert rows and rows[-1].event == gradients.event
        self.gradients.append(gradients)
        self.inner.step_apply(gradients, **kwargs)


def _rows(run_dir: Path, note_prefix: str) -> list[Any]:
    with PrivacyLedger(run_dir / LEDGER_FILENAME) as ledger:
        return [e for e in ledger.entries() if e.note.startswith(note_prefix)]


def test_labels_reach_the_public_side_only_through_randomized_response(tmp_path, tiny):
    config = tiny(data="synthetic:400")
    run_dir = tmp_path / "run"
    double = RecordingPublic(config, run_dir)
    train_delta(config, run_dir, progress=False, public=double)
    true = load_data(config.data).train.labels
    assert double.received and double.logit_calls > 0
    for data, labels in double.received:
        assert labels is not None and labels.event == RandomizedResponse(2.0, 10)
        assert not np.array_equal(labels.labels, true)
        p = keep_probability(2.0, 10)
        agree = float(np.mean(labels.labels == true))
        assert agree == pytest.approx(p, abs=4 * math.sqrt(p * (1 - p) / len(true)))
        assert len(data) == len(true) and data.shape == (8, 16, 16)


def test_public_models_are_cross_fitted_on_complementary_halves(tmp_path, tiny):
    config = tiny(public_folds=2)
    double = RecordingPublic(config, tmp_path / "run")
    train_delta(config, tmp_path / "run", progress=False, public=double)
    (m0, rows0), (m1, rows1) = double.trained
    assert (m0, m1) == ("fold0", "fold1")
    assert rows0 is not None and rows1 is not None
    assert not set(rows0) & set(rows1) and len(rows0) + len(rows1) == 160
    assert abs(len(rows0) - len(rows1)) <= 1


def test_clear_labels_are_sent_only_when_asked_and_make_epsilon_infinite(tmp_path, tiny):
    config = tiny(labels="clear")
    run_dir = tmp_path / "run"
    double = RecordingPublic(config, run_dir)
    result = train_delta(config, run_dir, progress=False, public=double)
    np.testing.assert_array_equal(double.received[0][1].labels, load_data(config.data).train.labels)
    (row,) = _rows(run_dir, "labels")
    assert row.event == NonPrivate("labels sent in clear")
    assert math.isinf(result.epsilon)


def test_grad_labels_leave_only_as_noisy_gradients_accounted_per_epoch(tmp_path, tiny):
    config = tiny(labels="grad", epochs_stage2=2, public_folds=2, label_epsilon=1.0)
    run_dir = tmp_path / "run"
    double = StepwiseRecordingPublic(config, run_dir)
    result = train_delta(config, run_dir, progress=False, public=double)
    assert double.received and all(labels is None for _, labels in double.received)
    assert not double.trained  # no self-training on labels: every step is a round trip
    # 2 stage-2 epochs x 2 fold models x ceil(80 / 32) batches; every row of the fold's data
    assert len(double.gradients) == 2 * 2 * 3
    assert sum(len(g) for g in double.gradients) == 2 * 160
    rows = _rows(run_dir, "labels")
    sigma = label_gradient_sigma(1.0, config.delta, label_gradient_releases(2, 1, 2))
    assert [(r.note, r.event, r.count) for r in rows] == [
        (f"labels (noisy gradients, epoch {e})", Gaussian(sigma), 1) for e in (1, 2)
    ]
    labels_only = Composed(tuple(SelfComposed(r.event, r.count) for r in rows))
    assert best_epsilon(labels_only, config.delta).epsilon <= 1.0
    # what crosses is far from the clean one-hot signal: the noise is sqrt(2) sigma per entry
    spread = np.concatenate([g.values for g in double.gradients]).std()
    assert spread > 0.9 * math.sqrt(2) * sigma > 1.0
    assert math.isfinite(result.epsilon) and result.final["test_acc_combined"] is not None


def test_grad_labels_need_a_stepwise_public_side_and_release_nothing_without_one(tmp_path, tiny):
    config = tiny(labels="grad")
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match="labels='grad' needs a public side"):
        train_delta(config, run_dir, progress=False, public=RecordingPublic(config, run_dir))
    assert not _rows(run_dir, "residual") and not _rows(run_dir, "labels")


def test_ledger_epsilon_is_the_gaussian_and_randomized_response_composition(tmp_path, tiny):
    config = tiny()
    result = train_delta(config, tmp_path / "run", progress=False)
    sigma = calibrated_sigma(config.epsilon, config.delta, 1)
    assert result.sigma == pytest.approx(sigma)
    expected = Composed(
        (SelfComposed(RandomizedResponse(2.0, 10), 1), SelfComposed(Gaussian(sigma), 1))
    )
    assert result.epsilon == pytest.approx(best_epsilon(expected, config.delta).epsilon, rel=1e-9)
    (residual,) = _rows(tmp_path / "run", "residual release (train)")
    assert residual.event == Gaussian(sigma) and residual.scope == "train"
    assert residual.status == "released"


def test_per_epoch_release_records_a_row_per_epoch_within_the_target(tmp_path, tiny):
    config = tiny(release="per-epoch", epochs_stage2=2, variant="naive-dp")
    train_delta(config, tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run", "IR release (train")
    assert len(rows) == 2
    sigma = calibrated_sigma(config.epsilon, config.delta, 2)
    assert all(r.event == Gaussian(sigma) for r in rows)
    residual_only = Composed(tuple(SelfComposed(r.event, 1) for r in rows))
    assert best_epsilon(residual_only, config.delta).epsilon <= config.epsilon


def test_infinite_epsilon_sends_raw_signs_recorded_as_non_private(tmp_path, tiny):
    result = train_delta(tiny(epsilon=math.inf), tmp_path / "run", progress=False)
    (row,) = _rows(tmp_path / "run", "residual release (train)")
    assert row.event == NonPrivate(NO_NOISE)
    assert math.isinf(result.epsilon) and result.sigma == 0.0


def test_resume_after_sigkill_never_releases_silently_twice(tmp_path, tiny):
    config = tiny(epochs_stage2=6)
    run_dir = tmp_path / "run"
    code = (
        "import json, sys, torch; torch.set_num_threads(1);"
        "from asymflow.delta.runs import DeltaConfig; from asymflow.delta.train import train_delta;"
        "train_delta(DeltaConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False)"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(config.to_dict()), str(run_dir)], env=env
    )
    deadline = time.monotonic() + 120
    try:
        while not (run_dir / "ckpt" / "stage2_epoch1.pt").exists():
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no stage-2 checkpoint within 120 s"
            time.sleep(0.02)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert release_file(run_dir, "train").exists()
    before = read_metrics(run_dir)
    assert not (run_dir / "result.json").exists()
    stage, epoch, _ = latest_checkpoint(run_dir)
    kept = [m for m in before if (m["stage"], m["epoch"]) <= (stage, epoch)]
    assert (stage, epoch) >= (2, 1) and kept[-1]["epoch"] == epoch  # its row precedes it

    result = train_delta(config, run_dir, progress=False, resume=True)

    assert len(_rows(run_dir, "residual release (train)")) == 1
    assert len(_rows(run_dir, "residual release (test)")) == 1
    assert len(_rows(run_dir, "labels")) == 1
    metrics = read_metrics(run_dir)
    assert [(m["stage"], m["epoch"]) for m in metrics] == [(1, 1)] + [(2, e) for e in range(1, 7)]
    assert metrics[: len(kept)] == kept  # rows up to the checkpoint are kept as they were
    assert result.final["test_acc_combined"] is not None


def test_a_lost_release_is_released_again_under_a_new_ledger_row(tmp_path, tiny):
    config = tiny()
    run_dir = tmp_path / "run"
    train_delta(config, run_dir, progress=False)
    # Simulate a crash after the ledger row was written but before the payload was saved.
    release_file(run_dir, "train").unlink()
    (run_dir / "ckpt" / "stage2_epoch1.pt").unlink()
    (run_dir / "result.json").unlink()
    train_delta(config, run_dir, progress=False, resume=True)
    rows = _rows(run_dir, "residual release (train)")
    assert len(rows) == 2 and rows[0].id < rows[1].id
    assert len(_rows(run_dir, "labels")) == 1  # still cached: not released again


SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def delta_and_main(tmp_path_factory, tiny) -> dict[int, tuple[Any, Any]]:
    """Delta at epsilon = inf and its main-only sibling (same stage 1), for three seeds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("delta-vs-main")
    runs = {}
    for seed in SEEDS:
        config = tiny(
            data="synthetic:400", epochs_stage1=3, epochs_stage2=2, epsilon=math.inf, seed=seed
        )
        delta = train_delta(config, root / f"delta{seed}", progress=False)
        main_config = config.replace(variant="main-only")
        fork_stage1(root / f"delta{seed}", root / f"main{seed}", main_config)
        main = train_delta(main_config, root / f"main{seed}", progress=False, resume=True)
        runs[seed] = (delta, main)
    torch.set_num_threads(threads)
    return runs


def test_delta_is_not_worse_than_main_only(delta_and_main):
    # Over 3 seeds x 80 test images, the standard error of a mean accuracy near 1/2 is
    # sqrt(0.25 / 240) = 0.032; Delta may trail main-only by at most two of them (0.065).
    # Adding z_res with weight 1 trailed by 0.11-0.19 on every seed.
    deltas = [d.accuracy for d, _ in delta_and_main.values()]
    mains = [m.accuracy for _, m in delta_and_main.values()]
    assert all(m is not None and m > 0.2 for m in mains)  # above chance (0.1)
    assert all(d is not None for d in deltas)
    n = len(SEEDS) * 80
    assert float(np.mean(deltas)) >= float(np.mean(mains)) - 2 * math.sqrt(0.25 / n)
    delta, main = delta_and_main[0]
    assert main.bytes_per_sample == 0 and main.public_macs == 0 and main.epsilon == 0.0
    assert main.residual_weight is None
    assert delta.bytes_per_sample == 8 * 16 * 16 // 8


def test_fitted_trust_weight_never_raises_the_training_loss(delta_and_main):
    for delta, _ in delta_and_main.values():
        rows = [r for r in delta.metrics if r["stage"] == 2]
        assert len(rows) == 2
        for row in rows:
            assert row["residual_weight"] >= 0.0
            assert row["holdout_loss_combined"] <= row["holdout_loss_main_only"] + 1e-12
        assert delta.residual_weight == pytest.approx(rows[-1]["residual_weight"])
        assert read_result(delta.run_dir)["residual_weight"] == delta.residual_weight


def test_trust_weight_switches_off_a_misleading_head_and_minimizes_the_loss():
    gen = torch.Generator().manual_seed(0)
    n, k = 2000, 5
    y = torch.randint(0, k, (n,), generator=gen)
    z_main = torch.randn(n, k, generator=gen) + 1.5 * functional.one_hot(y, k)
    noise = torch.randn(n, k, generator=gen)
    weight = ResidualWeight()
    weight.fit(z_main, -3.0 * functional.one_hot(y, k).float() + noise, y)
    assert weight.value == 0.0  # a head that points away from y is switched off, not negated
    informative = 2.0 * functional.one_hot(y, k).float() + noise
    w = weight.fit(z_main, informative, y)
    assert w > 0.1 and weight.value == w
    grid = np.linspace(0.0, 4.0, 401)
    losses = [ResidualWeight.loss(z_main, informative, y, float(g)) for g in grid]
    assert w == pytest.approx(grid[int(np.argmin(losses))], abs=0.011)
    assert ResidualWeight.loss(z_main, informative, y, w) <= min(losses) + 1e-9
    torch.testing.assert_close(
        weight(z_main, informative), z_main + w * functional.log_softmax(informative, 1)
    )


class _CrashError(Exception):
    pass


class CrashingPublic(RecordingPublic):
    """Fails at the second upload (stage-2 epoch 2), after the epoch-1 checkpoint."""

    def upload(self, data: Any, labels: Any = None) -> str:
        if self.received:
            raise _CrashError
        return super().upload(data, labels)


def test_checkpoints_refer_to_the_released_files_instead_of_embedding_them(tmp_path, tiny):
    config = tiny(epochs_stage2=2)
    run_dir = tmp_path / "run"
    with pytest.raises(_CrashError):
        train_delta(config, run_dir, progress=False, public=CrashingPublic(config, run_dir))
    state = load_checkpoint(run_dir / "ckpt" / "stage2_epoch1.pt")
    assert state["format"] == 2 and set(state["released"]) == {"train", "test", "labels"}
    for name, ref in state["released"].items():
        path = release_file(run_dir, name)
        assert ref["file"] == path.name
        assert ref["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        with np.load(path) as data:
            assert ref["event"] == str(data["event"])
    embedded = [  # byte tensors besides the RNG state: what format 1 stored payloads as
        v
        for v in _leaves({k: v for k, v in state.items() if k != "rng"})
        if isinstance(v, torch.Tensor) and v.dtype == torch.uint8
    ]
    assert not embedded
    assert "residual_weight.weight" in state["model"]

    # Resuming from that checkpoint needs the very same payload: altered or missing refuse.
    path = release_file(run_dir, "train")
    original = path.read_bytes()
    path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ValueError, match="altered"):
        train_delta(config, run_dir, progress=False, resume=True)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        train_delta(config, run_dir, progress=False, resume=True)
    path.write_bytes(original)
    result = train_delta(config, run_dir, progress=False, resume=True)
    assert [(m["stage"], m["epoch"]) for m in result.metrics] == [(1, 1), (2, 1), (2, 2)]
    assert len(_rows(run_dir, "residual release (train)")) == 1
    assert len(_rows(run_dir, "labels")) == 1


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for value in tree.values() for leaf in _leaves(value)]
    if isinstance(tree, list | tuple):
        return [leaf for value in tree for leaf in _leaves(value)]
    return [tree]


def test_existing_runs_need_resume_and_the_same_config(tmp_path, tiny):
    config = tiny(epochs_stage2=0)
    train_delta(config, tmp_path / "run", progress=False)
    with pytest.raises(FileExistsError, match="resume=True"):
        train_delta(config, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="lr"):
        train_delta(config.replace(lr=0.1), tmp_path / "run", progress=False, resume=True)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"variant": "dp-sgd"}, "variant"),
        ({"labels": "noisy"}, "labels"),
        ({"release": "always"}, "release"),
        ({"t_low": 32}, "t_low"),
        ({"r": 64}, "r must"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"delta": 1.0}, "delta"),
        ({"clip": math.inf}, "clip"),
        ({"label_epsilon": math.inf}, "label_epsilon"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_config_errors_name_the_parameter(changes, match):
    with pytest.raises(ValueError, match=match):
        DeltaConfig(**changes)


def test_config_round_trips_through_json_with_infinity():
    config = DeltaConfig(epsilon=math.inf)
    assert DeltaConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


def test_quick_demo_writes_the_report_and_its_plots(tmp_path):
    path = run_demo(tmp_path / "demo", progress=False, quick=True)
    text = path.read_text()
    for png in ("accuracy.png", "epsilon.png", "public_view.png"):
        assert (tmp_path / "demo" / png).stat().st_size > 1000
        assert f"({png})" in text
    for name in ("delta", "delta-eps-inf", "main-only", "naive-dp", "original"):
        assert f"| {name} |" in text
    assert "Non-private releases" in text  # the epsilon = inf run is flagged
