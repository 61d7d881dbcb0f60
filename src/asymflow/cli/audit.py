"""``asymflow audit reconstruct|membership|canary``: what the public side can recover, membership
inference against M_res, and canary-based empirical lower bounds on epsilon for DP-SGD
samplers. Thin wrappers around :mod:`asymflow.audit.commands`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from asymflow.checks import check_delta, check_int
from asymflow.cli.common import (
    JsonOpt,
    emit_json,
    errors,
    out_console,
    progress_display,
)

DataOpt = Annotated[
    str | None,
    typer.Option(
        metavar="SPEC",
        help="Data spec (e.g. digits, cifar10:PATH@N,M); default: the run's data, else digits.",
    ),
]
RunOpt = Annotated[
    Path | None,
    typer.Option(help="A Delta run directory whose trained backbone the attacker faces."),
]
OutOpt = Annotated[Path | None, typer.Option(help="Directory for the JSON (and PNG) results.")]
ViewsOpt = Annotated[
    str | None,
    typer.Option(help="Comma-separated views: ir, sign, delta:EPS, none."),
]


def _views(text: str | None, default: tuple[str, ...]) -> tuple[str, ...]:
    return default if text is None else tuple(v.strip() for v in text.split(",") if v.strip())


def _show(title: str, result: dict[str, Any], json_out: bool) -> None:
    if json_out:
        emit_json(result)
        return
    console = out_console()
    console.print(f"[bold]{title}[/]")
    for row in result.get("rows", []):
        console.print(
            "  " + ", ".join(f"{k}={v}" for k, v in row.items() if not isinstance(v, dict | list))
        )


def audit_reconstruct(
    data: DataOpt = None,
    run_dir: RunOpt = None,
    views: ViewsOpt = None,
    aux: Annotated[int | None, typer.Option(help="Auxiliary images for the decoder, >= 1.")] = None,
    private: Annotated[int | None, typer.Option(help="Held-out images to reconstruct.")] = None,
    out: OutOpt = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Train a decoder from the public view (1-bit residuals) to the image; PSNR and SSIM."""
    from asymflow.audit.commands import run_reconstruction

    with errors():
        for name, value in (("--aux", aux), ("--private", private)):
            if value is not None:
                check_int(name, value, 1)
        chosen = _views(views, ("ir", "sign", "delta:9", "delta:1.4", "none"))
        with progress_display() as progress:
            progress.add_task("reconstruction audit", total=None)
            result = run_reconstruction(
                data,
                run_dir=run_dir,
                views=chosen,
                aux=aux,
                private=private,
                out_dir=out,
                seed=seed,
            )
    _show("Model inversion from the public view", result, json_out)


def audit_membership(
    data: DataOpt = None,
    run_dir: RunOpt = None,
    views: ViewsOpt = None,
    members: Annotated[int, typer.Option(help="Members of the target's training set, >= 2.")] = 500,
    out: OutOpt = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """ML-Leaks (shadow models) and loss-threshold membership inference against M_res."""
    from asymflow.audit.commands import run_membership

    with errors():
        check_int("--members", members, 2)
        chosen = _views(views, ("sign", "delta:1.4"))
        with progress_display() as progress:
            progress.add_task("membership audit", total=None)
            result = run_membership(
                data, run_dir=run_dir, views=chosen, members=members, out_dir=out, seed=seed
            )
    _show("Membership inference against M_res", result, json_out)


def audit_canary(
    trials: Annotated[int, typer.Option(help="Trials per world (with/without canary).")] = 10_000,
    delta: Annotated[float, typer.Option(help="δ, 0 < δ < 1.")] = 1e-5,
    out: OutOpt = None,
    seed: Annotated[int, typer.Option(help="Seed.")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Empirical epsilon lower bounds (Clopper-Pearson) for Poisson and BIS DP-SGD passes,
    each next to its certified epsilon; a lower bound above it would be an accountant bug."""
    from asymflow.audit.commands import run_canary

    with errors():
        check_int("--trials", trials, 100)
        delta = check_delta("--delta", delta)
        with progress_display() as progress:
            progress.add_task("canary audit", total=None)
            result = run_canary(trials=trials, delta=delta, out_dir=out, seed=seed)
    _show("DP-SGD canary audit", result, json_out)
