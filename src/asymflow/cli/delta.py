"""``asymflow delta train|eval|report``: Delta runs from the command line.

- ``train``: every :class:`asymflow.delta.runs.DeltaConfig` field is an option of the same name
  (``t_low`` -> ``--t-low``); an option left out keeps the config's default, or with
  ``--resume`` the value in the run's ``config.json``. Calls
  :func:`asymflow.delta.train.train_delta`.
- ``eval``: test accuracy through accounted inference, :func:`asymflow.delta.infer.evaluate_run`
  (each query batch is a sanitized release recorded in the run's ledger).
- ``train`` and ``eval`` with ``--public HOST:PORT [--token-file F] [--ca-cert C]``: the public
  side is a server on another machine (``asymflow public serve``), reached through
  :class:`asymflow.transport.client.RemotePublic` (:mod:`.public`).
- ``report``: ``report.md`` with plots over finished runs, :func:`asymflow.report.write_report`.

Method: Niu et al., CVPR 2024, arXiv 2312.05264 (DESIGN.md sec. 3). torch is imported only
when a command runs, so the accounting commands start fast.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from asymflow.cli.common import (
    DATA_HINTS,
    CliInputError,
    JsonOpt,
    check_min_int,
    emit_json,
    errors,
    fmt,
    option_name,
    out_console,
    parse_int_list,
)
from asymflow.cli.public import (
    CaCertOpt,
    InsecureOpt,
    PublicOpt,
    TokenFileOpt,
    build_client,
    check_client_options,
    check_releases,
    client_kwargs,
    connect,
    remote_errors,
)

if TYPE_CHECKING:
    from asymflow.delta.runs import DeltaConfig

DATA = "Data"
DECOMPOSITION = "Decomposition and models"
TRAINING = "Training"
PRIVACY = "Privacy"
RUN = "Run"


# ------------------------------------------------------------------------------------ train


def delta_train(
    ctx: typer.Context,
    out: Annotated[
        Path,
        typer.Option(
            metavar="RUN_DIR",
            help="Run directory to create (config.json, metrics.jsonl, ledger.sqlite, "
            "checkpoints, result.json). Required.",
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
    variant: Annotated[
        str | None,
        typer.Option(
            metavar="[delta|original|main-only|naive-dp]",
            help="delta; original (non-private baseline); main-only (M_main alone, nothing "
            "leaves); naive-dp (the whole IR sanitized). \\[default: delta]",
            rich_help_panel=DATA,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            metavar="SPEC",
            help="digits, synthetic[:N], folder:PATH, cifar10:PATH or cifar100:PATH. "
            "\\[default: digits]",
            rich_help_panel=DATA,
        ),
    ] = None,
    image_size: Annotated[
        int | None,
        typer.Option(
            help="Side of the digits images (digits only). \\[default: 16]", rich_help_panel=DATA
        ),
    ] = None,
    ir_channels: Annotated[
        int | None,
        typer.Option(
            help="Channels c of the intermediate representation X (M_bb's output), >= r. "
            "\\[default: 32]",
            rich_help_panel=DECOMPOSITION,
        ),
    ] = None,
    r: Annotated[
        int | None,
        typer.Option(
            help="Singular triplets kept private, 1 <= r <= ir_channels. \\[default: 8]",
            rich_help_panel=DECOMPOSITION,
        ),
    ] = None,
    t: Annotated[
        int | None,
        typer.Option(
            help="DCT block size t; must divide the image height and width. \\[default: 16]",
            rich_help_panel=DECOMPOSITION,
        ),
    ] = None,
    t_low: Annotated[
        int | None,
        typer.Option(
            help="Low-frequency band t' kept per block, 1 <= t' <= t. \\[default: 8]",
            rich_help_panel=DECOMPOSITION,
        ),
    ] = None,
    private_widths: Annotated[
        str | None,
        typer.Option(
            metavar="N,N,...",
            help="Output channels n of M_main's factorized stages. \\[default: 16,64,128]",
            rich_help_panel=DECOMPOSITION,
        ),
    ] = None,
    private_ranks: Annotated[
        str | None,
        typer.Option(
            metavar="Q,Q,...",
            help="Kernels q of each factorized conv, one per stage. \\[default: 4,8,16]",
            rich_help_panel=DECOMPOSITION,
        ),
    ] = None,
    public_arch: Annotated[
        str | None,
        typer.Option(
            metavar="[resnet20|resnet18|resnet34]",
            help="M_res: this network without its stem. \\[default: resnet20]",
            rich_help_panel=DECOMPOSITION,
        ),
    ] = None,
    public_width: Annotated[
        float | None,
        typer.Option(
            help="Width multiplier of M_res, in [0.001, 16]. \\[default: 0.5]",
            rich_help_panel=DECOMPOSITION,
        ),
    ] = None,
    public_folds: Annotated[
        int | None,
        typer.Option(
            help="Cross-fitted public models, 1..10 (M_main learns from out-of-fold z_res). "
            "\\[default: 2]",
            rich_help_panel=DECOMPOSITION,
        ),
    ] = None,
    epochs_stage1: Annotated[
        int | None,
        typer.Option(
            help="Stage-1 epochs (M_bb + M_main on the main part), >= 0. \\[default: 6]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    epochs_stage2: Annotated[
        int | None,
        typer.Option(
            help="Stage-2 epochs (M_main privately, M_res publicly), >= 0. \\[default: 6]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    public_epochs: Annotated[
        int | None,
        typer.Option(
            help="Epochs of M_res per stage-2 epoch, >= 1. \\[default: 3]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(help="Training batch size, >= 1. \\[default: 64]", rich_help_panel=TRAINING),
    ] = None,
    eval_batch_size: Annotated[
        int | None,
        typer.Option(
            help="Evaluation batch size, >= 1. \\[default: 256]", rich_help_panel=TRAINING
        ),
    ] = None,
    lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of stage 1 (and of original), 0 < lr <= 10. \\[default: 0.05]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    stage2_lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of M_main in stage 2, 0 < lr <= 10. \\[default: 0.02]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    public_lr: Annotated[
        float | None,
        typer.Option(
            help="Learning rate of M_res, 0 < lr <= 10. \\[default: 0.1]", rich_help_panel=TRAINING
        ),
    ] = None,
    momentum: Annotated[
        float | None,
        typer.Option(
            help="SGD momentum, in [0, 0.999]. \\[default: 0.9]", rich_help_panel=TRAINING
        ),
    ] = None,
    weight_decay: Annotated[
        float | None,
        typer.Option(help="Weight decay, in [0, 1]. \\[default: 0.0005]", rich_help_panel=TRAINING),
    ] = None,
    alpha: Annotated[
        float | None,
        typer.Option(
            help="Kernel-orthogonality weight α of ||WWᵀ-I||², in [0, 100]. \\[default: 0.001]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    augment: Annotated[
        bool | None,
        typer.Option(
            "--augment/--no-augment",
            help="Random crops (black padding) of the private inputs. \\[default: on]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    flip: Annotated[
        bool | None,
        typer.Option(
            "--flip/--no-flip",
            help="Random mirroring too (digits are not mirror-symmetric). \\[default: off]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    public_augment: Annotated[
        bool | None,
        typer.Option(
            "--public-augment/--no-public-augment",
            help="Random crops of the public side's bit maps. \\[default: off]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    epsilon: Annotated[
        float | None,
        typer.Option(
            help="Target ε of the residual release(s), 0 < ε <= inf ('inf': sign bits without "
            "noise, recorded as a non-private release). \\[default: 1.4]",
            rich_help_panel=PRIVACY,
        ),
    ] = None,
    delta: Annotated[
        float | None,
        typer.Option(
            help="δ of the releases, 0 < δ < 1. \\[default: 1e-05]", rich_help_panel=PRIVACY
        ),
    ] = None,
    clip: Annotated[
        float | None,
        typer.Option(
            help="Per-sample L2 clip norm C of the residual, finite > 0. \\[default: 1.0]",
            rich_help_panel=PRIVACY,
        ),
    ] = None,
    labels: Annotated[
        str | None,
        typer.Option(
            metavar="[rr|grad|clear]",
            help="How labels reach the public side: rr (randomized response, once), grad "
            "(noisy per-step gradients softmax(z_res)-y, one round trip per step), or "
            "clear (a non-private release). \\[default: rr]",
            rich_help_panel=PRIVACY,
        ),
    ] = None,
    label_epsilon: Annotated[
        float | None,
        typer.Option(
            help="ε of the labels (rr, or all noisy gradients of a record), finite > 0. "
            "\\[default: 2.0]",
            rich_help_panel=PRIVACY,
        ),
    ] = None,
    release: Annotated[
        str | None,
        typer.Option(
            metavar="[once|per-epoch|padded]",
            help="Release the residuals of the un-augmented images once (cached), of a fresh "
            "augmented view every stage-2 epoch, or in padded slots: each record in exactly "
            "--sample-k of the stage-2 epochs, pure noise in the others (accounted as "
            "balanced sampling). \\[default: per-epoch]",
            rich_help_panel=PRIVACY,
        ),
    ] = None,
    sample_k: Annotated[
        int | None,
        typer.Option(
            help="With --release padded: epochs in which each record's slot carries its "
            "residual, 1 <= k <= --epochs-stage2. \\[default: 1]",
            rich_help_panel=PRIVACY,
        ),
    ] = None,
    slots: Annotated[
        int | None,
        typer.Option(
            help="With --release padded: slots per epoch, a public constant >= the record "
            "count (0: the record count, then treated as public). \\[default: 0]",
            rich_help_panel=PRIVACY,
        ),
    ] = None,
    payload: Annotated[
        str | None,
        typer.Option(
            metavar="[full|channel-mean]",
            help="What is released: the c x h x w residual, or its 1 x h x w mean over "
            "channels (same clip and noise, fewer dimensions). \\[default: full]",
            rich_help_panel=PRIVACY,
        ),
    ] = None,
    combine: Annotated[
        str | None,
        typer.Option(
            metavar="[weighted|sum]",
            help="Prediction: z_main + w log_softmax(z_res) with w >= 0 fitted on held-out "
            "rows, or the plain sum z_main + z_res. \\[default: weighted]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    backbone: Annotated[
        str | None,
        typer.Option(
            metavar="[frozen|trained]",
            help="M_bb kept at its seeded initialization (each residual depends on its own "
            "record only), or trained in stage 1 as in the paper (then no per-record bound "
            "holds and the ledger records epsilon = inf). \\[default: frozen]",
            rich_help_panel=PRIVACY,
        ),
    ] = None,
    holdout: Annotated[
        float | None,
        typer.Option(
            help="Fraction of training rows no private model trains on (w is fitted there), "
            "0 <= holdout <= 0.5 (> 0 with --combine weighted). \\[default: 0.1]",
            rich_help_panel=TRAINING,
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of initialization, shuffling and crops, >= 0. \\[default: 0]",
            rich_help_panel=RUN,
        ),
    ] = None,
    noise_seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the sanitizer and randomized-response noise, for reproducible tests "
            "only. \\[default: none: the OS's secure source]",
            rich_help_panel=RUN,
        ),
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(help="torch threads, >= 1. \\[default: 1]", rich_help_panel=RUN),
    ] = None,
    public_server: PublicOpt = None,
    token_file: TokenFileOpt = None,
    ca_cert: CaCertOpt = None,
    insecure: InsecureOpt = False,
    overlap: Annotated[
        bool,
        typer.Option(
            "--overlap/--no-overlap",
            help="With --public and a per-epoch or padded release: prepare each stage-2 "
            "epoch's release in a second thread while the public side trains on the previous "
            "one (same result, less wall time). \\[default: on]",
            rich_help_panel=RUN,
        ),
    ] = True,
    json_out: JsonOpt = False,
) -> None:
    """Train a Delta variant into a run directory and print its summary.

    Example: asymflow delta train --data digits --epsilon 1.4 --out runs/delta
    """
    given = {
        name: value
        for name, value in ctx.params.items()
        if value is not None and name not in _NOT_CONFIG
    }
    lost = (
        f"continue the run from its last checkpoint with 'asymflow delta train --out {out} "
        f"--resume --public {public_server} ...'"
    )
    with errors(_options(), DATA_HINTS), remote_errors(public_server, lost):
        check_client_options(public_server, token_file, ca_cert, insecure)
        for name in ("private_widths", "private_ranks"):
            if name in given:
                given[name] = parse_int_list(option_name(name), given[name])
        config = _train_config(given, out, resume)
        check_releases(config, public_server)
        from asymflow.delta.train import train_delta

        if public_server is None:
            result = train_delta(config, out, progress=True, resume=resume).to_dict()
        else:
            from asymflow.transport.client import RemotePublic

            remote = client_kwargs(token_file, ca_cert, insecure)
            connect(public_server, config, **remote)
            if config.labels == "grad":  # no labels are uploaded to tell the server the classes
                from asymflow.delta.train import load_run_data

                remote["classes"] = len(load_run_data(config).classes)
            with build_client(
                lambda: RemotePublic(public_server, config=config, **remote)
            ) as public:
                run = train_delta(
                    config, out, progress=True, resume=resume, public=public, overlap=overlap
                )
            result = run.to_dict()
    if json_out:
        emit_json(result)
        return
    console = out_console()
    console.print(results_table([(out.name or str(out), result)], title=f"Delta run {out}"))
    remote_eval = "" if public_server is None else f" --public {public_server} ..."
    console.print(
        f"wrote {out}; inspect the releases with 'asymflow ledger show {out}', query the test "
        f"set with 'asymflow delta eval {out}{remote_eval}'",
        soft_wrap=True,
    )


_NOT_CONFIG = frozenset(
    ("out", "resume", "json_out", "public_server", "token_file", "ca_cert", "insecure", "overlap")
)
"""Options of ``delta train`` that are not fields of the run's configuration."""


