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

from asymflow.checks import check_int
from asymflow.cli.common import (
    DATA_HINTS,
    CliInputError,
    JsonOpt,
    emit_json,
    errors,
    fmt,
    out_console,
)
from asymflow.cli.options import Run, run_command
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

RUN = "Run"

# ------------------------------------------------------------------------------------ train


CONFIG = "asymflow.delta.runs:DeltaConfig"
"""The configuration whose fields are options."""


@run_command(CONFIG)
def delta_train(
    run: Run,
    *,
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
) -> None:
    """Train a Delta variant into a run directory and print its summary.

    Example: asymflow delta train --data digits --epsilon 1.4 --out runs/delta
    """
    out, resume = run.out, run.resume
    lost = (
        f"continue the run from its last checkpoint with 'asymflow delta train --out {out} "
        f"--resume --public {public_server} ...'"
    )
    options = run.options()
    with errors(options, DATA_HINTS), remote_errors(public_server, lost):
        check_client_options(public_server, token_file, ca_cert, insecure)
        config = run.config(_new_config, options)
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
                run_result = train_delta(
                    config, out, progress=True, resume=resume, public=public, overlap=overlap
                )
            result = run_result.to_dict()
    if run.json_out:
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


def _new_config(given: Mapping[str, Any]) -> DeltaConfig:
    """A new run's config, its data spec (and t | image size) checked before the run directory
    is made."""
    from asymflow.delta.runs import DeltaConfig
    from asymflow.delta.train import load_run_data

    config = DeltaConfig(**given)
    load_run_data(config)
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
        check_int("--batch-size", batch_size, 1)
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
