"""``asymflow delta train|eval|report`` on a tiny synthetic run, and their clean errors."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.runs import DeltaConfig, read_config
from tests.cli.helpers import (
    assert_clean_error,
    assert_documented_defaults,
    invoke,
    options_of,
)

# tests/delta/conftest.py::tiny_config as options: a run of a second or two.
TINY = [
    *("--data", "synthetic:160", "--ir-channels", "8", "--r", "2"),
    *("--private-widths", "8,16", "--private-ranks", "2,4", "--public-width", "0.25"),
    *("--epochs-stage1", "1", "--epochs-stage2", "1", "--batch-size", "32"),
    *("--eval-batch-size", "64", "--noise-seed", "0"),
]
TINY_CONFIG = DeltaConfig(
    data="synthetic:160",
    ir_channels=8,
    r=2,
    private_widths=(8, 16),
    private_ranks=(2, 4),
    public_width=0.25,
    epochs_stage1=1,
    epochs_stage2=1,
    batch_size=32,
    eval_batch_size=64,
    noise_seed=0,
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One tiny Delta run trained through the command line, and its --json summary."""
    run = tmp_path_factory.mktemp("delta") / "run"
    result = invoke(["delta", "train", *TINY, "--out", str(run), "--json"])
    assert result.exit_code == 0, result.output
    return run, json.loads(result.stdout)


def test_train_writes_the_run_with_the_options_as_its_config(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    run, payload = trained
    assert read_config(run) == TINY_CONFIG
    for name in ("config.json", "metrics.jsonl", "ledger.sqlite", "result.json"):
        assert (run / name).is_file(), name
    assert payload == json.loads((run / "result.json").read_text())


def test_train_json_reports_accuracy_epsilon_traffic_macs_and_energy(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    run, payload = trained
    assert 0 <= payload["accuracy"] <= 1
    assert payload["bytes_per_sample"] == 8 * 16 * 16 // 8  # 1 bit per IR element
    assert payload["private_macs"] > 0 and payload["public_macs"] > 0
    assert 0 < payload["energy_fraction"] <= 1
    with PrivacyLedger.for_run(run) as ledger:
        report = ledger.epsilon(1e-5, dataset="synthetic:160", scope="train")
    assert math.isclose(payload["epsilon"], report.epsilon)
    assert payload["epsilon_method"] == report.method


def test_resume_of_a_finished_run_takes_its_settings_and_refuses_others(
    trained: tuple[Path, dict[str, Any]],
) -> None:
    run, payload = trained
    result = invoke(["delta", "train", "--out", str(run), "--resume"])
    assert result.exit_code == 0, result.output
    assert "acc" in result.stdout and "ε (method)" in result.stdout
    assert json.loads((run / "result.json").read_text())["epsilon"] == payload["epsilon"]
    message = assert_clean_error(
        invoke(["delta", "train", "--out", str(run), "--resume", "--epsilon", "2"]), "--epsilon"
    )
    assert "run: 1.4, given: 2.0" in message


def test_train_refuses_an_existing_run_without_resume(trained: tuple[Path, Any]) -> None:
    run, _ = trained
    assert_clean_error(invoke(["delta", "train", *TINY, "--out", str(run)]), "--resume")


def test_eval_queries_the_test_set_through_the_ledger(trained: tuple[Path, Any]) -> None:
    run, _ = trained
    result = invoke(["delta", "eval", str(run), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["variant"] == "delta"
    assert payload["queries"] == 32 and payload["batches"] == 1
    assert 0 <= payload["accuracy"] <= 1
    assert math.isclose(payload["epsilon_per_query"], 1.4, rel_tol=1e-3)
    with PrivacyLedger.for_run(run) as ledger:
        assert ledger.entries(dataset="synthetic:160/test-queries")
    table = invoke(["delta", "eval", str(run), "--batch-size", "16"])
    assert table.exit_code == 0, table.output
    assert "ε per query" in table.stdout


def test_report_writes_report_md_over_the_runs(trained: tuple[Path, Any], tmp_path: Path) -> None:
    run, _ = trained
    out = tmp_path / "report"
    result = invoke(["delta", "report", str(run), "--out", str(out), "--title", "Tiny"])
    assert result.exit_code == 0, result.output
    report = (out / "report.md").read_text()
    assert report.startswith("# Tiny")
    assert (out / "accuracy.png").stat().st_size > 0
    assert "report written to" in result.stdout


def test_eval_and_report_refuse_what_is_not_a_finished_delta_run(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    assert_clean_error(invoke(["delta", "eval", str(missing)]), "RUN_DIR")
    assert_clean_error(invoke(["delta", "report", str(missing), "--out", str(tmp_path)]), "RUN_DIR")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"sampler": "balanced"}))
    assert_clean_error(invoke(["delta", "eval", str(other)]), "another kind of run")
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps(TINY_CONFIG.to_dict()))
    assert_clean_error(invoke(["delta", "eval", str(unfinished)]), "RUN_DIR must hold a checkpoint")
    result = invoke(["delta", "report", str(unfinished), "--out", str(tmp_path / "r")])
    assert_clean_error(result, "--resume")
    assert not missing.exists()


BAD_TRAIN = [
    (["--epsilon", "0"], "--epsilon must satisfy 0 < epsilon <= inf"),
    (["--epsilon", "nan"], "--epsilon"),
    (["--delta", "1"], "--delta must satisfy 0 < delta < 1"),
    (["--clip", "inf"], "--clip must be a finite number > 0"),
    (["--labels", "noisy"], "--labels must be one of"),
    (["--label-epsilon", "0"], "--label-epsilon"),
    (["--release", "twice"], "--release must be one of"),
    (["--variant", "other"], "--variant must be one of"),
    (["--public-arch", "vgg"], "--public-arch must be one of"),
    (["--r", "40"], "--r must satisfy 1 <= r <= ir_channels"),
    (["--t-low", "20"], "--t-low must satisfy 1 <= t_low <= t"),
    (["--t", "5", "--t-low", "2"], "--t must divide the image height and width"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1"),
    (["--lr", "0"], "--lr must satisfy 0 < lr <= 10"),
    (["--threads", "0"], "--threads"),
    (["--private-widths", "8,x"], "--private-widths must be a comma-separated list"),
    (["--data", "synthetic:0"], "--data"),
    (["--data", "mnist"], "--data"),
    (["--data", "cifar10:/no/such/dir"], "--data"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_TRAIN)
def test_train_bad_input_is_one_line_naming_the_option(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    assert_clean_error(
        invoke(["delta", "train", "--data", "synthetic:40", *args, "--out", str(run)]), expected
    )
    assert not run.exists()  # refused before the run directory is made


def test_epsilon_inf_is_accepted_as_a_non_private_release() -> None:
    epsilon = options_of("delta", "train")["epsilon"]
    assert epsilon.type.convert("inf", epsilon, None) == math.inf
    assert DeltaConfig(epsilon=math.inf).epsilon == math.inf


def test_train_options_cover_the_config_and_document_its_defaults() -> None:
    options = options_of("delta", "train")
    fields = set(DeltaConfig.__dataclass_fields__)
    assert fields <= set(options)
    assert assert_documented_defaults(options, DeltaConfig()) == len(fields)