def _options() -> dict[str, str]:
    """Config field -> option, for error messages (the run directory is --out)."""
    from asymflow.delta.runs import DeltaConfig

    options = {name: option_name(name) for name in DeltaConfig.__dataclass_fields__}
    options["run_dir"] = "--out"
    return options


def _train_config(given: Mapping[str, Any], out: Path, resume: bool) -> DeltaConfig:
    """The run's config: the options over the defaults, or over the run's own config.json."""
    from asymflow.delta.runs import CONFIG_FILE, DeltaConfig, read_config

    if out.exists() and not out.is_dir():
        raise CliInputError(f"--out must be a directory, got the file {str(out)!r}")
    if not (out / CONFIG_FILE).is_file():
        config = DeltaConfig(**given)
        from asymflow.delta.train import load_run_data

        load_run_data(config)  # data spec and t | image size, before the run directory exists
        return config
    if not resume:
        raise CliInputError(
            f"--out {str(out)!r} already holds a run; pass --resume to continue it, or choose "
            "a new directory"
        )
    stored = read_config(out)
    config = stored.replace(**given)
    differ = [
        f"{option_name(name)} (run: {getattr(stored, name)}, given: {getattr(config, name)})"
        for name in DeltaConfig.__dataclass_fields__
        if getattr(stored, name) != getattr(config, name)
    ]
    if differ:
        raise CliInputError(
            "--resume continues a run with the settings in its config.json; these options "
            f"differ: {', '.join(differ)}"
        )
    return config


