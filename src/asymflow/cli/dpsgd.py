"""``asymflow dpsgd train``: DP-SGD with our samplers (Poisson, BIS), our accountant and ledger,
and optional model partitioning, through :func:`asymflow.dpsgd.train.train_dpsgd`.

Options map to :class:`asymflow.dpsgd.runs.DpsgdConfig` fields of the same name; an option
left out keeps the config's default, or with ``--resume`` the value in the run's
``config.json`` (options given must match it). Shuffled batches are refused: they have no
certified ε (Chua et al., ICML 2024). Partitioning: Dong, Chen, Ozgur, ICML 2025 (arXiv
2503.03043).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from asymflow.accounting.best import DEFAULT_METHODS
from asymflow.cli.common import (
    DATA_HINTS,
    CliInputError,
    JsonOpt,
    check_choice,
    check_training_noise,
    emit_json,
    errors,
    fmt,
    option_name,
    out_console,
)

if TYPE_CHECKING:
    from asymflow.dpsgd.runs import DpsgdConfig

SAMPLING = "Sampling"
NOISE = "Noise and partitioning"
MODEL = "Data and model"
RUN = "Run"

SAMPLERS = ("balanced", "poisson")
METHODS = {"rdp": ("rdp",), "pld": ("pld",), "best": DEFAULT_METHODS}


def dpsgd_train(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            metavar="RUN_DIR",
            help="New run directory (config.json, metrics.jsonl, ledger.sqlite, checkpoints, "
            "result.json), or the run to continue with --resume. Required.",
            rich_help_panel=RUN,
        ),
    ],
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="Continue the run in --out from its latest checkpoint (or start it). Options "
            "left out are read from its config.json; options given must match it.",
            rich_help_panel=RUN,
        ),
    ] = False,
    data: Annotated[
        str | None,
        typer.Option(
            metavar="SPEC",
            help="digits, synthetic[:N], folder:PATH, cifar10:PATH or cifar100:PATH. "
            "\\[default: digits]",
            rich_help_panel=MODEL,
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            metavar="[resnet20|resnet18|resnet34]",
            help="Network (GroupNorm). \\[default: resnet20]",
            rich_help_panel=MODEL,
        ),
    ] = None,
    width: Annotated[
        float | None,
        typer.Option(help="Width multiplier, in (0, 16]. \\[default: 0.25]", rich_help_panel=MODEL),
    ] = None,
    sampler: Annotated[
        str | None,
        typer.Option(
            metavar="[poisson|balanced|shuffle]",
            help="balanced (BIS: each record in exactly k of T steps per pass) or poisson "
            "(rate q); shuffle is refused (no certified ε). \\[default: balanced]",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    k: Annotated[
        int | None,
        typer.Option(
            "--k",
            help="Steps each record joins per pass, 1 <= k <= T (Poisson: q = k/T). \\[default: 1]",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Steps T per pass, >= k. \\[default: none: max(k, round(k N / batch size))]",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    q: Annotated[
        float | None,
        typer.Option(
            "--q",
            help="Poisson rate 0 < q <= 1 (--sampler poisson only). \\[default: none: k/T]",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help="Expected batch size, used to choose T when --steps is not given. \\[default: 64]",
            rich_help_panel=SAMPLING,
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        typer.Option(help="Passes over the data, >= 1. \\[default: 5]", rich_help_panel=SAMPLING),
    ] = None,
    sigma: Annotated[
        float | None,
        typer.Option(
            help="Noise multiplier σ in (0, 1e6]. Give --sigma or --target-epsilon.",
            rich_help_panel=NOISE,
        ),
    ] = None,
    target_epsilon: Annotated[
        float | None,
        typer.Option(
            help="Calibrate σ so that the certified ε of all epochs is at most this, in "
            "(0, 1e4]. Give --sigma or --target-epsilon.",
            rich_help_panel=NOISE,
        ),
    ] = None,
    delta: Annotated[
        float | None,
        typer.Option(help="Target δ, 0 < δ < 1. \\[default: 1e-05]", rich_help_panel=NOISE),
    ] = None,
    clip: Annotated[
        float | None,
        typer.Option(
            help="Per-sample clip norm C (of the split part with --shared), in (0, 1e6]. "
            "\\[default: 1.0]",
            rich_help_panel=NOISE,
        ),
    ] = None,
    shared_clip: Annotated[
        float | None,
        typer.Option(
            help="Clip norm of the --shared part, in (0, 1e6]. \\[default: none: --clip]",
            rich_help_panel=NOISE,
        ),
    ] = None,
    partition: Annotated[
        str | None,
        typer.Option(
            metavar="[none|split:d|dropout:0.5]",
            help="Each record updates one of d parameter blocks per step (split:d, d >= 2), or "
            "a random half of the coordinates (dropout:0.5). \\[default: none]",
            rich_help_panel=NOISE,
        ),
    ] = None,
    shared: Annotated[
        list[str] | None,
        typer.Option(
            metavar="PREFIX",
            help="Parameter-name prefix that every record updates (partial splitting); "
            "repeat or comma-separate. Needs --partition split:d or dropout:0.5.",
            rich_help_panel=NOISE,
        ),
    ] = None,
    partition_unit: Annotated[
        str | None,
        typer.Option(
            metavar="[layer|tensor]",
            help="Blocks are made of whole layers or whole tensors. \\[default: layer]",
            rich_help_panel=NOISE,
        ),
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            metavar="[rdp|pld|best]",
            help="Certified accountant(s): best is the smaller of rdp and pld. \\[default: best]",
            rich_help_panel=NOISE,
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(help="Learning rate, in (0, 100]. \\[default: 0.5]", rich_help_panel=MODEL),
    ] = None,
    momentum: Annotated[
        float | None,
        typer.Option(help="SGD momentum, in [0, 0.999]. \\[default: 0.0]", rich_help_panel=MODEL),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(help="Weight decay, in [0, 1]. \\[default: 0.0]", rich_help_panel=MODEL),
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment",
            help="Random crops of the training images. \\[default: off]",
            rich_help_panel=MODEL,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the initialization and augmentation, >= 0. \\[default: 0]",
            rich_help_panel=RUN,
        ),
    ] = None,
    sampler_seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the batch sampler, for reproducible tests only. "
            "\\[default: none: the OS's secure source]",
            rich_help_panel=RUN,
        ),
    ] = None,
    noise_seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the gradient noise, for reproducible tests only. "
            "\\[default: none: the OS's secure source]",
            rich_help_panel=RUN,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads, >= 1. \\[default: 1]", rich_help_panel=RUN),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Train a model with DP-SGD into a new run directory (or continue one with --resume) and
    print its summary.

    Example: asymflow dpsgd train --sampler balanced --k 5 --epochs 5 --target-epsilon 8
    --out runs/dpsgd
    """
    given: dict[str, Any] = {
        name: value
        for name, value in ctx.params.items()
        if value is not None and name not in ("out", "resume", "json_out", "method")
    }
    with errors(_options(), DATA_HINTS):
        if method is not None:
            given["methods"] = METHODS[check_choice("--method", method, tuple(METHODS))]
        if shared is not None:
            given["shared"] = tuple(p for item in shared for p in item.split(",") if p)
        config = _train_config(given, out, resume)
        from asymflow.dpsgd.train import train_dpsgd

        result = train_dpsgd(config, out, progress=True, resume=resume).to_dict()
    if json_out:
        emit_json(result)
        return
    _print_result(config.data, config.model, config.sampler, config.k, result)
    out_console().print(
        f"wrote {out}; inspect the releases with 'asymflow ledger show {out}'", soft_wrap=True
    )


