"""``asymflow ledger show`` with rows of two datasets: one ε per dataset and scope, never one
composed across them, and the run's headline ε named."""

from __future__ import annotations

import json
from pathlib import Path

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import Composed, Gaussian, SelfComposed
from asymflow.accounting.ledger import PrivacyLedger
from tests.cli.helpers import invoke

TRAIN = SelfComposed(Gaussian(2.0), 4)
TEST = Gaussian(1.5)


def _demo_like_run(run: Path, *, config: bool) -> None:
    """Training rows on "digits" and the test split's evaluation row, as a Delta run writes."""
    with PrivacyLedger.for_run(run) as ledger:
        ledger.record(Gaussian(2.0), dataset="digits", scope="train", count=3, note="residuals")
        ledger.record(Gaussian(2.0), dataset="digits", scope="train", note="labels")
        ledger.record(TEST, dataset="digits/test", scope="eval", note="test residuals")
    if config:
        (run / "config.json").write_text(json.dumps({"data": "digits", "epsilon": 1.4}))


def _show(*args: str) -> dict:
    result = invoke(["ledger", "show", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_headline_is_the_training_records_epsilon_not_a_composition(tmp_path: Path) -> None:
    _demo_like_run(tmp_path, config=True)
    payload = _show(str(tmp_path))
    train = best_epsilon(TRAIN, 1e-5).epsilon
    test = best_epsilon(TEST, 1e-5).epsilon
    assert payload["headline"]["dataset"] == "digits"
    assert "config.json" in payload["headline"]["why"]
    assert payload["epsilon"] == train
    assert [(p["dataset"], p["scope"], p["rows"]) for p in payload["populations"]] == [
        ("digits", "train", 2),
        ("digits/test", "eval", 1),
    ]
    assert [p["epsilon"] for p in payload["populations"]] == [train, test]
    assert [(d["dataset"], d["worst_scope"]) for d in payload["datasets"]] == [
        ("digits", "train"),
        ("digits/test", "eval"),
    ]
    composed = best_epsilon(Composed((TRAIN, TEST)), 1e-5).epsilon
    assert all(p["epsilon"] < composed for p in payload["populations"])
    assert len(payload["entries"]) == 3
    table = invoke(["ledger", "show", str(tmp_path)])
    assert table.exit_code == 0, table.output
    assert "headline ε spent" in table.stdout and "digits/test" in table.stdout


def test_dataset_option_picks_the_headline_and_its_rows(tmp_path: Path) -> None:
    _demo_like_run(tmp_path, config=True)
    payload = _show(str(tmp_path), "--dataset", "digits/test")
    assert payload["headline"]["dataset"] == "digits/test"
    assert payload["epsilon"] == best_epsilon(TEST, 1e-5).epsilon
    assert [p["dataset"] for p in payload["populations"]] == ["digits/test"]
    assert [e["dataset"] for e in payload["entries"]] == ["digits/test"]


def test_without_config_json_several_datasets_name_no_headline(tmp_path: Path) -> None:
    _demo_like_run(tmp_path, config=False)
    payload = _show(str(tmp_path / "ledger.sqlite"))
    assert payload["epsilon"] is None and payload["headline"]["dataset"] is None
    assert "--dataset" in payload["headline"]["why"]
    assert len(payload["populations"]) == 2
    table = invoke(["ledger", "show", str(tmp_path)])
    assert table.exit_code == 0, table.output
    assert "none named" in table.stdout
