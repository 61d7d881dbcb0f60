"""Benchmark: the private <-> public link over loopback gRPC with TLS and a bearer token.

Measures, for two residual shapes (the digits demo, 32x16x16, and CIFAR's stem output,
64x32x32 of Niu et al., CVPR 2024, arXiv 2312.05264, Sec. 4):

- bytes on the wire per sample against the 1-bit ceiling ceil(c*h*w/8): the encoded Upload
  message (envelope + JSON header + bits [+ int64 labels]) at several batch sizes, and the
  bytes a TCP relay between client and server counts for Logits calls at batch 64
  (TLS records, HTTP/2 and gRPC framing included; the TLS handshake excluded);
- inference latency (p50, p99) and throughput of Logits at batch 1 and 64, one client,
  sequential calls, against a server process (``python -m asymflow public serve``);
- private-side compute per batch (M_bb, decomposition, M_main, sanitizer; the ledger write
  timed apart) against public-side compute (M_res as reported by the server).

The models are freshly initialized (compute does not depend on the weights); torch uses one
thread on each side. Run: ``PYTHONPATH=src python bench/transport.py [--quick] [--out PATH]``.
Prints a table and writes JSON to ``bench/results/transport.json``. Not part of the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.labels import NoisyLabels, clear_labels
from asymflow.delta.private import PrivateModel, calibrated_sigma
from asymflow.delta.runs import DeltaConfig
from asymflow.delta.sanitize import SanitizedResidual, Sanitizer
from asymflow.delta.train import build_private
from asymflow.transport import wire
from asymflow.transport.auth import KeyFiles, keygen
from asymflow.transport.client import RemotePublic
from asymflow.transport.spec import PublicSpec

SRC = Path(__file__).resolve().parents[1] / "src"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "transport.json"
CLASSES = 10
EPSILON, DELTA, CLIP = 1.4, 1e-5, 1.0
SCENARIOS: dict[str, DeltaConfig] = {
    "digits-demo": DeltaConfig(),
    "cifar-stem": DeltaConfig(
        data="cifar10", ir_channels=64, image_size=32, public_width=1.0, eval_batch_size=64
    ),
}
"""Residual shapes: ``ir_channels`` x image size; M_res is ResNet-20 at ``public_width``."""

IMAGE_SIZE = {"digits-demo": 16, "cifar-stem": 32}


# ------------------------------------------------------------------------- a counting relay


class CountingRelay:
    """A TCP relay on 127.0.0.1 that counts the bytes in each direction."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = 0  # client -> server
        self.down = 0  # server -> client
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            for src, dst, up in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pipe, args=(src, dst, up), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                with self._lock:
                    if up:
                        self.up += len(data)
                    else:
                        self.down += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def snapshot(self) -> tuple[int, int]:
        with self._lock:
            return self.up, self.down

    def close(self) -> None:
        self._listener.close()


# ------------------------------------------------------------------------- server process


def start_server(keys: KeyFiles) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable, "-m", "asymflow", "public", "serve", "--listen", "127.0.0.1:0",
        "--token-file", str(keys.token), "--cert", str(keys.cert), "--key", str(keys.key),
        "--threads", "1", "--log-level", "WARNING",
    ]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening on " not in line:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, line.strip().rsplit(" ", 1)[1]


# ------------------------------------------------------------------------- measurements


@dataclass(frozen=True)
class WireRow:
    scenario: str
    shape: tuple[int, int, int]
    batch: int
    labels: bool
    ceiling_bytes_per_sample: int
    message_bytes_per_sample: float

    @property
    def overhead(self) -> float:
        return self.message_bytes_per_sample / self.ceiling_bytes_per_sample - 1


@dataclass(frozen=True)
class LatencyRow:
    scenario: str
    batch: int
    calls: int
    p50_ms: float
    p99_ms: float
    samples_per_s: float
    server_ms: float
    private_ms: float
    decompose_ms: float
    main_ms: float
    sanitize_ms: float
    ledger_ms: float
    up_bytes_per_sample: float | None
    down_bytes_per_sample: float | None


