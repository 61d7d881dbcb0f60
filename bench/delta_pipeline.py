"""Delta's stage 2 against a public server on loopback: sequential against overlapped.

    python bench/delta_pipeline.py            # digits and the CIFAR-10 subset (~10 min)
    python bench/delta_pipeline.py --quick    # digits only, fewer epochs (~2 min)

Each stage-2 epoch the private side releases the epoch's views (M_bb, decomposition,
sanitizer, ledger row, payload file), uploads them, and waits while the public side trains
its fold models; then it fits w and trains M_main. ``train_delta(..., overlap=True)`` (the
CLI's default with ``--public``) prepares epoch e+1's release in a second thread while the
server trains on epoch e. The two runs below use the same configuration, seeds and a fresh
server process each (``python -m asymflow public serve``, TLS and a bearer token on
127.0.0.1, one torch thread), and must end with the same model and ledger (checked).

Per run: the stage-2 wall time, the time the private side spent inside public calls
(upload, train, logits: the server computing plus the wire) and the rest (the private side's
own work that the public side did not hide), and the training images per second of stage 2.
The ratio overlapped / sequential is the number to read: the server here shares the
machine's 2 cores with the private side and its release thread, so absolute times are not
those of two machines. Prints a table and writes bench/results/delta_pipeline.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from asymflow.delta.runs import DeltaConfig
from asymflow.delta.train import load_run_data, train_delta
from asymflow.runfiles import read_metrics
from asymflow.transport.auth import keygen
from asymflow.transport.client import RemotePublic
from delta_frontier import CIFAR, base_config  # bench/ is on sys.path as the script's directory
from transport import start_server

RESULTS = Path(__file__).resolve().parent / "results"


class TimedPublic:
    """A PublicSide proxy that adds up the wall time spent in the remote calls."""

    def __init__(self, inner: RemotePublic) -> None:
        self.inner = inner
        self.seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.inner, name)
        if name not in ("upload", "train", "logits", "forget"):
            return target

        def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            try:
                return target(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - began

        return timed


def configs(quick: bool) -> dict[str, DeltaConfig]:
    """digits: the demo's models; cifar: the frontier bench's subset (1,000 training images)."""
    out = {"digits": base_config("digits", False, 0).replace(epochs_stage1=1, epochs_stage2=3)}
    if quick:
        out["digits"] = out["digits"].replace(epochs_stage2=2, public_epochs=1)
    elif CIFAR.is_dir():
        out["cifar"] = base_config("cifar", False, 0).replace(epochs_stage1=1, epochs_stage2=3)
    return {k: v.replace(epsilon=4.0, noise_seed=0, release="per-epoch") for k, v in out.items()}


def run(config: DeltaConfig, overlap: bool, work: Path) -> dict[str, Any]:
    keys = keygen(work / "keys")
    proc, address = start_server(keys)
    run_dir = work / f"run-{overlap}"
    try:
        with RemotePublic(
            address, config=config, root_cert=keys.cert, token_file=keys.token
        ) as remote:
            public = TimedPublic(remote)
            began = time.perf_counter()
            result = train_delta(config, run_dir, progress=False, public=public, overlap=overlap)
            total = time.perf_counter() - began
    finally:
        proc.kill()
        proc.wait()
    stage2 = sum(r["seconds"] for r in read_metrics(run_dir) if r.get("stage") == 2)
    state = torch.load(run_dir / "ckpt" / f"stage2_epoch{config.epochs_stage2}.pt")["model"]
    return {
        "overlap": overlap,
        "seconds_total": total,
        "seconds_stage2": stage2,
        "seconds_in_public_calls": public.seconds,
        "images_per_second": config.epochs_stage2 * len(load_run_data(config).train) / stage2,
        "accuracy": result.accuracy,
        "epsilon": result.epsilon,
        "model": state,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="digits only, 2 stage-2 epochs")
    parser.add_argument("--out", type=Path, default=RESULTS / "delta_pipeline.json")
    args = parser.parse_args(argv)
    console = Console(width=150)
    rows: list[dict[str, Any]] = []
    for name, config in configs(args.quick).items():
        pair = []
        for overlap in (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                measured = run(config, overlap, Path(tmp))
            console.print(
                f"{name} overlap={overlap}: stage 2 {measured['seconds_stage2']:.1f} s", style="dim"
            )
            pair.append(measured)
        same = all(torch.equal(pair[0]["model"][k], pair[1]["model"][k]) for k in pair[0]["model"])
        if not same or pair[0]["epsilon"] != pair[1]["epsilon"]:
            raise AssertionError(f"{name}: overlapped run differs from the sequential one")
        for measured in pair:
            measured.pop("model")
            own = measured["seconds_stage2"] - measured["seconds_in_public_calls"]
            rows.append(
                {
                    "config": name,
                    "epochs_stage2": config.epochs_stage2,
                    **measured,
                    "seconds_private_not_hidden": own,
                    "ratio_to_sequential": measured["seconds_stage2"] / pair[0]["seconds_stage2"],
                }
            )
    table = Table(title="Delta stage 2 with a public server on loopback (1 torch thread per side)")
    for col in ("config", "overlap", "stage 2 s", "in public calls s", "private, not hidden s",
                "images/s", "overlapped / sequential", "accuracy", "epsilon"):  # fmt: skip
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            r["config"],
            "on" if r["overlap"] else "off",
            f"{r['seconds_stage2']:.1f}",
            f"{r['seconds_in_public_calls']:.1f}",
            f"{r['seconds_private_not_hidden']:.1f}",
            f"{r['images_per_second']:.0f}",
            f"{r['ratio_to_sequential']:.2f}",
            f"{r['accuracy']:.3f}",
            f"{r['epsilon']:.3f}",
        )
    console.print(table)
    console.print("same model and epsilon with and without overlap: checked")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"machine": platform.machine(), "torch": torch.__version__, "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
