"""``asymflow fl run|app``: federated training with client-level DP on Flower.

``fl run`` simulates a run with :func:`asymflow.federated.run_federated`; ``fl app`` writes a
Flower App directory (:func:`asymflow.federated.write_flower_app`) for ``flwr run`` on the
deployment engine (see :mod:`asymflow.federated.deploy`). Options map to
:class:`asymflow.federated.FederatedConfig` fields of the same name; an option left out keeps
the config's default, or with ``fl run --resume`` the value in the run's ``config.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from asymflow.cli.common import (
    DATA_HINTS,
    CliInputError,
    JsonOpt,
    check_training_noise,
    emit_json,
    errors,
    fmt,
    option_name,
    out_console,
)

SAMPLING = "Client sampling"
NOISE = "Noise and subnetwork"
MODEL = "Data, model and local training"
RUN = "Run"

SAMPLERS = ("poisson", "balanced")
_NOT_CONFIG = ("out", "directory", "run_dir", "json_out", "resume")


def _opt(help_text: str, panel: str, *decls: str, **kwargs: Any) -> Any:
    return typer.Option(*decls, help=help_text, rich_help_panel=panel, **kwargs)


Data = Annotated[
    str | None,
    _opt(
        "digits, synthetic[:N], folder:PATH, cifar10:PATH or cifar100:PATH. \\[default: digits]",
        MODEL,
        metavar="SPEC",
    ),
]
Model = Annotated[
    str | None,
    _opt(
        "Network (GroupNorm). \\[default: resnet20]",
        MODEL,
        metavar="[resnet20|resnet18|resnet34]",
    ),
]
Width = Annotated[float | None, _opt("Width multiplier, in (0, 16]. \\[default: 0.25]", MODEL)]
Clients = Annotated[int | None, _opt("Number of clients N, >= 1. \\[default: 10]", SAMPLING)]
Rounds = Annotated[int | None, _opt("Rounds R, >= 1. \\[default: 20]", SAMPLING)]
Sampler = Annotated[
    str | None,
    _opt(
        "poisson (each client joins a round with probability q) or balanced (each client in "
        "exactly k of every T = --period rounds). \\[default: poisson]",
        SAMPLING,
        metavar="[poisson|balanced]",
    ),
]
K = Annotated[
    int | None,
    _opt("Rounds each client joins per period, 1 <= k <= T. \\[default: 2]", SAMPLING, "--k"),
]
Period = Annotated[int | None, _opt("Period T in rounds, >= k. \\[default: 5]", SAMPLING)]
Q = Annotated[
    float | None,
    _opt(
        "Poisson rate 0 < q <= 1 (--sampler poisson only). \\[default: none: k/T]", SAMPLING, "--q"
    ),
]
Subnetwork = Annotated[
    str | None,
    _opt(
        "Each sampled client trains one random block of d disjoint parameter blocks "
        "(split:d, d >= 2). \\[default: none]",
        NOISE,
        metavar="[none|split:d]",
    ),
]
Sigma = Annotated[
    float | None,
    _opt("Noise multiplier σ in (0, 1e6]. Give --sigma or --target-epsilon.", NOISE),
]
TargetEpsilon = Annotated[
    float | None,
    _opt(
        "Calibrate σ so that the client-level ε of all rounds is at most this, in (0, 1e4]. "
        "Give --sigma or --target-epsilon.",
        NOISE,
    ),
]
Delta = Annotated[float | None, _opt("Target δ, 0 < δ < 1. \\[default: 1e-05]", NOISE)]
Clip = Annotated[
    float | None, _opt("Clip norm C of each client update, in (0, 1e6]. \\[default: 1.0]", NOISE)
]
ServerLr = Annotated[
    float | None, _opt("Server learning rate, in (0, 100]. \\[default: 1.0]", MODEL)
]
LocalEpochs = Annotated[int | None, _opt("Local epochs per round, >= 1. \\[default: 1]", MODEL)]
BatchSize = Annotated[int | None, _opt("Local batch size, >= 1. \\[default: 32]", MODEL)]
Lr = Annotated[float | None, _opt("Local learning rate, in (0, 100]. \\[default: 0.1]", MODEL)]
Split = Annotated[
    str | None,
    _opt(
        "How the data is split among clients: iid or dirichlet (Dir(--alpha) class "
        "proportions). \\[default: iid]",
        MODEL,
        metavar="[iid|dirichlet]",
    ),
]
Alpha = Annotated[float | None, _opt("Dirichlet α, in (0, 1e6]. \\[default: 0.5]", MODEL)]
Seed = Annotated[
    int | None, _opt("Seed of the initialization and data split, >= 0. \\[default: 0]", RUN)
]
SamplerSeed = Annotated[
    int | None,
    _opt(
        "Seed of the client sampling and blocks, >= 0; fixed only for tests and exact "
        "replays: the guarantee needs it secret. \\[default: none: drawn from the OS]",
        RUN,
    ),
]
NoiseSeed = Annotated[
    int | None,
    _opt(
        "Seed of the server's noise, >= 0; fixed only for tests and exact replays: the "
        "guarantee needs it secret. \\[default: none: drawn from the OS]",
        RUN,
    ),
]
Parallelism = Annotated[
    int | None, _opt("Clients trained at once (simulation), >= 1. \\[default: 1]", RUN)
]
Threads = Annotated[int | None, _opt("torch threads per client, >= 1. \\[default: 1]", RUN)]


def _given(ctx: typer.Context) -> dict[str, Any]:
    """The config fields set by the options given."""
    return {
        name: value
        for name, value in ctx.params.items()
        if value is not None and name not in _NOT_CONFIG
    }


def _resume_config(given: dict[str, Any], out: Path) -> Any:
    """The config in ``out``'s config.json; the options given must match it."""
    from asymflow.federated import read_config

    stored = read_config(out)
    options = _options()
    differ = [
        f"{options[name]} (run: {getattr(stored, name)}, given: {value})"
        for name, value in given.items()
        if getattr(stored, name) != value
    ]
    if differ:
        raise CliInputError(
            "--resume continues a run with the settings in its config.json; these options "
            f"differ: {', '.join(differ)}"
        )
    return stored