def random_payload(shape: tuple[int, int, int], n: int, seed: int = 0) -> SanitizedResidual:
    rng = np.random.default_rng(seed)
    bits = np.packbits(rng.random((n, math.prod(shape))) >= 0.5, axis=1)
    return SanitizedResidual(bits, shape, Sanitizer(CLIP, 1.0).event)


def wire_rows(name: str, shape: tuple[int, int, int]) -> list[WireRow]:
    rows = []
    ceiling = math.ceil(math.prod(shape) / 8)
    for batch in (1, 64, 1024):
        data = random_payload(shape, batch)
        labels: NoisyLabels = clear_labels(np.arange(batch) % CLASSES, CLASSES)
        for with_labels in (False, True):
            message = wire.UploadRequest(
                "0" * 32, "1" * 32, 0, 1, data, labels if with_labels else None
            )
            size = len(wire.encode(message))
            rows.append(WireRow(name, shape, batch, with_labels, ceiling, size / batch))
    return rows


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def private_batch(
    model: PrivateModel, sanitizer: Sanitizer, ledger: PrivacyLedger, images: torch.Tensor
) -> tuple[SanitizedResidual, dict[str, float]]:
    """One query batch on the private side: ledger row, then M_bb + decomposition, M_main and
    the sanitizer. Returns the payload and the seconds of each step."""
    times = {}
    began = time.perf_counter()
    release = sanitizer.record_release(ledger, dataset="bench", scope="query")
    times["ledger"] = time.perf_counter() - began
    with torch.no_grad():
        began = time.perf_counter()
        dec = model.decompose(images)
        times["decompose"] = time.perf_counter() - began
        began = time.perf_counter()
        model.main(dec.features)
        times["main"] = time.perf_counter() - began
        began = time.perf_counter()
        payload = sanitizer.sanitize(dec.residual, release)
        times["sanitize"] = time.perf_counter() - began
    return payload, times


def latency_rows(
    name: str,
    config: DeltaConfig,
    address: str,
    keys: KeyFiles,
    work: Path,
    calls: dict[int, int],
) -> list[LatencyRow]:
    size = IMAGE_SIZE[name]
    shape = (config.ir_channels, size, size)
    spec = PublicSpec.from_config(config, classes=CLASSES, shape=shape)
    model = build_private(config, 3, CLASSES)
    model.eval()
    sanitizer = Sanitizer(CLIP, calibrated_sigma(EPSILON, DELTA, 1), seed=0)
    rows = []
    host, port = address.rsplit(":", 1)
    relay = CountingRelay(int(port))
    ledger = PrivacyLedger(work / f"{name}.sqlite")
    try:
        for via_relay in (False, True):
            target = f"{host}:{relay.port}" if via_relay else address
            with RemotePublic(
                target, spec=spec, root_cert=keys.cert, token_file=keys.token
            ) as public:
                fresh = spec.make_public()
                fresh.model("res")
                public.load_state_dict(fresh.state_dict())  # opens the session, sends M_res
                for batch, count in calls.items():
                    images = torch.randn(batch, 3, size, size)
                    payload, _ = private_batch(model, sanitizer, ledger, images)
                    public.logits(payload)  # warm-up
                    if via_relay:
                        up0, down0 = relay.snapshot()
                        for _ in range(count):
                            public.logits(payload)
                        up1, down1 = relay.snapshot()
                        row = rows[[r.batch for r in rows].index(batch)]
                        rows[rows.index(row)] = LatencyRow(
                            **{
                                **asdict(row),
                                "up_bytes_per_sample": (up1 - up0) / (count * batch),
                                "down_bytes_per_sample": (down1 - down0) / (count * batch),
                            }
                        )
                        continue
                    latencies, server = [], []
                    steps: dict[str, list[float]] = {}
                    for _ in range(count):
                        payload, times = private_batch(model, sanitizer, ledger, images)
                        before = public.server_seconds
                        began = time.perf_counter()
                        public.logits(payload)
                        latencies.append(time.perf_counter() - began)
                        server.append(public.server_seconds - before)
                        for key, value in times.items():
                            steps.setdefault(key, []).append(value)
                    compute = [
                        d + m + s
                        for d, m, s in zip(
                            steps["decompose"], steps["main"], steps["sanitize"], strict=True
                        )
                    ]
                    rows.append(
                        LatencyRow(
                            scenario=name,
                            batch=batch,
                            calls=count,
                            p50_ms=1e3 * percentile(latencies, 50),
                            p99_ms=1e3 * percentile(latencies, 99),
                            samples_per_s=batch * count / sum(latencies),
                            server_ms=1e3 * percentile(server, 50),
                            private_ms=1e3 * percentile(compute, 50),
                            decompose_ms=1e3 * percentile(steps["decompose"], 50),
                            main_ms=1e3 * percentile(steps["main"], 50),
                            sanitize_ms=1e3 * percentile(steps["sanitize"], 50),
                            ledger_ms=1e3 * percentile(steps["ledger"], 50),
                            up_bytes_per_sample=None,
                            down_bytes_per_sample=None,
                        )
                    )
    finally:
        ledger.close()
        relay.close()
    return rows


