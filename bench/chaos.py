"""Benchmark: N random SIGKILLs per long-running command, and what the ledger says after each.

    python bench/chaos.py                     # 20 mid-work kills per command
    python bench/chaos.py --kills 3 --commands dpsgd,delta   # a smoke run

The suite's ``tests/test_chaos.py`` kills each command twice; this bench kills it until
``--kills`` kills (issue 13: 20) landed mid-work, with the same commands and configurations
(imported from that test, so the two cannot drift apart):

- ``dpsgd train``, ``delta train``, ``fl run``: the command's whole process group is SIGKILLed
  at a uniformly random moment of its life (U(0, T) after it started, T the wall time of an
  uninterrupted run of the same command, start-up included), then started again with
  ``--resume``, until a process finishes on its own. That is one *episode*, in a fresh run
  directory; episodes repeat until ``--kills`` mid-work kills were made.
- ``public serve``: the server (TLS, token, ``--state-dir``) is SIGKILLed at U(0, T) moments of
  a ``delta train --public`` session and restarted on the same address and state directory;
  the client process lives on. One client session is one episode.

Each finished episode is compared with the uninterrupted reference of its command:

- **lost rows**: rows of the reference missing from the episode's ledger (must be 0);
- **over-count**: rows beyond the reference's. DP-SGD and federated: they must be exactly the
  cut work, the rows of passes/rounds that a killed process had started past its last
  checkpoint (computed at each kill). Delta: at most one per kill, each a copy of a reference
  row (a row written just before a kill whose release never reached its file is redone).
  ``public serve``: none at all, since the client never died;
- **repeated releases**: over-count rows that the rule above does not explain (must be 0);
- **same result**: the final model and the metrics (each epoch's or round's test accuracy,
  listed once), or Delta's result, equal the reference's bit for bit.

"mid-work" counts the kills that landed after the killed process had written a ledger or
metrics row (the server: after the session's first Train call had started); the others hit
start-up (imports, data, calibration), which is part of "any moment" too.

Prints a table and writes bench/results/chaos.json. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the chaos test's commands and helpers

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tests.test_chaos import DELTA, DPSGD, FL, PublicServe, Row, ledger_rows, start  # noqa: E402

from asymflow.delta.train import read_result  # noqa: E402
from asymflow.dpsgd import runs as dpsgd_runs  # noqa: E402
from asymflow.federated import runs as fl_runs  # noqa: E402
from asymflow.runfiles import METRICS_FILE, read_metrics  # noqa: E402
from asymflow.transport.auth import keygen  # noqa: E402

RESULTS = ROOT / "bench" / "results"
COMMANDS = ("dpsgd", "delta", "fl", "public")


@dataclass
class Tally:
    """What the kills of one command did, over all its episodes."""

    command: str
    kills: int = 0
    kills_mid_work: int = 0
    episodes: int = 0
    lost_rows: int = 0
    over_count_rows: int = 0
    repeated_releases: int = 0
    same_result: int = 0
    reference_seconds: float = 0.0
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(f"episode {self.episodes}: {what}")


def finished(process: subprocess.Popen[bytes], run: Path, timeout: float = 600) -> None:
    """Wait for ``process`` to end on its own; it must succeed."""
    code = process.wait(timeout=timeout)
    if code != 0:
        raise RuntimeError(f"{run}: the command exited with {code}")


def kill_later(process: subprocess.Popen[Any], delay: float, *, group: bool = True) -> bool:
    """SIGKILL ``process`` (its whole session if ``group``) after ``delay`` seconds unless it
    ends first; True if it was killed."""
    try:
        process.wait(timeout=delay)
        return False
    except subprocess.TimeoutExpired:
        if group:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        return True


def rows(run: Path) -> list[Row]:
    """The ledger rows of ``run`` (none before its ledger exists)."""
    return ledger_rows(run) if (run / "ledger.sqlite").exists() else []


def reference(args: list[str], run: Path) -> float:
    """Run ``args`` uninterrupted into ``run``; its wall time."""
    began = time.perf_counter()
    finished(start(args, run), run)
    return time.perf_counter() - began


# ----------------------------------------------------------------- dpsgd, delta, fl


def checkpointed(command: str, run: Path) -> int:
    """Epochs (DP-SGD) or rounds (federated) saved in ``run``'s latest checkpoint."""
    found = (dpsgd_runs.latest_checkpoint if command == "dpsgd" else fl_runs.latest_round)(run)
    return 0 if found is None else found[0]


