"""Benchmark: one public server under load from N private clients, and a SIGKILL in the middle.

A separate file from ``bench/transport.py`` (issue 13, item 3): that bench was being
restructured by another engineer at the same time.

- N clients (default 8), each its own process, train and query one public server at once
  over loopback with TLS and a bearer token. Each client loops over rounds: release a
  sanitized residual of 128 synthetic records (ledger row first, as ``delta train`` does),
  upload it with its label-DP labels, train its public model one epoch, query logits of its
  test payload, forget the previous round's data set; every 2nd round it checkpoints the
  public state (``state_dict``) into its run directory, every 8th round it loads that state
  back (``load_state_dict``), and every 5th round it sends one deliberate bad request (wrong
  token, wrong shape, unknown data set or model), which must be refused with its status.
- Phase 1 (``--seconds``, default 180; ``--quick``: 27): latency p50/p99 per call type,
  errors (every failure that is not a deliberate refusal), and the server's RSS from
  /proc/PID/status every second, with the least-squares slope over the phase's last half.
- Phase 2 (half as long): in its middle the server is SIGKILLed and restarted on the same
  address and ``--state-dir`` (it keeps each session's models and completed requests there;
  uploads are in memory only and the clients send the same payload again). Every client must
  complete rounds after the restart in the same session, and its ledger must hold exactly one
  row per release: the labels, the test payload and one per round, each round once.

The server is ``asymflow public serve --max-sessions N``: it keeps at most that many sessions
(least recently used evicted). ``--max-sessions 4`` (its default) with 8 clients measures
what eviction does: the clients lose trained sessions and resume from their checkpoints.

Run: ``python bench/public_load.py [--quick] [--clients N] [--max-sessions M]``. Prints a
table and writes JSON to ``bench/results/public_load.json``. Not part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CALLS = ("upload", "train", "logits", "forget", "state_dict", "load_state_dict")
REFUSALS = {
    "bad_token": "UNAUTHENTICATED",
    "bad_shape": "INVALID_ARGUMENT",
    "unknown_dataset": "NOT_FOUND",
    "unknown_model": "FAILED_PRECONDITION",
}
"""Deliberate bad requests and the status each must be refused with."""
ROWS = 128
SHAPE = (8, 8, 8)
CLASSES = 10
TOTAL_EPOCHS = 10_000
"""The cosine schedule's length: longer than any run, so the learning rate stays positive."""
START_SECONDS = 90.0


# ------------------------------------------------------------------------------ the client