def _config(ctx: typer.Context) -> Any:
    """The :class:`FederatedConfig` of the options given (call inside :func:`errors`)."""
    given = _given(ctx)
    check_training_noise(
        given,
        SAMPLERS,
        " at client level; use --sampler balanced (k of every T rounds) or poisson",
    )
    from asymflow.federated import FederatedConfig

    return FederatedConfig(**given)


def _options() -> dict[str, str]:
    """Config field -> option, for error messages."""
    from asymflow.federated import FederatedConfig

    options = {name: option_name(name) for name in FederatedConfig.__dataclass_fields__}
    options.update(run_dir="--out", partition="--subnetwork", spec="--subnetwork")
    return options


def fl_run(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            metavar="RUN_DIR",
            help="New run directory (config.json, metrics.jsonl, ledger.sqlite, ckpt, "
            "result.json, report.md), or the run to continue with --resume. Required.",
            rich_help_panel=RUN,
        ),
    ],
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its last completed round (or start it). "
            "Options left out are read from its config.json; options given must match it.",
            rich_help_panel=RUN,
        ),
    ] = False,
    data: Data = None,
    model: Model = None,
    width: Width = None,
    clients: Clients = None,
    rounds: Rounds = None,
    sampler: Sampler = None,
    k: K = None,
    period: Period = None,
    q: Q = None,
    subnetwork: Subnetwork = None,
    sigma: Sigma = None,
    target_epsilon: TargetEpsilon = None,
    delta: Delta = None,
    clip: Clip = None,
    server_lr: ServerLr = None,
    local_epochs: LocalEpochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    split: Split = None,
    alpha: Alpha = None,
    seed: Seed = None,
    sampler_seed: SamplerSeed = None,
    noise_seed: NoiseSeed = None,
    parallelism: Parallelism = None,
    threads: Threads = None,
    json_out: JsonOpt = False,
) -> None:
    """Simulate federated training with client-level DP into a new run directory (or continue
    one with --resume).

    Example: asymflow fl run --clients 10 --rounds 20 --sampler balanced --k 2 --period 5
    --subnetwork split:4 --target-epsilon 8 --out runs/fl
    """
    with errors(_options(), DATA_HINTS):
        if (out / "config.json").is_file():
            if not resume:
                raise CliInputError(
                    f"--out already holds a run ({out}); pass --resume to continue it, or "
                    "choose a new directory"
                )
            config = _resume_config(_given(ctx), out)
        else:
            config = _config(ctx)
        from asymflow.federated import run_federated

        result = run_federated(config, out, progress=True, resume=resume).to_dict()
    if json_out:
        emit_json(result)
        return
    _print_result(config.model, config.data, result)
    out_console().print(
        f"wrote {out}; inspect the releases with 'asymflow ledger show {out}'", soft_wrap=True
    )


def fl_app(
    ctx: typer.Context,
    directory: Annotated[
        Path,
        typer.Argument(metavar="DIR", help="Flower App directory to write (pyproject.toml)."),
    ],
    data: Data = None,
    model: Model = None,
    width: Width = None,
    clients: Clients = None,
    rounds: Rounds = None,
    sampler: Sampler = None,
    k: K = None,
    period: Period = None,
    q: Q = None,
    subnetwork: Subnetwork = None,
    sigma: Sigma = None,
    target_epsilon: TargetEpsilon = None,
    delta: Delta = None,
    clip: Clip = None,
    server_lr: ServerLr = None,
    local_epochs: LocalEpochs = None,
    batch_size: BatchSize = None,
    lr: Lr = None,
    split: Split = None,
    alpha: Alpha = None,
    seed: Seed = None,
    sampler_seed: SamplerSeed = None,
    noise_seed: NoiseSeed = None,
    parallelism: Parallelism = None,
    threads: Threads = None,
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
    with errors({**_options(), "directory": "DIR"}, DATA_HINTS):
        config = _config(ctx)
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


def _print_result(model: str, data: str, result: dict[str, Any]) -> None:
    table = Table(
        title=f"Federated {model} on {data}: {result['clients']} clients, {result['sampler']} "
        f"sampling, subnetwork {result['subnetwork']}",
        title_justify="left",
    )
    columns = (
        f"client-level ε at δ={result['delta']:g}",
        "σ",
        "test acc",
        "rounds",
        "expected clients",
        "time (s)",
    )
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(
        f"{fmt(result['epsilon'])} ({result['method']}, certified)",
        f"{result['sigma']:.4g}" + (" (calibrated)" if result["calibrated"] else ""),
        f"{100 * result['test_acc']:.1f}%",
        str(result["rounds"]),
        f"{result['expected_clients']:.4g}",
        f"{result['seconds']:.1f}",
    )
    console = out_console()
    console.print(table)
    console.print(f"accounting: {result['accounting']}", style="dim")
