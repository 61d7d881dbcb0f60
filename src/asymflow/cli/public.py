"""``asymflow public keygen|serve``: Delta's public side on another machine, and the
``--public HOST:PORT`` options of ``asymflow delta train|eval`` that use it.

- ``keygen``: a self-signed TLS certificate, its key and a bearer token,
  :func:`asymflow.transport.auth.keygen`.
- ``serve``: the public server, :func:`asymflow.transport.server.serve`, until Ctrl-C or
  SIGTERM. It refuses to start without a token and TLS unless ``--insecure-local`` is given
  on a loopback address.
- :func:`remote_public` / :func:`remote_errors`: the private side's client,
  :class:`asymflow.transport.client.RemotePublic`, checked against the server before a run
  starts, and its failures as one-line errors (exit 1).

Only sanitized 1-bit residuals and label-DP labels (each recorded in the run's ledger before it
leaves) cross the link (DESIGN.md sec. 5). grpc and torch are imported only when a command runs.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from asymflow.checks import check_choice, check_int
from asymflow.cli.common import (
    CliInputError,
    JsonOpt,
    emit_json,
    errors,
    fail,
    option_message,
)

if TYPE_CHECKING:
    from asymflow.delta.runs import DeltaConfig
    from asymflow.transport.client import RemotePublic

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
"""Names every certificate from ``keygen`` is valid for; ``--host`` adds more."""

MAX_DAYS = 3650
"""Longest validity of a certificate from ``keygen``, in days."""

CONNECT_SECONDS = 20.0
"""How long the private side retries reaching the server before a run starts."""

MAX_MESSAGE_MB = 2047
"""gRPC's message limits are 32-bit: at most 2047 MiB."""

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DNS_NAME = re.compile(rf"^(\*\.)?{_LABEL}(\.{_LABEL})*\.?$")

CLIENT_OPTIONS = {
    "target": "--public",
    "address": "--public",
    "token_file": "--token-file",
    "token": "--token-file",
    "root_cert": "--ca-cert",
}
"""Parameters of :class:`RemotePublic` -> the options that set them."""

SERVE_OPTIONS = {
    "address": "--listen",
    "listen": "--listen",
    "token_file": "--token-file",
    "token": "--token-file",
    "cert": "--cert",
    "key": "--key",
    "insecure_local": "--insecure-local",
    "state_dir": "--state-dir",
    "max_message_bytes": "--max-message-mb",
    "max_concurrent_rpcs": "--max-concurrent",
    "max_sessions": "--max-sessions",
    "max_held_bytes": "--max-held-mb",
    "workers": "--workers",
    "threads": "--threads",
    "nproc_per_node": "--nproc-per-node",
}
"""Parameters of :func:`serve` -> the options that set them."""


# ------------------------------------------------------------------------------------ keygen