@dataclass
class Client:
    """One private side's loop against the server (runs in its own process)."""

    index: int
    address: str
    keys: Path
    run: Path
    calls: list[tuple[float, str, float, str, str]] = field(default_factory=list)
    """(wall time at the end, call, seconds, ok|refused|error, detail)."""
    sessions: int = 0

    def connect(self) -> Any:
        from asymflow.transport.client import RemotePublic
        from asymflow.transport.spec import PublicSpec

        spec = PublicSpec("resnet20", SHAPE, CLASSES, width=0.25, init_seed=self.index)
        self.sessions += 1
        return RemotePublic(
            self.address,
            spec=spec,
            root_cert=self.keys / "cert.pem",
            token_file=self.keys / "token",
            timeout=120.0,
        )

    def timed(self, call: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, its latency recorded under ``call``."""
        from asymflow.transport.client import PublicServerError

        began = time.perf_counter()
        try:
            result = fn(*args, **kwargs)
        except PublicServerError as err:
            self.calls.append((time.time(), call, time.perf_counter() - began, "error", str(err)))
            raise
        self.calls.append((time.time(), call, time.perf_counter() - began, "ok", ""))
        return result

    def refuse(self, kind: str, public: Any, payload: Any) -> None:
        """Send one deliberate bad request of ``kind``; record whether it got its status."""
        from asymflow.delta.sanitize import SanitizedResidual
        from asymflow.transport.client import PublicServerError, RemotePublic

        began = time.perf_counter()
        try:
            if kind == "bad_token":
                with RemotePublic(
                    self.address,
                    spec=public.spec,
                    root_cert=self.keys / "cert.pem",
                    token="x" * 43,
                ) as wrong:
                    wrong.health()
            elif kind == "bad_shape":
                c, h, w = SHAPE
                bits = np.zeros((4, c * (h + 1) * w // 8), dtype=np.uint8)
                public.logits(SanitizedResidual(bits, (c, h + 1, w), payload.event))
            elif kind == "unknown_dataset":
                public.train("0" * 20, 1, batch_size=32, lr=0.05, seed=0)
            else:
                public.logits(payload, model="no-such-model")
            outcome, detail = "error", "accepted"
        except PublicServerError as err:
            ok = err.code.name == REFUSALS[kind]
            outcome, detail = ("refused" if ok else "error"), str(err)
        self.calls.append((time.time(), kind, time.perf_counter() - began, outcome, detail))

    def loop(self, stop: Path, pause: float) -> dict[str, Any]:
        """Rounds until ``stop`` exists; returns the report."""
        import torch

        from asymflow.accounting.ledger import PrivacyLedger
        from asymflow.delta.labels import release_labels
        from asymflow.delta.sanitize import Sanitizer
        from asymflow.transport.client import PublicServerError, PublicSessionLostError

        torch.set_num_threads(1)
        gen = torch.Generator().manual_seed(self.index)
        ledger = PrivacyLedger.for_run(self.run)
        dataset = f"load-client{self.index}"
        sanitizer = Sanitizer(1.0, 2.0, seed=self.index)

        def release(note: str, data: str) -> Any:
            record = sanitizer.record_release(ledger, dataset=data, scope="train", note=note)
            payload = sanitizer.sanitize(torch.randn((ROWS, *SHAPE), generator=gen), record)
            record.done()
            return payload

        truth = torch.randint(0, CLASSES, (ROWS,), generator=gen).numpy()
        labels, row = release_labels(
            truth,
            mode="rr",
            classes=CLASSES,
            ledger=ledger,
            dataset=dataset,
            epsilon=2.0,
            seed=self.index,
        )
        ledger.mark_released(row)
        test = release("test queries", f"{dataset}/test")
        payloads: dict[int, Any] = {}  # round -> its release, kept until checkpointed
        checkpoint: dict[str, Any] = {"round": 0, "public": None}
        done, released, previous = 0, 0, None
        public = self.connect()
        while not stop.exists():
            step = done + 1
            if step not in payloads:
                payloads[step] = release(f"round {step}", dataset)
                released = max(released, step)
            try:
                data = self.timed("upload", public.upload, payloads[step], labels)
                self.timed(
                    "train",
                    public.train,
                    data,
                    1,
                    batch_size=32,
                    lr=0.05,
                    seed=step,
                    start_epoch=step - 1,
                    total_epochs=TOTAL_EPOCHS,
                )
                self.timed("logits", public.logits, test)
                if previous is not None and previous != data:
                    self.timed("forget", public.forget, previous)
                previous, done = data, step
                if done % 2 == 0:
                    state = self.timed("state_dict", public.state_dict)
                    checkpoint = {"round": done, "public": state}
                    tmp = self.run / "checkpoint.pt.tmp"
                    torch.save(checkpoint, tmp)
                    os.replace(tmp, self.run / "checkpoint.pt")
                    payloads = {r: p for r, p in payloads.items() if r > done}
                    if done % 8 == 0:
                        self.timed("load_state_dict", public.load_state_dict, state)
                if done % 5 == 0:
                    kinds = tuple(REFUSALS)
                    self.refuse(kinds[(done // 5 + self.index) % len(kinds)], public, test)
            except PublicSessionLostError:
                # Resume from our own checkpoint in a new session; the rounds since it are
                # trained again on their kept releases, nothing is released again.
                public.close()
                public = self.connect()
                if checkpoint["public"] is not None:
                    public.load_state_dict(checkpoint["public"])
                done, previous = checkpoint["round"], None
            except PublicServerError:
                time.sleep(1.0)
            time.sleep(pause)
        public.close()
        return {
            "index": self.index,
            "rounds": done,
            "released_rounds": released,
            "sessions": self.sessions,
            "calls": self.calls,
        }


def client_main(argv: list[str]) -> int:
    """``public_load.py client ...``: one client process; writes ``RUN/report.json``."""
    p = argparse.ArgumentParser(prog="public_load.py client")
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--address", required=True)
    p.add_argument("--keys", type=Path, required=True)
    p.add_argument("--run", type=Path, required=True)
    p.add_argument("--stop", type=Path, required=True)
    p.add_argument("--pause", type=float, required=True)
    args = p.parse_args(argv)
    client = Client(args.index, args.address, args.keys, args.run)
    report = client.loop(args.stop, args.pause)
    (args.run / "report.json").write_text(json.dumps(report))
    return 0


# ------------------------------------------------------------------------------ the bench


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def env() -> dict[str, str]:
    """The children's environment: the source tree, one thread each, quiet gRPC."""
    path = os.pathsep.join(
        filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")])
    )
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "GRPC_VERBOSITY": "ERROR"}


