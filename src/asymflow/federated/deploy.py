"""A Flower App directory for ``flwr run``: the same ServerApp and ClientApp across machines.

:func:`write_flower_app` writes ``DIR/pyproject.toml`` naming our components and carrying the
run config in ``[tool.flwr.app.config]``::

    [tool.flwr.app.components]
    serverapp = "asymflow.federated.server_app:app"
    clientapp = "asymflow.federated.client_app:app"

The components are imported from the installed ``asymflow`` package, so install it on the
SuperLink host and on every SuperNode host first (``pip install asymflow`` or
``pip install -e .`` from a checkout, with ``flwr[simulation]==1.41.0``).

Deployment engine (flwr 1.41; checked on one host with a SuperLink, two SuperNodes and a
2-round run), e.g. N = 10 clients::

    # server host: the SuperLink's Fleet and Control APIs share one HTTP port (default 8000);
    # the components come from the pre-installed asymflow, so no runtime `uv sync` is needed
    flower-superlink --insecure --disable-runtime-dependency-installation
    # each client host, i = 0..9: partition i of the run's data spec ...
    flower-supernode --insecure --superlink SERVER:8000 \\
        --node-config "partition-id=i num-partitions=10"
    # ... or the site's own data (several SuperNodes on one host need distinct --port)
    flower-supernode --insecure --superlink SERVER:8000 --node-config 'data="folder:/data/site"'
    # the submitting machine: a SuperLink connection in $FLWR_HOME/config.toml (~/.flwr)
    #   [superlink.mylink]
    #   address = "SERVER:8000"
    #   insecure = true
    python -c "from asymflow.federated import FederatedConfig, write_flower_app as w; \\
        w('DIR', FederatedConfig(clients=10, subnetwork='split:4', target_epsilon=8.0))"
    flwr run DIR mylink --stream --run-config "rounds=50 run-dir='/srv/runs/fl-1'"

``--insecure`` is for test beds only; use the TLS options of all three commands otherwise.
The ServerApp waits until ``clients`` SuperNodes are connected, uses the first ``clients`` node
ids (sorted) as the population, and writes the run directory (``run-dir``, default
``runs/fl-<run id>``) on the SuperLink host. The simulation engine runs the same app through
a local-simulation connection (``options.num-supernodes = 10``) with ``flwr run DIR``, or from
Python with :func:`asymflow.federated.run_federated`.
"""

from __future__ import annotations

import os
from pathlib import Path

from asymflow.federated.config import FederatedConfig

__all__ = ["CLIENT_APP", "SERVER_APP", "app_pyproject", "write_flower_app"]

SERVER_APP = "asymflow.federated.server_app:app"
CLIENT_APP = "asymflow.federated.client_app:app"


def _toml_value(value: bool | int | float | str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def app_pyproject(
    config: FederatedConfig, *, run_dir: str | None = None, name: str = "asymflow-fl"
) -> str:
    """The ``pyproject.toml`` text of a Flower App running ``config`` (see the module
    docstring). Secret seeds are written only if set in ``config`` (leave them unset in
    production: the server then draws them from the OS)."""
    run_config = config.to_run_config()
    if run_dir is not None:
        run_config["run-dir"] = str(run_dir)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{name}"',
        'version = "1.0.0"',
        'description = "asymflow: federated training with client-level DP and random subnetworks"',
        'license = "Apache-2.0"',
        "dependencies = []  # asymflow and flwr are installed on every host beforehand",
        "",
        "[tool.hatch.build.targets.wheel]",
        'packages = ["."]',
        "",
        "[tool.flwr.app]",
        'publisher = "asymflow"',
        "",
        "[tool.flwr.app.components]",
        f'serverapp = "{SERVER_APP}"',
        f'clientapp = "{CLIENT_APP}"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{key} = {_toml_value(value)}" for key, value in run_config.items()]
    return "\n".join(lines) + "\n"


def write_flower_app(
    directory: str | os.PathLike[str],
    config: FederatedConfig,
    *,
    run_dir: str | None = None,
) -> Path:
    """Create ``directory`` (if needed) with the app's ``pyproject.toml``; return its path."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    target = path / "pyproject.toml"
    target.write_text(app_pyproject(config, run_dir=run_dir), encoding="utf-8")
    return target