# ------------------------------------------------------------------------------------ eval


def delta_eval(
    run_dir: Annotated[Path, typer.Argument(help="A trained Delta run directory.")],
    batch_size: Annotated[int, typer.Option(help="Queries per released batch, >= 1.")] = 256,
    public_server: PublicOpt = None,
    token_file: TokenFileOpt = None,
    ca_cert: CaCertOpt = None,
    insecure: InsecureOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Test accuracy of a trained run, queried as in deployment: each batch's residual is
    sanitized and recorded in the run's ledger before it leaves.

    With --public the run's public models are sent to that server, which answers the queries.

    Example: asymflow delta eval RUN --public HOST:7070 --token-file token --ca-cert cert.pem
    """
    lost = "run the evaluation again (the run's public models are sent again)"
    with (
        errors({"run_dir": "RUN_DIR", "batch_size": "--batch-size"}, DATA_HINTS),
        remote_errors(public_server, lost),
    ):
        check_min_int("--batch-size", batch_size, 1)
        check_client_options(public_server, token_file, ca_cert, insecure)
        _check_run_dir(run_dir, finished=False)
        from asymflow.delta.infer import evaluate_run

        if public_server is None:
            result = evaluate_run(run_dir, batch_size=batch_size)
        else:
            from asymflow.delta.runs import read_config
            from asymflow.transport.client import RemotePublic

            config = read_config(run_dir)
            check_releases(config, public_server)
            remote = client_kwargs(token_file, ca_cert, insecure)
            connect(public_server, config, **remote)
            with build_client(
                lambda: RemotePublic.for_run(run_dir, public_server, **remote)
            ) as public:
                result = evaluate_run(run_dir, batch_size=batch_size, public=public)
                result.update(public=public.target, server_seconds=public.server_seconds)
    if json_out:
        emit_json(result)
        return
    table = Table(title=f"Delta evaluation of {run_dir}", title_justify="left")
    for column in ("variant", "test acc", "queries", "batches", "ε per query", "δ"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    table.add_row(
        result["variant"],
        _fmt_acc(result["accuracy"]),
        str(result["queries"]),
        str(result["batches"]),
        f"{fmt(result['epsilon_per_query'])} ({result['epsilon_method']})",
        f"{result['delta']:g}",
    )
    console = out_console()
    console.print(table)
    if result["variant"] in ("delta", "naive-dp"):
        console.print(
            f"each batch of queries was one sanitized release, recorded in {run_dir}'s ledger "
            f"('asymflow ledger show {run_dir}')",
            soft_wrap=True,
        )
    else:
        console.print(f"{result['variant']} answers queries privately: nothing was released")
    if public_server is not None:
        console.print(
            f"z_res came from the public server at {public_server} "
            f"({result['server_seconds']:.2f} s of its compute)",
            soft_wrap=True,
        )


def _check_run_dir(run_dir: Path, *, finished: bool) -> None:
    """Refuse anything but a Delta run directory (with result.json if ``finished``)."""
    from asymflow.delta.runs import CONFIG_FILE, RESULT_FILE, read_config

    if not (run_dir / CONFIG_FILE).is_file():
        raise CliInputError(
            f"RUN_DIR must be a Delta run directory containing {CONFIG_FILE}, got {str(run_dir)!r}"
        )
    try:
        read_config(run_dir)
    except (ValueError, TypeError) as exc:
        raise CliInputError(
            f"RUN_DIR must be a Delta run directory, but {str(run_dir)!r} holds another kind of "
            f"run (its {CONFIG_FILE} is not a Delta configuration)"
        ) from exc
    if finished and not (run_dir / RESULT_FILE).is_file():
        raise CliInputError(
            f"RUN_DIR must be a finished Delta run (with {RESULT_FILE}), got {str(run_dir)!r}; "
            f"finish it with 'asymflow delta train --out {run_dir} --resume'"
        )


# ------------------------------------------------------------------------------------ report


def delta_report(
    run_dirs: Annotated[
        list[Path], typer.Argument(metavar="RUN_DIR...", help="Finished Delta run directories.")
    ],
    out: Annotated[
        Path, typer.Option(metavar="DIR", help="Directory for report.md and its PNGs. Required.")
    ],
    title: Annotated[str | None, typer.Option(help="Title of the report.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write DIR/report.md (accuracy per epoch, ε by kind of release, what the public side
    sees, the ledgers) over finished runs."""
    with errors({"run_dir": "RUN_DIR", "runs": "RUN_DIR", "out_dir": "--out"}):
        if out.exists() and not out.is_dir():
            raise CliInputError(f"--out must be a directory, got the file {str(out)!r}")
        for run_dir in run_dirs:
            _check_run_dir(run_dir, finished=True)
        from asymflow.delta.train import read_result
        from asymflow.report import write_report

        path = write_report(run_dirs, out, **({} if title is None else {"title": title}))
        results = [(run_dir.name, read_result(run_dir)) for run_dir in run_dirs]
    if json_out:
        emit_json({"report": str(path), "runs": [result for _, result in results]})
        return
    console = out_console()
    console.print(results_table(results, title="Delta runs"))
    console.print(f"report written to {path}", soft_wrap=True)


# ------------------------------------------------------------------------------------ tables


def results_table(runs: Sequence[tuple[str, Mapping[str, Any]]], *, title: str) -> Table:
    """One row per finished run (``result.json``): test accuracy, the public head's own
    accuracy and Delta's trust weight w, the certified ε spent on the training records with
    its method, σ, bytes sent per sample, MACs per sample on each side, and the fraction
    ||main||²/||X||² of the IR's energy in the main part (a property of the decomposition,
    not a privacy measure)."""
    delta = runs[0][1]["delta"] if runs else 1e-5
    table = Table(title=f"{title}; ε at δ={delta:g}", title_justify="left")
    widest = max((len(name) for name, _ in runs), default=3)
    table.add_column("run", no_wrap=True, min_width=widest)
    table.add_column("variant", no_wrap=True)
    columns = (
        "acc",
        "public",
        "w",
        "ε (method)",
        "σ",
        "bytes/sample",
        "MACs priv",
        "MACs pub",
        "main energy",
    )
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    for name, result in runs:
        sent = result["bytes_per_sample"]
        spent = result["epsilon"]
        sigma = result.get("sigma")
        energy = result.get("energy_fraction")
        table.add_row(
            name,
            result["variant"],
            _fmt_acc(result.get("accuracy")),
            _fmt_acc(result.get("final", {}).get("test_acc_public")),
            "-" if result.get("residual_weight") is None else f"{result['residual_weight']:.3g}",
            f"{fmt(spent)} ({result['epsilon_method']})" if sent or spent else "0 (no release)",
            "-" if sigma is None else f"{sigma:.4g}",
            f"{sent} B" if sent else "0 B",
            _fmt_macs(result["private_macs"]),
            _fmt_macs(result["public_macs"]),
            "-" if energy is None else f"{100 * energy:.1f}%",
        )
    return table


def _fmt_acc(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _fmt_macs(value: int) -> str:
    if not value:
        return "0"
    return f"{value / 1e6:.2f}M" if value >= 1e5 else f"{value / 1e3:.1f}K"