class Server:
    """The public server process; :meth:`start` waits for its 'listening on' line."""

    def __init__(self, address: str, keys: Path, state: Path, log: Path, sessions: int) -> None:
        self.command = [
            *(sys.executable, "-m", "asymflow", "public", "serve", "--listen", address),
            *("--token-file", str(keys / "token"), "--cert", str(keys / "cert.pem")),
            *("--key", str(keys / "key.pem"), "--state-dir", str(state)),
            *("--max-sessions", str(sessions), "--log-level", "WARNING"),
        ]
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start the process; return the seconds until it listens."""
        began = time.monotonic()
        out = self.log.with_suffix(f".{int(time.time() * 1000)}.out")
        with out.open("wb") as stdout, self.log.open("ab") as stderr:
            self.proc = subprocess.Popen(self.command, stdout=stdout, stderr=stderr, env=env())
        while "listening on" not in out.read_text():
            if self.proc.poll() is not None or time.monotonic() - began > START_SECONDS:
                raise RuntimeError(f"the server did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.1)
        return time.monotonic() - began

    def kill(self) -> None:
        """SIGKILL (no cleanup) and reap."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)


def rss_kib(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def sample_rss(
    server: Server, samples: list[tuple[float, int, int]], stop: threading.Event
) -> None:
    """(wall time, pid, RSS KiB) of the running server, every second."""
    while not stop.wait(1.0):
        proc = server.proc
        if proc is not None and (kib := rss_kib(proc.pid)) is not None:
            samples.append((time.time(), proc.pid, kib))


def slope_mib_per_min(points: list[tuple[float, int, int]]) -> float:
    """Least-squares slope of RSS over time, MiB per minute."""
    t = np.array([p[0] for p in points])
    y = np.array([p[2] / 1024 for p in points])
    return float(np.polyfit(t - t[0], y, 1)[0] * 60) if len(points) > 2 else float("nan")


def latency_table(calls: list[list[Any]], begin: float, end: float) -> dict[str, dict[str, Any]]:
    """Per call type: count, p50, p99 and max (ms), errors and refusals of the calls that
    ended in [begin, end)."""
    out: dict[str, dict[str, Any]] = {}
    for name in (*CALLS, *REFUSALS):
        rows = [c for c in calls if c[1] == name and begin <= c[0] < end]
        ok = [c[2] * 1000 for c in rows if c[3] != "error"]
        out[name] = {
            "calls": len(rows),
            "p50_ms": float(np.percentile(ok, 50)) if ok else None,
            "p99_ms": float(np.percentile(ok, 99)) if ok else None,
            "max_ms": max(ok) if ok else None,
            "errors": sum(c[3] == "error" for c in rows),
            "refused": sum(c[3] == "refused" for c in rows),
        }
    return out


def check_ledger(run: Path, released: int) -> dict[str, Any]:
    """Rows of the client's ledger: one for the labels, one for the test payload and one per
    released round, each round once."""
    from asymflow.accounting.ledger import PrivacyLedger

    with PrivacyLedger.for_run(run) as ledger:
        notes = Counter(e.note for e in ledger.entries())
    rounds = {f"round {r}" for r in range(1, released + 1)}
    repeated = sorted(n for n, k in notes.items() if k > 1)
    missing = sorted(rounds - set(notes))
    return {
        "rows": notes.total(),
        "expected": released + 2,
        "repeated": repeated,
        "missing": missing,
        "ok": notes.total() == released + 2 and not repeated and not missing,
    }


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from asymflow.transport.auth import keygen

    phase1 = 27.0 if args.quick else args.seconds
    phase2 = phase1 / 2
    work = Path(tempfile.mkdtemp(prefix="public-load-"))
    keys = keygen(work / "keys").cert.parent
    address = f"127.0.0.1:{free_port()}"
    sessions = args.max_sessions or args.clients
    server = Server(address, keys, work / "state", work / "server.log", sessions)
    stop_file = work / "stop"
    clients: list[subprocess.Popen[bytes]] = []
    samples: list[tuple[float, int, int]] = []
    sampling = threading.Event()
    try:
        started = server.start()
        sampler = threading.Thread(target=sample_rss, args=(server, samples, sampling), daemon=True)
        sampler.start()
        for i in range(args.clients):
            run = work / f"client{i}"
            run.mkdir()
            command = [sys.executable, __file__, "client", "--index", str(i), "--address", address]
            command += ["--keys", str(keys), "--run", str(run), "--stop", str(stop_file)]
            command += ["--pause", str(args.pause)]
            with (run / "client.log").open("wb") as log:
                clients.append(subprocess.Popen(command, stdout=log, stderr=log, env=env()))
        t0 = time.time()
        time.sleep(phase1)
        t1 = time.time()
        time.sleep(phase2 / 2)
        t_kill = time.time()
        server.kill()
        restart = server.start()
        t_back = time.time()
        time.sleep(phase2 / 2)
        t2 = time.time()
        stop_file.touch()
        for proc in clients:
            proc.wait(timeout=300)
        sampling.set()
        sampler.join()
    finally:
        stop_file.touch()
        sampling.set()
        for proc in clients:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        server.kill()
    reports = []
    for i, proc in enumerate(clients):
        path = work / f"client{i}" / "report.json"
        if proc.returncode != 0 or not path.exists():
            log = (work / f"client{i}" / "client.log").read_text()[-2000:]
            raise RuntimeError(f"client {i} failed (exit {proc.returncode}):\n{log}")
        reports.append(json.loads(path.read_text()))
    calls = [c for r in reports for c in r["calls"]]
    first = [p for p in samples if p[0] < t_kill]
    warm = [p for p in first if p[0] >= t0 + phase1 / 2]
    resumed = []
    for r in reports:
        after = [c for c in r["calls"] if c[1] == "train" and c[3] == "ok" and c[0] > t_back]
        resumed.append(bool(after) and r["sessions"] == 1)
    ledgers = [check_ledger(work / f"client{r['index']}", r["released_rounds"]) for r in reports]
    errors = [c for c in calls if c[3] == "error"]
    return {
        "config": {
            "clients": args.clients,
            "max_sessions": sessions,
            "phase1_seconds": phase1,
            "phase2_seconds": phase2,
            "pause_seconds": args.pause,
            "rows": ROWS,
            "shape": SHAPE,
            "model": "resnet20 width 0.25",
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "server_start_seconds": started,
        "restart_seconds": restart,
        "phase1": latency_table(calls, t0, t1),
        "phase2": latency_table(calls, t1, t2 + 600),
        "errors": len(errors),
        "error_examples": sorted({c[4] for c in errors})[:10],
        "refused": sum(c[3] == "refused" for c in calls),
        "rounds": [r["rounds"] for r in reports],
        "sessions_per_client": [r["sessions"] for r in reports],
        "rss_mib": {
            "warm_start": first[0][2] / 1024 if first else None,
            "end_phase1": first[-1][2] / 1024 if first else None,
            "max_phase1": max(p[2] for p in first) / 1024 if first else None,
            "slope_last_half_mib_per_min": slope_mib_per_min(warm),
            "after_restart_end": samples[-1][2] / 1024 if samples else None,
            "samples": [(round(t - t0, 1), pid, kib) for t, pid, kib in samples],
        },
        "kill": {
            "at_seconds": round(t_kill - t0, 1),
            "down_seconds": round(t_back - t_kill, 2),
            "clients_resumed": sum(resumed),
            "ledgers_one_row_per_release": sum(x["ok"] for x in ledgers),
            "ledgers": ledgers,
        },
    }


def print_table(result: dict[str, Any]) -> None:
    """The latency table of both phases and the checks."""
    head = ("calls", 8), ("p50 ms", 9), ("p99 ms", 10), ("max ms", 10), ("errors", 8)
    head += (("refused", 9),)
    print(f"{'call':<17}{'phase':>6}" + "".join(f"{name:>{width}}" for name, width in head))
    for phase in ("phase1", "phase2"):
        for name, row in result[phase].items():
            p50 = "-" if row["p50_ms"] is None else f"{row['p50_ms']:.1f}"
            p99 = "-" if row["p99_ms"] is None else f"{row['p99_ms']:.1f}"
            top = "-" if row["max_ms"] is None else f"{row['max_ms']:.1f}"
            print(
                f"{name:<17}{phase[-1]:>6}{row['calls']:>8}{p50:>9}{p99:>10}{top:>10}"
                f"{row['errors']:>8}{row['refused']:>9}"
            )
    rss, kill = result["rss_mib"], result["kill"]
    print(
        f"RSS MiB: {rss['warm_start']:.1f} at start, {rss['end_phase1']:.1f} at end of phase 1 "
        f"(max {rss['max_phase1']:.1f}); slope over its last half "
        f"{rss['slope_last_half_mib_per_min']:+.2f} MiB/min"
    )
    n = result["config"]["clients"]
    print(
        f"kill at {kill['at_seconds']} s, back after {kill['down_seconds']} s: "
        f"{kill['clients_resumed']}/{n} clients resumed in their session, "
        f"{kill['ledgers_one_row_per_release']}/{n} ledgers with one row per release; "
        f"errors {result['errors']}, deliberate refusals {result['refused']}"
    )


def main(argv: list[str]) -> int:
    if argv[:1] == ["client"]:
        return client_main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=180.0, help="phase 1 (phase 2: half)")
    p.add_argument("--quick", action="store_true", help="phase 1 of 27 s")
    p.add_argument("--pause", type=float, default=0.2, help="each client's pause per round, s")
    p.add_argument("--max-sessions", type=int, default=None, help="server's; default: clients")
    p.add_argument("--out", type=Path, default=RESULTS / "public_load.json")
    args = p.parse_args(argv)
    result = run_bench(args)
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    ok = result["errors"] == 0 and result["kill"]["ledgers_one_row_per_release"] == args.clients
    return 0 if ok and result["kill"]["clients_resumed"] == args.clients else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
