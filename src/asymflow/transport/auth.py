"""Authentication of the private <-> public link: a bearer token over TLS.

The private side sends ``authorization: Bearer <token>`` with every call; the server compares
it with its own token file in constant time (``hmac.compare_digest``). TLS (server
certificate, checked by the client against a CA or the self-signed certificate itself)
protects the token and the payloads on the way. :func:`keygen` writes a self-signed pair and
a token for local use (DESIGN.md sec. 5).
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import logging
import os
import secrets
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from asymflow.checks import check_int

log = logging.getLogger(__name__)

AUTH_HEADER = "authorization"
BEARER = "Bearer "
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 4096

CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
TOKEN_FILE = "token"


def read_token(path: str | os.PathLike[str]) -> str:
    """The bearer token in ``path`` (surrounding whitespace removed).

    It must be 16 to 4096 printable ASCII characters without spaces. A file readable by
    group or others is accepted with a warning.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"token_file must be an existing file, got {file}")
    mode = file.stat().st_mode
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("token file %s is readable by group or others; chmod 600 it", file)
    token = file.read_text(encoding="ascii", errors="replace").strip()
    check_token(token)
    return token


def check_token(token: str) -> None:
    """Raise ``ValueError`` unless ``token`` is 16-4096 printable ASCII characters, no spaces."""
    if not isinstance(token, str) or not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
        size = len(token) if isinstance(token, str) else type(token).__name__
        raise ValueError(
            f"token must hold {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters, got {size}"
        )
    if not all(33 <= ord(ch) <= 126 for ch in token):
        raise ValueError("token must be printable ASCII without spaces")


def token_matches(expected: str, header: str | bytes | None) -> bool:
    """True if ``header`` is ``Bearer <expected>``; constant time in the token's content."""
    if header is None:
        return False
    if isinstance(header, bytes):
        header = header.decode("latin-1")
    if not header.startswith(BEARER):
        return False
    given = header[len(BEARER) :].encode("latin-1", errors="replace")
    return hmac.compare_digest(given, expected.encode("ascii"))


def bearer_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying ``token``."""
    check_token(token)
    return ((AUTH_HEADER, BEARER + token),)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[V6]:PORT``) into host and port; port 0 asks for a free port."""
    if not isinstance(address, str) or ":" not in address:
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    host, _, port_text = address.rpartition(":")
    if host.startswith("[") != host.endswith("]"):
        raise ValueError(f"address must be HOST:PORT or [IPV6]:PORT, got {address!r}")
    if not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"address must be HOST:PORT with 0 <= PORT <= 65535, got {address!r}")
    return host, int(port_text)


def server_credentials(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> Any:
    """TLS credentials of the server from PEM files (no client certificates)."""
    cert_pem, key_pem = Path(cert).read_bytes(), Path(key).read_bytes()
    x509.load_pem_x509_certificate(cert_pem)  # a clear error for a wrong file
    serialization.load_pem_private_key(key_pem, password=None)
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def channel_credentials(root_cert: str | os.PathLike[str] | bytes) -> grpc.ChannelCredentials:
    """TLS credentials of the client, trusting ``root_cert`` (a CA or the self-signed cert)."""
    pem = root_cert if isinstance(root_cert, bytes) else Path(root_cert).read_bytes()
    x509.load_pem_x509_certificate(pem)
    return grpc.ssl_channel_credentials(root_certificates=pem)


@dataclass(frozen=True)
class KeyFiles:
    """What :func:`keygen` wrote: the certificate, its private key and a bearer token."""

    cert: Path
    key: Path
    token: Path


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    path.chmod(0o600)


def keygen(
    out_dir: str | os.PathLike[str],
    *,
    days: int = 365,
    hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
    overwrite: bool = False,
) -> KeyFiles:
    """Write a self-signed ECDSA P-256 certificate (``cert.pem``, subject alternative names
    ``hosts``), its key (``key.pem``, mode 600) and a random bearer token (``token``, 32
    bytes from ``secrets``, mode 600) into ``out_dir``. For local use and tests: a real
    deployment uses a certificate from its own CA."""
    check_int("days", days, 1, 3650)
    if not hosts:
        raise ValueError("hosts must name at least one host or IP address")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = KeyFiles(out / CERT_FILE, out / KEY_FILE, out / TOKEN_FILE)
    existing = [p for p in (files.cert, files.key, files.token) if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"out_dir already holds {[p.name for p in existing]}; overwrite=True")
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host.strip("[]"))))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "asymflow public server")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(
        files.key,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    _write_private(files.token, (secrets.token_urlsafe(32) + "\n").encode("ascii"))
    return files


class BearerTokenInterceptor(grpc.ServerInterceptor):
    """Refuse every call without ``authorization: Bearer <token>`` (UNAUTHENTICATED).

    ``on_refusal`` is called (with the method name) for each refused call, e.g. to count them.
    """

    def __init__(self, token: str, on_refusal: Callable[[str], None] | None = None) -> None:
        check_token(token)
        self._token = token
        self._on_refusal = on_refusal

        def deny(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")
            raise AssertionError("unreachable")  # pragma: no cover

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        header = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == AUTH_HEADER:
                header = value
                break
        if token_matches(self._token, header):
            return continuation(handler_call_details)
        if self._on_refusal is not None:
            self._on_refusal(handler_call_details.method)
        return self._deny
