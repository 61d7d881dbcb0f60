"""train_dpsgd end to end on tiny synthetic data, and noise calibration."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from asymflow.accounting import (
    BalancedSampled,
    Gaussian,
    PoissonSampled,
    SelfComposed,
    best_epsilon,
)
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.dpsgd.aggregate import validate_model
from asymflow.dpsgd.partition import PartitionSpec, step_accounting
from asymflow.dpsgd.runs import (
    DpsgdConfig,
    latest_checkpoint,
    load_checkpoint,
    read_config,
    read_metrics,
)
from asymflow.dpsgd.train import calibrated_sigma, train_dpsgd
from asymflow.models import resnet20
from asymflow.runfiles import write_config
from asymflow.sampling import BalancedIterationSampler
from tests.cli.helpers import subprocess_env

RDP = ("rdp",)
TINY = {
    "data": "synthetic:40",
    "width": 0.25,
    "k": 2,
    "steps": 5,
    "epochs": 2,
    "methods": RDP,
    "sampler_seed": 1,
    "noise_seed": 2,
    "eval_batch_size": 64,
}


def test_bis_training_run_ledger_matches_the_sampler_event(tmp_path: Path) -> None:
    config = DpsgdConfig(sampler="balanced", sigma=1.5, **TINY)
    result = train_dpsgd(config, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "ledger.sqlite", "result.json"):
        assert (run / name).is_file(), name
    assert (run / "ckpt" / "epoch2.pt").is_file()
    assert read_config(run) == config
    assert [row["epoch"] for row in read_metrics(run)] == [1, 2]
    sampler = BalancedIterationSampler(40, 2, 5, seed=0, passes=2)
    want = best_epsilon(sampler.privacy_event(Gaussian(1.5)), config.delta, RDP)
    assert result.epsilon == pytest.approx(want.epsilon, rel=1e-9)
    assert result.expected_batch_size == pytest.approx(2 * 40 / 5)
    with PrivacyLedger(run / "ledger.sqlite") as ledger:
        entries = ledger.entries()
    assert [e.event for e in entries] == [BalancedSampled(2, 5, Gaussian(1.5))] * 2
    assert json.loads((run / "result.json").read_text())["epsilon"] == result.epsilon


def test_poisson_split_run_with_target_epsilon_stays_within_it(tmp_path: Path) -> None:
    config = DpsgdConfig(
        sampler="poisson", target_epsilon=8.0, partition="split:2", **{**TINY, "epochs": 1}
    )
    result = train_dpsgd(config, tmp_path / "run", progress=False)
    assert result.calibrated
    assert result.epsilon <= 8.0
    assert "ModelPartitioned(2" in result.accounting
    assert len(result.partition["blocks"]) == 2


@pytest.mark.parametrize(
    ("sampler", "partition", "shared"),
    [
        ("balanced", "none", ()),
        ("poisson", "none", ()),
        ("poisson", "split:3", ()),
        ("poisson", "split:2", ("stem",)),
    ],
)
def test_calibrated_sigma_never_overshoots_the_target(
    sampler: str, partition: str, shared: tuple[str, ...]
) -> None:
    """The allocation RDP is costly at large sigma, hence the lenient target (sigma ~ 1)."""
    target, delta, k, steps, epochs = 8.0, 1e-5, 2, 5, 2
    config = DpsgdConfig(
        sampler=sampler,
        target_epsilon=target,
        delta=delta,
        k=k,
        steps=steps,
        epochs=epochs,
        partition=partition,
        shared=shared,
        methods=RDP,
    )
    accounting = step_accounting(PartitionSpec.parse(partition), sampler, has_shared=bool(shared))
    sigma, planned = calibrated_sigma(config, steps, accounting)
    step = accounting.event(sigma)
    if sampler == "balanced":
        schedule = SelfComposed(BalancedSampled(k, steps, step), epochs)
    else:
        schedule = SelfComposed(PoissonSampled(k / steps, step), steps * epochs)
    eps = best_epsilon(schedule, delta, RDP).epsilon
    assert planned is not None and eps == pytest.approx(planned, rel=1e-9)
    assert eps <= target
    # ...and it is tight: 1% less noise (nearly) reaches the target. The bound need not be
    # strictly monotone in sigma (the joint partial-split step takes a minimum of two bounds
    # per order), so "reaches" allows 1%.
    assert best_epsilon(_rescaled(schedule, 0.99), delta, RDP).epsilon > target * 0.99


def _rescaled(event, factor: float):
    """The same schedule with every Gaussian multiplier scaled by ``factor``."""
    from dataclasses import fields, replace

    from asymflow.accounting.events import Event

    if isinstance(event, Gaussian):
        return Gaussian(event.sigma * factor)
    changes = {
        f.name: _rescaled(getattr(event, f.name), factor)
        for f in fields(event)
        if isinstance(getattr(event, f.name), Event)
    }
    return replace(event, **changes)


def test_batchnorm_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"BatchNorm.*norm='group'"):
        validate_model(resnet20(norm="batch", width=0.25))
    config = DpsgdConfig(sampler="balanced", sigma=1.0, norm="batch", **TINY)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_dpsgd(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "config.json").exists()


def test_shuffle_sampler_run_is_refused(tmp_path: Path) -> None:
    config = DpsgdConfig(sampler="shuffle", sigma=1.0, **TINY)
    with pytest.raises(ValueError, match="no certified epsilon"):
        train_dpsgd(config, tmp_path / "run", progress=False)


def test_config_errors_name_the_parameter() -> None:
    with pytest.raises(ValueError, match="exactly one of sigma and target_epsilon"):
        DpsgdConfig(sigma=1.0, target_epsilon=2.0)
    with pytest.raises(ValueError, match=r"k must satisfy 1 <= k <= steps"):
        DpsgdConfig(sigma=1.0, k=6, steps=5)
    with pytest.raises(ValueError, match="shared parameters need partition"):
        DpsgdConfig(sigma=1.0, shared=("stem",))
    with pytest.raises(ValueError, match=r"sigma must lie in \(0"):
        DpsgdConfig(sigma=0.0)
    assert math.isclose(DpsgdConfig(sigma=1.0).steps_for(1000), round(1000 / 64))


def _train_in_subprocess(config: DpsgdConfig, run_dir: Path) -> subprocess.Popen[bytes]:
    code = (
        "import json, sys, torch; torch.set_num_threads(1);"
        "from asymflow.dpsgd.runs import DpsgdConfig; from asymflow.dpsgd.train import train_dpsgd;"
        "train_dpsgd(DpsgdConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], progress=False)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, json.dumps(config.to_dict()), str(run_dir)],
        env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
    )


def _ledger_rows(run_dir: Path) -> int:
    with PrivacyLedger.for_run(run_dir) as ledger:
        return len(ledger.entries())


def test_resume_after_sigkill_equals_the_uninterrupted_run_and_never_under_reports(
    tmp_path: Path,
) -> None:
    """Split BIS with momentum: batches, masks, noise and optimizer state all carry over."""
    config = DpsgdConfig(
        sampler="balanced", sigma=1.5, partition="split:2", momentum=0.5, **{**TINY, "epochs": 4}
    )
    run = tmp_path / "run"
    proc = _train_in_subprocess(config, run)
    deadline = time.monotonic() + 120
    try:  # kill it once epoch 2 has written its ledger row, after the checkpoint of epoch 1
        while latest_checkpoint(run) is None or _ledger_rows(run) < 2:
            assert proc.poll() is None, "training ended before it could be killed"
            assert time.monotonic() < deadline, "no second pass within 120 s"
            time.sleep(0.02)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not (run / "result.json").exists()
    found = latest_checkpoint(run)
    assert found is not None and found[0] < config.epochs
    done = found[0]
    # The process may have gone on past the checkpoint polled for: keep only the rows up to
    # the checkpoint that was there at the kill.
    kept = [m for m in read_metrics(run) if m["epoch"] <= done]
    assert [m["epoch"] for m in kept] == list(range(1, done + 1))
    rows_at_kill = _ledger_rows(run)
    assert rows_at_kill >= done

    resumed = train_dpsgd(config, run, progress=False, resume=True)
    reference = train_dpsgd(config, tmp_path / "reference", progress=False)

    metrics = read_metrics(run)
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[:done] == kept
    # Every pass started before the kill keeps its row; the redone ones add theirs.
    assert _ledger_rows(run) == rows_at_kill + config.epochs - done
    with PrivacyLedger.for_run(run) as ledger:
        spent = best_epsilon(ledger.composed_event(dataset=config.data), config.delta, RDP)
    assert resumed.epsilon == spent.epsilon >= reference.epsilon
    assert (resumed.epsilon > reference.epsilon) == (rows_at_kill > done)  # a pass was cut short
    assert json.loads((run / "result.json").read_text())["epsilon"] == resumed.epsilon
    # Fixed seeds: the resumed run is the uninterrupted one, bit for bit.
    assert [m["test_acc"] for m in metrics] == [m["test_acc"] for m in reference.metrics]
    mine = load_checkpoint(run / "ckpt" / "epoch4.pt")
    theirs = load_checkpoint(tmp_path / "reference" / "ckpt" / "epoch4.pt")
    for name, tensor in theirs["model"].items():
        assert torch.equal(mine["model"][name], tensor), name

    again = train_dpsgd(config, run, progress=False, resume=True)  # finished: nothing to train
    assert _ledger_rows(run) == rows_at_kill + config.epochs - done
    assert (again.epsilon, again.test_acc, again.metrics) == (
        resumed.epsilon,
        resumed.test_acc,
        metrics,
    )


def test_resume_with_a_different_config_is_refused_naming_the_fields(tmp_path: Path) -> None:
    config = DpsgdConfig(sampler="balanced", sigma=1.5, **TINY)
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, config)
    other = DpsgdConfig(sampler="poisson", sigma=2.0, **TINY)
    with pytest.raises(ValueError, match=r"differing fields: \['sampler', 'sigma'\]"):
        train_dpsgd(other, run, progress=False, resume=True)
    with pytest.raises(FileExistsError, match="pass resume=True"):
        train_dpsgd(config, run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]


@pytest.mark.parametrize("fixed", ["sampler_seed", "noise_seed"])
def test_resume_with_only_one_seed_fixed_is_refused(tmp_path: Path, fixed: str) -> None:
    # A redone epoch would reuse its batches with fresh noise, or its noise on fresh batches.
    unfixed = "noise_seed" if fixed == "sampler_seed" else "sampler_seed"
    config = DpsgdConfig(sampler="balanced", sigma=1.5, **{**TINY, unfixed: None})
    run = tmp_path / "run"
    run.mkdir()
    write_config(run, config)
    with pytest.raises(ValueError, match="sampler_seed and noise_seed must both be set or both"):
        train_dpsgd(config, run, progress=False, resume=True)
    assert sorted(p.name for p in run.iterdir()) == ["config.json"]
