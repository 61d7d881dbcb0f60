"""FederatedConfig validation and its JSON / Flower run-config round trips."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from asymflow.federated.config import FederatedConfig
from asymflow.federated.deploy import CLIENT_APP, SERVER_APP, write_flower_app


def test_rate_and_expected_clients_follow_the_sampler() -> None:
    bis = FederatedConfig(sigma=1.0, sampler="balanced", clients=20, k=2, period=8, rounds=20)
    assert bis.rate == pytest.approx(0.25)
    assert bis.expected_clients == pytest.approx(5.0)
    assert bis.passes == 3
    poisson = FederatedConfig(sigma=1.0, sampler="poisson", clients=20, q=0.1)
    assert poisson.expected_clients == pytest.approx(2.0)
    assert FederatedConfig(sigma=1.0, k=2, period=5).rate == pytest.approx(0.4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one of sigma and target_epsilon"),
        ({"sigma": 1.0, "target_epsilon": 2.0}, "exactly one"),
        ({"sigma": 1.0, "k": 6, "period": 5}, "k must satisfy 1 <= k <= period"),
        ({"sigma": 1.0, "sampler": "balanced", "q": 0.1}, "q applies to sampler 'poisson'"),
        ({"sigma": 1.0, "subnetwork": "dropout:0.5"}, "subnetwork must be 'none' or 'split:d'"),
        ({"sigma": 1.0, "subnetwork": "split:1"}, "split:d needs an integer d >= 2"),
        ({"sigma": 1.0, "sampler": "shuffle"}, "sampler must be one of"),
        ({"sigma": 1.0, "clients": 0}, "clients must be an integer >= 1"),
    ],
)
def test_invalid_configs_name_the_parameter(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FederatedConfig(**kwargs)  # type: ignore[arg-type]


def test_json_and_run_config_round_trips() -> None:
    config = FederatedConfig(
        target_epsilon=3.0,
        sampler="balanced",
        k=1,
        period=4,
        subnetwork="split:2",
        methods=("pld",),
        noise_seed=7,
        width=1,
    )
    assert FederatedConfig.from_dict(config.to_dict()) == config
    run_config = config.to_run_config()
    assert run_config["methods"] == "pld" and "sigma" not in run_config
    assert FederatedConfig.from_run_config({**run_config, "run-dir": "x"}) == config


def test_flower_app_pyproject_is_valid_and_carries_the_config(tmp_path: Path) -> None:
    from flwr.cli.config_utils import load_and_validate

    config = FederatedConfig(sigma=0.8, clients=3, subnetwork="split:2")
    path = write_flower_app(tmp_path / "app", config, run_dir="/srv/runs/a")
    parsed, _warnings = load_and_validate(path, check_module=True)
    assert parsed["tool"]["flwr"]["app"]["components"] == {
        "serverapp": SERVER_APP,
        "clientapp": CLIENT_APP,
    }
    table = tomllib.loads(path.read_text())["tool"]["flwr"]["app"]["config"]
    assert table["run-dir"] == "/srv/runs/a"
    assert FederatedConfig.from_run_config(table) == config