def same_final(command: str, run: Path, whole: Path) -> bool:
    """The episode's final model and metrics (DP-SGD, federated) or result (Delta) equal the
    reference's."""
    if command == "delta":
        mine, theirs = read_result(run), read_result(whole)
        return (mine["accuracy"], mine["final"]) == (theirs["accuracy"], theirs["final"])
    if command == "dpsgd":
        name = f"ckpt/epoch{dpsgd_runs.read_config(whole).epochs}.pt"
    else:
        name = fl_runs.FINAL_CHECKPOINT
    mine = torch.load(run / name, weights_only=True)["model"]
    theirs = torch.load(whole / name, weights_only=True)["model"]
    same_model = mine.keys() == theirs.keys() and all(
        torch.equal(mine[n], theirs[n]) for n in theirs
    )
    return same_model and accuracies(run) == accuracies(whole)


def accuracies(run: Path) -> list[tuple[int, float]]:
    """The (epoch or round, test accuracy) rows of ``run``'s metrics, each listed once."""
    return [(m.get("epoch", m.get("round")), m["test_acc"]) for m in read_metrics(run)]


def episode(
    command: str,
    args: list[str],
    run: Path,
    whole: Path,
    span: float,
    rng: random.Random,
    tally: Tally,
    target: int,
) -> None:
    """Kill ``args`` at random moments until a process finishes (or ``tally`` holds
    ``target`` mid-work kills, then one last uninterrupted resume), and compare with the
    reference."""
    cut: Counter[Row] = Counter()
    kills = 0
    done = 0
    while True:
        before = len(rows(run))
        began = time.time()
        process = start(args, run, *(("--resume",) if run.exists() else ()))
        if tally.kills_mid_work >= target or not kill_later(process, rng.uniform(0.0, span)):
            if process.poll() is None:
                finished(process, run)
            break
        kills += 1
        metrics = run / METRICS_FILE
        tally.kills_mid_work += len(rows(run)) > before or (
            metrics.is_file() and metrics.stat().st_mtime > began
        )
        if command != "delta":  # one row per pass/round, written as it starts
            saved = checkpointed(command, run)
            cut.update(rows(run)[before + saved - done :])
            done = saved
    tally.kills += kills
    tally.episodes += 1
    mine, theirs = Counter(ledger_rows(run)), Counter(ledger_rows(whole))
    lost, extra = theirs - mine, mine - theirs
    tally.lost_rows += lost.total()
    tally.over_count_rows += extra.total()
    if command == "delta":
        unexplained = max(0, extra.total() - kills) + sum(
            n for row, n in extra.items() if row not in theirs
        )
    else:
        unexplained = (extra - cut).total() + (cut - extra).total()
    tally.repeated_releases += unexplained
    same = same_final(command, run, whole)
    tally.same_result += same
    tally.check(not lost, f"lost rows {dict(lost)}")
    tally.check(not unexplained, f"over-count not explained by the cut work: {dict(extra)}")
    tally.check(same, "final model differs from the uninterrupted run")


def run_command(command: str, kills: int, rng: random.Random, tmp: Path) -> Tally:
    args = {"dpsgd": DPSGD, "delta": DELTA, "fl": FL}[command]
    tally = Tally(command)
    began = time.perf_counter()
    whole = tmp / command / "whole"
    tally.reference_seconds = reference(args, whole)
    while tally.kills_mid_work < kills:
        run = tmp / command / f"episode{tally.episodes}"
        episode(command, args, run, whole, tally.reference_seconds, rng, tally, kills)
    tally.seconds = time.perf_counter() - began
    return tally


# ----------------------------------------------------------------------- public serve


def free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def public_session(
    tally: Tally,
    server: PublicServe,
    client_args: list[str],
    run: Path,
    span: float,
    rng: random.Random,
    target: int,
) -> None:
    """One ``delta train --public`` session; the server is killed and restarted at U(0, span)
    intervals while the client runs, until ``tally`` holds ``target`` mid-work kills (those
    after the session's first Train call started)."""
    client = start(DELTA, run, *client_args)
    trains = server.trains
    try:
        while tally.kills_mid_work < target:
            try:
                client.wait(timeout=rng.uniform(0.0, span))
                break
            except subprocess.TimeoutExpired:
                tally.kills_mid_work += server.trains > trains
                server.kill()
                server.start()
                tally.kills += 1
        finished(client, run)
    finally:
        if client.poll() is None:
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(timeout=30)


