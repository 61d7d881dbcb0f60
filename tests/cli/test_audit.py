"""``asymflow audit``: bad input is refused cleanly; the canary audit runs end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from asymflow.cli import app

runner = CliRunner()


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["audit", "canary", "--trials", "5"], "--trials"),
        (["audit", "canary", "--delta", "2"], "--delta"),
        (["audit", "membership", "--members", "1"], "--members"),
        (["audit", "reconstruct", "--aux", "0"], "--aux"),
    ],
)
def test_bad_input_is_one_clean_line(args, option):
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert option in result.output
    assert "Traceback" not in result.output


def test_canary_lower_bounds_stay_below_certified_epsilon(tmp_path):
    result = runner.invoke(
        app, ["audit", "canary", "--trials", "2000", "--out", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["rows"]
    for row in payload["rows"]:
        assert row["epsilon_lower"] <= row["certified_epsilon"]
    assert (tmp_path / "canary.json").is_file()
