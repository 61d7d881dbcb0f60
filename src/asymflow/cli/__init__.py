"""The ``asymflow`` command line (typer): the command tree (DESIGN.md sec. 1).

- ``asymflow demo [--out DIR] [--quick]``: Delta on the bundled digits, the ledgers and a report
  (:mod:`.demo`).
- ``asymflow delta train|eval|report``: Delta runs (:mod:`.delta`); ``train`` and ``eval``
  with ``--public HOST:PORT`` use a public server on another machine.
- ``asymflow public keygen|serve``: TLS keys and a bearer token, and the public server that
  hosts Delta's public side on another machine (:mod:`.public`).
- ``asymflow dpsgd train``: DP-SGD with BIS/Poisson sampling and model partitioning
  (:mod:`.dpsgd`).
- ``asymflow fl run|app``: federated training with client-level DP on Flower, simulated, or
  a Flower App directory for ``flwr run`` (:mod:`.fl`).
- ``asymflow account``: ε of a training schedule by every certified method and, on request, a
  Monte Carlo estimate; ``account calibrate``: the smallest σ for a target ε (:mod:`.account`).
- ``asymflow ledger show RUN_DIR``: a run's privacy ledger and the ε it spends (:mod:`.ledger`).

Every command with ``--json`` prints exactly one JSON object on stdout; progress goes to stderr.
Bad input exits with code 2 and one line ``Error: ...`` on stderr naming the option and its
allowed range, never a traceback (:mod:`.common`); so do the parser's own errors (an unknown
option, a value of the wrong type), through :class:`OneLineErrors`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from asymflow import __version__
from asymflow.cli import account, audit, delta, demo, dpsgd, fl, ledger, public
from asymflow.cli.common import fail
from asymflow.cli.options import ConfigCommand

__all__ = ["app"]

# dp_accounting's truncation-bound search (pld/common.py) overflows inside scipy's logsumexp
# on large self-compositions; the result is handled there, so the warning is only noise.
warnings.filterwarnings(
    "ignore",
    message="overflow encountered in divide",
    category=RuntimeWarning,
    module=r"scipy\.special\._logsumexp",
)


class OneLineErrors(TyperGroup):
    """The root group: the parser's usage errors (an unknown command or option, a value of the
    wrong type, a missing option) of any command become one ``Error: ...`` line, exit code 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except click.exceptions.NoArgsIsHelpError:
        raise  # a group called without a command shows its help
    except click.UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        fail(exc.format_message().rstrip(".") + where, code=exc.exit_code)


app = typer.Typer(
    name="asymflow",
    cls=OneLineErrors,
    help="Private learning with asymmetric flows and partition-amplified DP accounting.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def _group(name: str, help_text: str, **settings: Any) -> typer.Typer:
    """The command group ``asymflow <name>``; called without a command, it shows its help."""
    group = typer.Typer(**{"help": help_text, "no_args_is_help": True, **settings})
    app.add_typer(group, name=name)
    return group


app.command("demo")(demo.demo)
delta_app = _group(
    "delta", "Delta: private learning with asymmetric flows (train, evaluate, report)."
)
delta_app.command("train", cls=ConfigCommand)(delta.delta_train)
delta_app.command("eval")(delta.delta_eval)
delta_app.command("report")(delta.delta_report)
dpsgd_app = _group(
    "dpsgd", "DP-SGD with balanced (k of T) or Poisson sampling and model partitioning."
)
dpsgd_app.command("train", cls=ConfigCommand)(dpsgd.dpsgd_train)
fl_app = _group(
    "fl", "Federated training with client-level DP on Flower: simulate, or write a Flower App."
)
fl_app.command("run", cls=ConfigCommand)(fl.fl_run)
fl_app.command("app", cls=ConfigCommand)(fl.fl_app)
audit_app = _group(
    "audit", "Privacy audits: reconstruction from the public view, membership inference, canaries."
)
audit_app.command("reconstruct")(audit.audit_reconstruct)
audit_app.command("membership")(audit.audit_membership)
audit_app.command("canary")(audit.audit_canary)
account_app = _group(
    "account",
    "Certified ε of a DP-SGD schedule (run with options), or noise calibration.",
    no_args_is_help=False,
    add_completion=False,
)
account_app.callback(invoke_without_command=True)(account.account)
account_app.command("calibrate")(account.calibrate)
ledger_app = _group("ledger", "Inspect a run's privacy ledger.")
ledger_app.command("show")(ledger.ledger_show)
public_app = _group(
    "public", "Delta's public side on another machine: TLS keys and a token, and the server."
)
public_app.command("keygen")(public.public_keygen)
public_app.command("serve")(public.public_serve)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"asymflow {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Private learning with asymmetric flows and partition-amplified DP accounting."""
