"""``asymflow fl run|app``: clean errors and the Flower App directory (no Ray simulation here;
tests/federated runs the simulation)."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from asymflow.federated import FederatedConfig
from tests.cli.helpers import assert_clean_error, assert_documented_defaults, invoke, options_of

BAD = [
    (["--clients", "0", "--sigma", "1"], "--clients"),
    (["--subnetwork", "split:1", "--sigma", "1"], "--subnetwork"),
    (["--sampler", "shuffle", "--sigma", "1"], "--sampler"),
    (["--sampler", "uniform", "--sigma", "1"], "--sampler"),
    (["--sigma", "1", "--target-epsilon", "8"], "--target-epsilon"),
    ([], "--sigma"),
    (["--k", "6", "--period", "5", "--sigma", "1"], "--k"),
    (["--sampler", "balanced", "--q", "0.5", "--sigma", "1"], "--q"),
    (["--split", "shards", "--sigma", "1"], "--split"),
    (["--clients", "two", "--sigma", "1"], "--clients"),
]


@pytest.mark.parametrize("command", ["run", "app"])
@pytest.mark.parametrize(("args", "name"), BAD)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, command: str, args: list[str], name: str
) -> None:
    target = tmp_path / "out"
    where = ["--out", str(target)] if command == "run" else [str(target)]
    assert_clean_error(invoke(["fl", command, *where, *args]), name)
    assert not (target / "config.json").exists()
    assert not (target / "pyproject.toml").exists()


def test_app_writes_the_pyproject_and_the_instructions(tmp_path: Path) -> None:
    directory = tmp_path / "app"
    args = ["fl", "app", str(directory), "--clients", "4", "--rounds", "3"]
    args += ["--sampler", "balanced", "--k", "1", "--period", "2", "--subnetwork", "split:2"]
    result = invoke([*args, "--target-epsilon", "8", "--run-dir", "/srv/runs/fl-1"])
    assert result.exit_code == 0, result.output
    assert "flwr run" in result.stdout and "flower-supernode" in result.stdout
    text = (directory / "pyproject.toml").read_text(encoding="utf-8")
    run_config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert run_config["run-dir"] == "/srv/runs/fl-1"
    assert FederatedConfig.from_run_config(run_config) == FederatedConfig(
        clients=4,
        rounds=3,
        sampler="balanced",
        k=1,
        period=2,
        subnetwork="split:2",
        target_epsilon=8.0,
    )


def test_app_json_is_one_object(tmp_path: Path) -> None:
    result = invoke(["fl", "app", str(tmp_path / "a"), "--sigma", "1.2", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["config"]["sigma"] == 1.2
    assert Path(payload["pyproject"]).is_file()


@pytest.mark.parametrize("command", ["run", "app"])
def test_documented_defaults_match_the_config(command: str) -> None:
    options = options_of("fl", command)
    assert assert_documented_defaults(options, FederatedConfig(sigma=1.0)) >= 15
