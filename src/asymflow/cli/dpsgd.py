"""``asymflow dpsgd train``: DP-SGD with our samplers (Poisson, BIS), our accountant and ledger,
and optional model partitioning, through :func:`asymflow.dpsgd.train.train_dpsgd`.

Options map to :class:`asymflow.dpsgd.runs.DpsgdConfig` fields of the same name; an option
left out keeps the config's default, or with ``--resume`` the value in the run's
``config.json`` (options given must match it). Shuffled batches are refused: they have no
certified ε (Chua et al., ICML 2024). Partitioning: Dong, Chen, Ozgur, ICML 2025 (arXiv
2503.03043).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Annotated, Any

import typer

from asymflow.accounting.best import DEFAULT_METHODS
from asymflow.checks import check_choice
from asymflow.cli.common import DATA_HINTS, check_training_noise, errors, fmt, show_run
from asymflow.cli.options import Run, run_command

if TYPE_CHECKING:
    from asymflow.dpsgd.runs import DpsgdConfig

NOISE = "Noise and partitioning"
SAMPLERS = ("balanced", "poisson")
METHODS = {"rdp": ("rdp",), "pld": ("pld",), "best": DEFAULT_METHODS}


CONFIG = "asymflow.dpsgd.runs:DpsgdConfig"
"""The configuration whose fields are options."""


@run_command(CONFIG)
def dpsgd_train(
    run: Run,
    *,
    method: Annotated[
        str | None,
        typer.Option(
            metavar="[rdp|pld|best]",
            help="Certified accountant(s): best is the smaller of rdp and pld. \\[default: best]",
            rich_help_panel=NOISE,
        ),
    ] = None,
) -> None:
    """Train a model with DP-SGD into a new run directory (or continue one with --resume) and
    print its summary.

    Example: asymflow dpsgd train --sampler balanced --k 5 --epochs 5 --target-epsilon 8
    --out runs/dpsgd
    """
    options = run.options(methods="--method")
    with errors(options, DATA_HINTS):
        if method is not None:
            methods = METHODS[check_choice("--method", method, tuple(METHODS))]
            run = replace(run, given={**run.given, "methods": methods})
        from asymflow.dpsgd.train import train_dpsgd

        config = run.config(_new_config, options)
        result = train_dpsgd(config, run.out, progress=True, resume=run.resume).to_dict()
    steps = result["steps_per_epoch"]
    rate = f"k={config.k} of T={steps}" if config.sampler == "balanced" else f"T={steps} steps"
    cells = {
        "test acc": f"{100 * result['test_acc']:.1f}%",
        f"ε spent at δ={result['delta']:g}": f"{fmt(result['epsilon'])} ({result['method']}, "
        "certified)",
        "σ": f"{result['sigma']:.4g}" + (" (calibrated)" if result["calibrated"] else ""),
        "expected batch": f"{result['expected_batch_size']:.4g}",
        "blocks": str(len(result["partition"]["blocks"])),
        "time (s)": f"{result['seconds']:.1f}",
    }
    title = f"DP-SGD {config.model} on {config.data}: {config.sampler} ({rate}), "
    show_run(run.out, result, run.json_out, cells, title + f"{result['epochs']} epoch(s)")


def _new_config(given: Mapping[str, Any]) -> DpsgdConfig:
    """A new run's config; shuffled batches and a missing or doubled noise setting refused."""
    check_training_noise(
        given,
        SAMPLERS,
        " for DP-SGD (Chua et al. 2024); use --sampler balanced --k 1 for the same batch "
        "structure with a certified bound",
    )
    from asymflow.dpsgd.runs import DpsgdConfig

    return DpsgdConfig(**given)
