"""Shared fixtures of the transport tests: one torch thread, TLS keys, real server processes.

A :class:`ServerProcess` runs ``python -m asymflow public serve`` on loopback, reads the
port it prints, and keeps its log lines so that a test can act on them (e.g. SIGKILL the
process when it starts a training call).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from asymflow.transport.auth import KeyFiles, keygen
from tests.fixtures import one_torch_thread  # noqa: F401 (autouse)

SRC = Path(__file__).resolve().parents[2] / "src"
START_TIMEOUT = 90.0


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    """A self-signed certificate for 127.0.0.1/localhost, its key and a bearer token."""
    return keygen(tmp_path_factory.mktemp("keys"))


SERVE = ["-m", "asymflow", "public", "serve"]
"""``python -m asymflow public serve``, the one way to start the public server."""

WARM_START = (
    "import sys\n"
    "import asymflow.transport.server\n"
    "from asymflow.cli import app\n"
    "print('warm', flush=True)\n"
    "sys.stdin.readline()\n"
    "app(['public', 'serve', *sys.argv[1:]], prog_name='asymflow')\n"
)
"""A spare server: imports everything, then waits for a line on stdin before serving."""


class ServerProcess:
    """A public server in its own process; ``on_line`` sees every log line it writes.

    The process runs ``python -m asymflow public serve ARGS``; with ``warm=True`` it
    imports the server and waits for :meth:`start` before running the same command
    (a warm spare that takes over a port within milliseconds of a kill). With
    ``wait=False`` the constructor returns at once; :meth:`ready` waits.
    """

    def __init__(
        self,
        args: list[str],
        on_line: Callable[[str, ServerProcess], None] | None = None,
        *,
        warm: bool = False,
        wait: bool = True,
    ) -> None:
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        self.lines: list[str] = []
        self.on_line = on_line
        command = ["-c", WARM_START] if warm else SERVE
        self.proc = subprocess.Popen(
            [sys.executable, *command, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self._reader = threading.Thread(target=self._read_log, daemon=True)
        self._reader.start()
        self.warm = warm
        self.address = ""
        self._ready = False
        if wait:
            self.ready()

    def ready(self) -> str:
        """Wait until the process has imported (warm) or listens; return its address."""
        if not self._ready:
            if self.warm:
                self._expect("warm")
            else:
                self.address = self._expect("listening on ").strip().rsplit(" ", 1)[1]
            self._ready = True
        return self.address

    def start(self) -> str:
        """Let a warm spare serve; return the address it listens on."""
        self.ready()
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        self.address = self._expect("listening on ").strip().rsplit(" ", 1)[1]
        return self.address

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))
            if self.on_line is not None:
                self.on_line(line, self)

    def _expect(self, text: str) -> str:
        result: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            result.append(self.proc.stdout.readline())

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(START_TIMEOUT)
        line = result[0] if result else ""
        if text not in line:
            self.kill()
            raise RuntimeError(
                f"server printed {line!r}, not {text!r}:\n" + "\n".join(self.lines[-20:])
            )
        return line

    def count(self, text: str) -> int:
        """Log lines containing ``text``."""
        return sum(text in line for line in list(self.lines))

    def kill(self) -> None:
        """SIGKILL: no cleanup, no final snapshot, connections reset."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM and wait (the graceful path)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tls_args(keys: KeyFiles, listen: str = "127.0.0.1:0") -> list[str]:
    """Server arguments for TLS with a bearer token."""
    return [
        "--listen", listen, "--token-file", str(keys.token),
        "--cert", str(keys.cert), "--key", str(keys.key),
    ]  # fmt: skip
