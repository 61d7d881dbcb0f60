"""``asymflow public keygen|serve`` and ``delta train|eval --public``: keys with private
modes, clean refusals, and a tiny Delta run through a real server process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.transport.auth import KeyFiles, keygen
from tests.cli.helpers import assert_clean_error, invoke, subprocess_env
from tests.cli.test_delta import TINY

START_TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def _quiet_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--public`` sets GRPC_VERBOSITY if unset; keep that out of the test process."""
    monkeypatch.setenv("GRPC_VERBOSITY", os.environ.get("GRPC_VERBOSITY", "ERROR"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyFiles:
    return keygen(tmp_path_factory.mktemp("keys"))


# ------------------------------------------------------------------------------------ keygen


def test_keygen_writes_cert_key_and_token_and_keeps_the_secrets_private(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    result = invoke(["public", "keygen", "--out", str(out), "--host", "pub.example.org"])
    assert result.exit_code == 0, result.output
    for name in ("cert.pem", "key.pem", "token"):
        assert str(out / name) in result.stdout
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (out / "token").stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate((out / "cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "pub.example.org" in names.get_values_for_type(x509.DNSName)
    assert "localhost" in names.get_values_for_type(x509.DNSName)

    token = (out / "token").read_text()
    assert_clean_error(invoke(["public", "keygen", "--out", str(out)]), "--overwrite")
    assert (out / "token").read_text() == token  # refused: nothing replaced
    result = invoke(["public", "keygen", "--out", str(out), "--overwrite", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["token"] == str(out / "token")
    assert (out / "token").read_text() != token
    assert (out / "token").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    ("args", "name"),
    [
        (["--days", "0"], "--days must be an integer in [1, 3650]"),
        (["--host", "not a host"], "--host"),
    ],
)
def test_keygen_bad_input_is_one_line(args: list[str], name: str, tmp_path: Path) -> None:
    assert_clean_error(invoke(["public", "keygen", "--out", str(tmp_path / "k"), *args]), name)
    assert not (tmp_path / "k" / "token").exists()


# ------------------------------------------------------------------------------------ serve


def test_serve_refuses_to_start_unprotected_or_misconfigured(keys: KeyFiles) -> None:
    token, cert, key = str(keys.token), str(keys.cert), str(keys.key)
    cases = [
        (["--listen", "0.0.0.0:0"], "--token-file, --cert and --key are required"),
        (["--listen", "0.0.0.0:0", "--token-file", token], "--cert and --key are required"),
        (["--listen", "0.0.0.0:0", "--insecure-local"], "--insecure-local is allowed only"),
        (["--listen", "0.0.0.0:0", "--cert", cert], "--cert and --key must be given together"),
        (["--listen", "nowhere", "--insecure-local"], "--listen must be HOST:PORT"),
        (["--token-file", cert, "--cert", cert, "--key", key], "--token-file"),
        (["--token-file", token, "--cert", key, "--key", key], "--cert must be a PEM cert"),
        (["--token-file", token, "--cert", cert, "--key", token], "--key must be"),
        (["--insecure-local", "--max-message-mb", "4096"], "--max-message-mb"),
        (["--insecure-local", "--nproc-per-node", "0"], "--nproc-per-node"),
    ]
    for args, name in cases:
        assert_clean_error(invoke(["public", "serve", *args]), name)


# ------------------------------------------------------------------------------------ client


def test_public_options_are_checked_before_a_run_starts(keys: KeyFiles, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cases = [
        (["--token-file", str(keys.token)], "--token-file only apply with --public"),
        (["--public", "10.1.2.3:7070"], "--ca-cert is required with --public"),
        (["--public", "10.1.2.3:7070", "--insecure"], "--insecure is allowed only"),
        (["--public", "10.1.2.3"], "--public must be HOST:PORT"),
        (
            ["--public", "127.0.0.1:7070", "--ca-cert", str(tmp_path / "none.pem")],
            "--ca-cert must be an existing file",
        ),
        (
            ["--variant", "main-only", "--public", "127.0.0.1:7070", "--ca-cert", str(keys.cert)],
            "--public applies only to the variants that release residuals",
        ),
    ]
    for args, name in cases:
        result = invoke(["delta", "train", "--data", "synthetic:40", *args, "--out", str(run)])
        assert_clean_error(result, name)
    assert not run.exists()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_listening(proc: subprocess.Popen[bytes], stdout: Path, stderr: Path) -> str:
    """The address in the server's 'listening on HOST:PORT' line."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        for line in stdout.read_text().splitlines():
            if "listening on " in line:
                return line.rsplit(" ", 1)[1]
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    raise AssertionError(f"the server did not start:\n{stderr.read_text()[-2000:]}")


def test_delta_trains_and_evaluates_through_a_public_server_process(
    keys: KeyFiles, tmp_path: Path
) -> None:
    address = f"127.0.0.1:{free_port()}"
    stdout, stderr = tmp_path / "server.out", tmp_path / "server.err"
    command = [
        *(sys.executable, "-m", "asymflow", "public", "serve", "--listen", address),
        *("--token-file", str(keys.token), "--cert", str(keys.cert), "--key", str(keys.key)),
        *("--state-dir", str(tmp_path / "state")),
    ]
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            command,
            stdout=out,
            stderr=err,
            env={**subprocess_env(), "OMP_NUM_THREADS": "1"},
            start_new_session=True,  # its own process group, killed as a whole below
        )
    try:
        assert wait_for_listening(proc, stdout, stderr) == address
        client = ["--public", address, "--token-file", str(keys.token)]
        client += ["--ca-cert", str(keys.cert)]
        run = tmp_path / "run"
        result = invoke(["delta", "train", *TINY, *client, "--out", str(run), "--json"])
        assert result.exit_code == 0, result.output
        assert 0 <= json.loads(result.stdout)["accuracy"] <= 1

        result = invoke(["delta", "eval", str(run), *client, "--json"])
        assert result.exit_code == 0, result.output
        payload = json.loads(result.stdout)
        assert 0 <= payload["accuracy"] <= 1
        assert payload["queries"] == 32 and payload["public"] == address
        assert payload["epsilon_per_query"] > 0 and payload["server_seconds"] > 0
        with PrivacyLedger.for_run(run) as ledger:
            assert ledger.entries(dataset="synthetic:160/test-queries")
        assert list((tmp_path / "state").iterdir())  # the server persisted its models

        wrong = tmp_path / "wrong-token"
        wrong.write_text("x" * 43)
        wrong.chmod(0o600)
        wrong_client = ["--public", address, "--token-file", str(wrong)]
        wrong_client += ["--ca-cert", str(keys.cert)]
        refused = invoke(["delta", "eval", str(run), *wrong_client])
        message = assert_clean_error(refused, "UNAUTHENTICATED", code=1)
        assert "--token-file" in message

        os.killpg(proc.pid, signal.SIGTERM)  # a clean stop on SIGTERM
        assert proc.wait(timeout=30) == 0, stderr.read_text()[-2000:]
        assert "stopping the public server" in stderr.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
