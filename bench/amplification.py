"""Benchmark: sampling and partition amplification at equal certified epsilon, on CIFAR-10.

DP-SGD (:func:`asymflow.dpsgd.train_dpsgd`, Opacus per-sample gradients, fixed expected-batch
normalization) on a class-balanced subset of the CIFAR-10 JPEGs, ResNet-20 with GroupNorm at
width 0.5, for a few epochs, at epsilon = 8, delta = 1e-5 for the whole run. Rows:

- Poisson(q) vs Balanced Iteration Subsampling BIS(k, T) with q = k/T (the same expected batch
  kN/T and the same number of steps), no partitioning (Dong, Chen, Ozgur, ICML 2025,
  arXiv 2503.03043; random allocation, Feldman & Shenfeld 2025);
- Poisson with random-subnetwork splitting ``split:2`` and ``split:4`` (each example updates
  one random block, noise on all blocks; the 1-of-d random-allocation pair per step, ibid.
  Sec. 3-4), where partition amplification is accounted. BIS with splitting is not listed: no
  accountant here bounds it with partition amplification.

Every sigma is the smallest our calibrator (:func:`asymflow.accounting.noise_for_epsilon`, via
:func:`asymflow.dpsgd.calibrated_sigma` on the exact schedule) certifies for epsilon <= 8; the
certified epsilon column is recomputed from each run's ledger. images/s counts the expected
number of examples per epoch (kN) over the run's wall time, evaluation included.

The target printed at the end: at equal certified epsilon, BIS needs less noise than Poisson
wherever the accountant says so, and accuracy follows (same for partitioning vs none). One seed
per row: accuracy differences of a point or two are within seed-to-seed noise.

Run: ``PYTHONPATH=src python bench/amplification.py [--quick] [--data PATH] [--out PATH]``
(default: 10,000 training and 2,000 test images, 2 epochs, batch 128, about 25 minutes on 2 busy
cores; ``--quick``: 1,000 / 500 images, width 0.25, 1 epoch, a few minutes, mostly calibration).
The subset is a tree of symbolic links under ``~/.cache/asymflow/bench`` (decoded once into the
image cache). Writes
JSON to ``bench/results/amplification.json`` (``amplification-quick.json`` with ``--quick``).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from asymflow.data.cifar import CIFAR10_CLASSES
from asymflow.dpsgd import DpsgdConfig, calibrated_sigma, step_accounting, train_dpsgd

warnings.filterwarnings("ignore", message="overflow encountered in divide", category=RuntimeWarning)
# dp_accounting logs, through absl, every RDP order it drops; the result is still an upper bound.
logging.getLogger("absl").setLevel(logging.ERROR)

DEFAULT_DATA = Path("/work/shared/data/cifar10-jpg")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "amplification.json"
QUICK_OUT = DEFAULT_OUT.with_name("amplification-quick.json")
EPSILON = 8.0
DELTA = 1e-5
ROWS: tuple[tuple[str, str], ...] = (
    ("poisson", "none"),
    ("balanced", "none"),
    ("poisson", "split:2"),
    ("poisson", "split:4"),
)
FULL = {"train": 10_000, "test": 2_000, "epochs": 2, "width": 0.5, "batch": 128}
QUICK = {"train": 1_000, "test": 500, "epochs": 1, "width": 0.25, "batch": 64}


def subset_tree(source: Path, train: int, test: int, cache: Path) -> Path:
    """``cache/cifar10-{train}-{test}/{train,test}/<class>/`` with symbolic links to the first
    ``train/10`` (``test/10``) files of every class of ``source``, by name."""
    root = cache / f"cifar10-{train}-{test}"
    done = root / ".complete"
    if done.is_file():
        return root
    for split, total in (("train", train), ("test", test)):
        per_class = total // len(CIFAR10_CLASSES)
        for name in CIFAR10_CLASSES:
            files = sorted((source / split / name).iterdir())[:per_class]
            if len(files) < per_class:
                raise ValueError(f"{source / split / name} holds fewer than {per_class} images")
            target = root / split / name
            target.mkdir(parents=True, exist_ok=True)
            for f in files:
                link = target / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    done.write_text("ok\n")
    return root


def _config(
    sampler: str, partition: str, data: str, scale: dict[str, Any], seed: int
) -> DpsgdConfig:
    return DpsgdConfig(
        data=data,
        model="resnet20",
        width=scale["width"],
        norm="group",
        sampler=sampler,
        k=1,
        batch_size=scale["batch"],
        epochs=scale["epochs"],
        target_epsilon=EPSILON,
        delta=DELTA,
        clip=1.0,
        partition=partition,
        lr=0.3,
        momentum=0.9,
        augment=False,
        eval_batch_size=500,
        seed=seed,
        threads=1,
    )


def run_row(
    sampler: str,
    partition: str,
    data: str,
    n_train: int,
    scale: dict[str, Any],
    runs: Path,
    seed: int,
) -> dict[str, Any]:
    """Calibrate sigma for epsilon = 8 on the exact schedule, train, read the ledger's epsilon."""
    target = _config(sampler, partition, data, scale, seed)
    steps = target.steps_for(n_train)
    accounting = step_accounting(target.partition_spec, sampler, has_shared=False)
    began = time.perf_counter()
    sigma, planned = calibrated_sigma(target, steps, accounting)
    calibration_s = time.perf_counter() - began
    config = dataclasses.replace(target, sigma=sigma, target_epsilon=None)
    result = train_dpsgd(config, runs / f"{sampler}-{partition.replace(':', '')}", progress=True)
    images = config.epochs * config.k * n_train  # expected examples processed (kN per epoch)
    return {
        "sampler": sampler,
        "partition": partition,
        "k": config.k,
        "steps_per_epoch": steps,
        "rate": config.k / steps,
        "expected_batch": result.expected_batch_size,
        "sigma": sigma,
        "planned_epsilon": planned,
        "epsilon": result.epsilon,
        "epsilon_method": result.method,
        "test_acc": result.test_acc,
        "images_per_s": images / result.seconds,
        "train_seconds": result.seconds,
        "calibration_seconds": calibration_s,
        "accounting": result.accounting,
    }