def public_keygen(
    out: Annotated[
        Path,
        typer.Option(
            metavar="DIR", help="Directory for cert.pem, key.pem and token (created). Required."
        ),
    ],
    days: Annotated[int, typer.Option(help="Days the certificate is valid, 1..3650.")] = 365,
    host: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="Host name or IP address the private side connects to (repeatable); the "
            "certificate is valid for these and for 127.0.0.1 and localhost.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the files if DIR already holds them.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a self-signed TLS certificate, its key and a bearer token into DIR.

    cert.pem, key.pem (mode 600) and token (mode 600, 32 random bytes).

    The public host needs all three; the private side needs cert.pem and token.

    Example: asymflow public keygen --out keys --host public.example.org
    """
    with errors({"days": "--days", "out_dir": "--out", "hosts": "--host"}):
        check_int("--days", days, 1, MAX_DAYS)
        hosts = _hosts(host or [])
        if out.exists() and not out.is_dir():
            raise CliInputError(f"--out must be a directory, got the file {str(out)!r}")
        from asymflow.transport.auth import CERT_FILE, KEY_FILE, TOKEN_FILE, keygen

        held = [name for name in (CERT_FILE, KEY_FILE, TOKEN_FILE) if (out / name).exists()]
        if held and not overwrite:
            raise CliInputError(
                f"--out {str(out)!r} already holds {', '.join(held)}; pass --overwrite to "
                "replace them (clients holding the old token and certificate are then refused)"
            )
        files = keygen(out, days=days, hosts=hosts, overwrite=overwrite)
    if json_out:
        emit_json(
            {
                "cert": str(files.cert),
                "key": str(files.key),
                "token": str(files.token),
                "hosts": list(hosts),
                "days": days,
            }
        )
        return
    typer.echo(f"cert:  {files.cert}  (valid {days} days for {', '.join(hosts)})")
    typer.echo(f"key:   {files.key}  (mode 600; the server's private key)")
    typer.echo(f"token: {files.token}  (mode 600; the bearer token, keep it secret)")
    typer.echo(
        "the public host needs all three ('asymflow public serve --cert --key --token-file'); "
        "the private side needs cert.pem and token ('--ca-cert', '--token-file')"
    )


def _hosts(given: list[str]) -> tuple[str, ...]:
    """The certificate's names: 127.0.0.1, localhost and each valid ``--host``, once each."""
    hosts = list(DEFAULT_HOSTS)
    for name in given:
        name = name.strip()
        try:
            ipaddress.ip_address(name.strip("[]"))
        except ValueError:
            if not _DNS_NAME.match(name) or len(name) > 253:
                raise CliInputError(
                    f"--host must be a DNS name or an IP address, got {name!r}"
                ) from None
        if name not in hosts:
            hosts.append(name)
    return tuple(hosts)


# ------------------------------------------------------------------------------------ serve


def public_serve(
    listen: Annotated[
        str,
        typer.Option(
            metavar="HOST:PORT",
            help="Address to listen on; 0.0.0.0:PORT for every interface, port 0 for any free "
            "port.",
        ),
    ] = "127.0.0.1:7070",
    token_file: Annotated[
        Path | None,
        typer.Option(metavar="FILE", help="The bearer token (token from 'public keygen')."),
    ] = None,
    cert: Annotated[
        Path | None, typer.Option(metavar="FILE", help="TLS certificate, PEM (cert.pem).")
    ] = None,
    key: Annotated[
        Path | None, typer.Option(metavar="FILE", help="TLS private key, PEM (key.pem).")
    ] = None,
    insecure_local: Annotated[
        bool,
        typer.Option(
            "--insecure-local",
            help="Allow no token and no TLS; only on a loopback address (127.0.0.1, ::1, "
            "localhost).",
        ),
    ] = False,
    state_dir: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="Write the public models here after every change, so that a restarted server "
            "resumes them. Without it a restart loses them.",
        ),
    ] = None,
    max_message_mb: Annotated[
        int, typer.Option(metavar="N", help="Largest request in MiB, 1..2047.")
    ] = 64,
    max_concurrent: Annotated[
        int,
        typer.Option(metavar="N", help="Calls running or waiting at once; more are refused, >= 1."),
    ] = 16,
    max_sessions: Annotated[
        int,
        typer.Option(
            metavar="N", help="Private sides served at once; the least recently used goes, >= 1."
        ),
    ] = 4,
    max_held_mb: Annotated[
        int, typer.Option(metavar="N", help="Uploads held in memory over all sessions, in MiB.")
    ] = 4096,
    workers: Annotated[int, typer.Option(help="Threads answering calls, >= 1.")] = 4,
    threads: Annotated[int, typer.Option(help="torch threads, >= 1.")] = 1,
    nproc_per_node: Annotated[
        int,
        typer.Option(
            "--nproc-per-node",
            metavar="N",
            help="Train the public models with DDP over N processes on this machine, started "
            "by torchrun (one CUDA device each if there are N, else CPU); 1 trains in process.",
        ),
    ] = 1,
    log_level: Annotated[
        str, typer.Option(metavar="[DEBUG|INFO|WARNING|ERROR]", help="Log level (stderr).")
    ] = "INFO",
) -> None:
    """Serve Delta's public side over gRPC until Ctrl-C or SIGTERM.

    Prints 'asymflow public server listening on HOST:PORT' once it accepts calls.

    Example: asymflow public serve --listen 0.0.0.0:7070 --token-file T --cert C --key K
    """
    with errors(SERVE_OPTIONS):
        host = _check_serve(listen, token_file, cert, key, insecure_local, state_dir, log_level)
        # in MiB here; serve() checks the other limits before it listens
        check_int("--max-message-mb", max_message_mb, 1, MAX_MESSAGE_MB)
        check_int("--max-held-mb", max_held_mb, 0)
        logging.basicConfig(
            level=getattr(logging, log_level),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )
        logging.getLogger("asymflow").setLevel(getattr(logging, log_level))
        from asymflow.transport.server import serve

        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                server = serve(
                    listen,
                    token_file,
                    cert,
                    key,
                    insecure_local,
                    state_dir=state_dir,
                    max_message_bytes=max_message_mb << 20,
                    max_concurrent_rpcs=max_concurrent,
                    max_sessions=max_sessions,
                    max_held_bytes=max_held_mb << 20,
                    workers=workers,
                    threads=threads,
                    nproc_per_node=nproc_per_node,
                )
            except OSError as exc:
                if "could not listen" not in str(exc):
                    raise
                raise CliInputError(
                    f"--listen {listen}: {exc} (is the port in use, or {host!r} not an "
                    "address of this machine?)"
                ) from None
            try:
                typer.echo(f"asymflow public server listening on {server.address}")
                if token_file is None or cert is None:
                    typer.echo(
                        "warning: no bearer token or no TLS (--insecure-local): for this "
                        "machine only",
                        err=True,
                    )
                while not stop.wait(0.5):
                    pass
                typer.echo("stopping the public server", err=True)
            finally:
                server.stop(grace=5.0)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _check_serve(
    listen: str,
    token_file: Path | None,
    cert: Path | None,
    key: Path | None,
    insecure_local: bool,
    state_dir: Path | None,
    log_level: str,
) -> str:
    """Refuse what :func:`serve` would refuse, naming the options; return the host."""
    from asymflow.transport.auth import check_token, is_loopback, split_address

    check_choice("--log-level", log_level, LOG_LEVELS)
    try:
        host, _ = split_address(listen)
    except ValueError as exc:
        raise CliInputError(option_message(str(exc), {"address": "--listen"})) from None
    if (cert is None) != (key is None):
        raise CliInputError(
            "--cert and --key must be given together (cert.pem and key.pem from 'asymflow "
            "public keygen'), or neither"
        )
    missing = [
        name
        for name, value in (("--token-file", token_file), ("--cert", cert), ("--key", key))
        if value is None
    ]
    if missing and not insecure_local:
        names = " and ".join([", ".join(missing[:-1]), missing[-1]] if missing[1:] else missing)
        verb = "is" if len(missing) == 1 else "are"
        raise CliInputError(
            f"{names} {verb} required: the server accepts only calls with a bearer token "
            "over TLS ('asymflow public keygen' writes them); without them it starts only with "
            f"--insecure-local on a loopback address, got --listen {listen}"
        )
    if missing and not is_loopback(host):
        raise CliInputError(
            "--insecure-local is allowed only on a loopback --listen address (127.0.0.1, ::1, "
            f"localhost), got --listen {listen}; give --token-file, --cert and --key instead"
        )
    for option, path in (("--token-file", token_file), ("--cert", cert), ("--key", key)):
        if path is not None and not path.is_file():
            raise CliInputError(f"{option} must be an existing file, got {str(path)!r}")
    if token_file is not None:
        try:  # read_token's text, without its warning on loose permissions (serve gives it)
            check_token(token_file.read_text(encoding="ascii", errors="replace").strip())
        except ValueError as exc:
            raise CliInputError(f"--token-file {str(token_file)!r}: {exc}") from None
    if cert is not None and key is not None:
        _check_key_pair(cert, key)
    if state_dir is not None and state_dir.exists() and not state_dir.is_dir():
        raise CliInputError(f"--state-dir must be a directory, got the file {str(state_dir)!r}")
    return host


