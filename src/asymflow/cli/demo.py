"""``asymflow demo``: the main job on the bundled digits data. Trains the Delta variants
(Delta at ε = 1.4 and ∞, main-only, naive-DP, original), records every release in each run's
ledger, and writes ``report.md``, through :func:`asymflow.report.run_demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from asymflow.cli.common import CliInputError, JsonOpt, emit_json, errors, out_console
from asymflow.cli.delta import results_table


def demo(
    out: Annotated[
        Path,
        typer.Option(
            metavar="DIR", help="Directory for the run directories (one per variant) and report.md."
        ),
    ] = Path("runs/demo"),
    quick: Annotated[
        bool,
        typer.Option(
            "--quick", help="A few seconds on small synthetic data instead of digits (for tests)."
        ),
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Delta on the bundled digits data: train the variants, then write DIR/report.md.

    Finished runs in DIR are reused, so an interrupted demo continues where it stopped.
    """
    with errors({"out_dir": "--out", "run_dir": "--out"}):
        if out.exists() and not out.is_dir():
            raise CliInputError(f"--out must be a directory, got the file {str(out)!r}")
        from asymflow.delta.runs import CONFIG_FILE, read_config
        from asymflow.delta.train import read_result
        from asymflow.report import demo_configs, run_demo

        configs = demo_configs(quick=quick)
        for name, config in configs.items():
            if (out / name / CONFIG_FILE).is_file() and read_config(out / name) != config:
                raise CliInputError(
                    f"--out {str(out)!r} holds a demo run {name!r} made with other settings "
                    f"(with{'out' if quick else ''} --quick?); choose another --out or remove it"
                )
        path = run_demo(out, progress=True, quick=quick)
        results = [(name, read_result(out / name)) for name in configs]
    if json_out:
        emit_json({"report": str(path), "runs": {name: result for name, result in results}})
        return
    console = out_console()
    console.print(
        results_table(results, title=f"Delta demo ({'synthetic' if quick else 'digits'})")
    )
    console.print(f"report: {path}", soft_wrap=True)