def _train_config(given: dict[str, Any], out: Path, resume: bool) -> DpsgdConfig:
    """The run's config: the options over the defaults for a new run; with --resume the run's
    own config.json, which the options given must match."""
    from asymflow.dpsgd.runs import CONFIG_FILE, DpsgdConfig, read_config

    if not (out / CONFIG_FILE).is_file():
        check_training_noise(
            given,
            SAMPLERS,
            " for DP-SGD (Chua et al. 2024); use --sampler balanced --k 1 for the same batch "
            "structure with a certified bound",
        )
        return DpsgdConfig(**given)
    if not resume:
        raise CliInputError(
            f"--out already holds a run ({out}); pass --resume to continue it, or choose a new "
            "directory"
        )
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


def _options() -> dict[str, str]:
    """Config field -> option, for error messages."""
    from asymflow.dpsgd.runs import DpsgdConfig

    options = {name: option_name(name) for name in DpsgdConfig.__dataclass_fields__}
    options.update(run_dir="--out", methods="--method")
    return options


def _print_result(data: str, model: str, sampler: str, k: int, result: dict[str, Any]) -> None:
    steps = result["steps_per_epoch"]
    rate = f"k={k} of T={steps}" if sampler == "balanced" else f"T={steps} steps"
    table = Table(
        title=f"DP-SGD {model} on {data}: {sampler} ({rate}), {result['epochs']} epoch(s)",
        title_justify="left",
    )
    columns = (
        "test acc",
        f"ε spent at δ={result['delta']:g}",
        "σ",
        "expected batch",
        "blocks",
        "time (s)",
    )
    for column in columns:
        table.add_column(column, justify="right")
    table.add_row(
        f"{100 * result['test_acc']:.1f}%",
        f"{fmt(result['epsilon'])} ({result['method']}, certified)",
        f"{result['sigma']:.4g}" + (" (calibrated)" if result["calibrated"] else ""),
        f"{result['expected_batch_size']:.4g}",
        str(len(result["partition"]["blocks"])),
        f"{result['seconds']:.1f}",
    )
    console = out_console()
    console.print(table)
    console.print(f"accounting: {result['accounting']}", style="dim")