def _check_key_pair(cert: Path, key: Path) -> None:
    """``cert`` must be a PEM certificate and ``key`` its unencrypted PEM private key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert.read_bytes())
    except ValueError:
        raise CliInputError(f"--cert must be a PEM certificate, got {str(cert)!r}") from None
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise CliInputError(
            f"--key must be an unencrypted PEM private key, got {str(key)!r}"
        ) from None
    der = serialization.Encoding.DER
    info = serialization.PublicFormat.SubjectPublicKeyInfo
    if certificate.public_key().public_bytes(der, info) != private.public_key().public_bytes(
        der, info
    ):
        raise CliInputError(f"--key {str(key)!r} is not the private key of --cert {str(cert)!r}")


# ------------------------------------------------------------------------------------ client

CLIENT = "Public side on another machine"

PublicOpt = Annotated[
    str | None,
    typer.Option(
        "--public",
        metavar="HOST:PORT",
        help="Use the public server at HOST:PORT ('asymflow public serve') instead of an "
        "in-process public side. Only sanitized 1-bit residuals and label-DP labels are sent.",
        rich_help_panel=CLIENT,
    ),
]
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="The server's bearer token (token from 'asymflow public keygen').",
        rich_help_panel=CLIENT,
    ),
]
CaCertOpt = Annotated[
    Path | None,
    typer.Option(
        metavar="FILE",
        help="Certificate the server's TLS certificate must match (cert.pem from 'asymflow "
        "public keygen', or its CA).",
        rich_help_panel=CLIENT,
    ),
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure",
        help="No TLS: only to a server started with --insecure-local on this machine.",
        rich_help_panel=CLIENT,
    ),
]


def check_client_options(
    target: str | None, token_file: Path | None, ca_cert: Path | None, insecure: bool
) -> None:
    """Refuse a combination of ``--public``, ``--token-file``, ``--ca-cert`` and ``--insecure``
    that cannot work, before anything runs."""
    if target is None:
        given = [
            name
            for name, value in (
                ("--token-file", token_file),
                ("--ca-cert", ca_cert),
                ("--insecure", insecure or None),
            )
            if value is not None
        ]
        if given:
            raise CliInputError(
                f"{', '.join(given)} only apply with --public HOST:PORT (a remote public server)"
            )
        return
    # gRPC's native log writes each failed TLS handshake to stderr at INFO; errors are enough
    # (read when grpc is first imported; GRPC_VERBOSITY set by the user wins).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    from asymflow.transport.auth import is_loopback, split_address

    try:
        host, port = split_address(target)
    except ValueError as exc:
        raise CliInputError(option_message(str(exc), CLIENT_OPTIONS)) from None
    if port == 0:
        raise CliInputError(f"--public must name the server's port (1..65535), got {target!r}")
    if insecure and ca_cert is not None:
        raise CliInputError("--insecure (no TLS) and --ca-cert (TLS) exclude each other")
    if ca_cert is None and not insecure:
        raise CliInputError(
            "--ca-cert is required with --public: the certificate the server presents "
            "(cert.pem from 'asymflow public keygen'); --insecure (no TLS) is only for a "
            f"server on this machine, got --public {target}"
        )
    if insecure and not is_loopback(host):
        raise CliInputError(
            "--insecure is allowed only with a loopback --public address (127.0.0.1, ::1, "
            f"localhost), got --public {target}; give --ca-cert instead"
        )
    for option, path in (("--token-file", token_file), ("--ca-cert", ca_cert)):
        if path is not None and not path.is_file():
            raise CliInputError(f"{option} must be an existing file, got {str(path)!r}")


def check_releases(config: DeltaConfig, target: str | None) -> None:
    """``--public`` only for the variants that send anything to the public side."""
    if target is not None and not config.releases_residual:
        raise CliInputError(
            f"--public applies only to the variants that release residuals (delta, naive-dp); "
            f"--variant {config.variant} keeps everything on the private side"
        )


def client_kwargs(token_file: Path | None, ca_cert: Path | None, insecure: bool) -> dict[str, Any]:
    """Keyword arguments of :class:`RemotePublic` from the options."""
    return {"root_cert": ca_cert, "token_file": token_file, "insecure": insecure}


def connect(target: str, config: DeltaConfig, **kwargs: Any) -> None:
    """Reach the server once before a run starts (retrying for at most
    :data:`CONNECT_SECONDS`), so that a wrong address, certificate or token fails at once
    instead of after the private training stage."""
    from asymflow.transport.client import RemotePublic, RetryPolicy

    retry = RetryPolicy(deadline=CONNECT_SECONDS)
    client_log = logging.getLogger("asymflow.transport.client")
    level = client_log.level
    client_log.setLevel(logging.ERROR)  # no retry warnings: one line if it fails
    try:
        with build_client(
            lambda: RemotePublic(target, config=config, retry=retry, **kwargs)
        ) as client:
            client.health()
    finally:
        client_log.setLevel(level)


@contextmanager
def build_client(factory: Any) -> Iterator[RemotePublic]:
    """``factory()`` (a :class:`RemotePublic`), its parameter errors naming the options;
    closed on exit."""
    try:
        client = factory()
    except (ValueError, TypeError) as exc:
        raise CliInputError(
            option_message(str(exc), CLIENT_OPTIONS, {"PEM": "--ca-cert"})
        ) from None
    with client:
        yield client


_HINTS = {
    "UNAVAILABLE": "is it running and reachable at that address, and does --ca-cert hold the "
    "certificate it serves, issued for that host name ('asymflow public keygen --host')?",
    "UNAUTHENTICATED": "--token-file must hold the token the server was started with",
    "DEADLINE_EXCEEDED": "it did not answer in time; is it overloaded?",
    "RESOURCE_EXHAUSTED": "it is at one of its limits (--max-message-mb, --max-concurrent, "
    "held uploads); try again or raise them",
    "FAILED_PRECONDITION": "is it the same asymflow version as this side?",
}


@contextmanager
def remote_errors(target: str | None, lost_hint: str) -> Iterator[None]:
    """The public server's refusals and failures as one ``Error: ...`` line, exit code 1.

    ``lost_hint`` says what to do when the server lost the session's trained models."""
    if target is None:
        yield
        return
    from asymflow.transport.client import PublicServerError, PublicSessionLostError

    try:
        yield
    except PublicSessionLostError as exc:
        fail(
            f"the public server at {target} lost this session's trained public models "
            f"({exc.code.name}: {exc.details}); {lost_hint}",
            code=1,
        )
    except PublicServerError as exc:
        hint = _HINTS.get(exc.code.name)
        fail(
            f"the public server at {target} failed {exc.method}: {exc.code.name}: "
            f"{exc.details}" + (f" ({hint})" if hint else ""),
            code=1,
        )