def verdict(rows: list[dict[str, Any]], tolerance: float = 0.01) -> dict[str, Any]:
    """Whether less noise came with equal-or-better accuracy (within ``tolerance``)."""
    by = {(r["sampler"], r["partition"]): r for r in rows}
    out: dict[str, Any] = {}
    base = by[("poisson", "none")]
    for key, label in (
        (("balanced", "none"), "BIS vs Poisson"),
        (("poisson", "split:2"), "split:2 vs none (Poisson)"),
        (("poisson", "split:4"), "split:4 vs none (Poisson)"),
    ):
        other = by[key]
        less_noise = other["sigma"] < base["sigma"]
        acc_delta = other["test_acc"] - base["test_acc"]
        follows = acc_delta >= -tolerance if less_noise else acc_delta <= tolerance
        out[label] = {
            "sigma_ratio": other["sigma"] / base["sigma"],
            "less_noise": less_noise,
            "accuracy_delta": acc_delta,
            "accuracy_follows": follows,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (~2 min)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="CIFAR-10 JPEG tree")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON path (default results/amplification.json, "
        "or amplification-quick.json with --quick)",
    )
    parser.add_argument("--seed", type=int, default=0, help="model initialization seed")
    parser.add_argument(
        "--runs", type=Path, default=None, help="keep the run directories here (default: temp)"
    )
    args = parser.parse_args(argv)
    console = Console()
    if not (args.data / "train").is_dir() or not (args.data / "test").is_dir():
        console.print(f"[yellow]skipping: CIFAR-10 JPEG tree not found at {args.data}[/yellow]")
        return 0
    torch.set_num_threads(1)
    scale = QUICK if args.quick else FULL
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "asymflow"
    tree = subset_tree(args.data, scale["train"], scale["test"], cache / "bench")
    data = f"cifar10:{tree}"
    began = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="amplification-") as tmp:
        runs = args.runs if args.runs is not None else Path(tmp)
        for sampler, partition in ROWS:
            console.print(f"[bold]{sampler} / {partition}[/bold]")
            row = run_row(sampler, partition, data, scale["train"], scale, runs, args.seed)
            rows.append(row)
            console.print(
                f"  sigma {row['sigma']:.4f}  eps {row['epsilon']:.3f}  acc {row['test_acc']:.4f}"
                f"  {row['images_per_s']:.1f} img/s"
            )
    table = Table(
        title=f"DP-SGD on CIFAR-10 subset at certified epsilon <= {EPSILON}, delta = {DELTA:g}"
    )
    for col in ("sampler", "partition", "sigma", "certified eps", "test acc", "images/s"):
        table.add_column(col, justify="left" if col in ("sampler", "partition") else "right")
    for r in rows:
        table.add_row(
            r["sampler"] if r["sampler"] == "poisson" else f"BIS (k={r['k']})",
            r["partition"],
            f"{r['sigma']:.4f}",
            f"{r['epsilon']:.3f} ({r['epsilon_method']})",
            f"{r['test_acc']:.4f}",
            f"{r['images_per_s']:.1f}",
        )
    console.print(table)
    checks = verdict(rows)
    console.print(
        "Target: at equal certified epsilon, BIS needs less noise (sigma) than Poisson wherever "
        "the accountant says so, and accuracy follows."
    )
    for label, c in checks.items():
        console.print(
            f"  {label}: sigma ratio {c['sigma_ratio']:.4f} "
            f"({'less' if c['less_noise'] else 'not less'} noise), accuracy "
            f"{c['accuracy_delta']:+.4f} -> "
            f"{'follows' if c['accuracy_follows'] else 'does NOT follow'}"
        )
    bis = checks["BIS vs Poisson"]
    holds = bis["less_noise"] and bis["accuracy_follows"]
    console.print(f"[bold]target {'HOLDS' if holds else 'DOES NOT HOLD'}[/bold] (BIS vs Poisson)")
    payload = {
        "epsilon_target": EPSILON,
        "delta": DELTA,
        "quick": args.quick,
        "scale": scale,
        "data": str(args.data),
        "model": f"resnet20, GroupNorm, width {scale['width']}",
        "rows": rows,
        "checks": checks,
        "target_holds": holds,
        "seconds": time.perf_counter() - began,
        "platform": {
            "python": sys.version.split()[0],
            "machine": platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    out = args.out if args.out is not None else (QUICK_OUT if args.quick else DEFAULT_OUT)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    console.print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
