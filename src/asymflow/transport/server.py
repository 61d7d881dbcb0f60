"""The public server: an untrusted process serving :class:`PublicService` over gRPC, with
TLS and a bearer token (DESIGN.md sec. 5).

:func:`serve` starts it; what each call does and how it is refused is
:mod:`asymflow.transport.service`. Start it with
``asymflow public serve --listen 127.0.0.1:7070 --token-file F --cert C --key K``
(:mod:`asymflow.cli.public`).
"""

from __future__ import annotations

import logging
import os
import time
from concurrent import futures

import grpc
import torch

from asymflow.checks import check_int
from asymflow.transport import wire
from asymflow.transport.auth import (
    BearerTokenInterceptor,
    is_loopback,
    read_token,
    server_credentials,
    split_address,
)
from asymflow.transport.service import (
    DEFAULT_MAX_HELD_BYTES,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_MAX_SESSIONS,
    METHODS,
    STATUS_OF_REFUSAL,
    PublicService,
    RefusedError,
)

log = logging.getLogger("asymflow.transport.server")

SERVICE = wire.SERVICE
MISSING_KEY = wire.MISSING_KEY
DEFAULT_MAX_CONCURRENT_RPCS = 16
DEFAULT_WORKERS = 4


class PublicServer:
    """A running gRPC server around a :class:`PublicService`."""

    def __init__(self, server: grpc.Server, service: PublicService, host: str, port: int) -> None:
        self._server = server
        self.service = service
        self.host = host
        self.port = port

    @property
    def address(self) -> str:
        """``HOST:PORT`` the server listens on (the real port when 0 was asked)."""
        return f"{self.host}:{self.port}"

    def stop(self, grace: float | None = 2.0) -> None:
        """Stop accepting calls; running calls get ``grace`` seconds to finish."""
        self._server.stop(grace).wait()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stops (True) or ``timeout`` passes (False)."""
        return bool(self._server.wait_for_termination(timeout))


def _grpc_handler(service: PublicService, method: str) -> grpc.RpcMethodHandler:
    def call(request: bytes, context: grpc.ServicerContext) -> bytes:
        began = time.perf_counter()
        log.info("rpc=%s phase=start peer=%s", method, context.peer())
        service.count(f"calls_{method}")
        try:
            reply = service.handle(method, request)
        except RefusedError as refusal:
            service.count(f"refused_{refusal.code.name}")
            log.info("rpc=%s phase=refused code=%s %s", method, refusal.code.name, refusal)
            if refusal.missing is not None:
                context.set_trailing_metadata(((MISSING_KEY, refusal.missing),))
            context.abort(refusal.code, refusal.message)
        except wire.WireError as err:
            code = STATUS_OF_REFUSAL[err.reason]
            service.count(f"refused_{code.name}")
            log.info("rpc=%s phase=refused code=%s %s", method, code.name, err)
            context.abort(code, str(err))
        except Exception:
            service.count("internal_errors")
            log.exception("rpc=%s phase=failed", method)
            context.abort(grpc.StatusCode.INTERNAL, f"{method} failed on the server (see its log)")
        log.info("rpc=%s phase=done seconds=%.4f", method, time.perf_counter() - began)
        return reply

    return grpc.unary_unary_rpc_method_handler(call)


def serve(
    listen: str,
    token_file: str | os.PathLike[str] | None,
    cert: str | os.PathLike[str] | None,
    key: str | os.PathLike[str] | None,
    insecure_local: bool = False,
    *,
    state_dir: str | os.PathLike[str] | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_concurrent_rpcs: int = DEFAULT_MAX_CONCURRENT_RPCS,
    workers: int = DEFAULT_WORKERS,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    max_held_bytes: int = DEFAULT_MAX_HELD_BYTES,
    threads: int = 1,
    nproc_per_node: int = 1,
) -> PublicServer:
    """Start a public server on ``listen`` (``HOST:PORT``; port 0 picks a free one).

    It requires a bearer token (``token_file``) and TLS (``cert`` + ``key``, PEM). Without
    them it refuses to start unless ``insecure_local=True`` and ``listen`` is a loopback
    address. ``max_message_bytes`` caps each request (gRPC answers RESOURCE_EXHAUSTED above
    it); at most ``max_concurrent_rpcs`` calls run or wait at once (the rest are refused
    with RESOURCE_EXHAUSTED) on ``workers`` threads; ``threads`` is torch's thread count.
    With ``nproc_per_node`` > 1 training runs as a torchrun DDP job of that many processes.
    """
    host, port = split_address(listen)
    if (cert is None) != (key is None):
        raise ValueError("cert and key must be given together (PEM files), or neither")
    tls = cert is not None and key is not None
    if token_file is None or not tls:
        if not insecure_local:
            raise ValueError(
                "the public server needs token_file and TLS (cert and key); without them it "
                "starts only with insecure_local=True on a loopback address"
            )
        if not is_loopback(host):
            raise ValueError(
                "insecure_local=True is allowed only on a loopback address "
                f"(127.0.0.1, ::1, localhost), got host={host!r}"
            )
    check_int("max_concurrent_rpcs", max_concurrent_rpcs, 1)
    check_int("workers", workers, 1)
    token = None if token_file is None else read_token(token_file)
    credentials = server_credentials(cert, key) if tls else None  # type: ignore[arg-type]
    service = PublicService(
        state_dir=state_dir,
        max_message_bytes=max_message_bytes,
        max_sessions=max_sessions,
        max_held_bytes=max_held_bytes,
        threads=threads,
        nproc_per_node=nproc_per_node,
    )
    interceptors = []
    if token is not None:
        interceptors.append(
            BearerTokenInterceptor(token, on_refusal=lambda m: service.count("unauthenticated"))
        )
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="asymflow-public"),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
        ],
        maximum_concurrent_rpcs=max_concurrent_rpcs,
    )
    handlers = {m: _grpc_handler(service, m) for m in METHODS}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    bind = f"{host}:{port}"
    try:
        if credentials is not None:
            bound = server.add_secure_port(bind, credentials)
        else:
            bound = server.add_insecure_port(bind)
    except RuntimeError as err:
        raise OSError(f"could not listen on {bind}: {err}") from None
    if bound == 0:
        raise OSError(f"could not listen on {bind}")
    server.start()
    torch.set_num_threads(threads)
    log.info(
        "listening on %s:%d (tls=%s, token=%s, state_dir=%s)",
        host,
        bound,
        tls,
        bool(token),
        state_dir,
    )
    return PublicServer(server, service, host, bound)


__all__ = ["METHODS", "MISSING_KEY", "SERVICE", "PublicServer", "serve"]
