"""``asymflow fl run|app``: federated training with client-level DP on Flower.

``fl run`` simulates a run with :func:`asymflow.federated.run_federated`; ``fl app`` writes a
Flower App directory (:func:`asymflow.federated.write_flower_app`) for ``flwr run`` on the
deployment engine (see :mod:`asymflow.federated.deploy`). Options map to
:class:`asymflow.federated.FederatedConfig` fields of the same name; an option left out keeps
the config's default, or with ``fl run --resume`` the value in the run's ``config.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from asymflow.cli.common import (
    DATA_HINTS,
    JsonOpt,
    check_training_noise,
    emit_json,
    errors,
    fmt,
    out_console,
    show_run,
)
from asymflow.cli.options import Run, config_command, option_names, run_command

if TYPE_CHECKING:
    from asymflow.federated import FederatedConfig

RUN = "Run"
SAMPLERS = ("poisson", "balanced")


CONFIG = "asymflow.federated:FederatedConfig"
"""The configuration whose fields are options."""


SUBNETWORK = {"partition": "--subnetwork", "spec": "--subnetwork"}
"""PartitionSpec's parameters, for error messages: --subnetwork sets them."""


def _new_config(given: Mapping[str, Any]) -> FederatedConfig:
    """The config of the options given; shuffling and a missing or doubled noise setting
    refused."""
    check_training_noise(
        given,
        SAMPLERS,
        " at client level; use --sampler balanced (k of every T rounds) or poisson",
    )
    from asymflow.federated import FederatedConfig

    return FederatedConfig(**given)


@run_command(CONFIG)
def fl_run(run: Run) -> None:
    """Simulate federated training with client-level DP into a new run directory (or continue
    one with --resume).

    Example: asymflow fl run --clients 10 --rounds 20 --sampler balanced --k 2 --period 5
    --subnetwork split:4 --target-epsilon 8 --out runs/fl
    """
    options = run.options(**SUBNETWORK)
    with errors(options, DATA_HINTS):
        from asymflow.federated import run_federated

        config = run.config(_new_config, options)
        result = run_federated(config, run.out, progress=True, resume=run.resume).to_dict()
    cells = {
        f"client-level ε at δ={result['delta']:g}": f"{fmt(result['epsilon'])} "
        f"({result['method']}, certified)",
        "σ": f"{result['sigma']:.4g}" + (" (calibrated)" if result["calibrated"] else ""),
        "test acc": f"{100 * result['test_acc']:.1f}%",
        "rounds": str(result["rounds"]),
        "expected clients": f"{result['expected_clients']:.4g}",
        "time (s)": f"{result['seconds']:.1f}",
    }
    title = f"Federated {config.model} on {config.data}: {result['clients']} clients, "
    show_run(
        run.out,
        result,
        run.json_out,
        cells,
        title + f"{result['sampler']} sampling, subnetwork {result['subnetwork']}",
    )


@config_command(CONFIG)
def fl_app(
    *,
    directory: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="Flower App directory to write (pyproject.toml)."),
    ],
    given: dict[str, Any],
    run_dir: Annotated[
        str | None,
        typer.Option(
            metavar="RUN_DIR",
            help="Run directory on the SuperLink host. \\[default: none: runs/fl-<run id>]",
            rich_help_panel=RUN,
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a Flower App directory for 'flwr run' on the deployment engine.

    Example: asymflow fl app fl-app --clients 10 --subnetwork split:4 --target-epsilon 8
    """
    options = option_names(CONFIG, run_dir="--run-dir", directory="DIR", **SUBNETWORK)
    with errors(options, DATA_HINTS):
        config = _new_config(given)
        from asymflow.federated import write_flower_app

        path = write_flower_app(directory, config, run_dir=run_dir)
    if json_out:
        emit_json({"pyproject": str(path), "run_dir": run_dir, "config": config.to_dict()})
        return
    n = config.clients
    lines = [
        f"wrote {path}",
        "install asymflow and flwr[simulation] on every host, then (--insecure: test beds only):",
        "  server:   flower-superlink --insecure --disable-runtime-dependency-installation",
        f"  clients:  flower-supernode --insecure --superlink SERVER:8000 "
        f'--node-config "partition-id=i num-partitions={n}"   (i = 0..{n - 1})',
        '  submit:   add [superlink.mylink] address = "SERVER:8000", insecure = true to '
        "~/.flwr/config.toml, then",
        f"            flwr run {directory} mylink --stream",
    ]
    console = out_console()
    for line in lines:
        console.print(line, soft_wrap=True, markup=False, highlight=False)
