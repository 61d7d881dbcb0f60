"""Authentication and start-up rules: the token, the self-signed pair, who may start without
TLS, and the bounded call queue."""

from __future__ import annotations

import ipaddress
import stat
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from cryptography import x509

from asymflow.accounting.events import Gaussian
from asymflow.delta.contract import PublicSide
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.transport import wire
from asymflow.transport.auth import (
    check_token,
    is_loopback,
    keygen,
    read_token,
    split_address,
    token_matches,
)
from asymflow.transport.client import PublicServerError, RemotePublic, RetryPolicy
from asymflow.transport.server import serve
from asymflow.transport.spec import PublicSpec
from tests.transport.conftest import free_port

SPEC = PublicSpec("resnet20", (4, 8, 8), 3, 0.25, init_seed=1)


def test_keygen_writes_a_self_signed_pair_for_loopback_and_a_private_token(tmp_path):
    files = keygen(tmp_path)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert cert.issuer == cert.subject
    for private in (files.key, files.token):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert len(read_token(files.token)) >= 32
    with pytest.raises(FileExistsError, match="overwrite=True"):
        keygen(tmp_path)


def test_tokens_are_compared_whole_and_must_be_long_enough(tmp_path):
    token = "x" * 20
    assert token_matches(token, "Bearer " + token)
    assert token_matches(token, ("Bearer " + token).encode())
    for header in (None, token, "Bearer " + token[:-1], "Bearer " + token + "y", "bearer " + token):
        assert not token_matches(token, header)
    with pytest.raises(ValueError, match="16 to 4096 characters"):
        check_token("short")
    with pytest.raises(ValueError, match="printable ASCII"):
        check_token("x" * 10 + " " + "y" * 10)
    (tmp_path / "t").write_text("  tiny \n")
    with pytest.raises(ValueError, match="16 to 4096"):
        read_token(tmp_path / "t")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.3.2.1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("10.0.0.1", False), ("example.org", False), ("[::]", False)],
)  # fmt: skip
def test_loopback_addresses_are_recognized(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("address", ["7070", "host:", ":70", "h:99999", "[::1:70", "h:x"])
def test_malformed_listen_addresses_are_refused(address):
    with pytest.raises(ValueError, match="HOST:PORT"):
        split_address(address)


def test_a_server_without_token_or_tls_starts_only_on_loopback_when_asked(keys):
    with pytest.raises(ValueError, match="needs token_file and TLS"):
        serve("127.0.0.1:0", None, None, None)
    with pytest.raises(ValueError, match="needs token_file and TLS"):
        serve("127.0.0.1:0", keys.token, None, None)  # a token in clear text needs the flag
    with pytest.raises(ValueError, match="only on a loopback address"):
        serve("0.0.0.0:0", None, None, None, insecure_local=True)
    with pytest.raises(ValueError, match="together"):
        serve("127.0.0.1:0", keys.token, keys.cert, None)
    server = serve("127.0.0.1:0", None, None, None, insecure_local=True)
    try:
        client = RemotePublic(server.address, spec=SPEC, insecure=True)
        assert client.health().status == "serving"
        client.close()
    finally:
        server.stop(0)


def test_the_client_is_a_public_side_that_sends_only_sanitized_payloads():
    public = RemotePublic(f"127.0.0.1:{free_port()}", spec=SPEC, insecure=True)
    assert isinstance(public, PublicSide)
    with public, pytest.raises(TypeError, match="SanitizedResidual"):
        public.upload(torch.zeros(2, 4, 8, 8))  # refused before any connection is made
    with pytest.raises(TypeError, match="NoisyLabels"):
        public.upload(sanitized(), np.zeros(2, dtype=np.int64))


def sanitized() -> SanitizedResidual:
    return SanitizedResidual(np.zeros((2, 32), dtype=np.uint8), (4, 8, 8), Gaussian(1.0))


def test_a_client_needs_tls_or_an_explicit_insecure_loopback_target(keys):
    with pytest.raises(ValueError, match="root_cert"):
        RemotePublic("10.1.2.3:7070", spec=SPEC, insecure=True)
    with pytest.raises(ValueError, match="root_cert"):
        RemotePublic("127.0.0.1:7070", spec=SPEC)


def test_calls_beyond_the_concurrency_bound_are_refused_with_resource_exhausted(keys):
    server = serve("127.0.0.1:0", keys.token, keys.cert, keys.key, max_concurrent_rpcs=1, workers=2)
    entered, release = threading.Event(), threading.Event()
    original = server.service.health

    def slow_health(request: bytes) -> bytes:
        entered.set()
        release.wait(10)
        return original(request)

    server.service.health = slow_health  # type: ignore[method-assign]
    quick = RetryPolicy(deadline=0)
    first = RemotePublic(server.address, spec=SPEC, root_cert=keys.cert, token_file=keys.token)
    second = RemotePublic(
        server.address, spec=SPEC, root_cert=keys.cert, token_file=keys.token, retry=quick
    )
    try:
        worker = threading.Thread(target=first.health)
        worker.start()
        assert entered.wait(10)
        with pytest.raises(PublicServerError) as err:
            second.health()
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        worker.join(10)
        server.service.health = original  # type: ignore[method-assign]
        deadline = time.monotonic() + 10  # the slot frees once the first call has fully ended
        while True:
            try:
                assert second.health().protocol == wire.PROTOCOL_VERSION  # served again
                break
            except PublicServerError as again:
                assert again.code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        release.set()
        first.close()
        second.close()
        server.stop(0)