def run_public(kills: int, rng: random.Random, tmp: Path) -> Tally:
    tally = Tally("public")
    began = time.perf_counter()
    whole = tmp / "delta" / "whole"  # the in-process run of the same configuration
    if not (whole / "result.json").exists():
        reference(DELTA, whole)
    keys = keygen(tmp / "public" / "keys")
    server = PublicServe(keys, free_address(), tmp / "public" / "state")
    client_args = ["--public", server.command[server.command.index("--listen") + 1]]
    client_args += ["--token-file", str(keys.token), "--ca-cert", str(keys.cert)]
    server.start()
    try:
        clean = time.perf_counter()
        public_session(tally, server, client_args, tmp / "public" / "clean", 0.0, rng, 0)
        tally.reference_seconds = time.perf_counter() - clean
        while tally.kills_mid_work < kills:
            run = tmp / "public" / f"episode{tally.episodes}"
            public_session(tally, server, client_args, run, tally.reference_seconds, rng, kills)
            tally.episodes += 1
            mine, theirs = Counter(ledger_rows(run)), Counter(ledger_rows(whole))
            lost, extra = theirs - mine, mine - theirs
            tally.lost_rows += lost.total()
            tally.over_count_rows += extra.total()
            tally.repeated_releases += extra.total()  # the client never died: none allowed
            same = same_final("delta", run, whole)
            tally.same_result += same
            tally.check(not lost, f"lost rows {dict(lost)}")
            tally.check(not extra, f"rows repeated {dict(extra)}")
            tally.check(same, "result differs from the uninterrupted run")
    finally:
        server.kill()
    tally.seconds = time.perf_counter() - began
    return tally


def print_table(console: Console, tallies: list[Tally]) -> None:
    table = Table(
        title="SIGKILL at random moments, resumed: the ledger against an uninterrupted run"
    )
    for name in (
        "command",
        "kills",
        "mid-work",
        "episodes",
        "lost rows",
        "over-count rows (cut work)",
        "repeated releases",
        "same result",
        "reference s",
        "bench s",
    ):
        table.add_column(name, justify="left" if name == "command" else "right")
    for t in tallies:
        table.add_row(
            t.command,
            str(t.kills),
            str(t.kills_mid_work),
            str(t.episodes),
            str(t.lost_rows),
            str(t.over_count_rows),
            str(t.repeated_releases),
            f"{t.same_result}/{t.episodes}",
            f"{t.reference_seconds:.1f}",
            f"{t.seconds:.0f}",
        )
    console.print(table)
    for t in tallies:
        for problem in t.problems:
            console.print(f"[red]{t.command}: {problem}[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--kills", type=int, default=20, help="mid-work kills per command (default 20)"
    )
    parser.add_argument(
        "--commands", default=",".join(COMMANDS), help="subset of " + ",".join(COMMANDS)
    )
    parser.add_argument("--seed", type=int, default=13, help="seed of the kill moments")
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos.json")
    args = parser.parse_args(argv)
    commands = args.commands.split(",")
    if args.kills < 1:
        parser.error(f"--kills must be >= 1, got {args.kills}")
    if unknown := sorted(set(commands) - set(COMMANDS)):
        parser.error(f"--commands must be among {','.join(COMMANDS)}, got {unknown}")
    console = Console(width=150)
    rng = random.Random(args.seed)
    tallies: list[Tally] = []
    with tempfile.TemporaryDirectory(prefix="asymflow-chaos-") as tmp:
        os.environ["RAY_TMPDIR"] = tmp
        for command in commands:
            runner: Callable[[int, random.Random, Path], Tally] = (
                run_public
                if command == "public"
                else lambda k, r, t, c=command: run_command(c, k, r, t)
            )
            tally = runner(args.kills, rng, Path(tmp))
            tallies.append(tally)
            console.print(
                f"{command}: {tally.kills} kills in {tally.episodes} episodes, "
                f"{len(tally.problems)} problems ({tally.seconds:.0f} s)"
            )
    print_table(console, tallies)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    out = {
        "kills_per_command": args.kills,
        "seed": args.seed,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "commands": [asdict(t) for t in tallies],
    }
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    console.print(f"wrote {args.out}")
    return 0 if all(not t.problems for t in tallies) else 1


if __name__ == "__main__":
    sys.exit(main())
