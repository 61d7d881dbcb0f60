"""``asymflow dpsgd train`` on tiny synthetic data, and its clean errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.dpsgd.runs import DpsgdConfig, read_config, read_metrics
from tests.cli.helpers import (
    assert_clean_error,
    assert_documented_defaults,
    invoke,
    options_of,
)

# tests/dpsgd/test_train.py::TINY as options, one epoch.
TINY = [
    *("--data", "synthetic:40", "--width", "0.25", "--k", "2", "--steps", "5"),
    *("--epochs", "1", "--method", "rdp", "--sampler-seed", "1", "--noise-seed", "2"),
]


def test_train_writes_the_run_and_reports_the_ledger_epsilon(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["dpsgd", "train", *TINY, "--sampler", "balanced", "--sigma", "1.5"]
    result = invoke([*args, "--partition", "split:2", "--out", str(run), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert read_config(run) == DpsgdConfig(
        data="synthetic:40",
        width=0.25,
        k=2,
        steps=5,
        epochs=1,
        methods=("rdp",),
        sampler_seed=1,
        noise_seed=2,
        sigma=1.5,
        partition="split:2",
    )
    assert payload["sigma"] == 1.5 and not payload["calibrated"]
    assert payload["steps_per_epoch"] == 5
    assert len(payload["partition"]["blocks"]) == 2
    with PrivacyLedger.for_run(run) as ledger:
        expected = best_epsilon(ledger.composed_event(dataset="synthetic:40"), 1e-5, ("rdp",))
    assert payload["epsilon"] == expected.epsilon
    assert payload["method"] == "rdp"
    assert_clean_error(invoke([*args, "--out", str(run)]), "--out already holds a run")


def test_train_with_target_epsilon_prints_the_calibrated_sigma(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["dpsgd", "train", *TINY, "--sampler", "poisson", "--target-epsilon", "8"]
    result = invoke([*args, "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert "(calibrated)" in result.stdout
    assert json.loads((run / "result.json").read_text())["epsilon"] <= 8


def test_resume_reads_the_settings_of_the_run_and_refuses_others(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ["dpsgd", "train", *TINY, "--sampler", "balanced", "--sigma", "1.5", "--out", str(run)]
    assert invoke(args).exit_code == 0
    # As if killed after epoch 1's metrics row, before its checkpoint.
    shutil.rmtree(run / "ckpt")
    (run / "result.json").unlink()
    assert_clean_error(
        invoke([*args, "--resume", "--sigma", "2"]), "these options differ: --sigma (run: 1.5,"
    )
    result = invoke(["dpsgd", "train", "--out", str(run), "--resume", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    with PrivacyLedger.for_run(run) as ledger:
        assert len(ledger.entries()) == 2  # the cut pass and the redone one
        spent = best_epsilon(ledger.composed_event(dataset="synthetic:40"), 1e-5, ("rdp",))
    assert payload["epsilon"] == spent.epsilon
    assert [m["epoch"] for m in read_metrics(run)] == [1]


BAD_TRAIN = [
    (["--sampler", "shuffle", "--sigma", "1"], "--sampler shuffle has no certified ε"),
    (["--sampler", "uniform", "--sigma", "1"], "--sampler must be one of balanced, poisson"),
    ([], "exactly one of --sigma"),
    (["--sigma", "1", "--target-epsilon", "2"], "exactly one of --sigma"),
    (["--sigma", "0"], "--sigma must lie in (0"),
    (["--target-epsilon", "-1"], "--target-epsilon must lie in (0"),
    (["--sigma", "1", "--k", "9"], "--k must satisfy 1 <= k <= steps"),
    (["--sigma", "1", "--q", "0.5"], "--q applies to sampler 'poisson' only"),
    (["--sigma", "1", "--sampler", "poisson", "--q", "1.5"], "--q must lie in (0"),
    (["--sigma", "1", "--delta", "0"], "--delta"),
    (["--sigma", "1", "--clip", "0"], "--clip"),
    (["--sigma", "1", "--partition", "split:1"], "--partition split:d needs an integer d >= 2"),
    (["--sigma", "1", "--partition", "dropout:0.3"], "--partition dropout:r"),
    (["--sigma", "1", "--shared", "stem"], "--shared parameters need partition"),
    (["--sigma", "1", "--model", "vgg"], "--model must be one of"),
    (["--sigma", "1", "--width", "0"], "--width must lie in (0"),
    (["--sigma", "1", "--method", "mc"], "--method must be one of rdp, pld, best"),
    (["--sigma", "1", "--data", "nope"], "--data"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_TRAIN)
def test_train_bad_input_is_one_line_naming_the_option(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert_clean_error(invoke(["dpsgd", "train", *TINY, *args, "--out", str(run)]), expected)
    assert not run.exists()


def test_train_documents_the_config_defaults() -> None:
    options = options_of("dpsgd", "train")
    assert {"sigma", "target_epsilon", "partition", "shared", "sampler", "out"} <= set(options)
    assert assert_documented_defaults(options, DpsgdConfig(sigma=1.0)) >= 20
