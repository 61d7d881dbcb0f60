"""``asymflow ledger show``: the rows of a run's ledger and the ε they spend."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asymflow.accounting.events import Gaussian, event_from_dict
from asymflow.accounting.schedule import training_event
from tests.cli.helpers import assert_clean_error, invoke


def test_ledger_show_lists_rows_and_the_epsilon_spent(tmp_path: Path) -> None:
    ledger_module = pytest.importorskip("asymflow.accounting.ledger")
    event = training_event("balanced", 2.0, 16, k=2)
    with ledger_module.PrivacyLedger.for_run(tmp_path) as ledger:
        ledger.record(event, dataset="digits", note="pass 1")
        ledger.record(Gaussian(8.0), dataset="digits", count=2, note="residuals")
        expected = ledger.epsilon(1e-5)
    result = invoke(["ledger", "show", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [row["count"] for row in payload["entries"]] == [1, 2]
    assert event_from_dict(payload["entries"][0]["event"]) == event
    assert payload["epsilon"] == expected.epsilon
    assert payload["certified"] is True
    table = invoke(["ledger", "show", str(tmp_path)])
    assert table.exit_code == 0, table.output
    assert "residuals" in table.stdout
    assert "ε spent" in table.stdout


def test_ledger_show_of_a_missing_run_dir_is_a_clean_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-run"
    assert_clean_error(invoke(["ledger", "show", str(missing)]), "RUN_DIR")
    assert not missing.exists()  # showing must not create a ledger
