"""``asymflow account`` and ``account calibrate``: JSON shape, labels of bounds and estimates,
clean errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import event_from_dict
from asymflow.accounting.rdp import RdpAccountant
from asymflow.accounting.schedule import training_event
from tests.cli.helpers import assert_clean_error, invoke, subprocess_env

# Small schedules with a moderate epsilon keep every PLD cheap.
BALANCED = ["--sampler", "balanced", "--sigma", "2", "--steps", "16", "--k", "2", "--delta", "1e-5"]
CERTIFIED_KIND = "certified upper bound"


def account_json(args: list[str]) -> dict[str, Any]:
    result = invoke(["account", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def certified_values(payload: dict[str, Any]) -> dict[str, float]:
    return {
        name: value
        for name, value in payload["by_method"].items()
        if payload["kinds"][name] == CERTIFIED_KIND
    }


def test_account_json_has_documented_shape_and_best_is_min_of_certified() -> None:
    payload = account_json(BALANCED)
    assert {"epsilon", "method", "certified", "by_method", "delta", "event"} <= payload.keys()
    assert payload["certified"] is True
    assert payload["delta"] == 1e-5
    certified = certified_values(payload)
    assert set(certified) == {"rdp", "pld", "pld-blocks"}  # k = 2 of 16: the blocks apply
    assert payload["epsilon"] == min(certified.values())
    assert payload["method"] == min(certified, key=certified.__getitem__)
    expected_event = training_event("balanced", 2.0, 16, k=2)
    assert event_from_dict(payload["event"]) == expected_event
    assert payload["epsilon"] == best_epsilon(expected_event, 1e-5).epsilon


def test_account_json_in_a_subprocess_prints_only_json_and_never_loads_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "asymflow", "account", *BALANCED, "--epochs", "2", "--json"],
        capture_output=True,
        text=True,
        env={**subprocess_env(), "PYTHONPROFILEIMPORTTIME": "1"},  # every import, on stderr
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    payload = json.loads(proc.stdout)  # the whole stdout is one JSON object
    assert payload["certified"] is True
    assert payload["event"]["count"] == 2
    assert payload["epsilon"] == min(certified_values(payload).values())
    # The accounting commands start fast: torch is imported only by the training commands.
    assert re.search(r"\|\s+asymflow\.cli\.delta$", proc.stderr, re.MULTILINE)
    assert not re.search(r"\|\s+(torch|opacus)$", proc.stderr, re.MULTILINE)


def test_account_method_rdp_reports_the_rdp_bound() -> None:
    payload = account_json([*BALANCED, "--method", "rdp"])
    assert payload["method"] == "rdp"
    assert payload["epsilon"] == payload["by_method"]["rdp"]
    assert payload["certified"] is True


def test_account_poisson_with_rate_q() -> None:
    args = ["--sampler", "poisson", "--sigma", "2", "--steps", "16", "--q", "0.125"]
    payload = account_json([*args, "--delta", "1e-5"])
    assert payload["event"]["event"]["q"] == 0.125
    assert payload["event"]["count"] == 16
    assert payload["epsilon"] == min(certified_values(payload).values())


def test_account_table_marks_certified_bounds() -> None:
    result = invoke(["account", *BALANCED])
    assert result.exit_code == 0, result.output
    assert CERTIFIED_KIND in result.stdout
    assert "ε <=" in result.stdout


def test_shuffle_is_reported_as_a_lower_bound_never_as_epsilon() -> None:
    args = ["--sampler", "shuffle", "--sigma", "2", "--steps", "16", "--delta", "1e-5"]
    payload = account_json(args)
    assert payload["certified"] is False
    assert payload["method"] == "lower-bound"
    assert payload["epsilon"] is None
    assert payload["kind"] == "lower bound (not a guarantee)"
    # Optimistic 1-of-T allocation <= certified 1-of-T allocation (balanced, k=1).
    certified = account_json(["--sampler", "balanced", "--k", "1", *args[2:]])
    assert 0 < payload["lower_bound"] <= certified["epsilon"]
    table = invoke(["account", *args])
    assert table.exit_code == 0
    assert "lower bound (not a guarantee)" in table.stdout
    assert "ε <=" not in table.stdout


def test_monte_carlo_is_labelled_an_estimate_and_never_chosen_as_best() -> None:
    args = ["--sampler", "balanced", "--sigma", "1", "--steps", "4", "--k", "1", "--delta", "1e-2"]
    estimate = account_json([*args, "--method", "mc", "--mc-samples", "2000"])
    assert estimate["method"] == "mc"
    assert estimate["certified"] is False
    assert estimate["kinds"]["mc"].startswith("estimate")
    assert estimate["mc"]["confidence"] == 0.95
    assert estimate["mc"]["epsilon_lower"] <= estimate["epsilon"]
    best = account_json([*args, "--mc-samples", "2000"])
    assert best["method"] in ("rdp", "pld")
    assert best["epsilon"] == min(certified_values(best).values())


def test_calibrate_epsilon_never_exceeds_target() -> None:
    args = ["--sampler", "poisson", "--steps", "16", "--k", "2", "--delta", "1e-5"]
    result = invoke(
        ["account", "calibrate", "--epsilon", "1.5", *args, "--method", "rdp", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["certified"] is True
    assert payload["target_epsilon"] == 1.5
    assert 0 < payload["epsilon"] <= 1.5
    event = training_event("poisson", payload["sigma"], 16, k=2)
    assert RdpAccountant().compose(event).epsilon(1e-5) <= 1.5


def test_plot_is_written_and_non_empty(tmp_path: Path) -> None:
    out = tmp_path / "plots" / "eps.png"
    payload = account_json(
        [
            "--sampler",
            "shuffle",
            "--sigma",
            "2",
            "--steps",
            "16",
            "--delta",
            "1e-5",
            "--plot",
            str(out),
        ]
    )
    assert out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    series = payload["plot"]["series"]
    assert any(name.startswith("Poisson") for name in series)
    assert any(name.startswith("BIS") for name in series)
    assert any("lower bound" in name for name in series)


ACC = ["account", "--steps", "8"]
CAL = ["account", "calibrate", "--steps", "8"]
BAD_INPUTS = [
    ([*ACC, "--sampler", "balanced", "--sigma", "0", "--k", "1"], "--sigma"),
    ([*ACC, "--sampler", "balanced", "--sigma", "-1", "--k", "1"], "--sigma"),
    ([*ACC, "--sampler", "balanced", "--sigma", "nan", "--k", "1"], "--sigma"),
    ([*ACC, "--sampler", "balanced", "--sigma", "inf", "--k", "1"], "--sigma"),
    ([*ACC, "--sampler", "balanced", "--sigma", "1", "--k", "9"], "--k"),
    ([*ACC, "--sampler", "balanced", "--sigma", "1", "--k", "0"], "--k"),
    (["account", "--sampler", "balanced", "--sigma", "1", "--steps", "0", "--k", "1"], "--steps"),
    ([*ACC, "--sampler", "balanced", "--sigma", "1"], "--k"),
    ([*ACC, "--sampler", "poisson", "--sigma", "1"], "--k or --q"),
    ([*ACC, "--sampler", "poisson", "--sigma", "1", "--q", "nan"], "--q"),
    ([*ACC, "--sampler", "poisson", "--sigma", "1", "--q", "1.5"], "--q"),
    ([*ACC, "--sampler", "uniform", "--sigma", "1", "--k", "1"], "--sampler"),
    ([*ACC, "--sampler", "balanced", "--sigma", "1", "--k", "1", "--epochs", "0"], "--epochs"),
    ([*ACC, "--sampler", "balanced", "--sigma", "1", "--k", "1", "--method", "x"], "--method"),
    ([*ACC, "--sampler", "poisson", "--sigma", "1", "--k", "1", "--method", "mc"], "--method mc"),
    ([*ACC, "--sampler", "shuffle", "--sigma", "1", "--k", "2"], "--k"),
    (["account", "--sigma", "1", "calibrate"], "calibrate"),
    ([*CAL, "--epsilon", "nan", "--sampler", "poisson", "--k", "1"], "--epsilon"),
    ([*CAL, "--epsilon", "0", "--sampler", "poisson", "--k", "1"], "--epsilon"),
    ([*CAL, "--epsilon", "1", "--sampler", "shuffle"], "shuffle"),
    ([*CAL, "--epsilon", "1", "--sampler", "poisson", "--k", "1", "--method", "mc"], "--method"),
]
BAD_DELTAS = ["0", "1", "1.5", "-1e-5", "nan"]


@pytest.mark.parametrize(("args", "name"), BAD_INPUTS)
def test_bad_input_gives_one_line_error_naming_the_parameter(args: list[str], name: str) -> None:
    needs_delta = args[1] != "--sigma"
    assert_clean_error(invoke([*args, "--delta", "1e-5"] if needs_delta else args), name)


@pytest.mark.parametrize("delta", BAD_DELTAS)
def test_bad_delta_gives_one_line_error_naming_delta(delta: str) -> None:
    schedule = ["--sampler", "balanced", "--steps", "8", "--k", "1", "--delta", delta]
    assert_clean_error(invoke(["account", "--sigma", "1", *schedule]), "--delta")
    assert_clean_error(invoke(["account", "calibrate", "--epsilon", "1", *schedule]), "--delta")


def test_bad_input_in_a_subprocess_has_no_traceback() -> None:
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "asymflow", "account", "--sampler", "balanced"),
            *("--sigma", "nan", "--steps", "8", "--k", "1", "--delta", "1e-5", "--json"),
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == "Error: --sigma must be a finite number > 0, got nan"


def test_balanced_reports_a_certified_bracket_with_its_methods() -> None:
    payload = account_json(BALANCED)
    bracket = payload["bracket"]
    assert bracket["upper"] == payload["epsilon"]
    assert bracket["upper_method"] == payload["method"]
    assert 0 < bracket["lower"] <= bracket["upper"]
    assert "lower bound" in bracket["lower_method"]
    table = invoke(["account", *BALANCED])
    assert table.exit_code == 0, table.output
    assert "bracket:" in table.stdout


def test_poisson_has_no_balanced_bracket() -> None:
    args = ["--sampler", "poisson", "--sigma", "2", "--steps", "16", "--q", "0.125"]
    assert "bracket" not in account_json([*args, "--delta", "1e-5"])


def test_balanced_k_above_one_bracket_names_the_block_pld_when_it_is_the_upper_bound() -> None:
    """k > 1: the bracket's upper bound is the best certified one, pld-blocks included, named
    with its method; the certified lower bound below it names its own."""
    args = ["--sampler", "balanced", "--sigma", "0.8", "--steps", "200", "--k", "4"]
    payload = account_json([*args, "--delta", "1e-5"])
    certified = certified_values(payload)
    assert {"rdp", "pld", "pld-blocks"} <= certified.keys()
    assert certified["pld-blocks"] < certified["pld"]  # tighter than the k-fold reduction
    bracket = payload["bracket"]
    assert bracket["upper"] == payload["epsilon"] == min(certified.values())
    assert bracket["upper_method"] == payload["method"] == "pld-blocks"
    assert "block PLD" in bracket["upper_how"]
    assert 0 < bracket["lower"] <= bracket["upper"]
    assert "lower bound" in bracket["lower_method"]
    table = invoke(["account", *args, "--delta", "1e-5"])
    assert table.exit_code == 0, table.output
    assert "upper: pld-blocks" in " ".join(table.stdout.split())
    only = account_json([*args, "--delta", "1e-5", "--method", "pld-blocks"])
    assert only["method"] == "pld-blocks"
    assert only["epsilon"] == certified["pld-blocks"]


def test_pld_blocks_is_skipped_where_it_equals_pld() -> None:
    args = ["--sampler", "balanced", "--sigma", "2", "--steps", "16", "--k", "1"]
    payload = account_json([*args, "--delta", "1e-5"])
    assert "pld-blocks" not in payload["by_method"]
    assert {"rdp", "pld"} <= payload["by_method"].keys()