# ------------------------------------------------------------------------- output


def print_tables(console: Console, wires: list[WireRow], latencies: list[LatencyRow]) -> None:
    table = Table(title="Bytes per sample: encoded Upload message vs the 1-bit ceiling")
    for column in (
        "scenario",
        "c x h x w",
        "batch",
        "labels",
        "ceil(chw/8)",
        "message",
        "overhead",
    ):
        table.add_column(column, justify="right")
    for r in wires:
        table.add_row(
            r.scenario,
            "x".join(map(str, r.shape)),
            str(r.batch),
            "int64" if r.labels else "-",
            str(r.ceiling_bytes_per_sample),
            f"{r.message_bytes_per_sample:.1f}",
            f"{100 * r.overhead:+.2f}%",
        )
    console.print(table)
    table = Table(title="Inference over loopback gRPC + TLS (Logits, one client, sequential)")
    columns = (
        "scenario", "batch", "calls", "p50 ms", "p99 ms", "samples/s", "public ms",
        "private ms", "(bb+svd/dct", "M_main", "sanitize)", "ledger ms", "up B/sample",
        "down B/sample",
    )  # fmt: skip
    for column in columns:
        table.add_column(column, justify="right")
    for r in latencies:
        table.add_row(
            r.scenario,
            str(r.batch),
            str(r.calls),
            f"{r.p50_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.samples_per_s:.0f}",
            f"{r.server_ms:.1f}",
            f"{r.private_ms:.1f}",
            f"{r.decompose_ms:.1f}",
            f"{r.main_ms:.1f}",
            f"{r.sanitize_ms:.1f}",
            f"{r.ledger_ms:.1f}",
            "-" if r.up_bytes_per_sample is None else f"{r.up_bytes_per_sample:.0f}",
            "-" if r.down_bytes_per_sample is None else f"{r.down_bytes_per_sample:.0f}",
        )
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    calls = {1: 20, 64: 5} if args.quick else {1: 100, 64: 20}
    console = Console(width=170)
    wires = [
        row
        for name, config in SCENARIOS.items()
        for row in wire_rows(name, (config.ir_channels, IMAGE_SIZE[name], IMAGE_SIZE[name]))
    ]
    latencies: list[LatencyRow] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        keys = keygen(work / "keys")
        proc, address = start_server(keys)
        try:
            for name, config in SCENARIOS.items():
                latencies += latency_rows(name, config, address, keys, work, calls)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    print_tables(console, wires, latencies)
    result: dict[str, Any] = {
        "benchmark": "transport",
        "platform": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": 1,
            "loadavg": list(os.getloadavg()),
        },
        "settings": {"epsilon": EPSILON, "delta": DELTA, "clip": CLIP, "calls": calls},
        "wire": [{**asdict(r), "overhead": r.overhead} for r in wires],
        "latency": [asdict(r) for r in latencies],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
