"""The private <-> public link of Delta over gRPC (DESIGN.md sec. 5).

- :mod:`~asymflow.transport.wire`: the versioned binary envelope and its strict decoder;
- :mod:`~asymflow.transport.spec`: the public model both sides agree on;
- :mod:`~asymflow.transport.auth`: bearer token, TLS, :func:`keygen`;
- :mod:`~asymflow.transport.server`: :func:`serve`, the public server process (gRPC, TLS);
- :mod:`~asymflow.transport.service`: :class:`PublicService`, what the server does with a call;
- :mod:`~asymflow.transport.sessions`: the server's sessions, replayed replies and snapshots;
- :mod:`~asymflow.transport.ddp`: the public server's training as a torchrun DDP job;
- :mod:`~asymflow.transport.client`: :class:`RemotePublic`, a ``PublicSide`` over gRPC.
"""

from typing import Any

from asymflow.transport.auth import KeyFiles, keygen
from asymflow.transport.client import (
    PublicServerError,
    PublicSessionLostError,
    RemotePublic,
    RetryPolicy,
)
from asymflow.transport.spec import PublicSpec
from asymflow.transport.wire import PROTOCOL_VERSION, WireError

_SERVER_NAMES = ("PublicServer", "PublicService", "serve")


def __getattr__(name: str) -> Any:
    """The server's names, imported on first use (the client side does not need them)."""
    if name in _SERVER_NAMES:
        from asymflow.transport import server

        return getattr(server, name)
    raise AttributeError(f"module 'asymflow.transport' has no attribute {name!r}")


__all__ = [
    "PROTOCOL_VERSION",
    "KeyFiles",
    "PublicServer",
    "PublicServerError",
    "PublicService",
    "PublicSessionLostError",
    "PublicSpec",
    "RemotePublic",
    "RetryPolicy",
    "WireError",
    "keygen",
    "serve",
]
