"""The honest accuracy-epsilon frontier of Delta: test accuracy against the certified total
epsilon per record, next to main-only, naive-DP, whole-network DP-SGD and the original network.

    python bench/delta_frontier.py                      # digits, 3 seeds (budget below)
    python bench/delta_frontier.py --data cifar         # the CIFAR-10 subset
    python bench/delta_frontier.py --data digits --quick  # smoke run: 1 seed, eps in {8, inf}

Rows, for every seed (3; ``--quick``: 1) and every column epsilon in {1, 2, 4, 8, 16, inf}:

- **Delta** with :data:`DELTA_PROTOCOL`. Each row's *total* epsilon per record (residual
  releases composed with the label release, PLD/RDP, the ledger's own composition) is the
  column's epsilon: the labels get ``LABEL_SHARE`` of it, and the residual epsilon is the
  largest whose composition with them the accountant certifies at <= the column's epsilon
  (:func:`split_epsilon`, a bisection on the same events the run records). At inf: clear labels
  and no noise anywhere (``labels="clear"``, ``epsilon=inf``).
- **Delta, padded** (:data:`PADDED_PROTOCOL`, release="padded": each record in exactly
  ``sample_k`` of the stage-2 epochs, padded slots, balanced-sampling accounting), finite
  epsilon only; listed only when ``DeltaConfig`` has the field.
- **naive-DP** (the whole IR sanitized, same protocol and epsilon split), finite epsilon.
- **DP-SGD**: the whole original-size network (ResNet-20, GroupNorm) trained by our own
  :mod:`asymflow.dpsgd` with balanced iteration subsampling (BIS, k = 1) and
  ``target_epsilon`` = the column's nominal epsilon, at the same delta, on the same training
  images (:data:`DPSGD`); not applicable at inf.
- **main-only** (epsilon = 0, nothing leaves) and the **original** network (non-private, the
  ceiling), once per seed.

The epsilon plotted and tabulated is the one each run's ledger certifies (``RunResult.epsilon``
and ``DpsgdResult.epsilon``: every release over the training set, composed per record), not the
nominal one. Stage 1 releases nothing; it is trained once per seed and data set (the main-only
run) and forked into every other two-stage run with :func:`fork_stage1`.

Budget (one torch thread per run, ``--jobs`` runs at a time, default 2 on this 2-core
machine; the measured wall time is in the JSON). Each data set is sized to finish in under 30
minutes from scratch with ``--jobs 2`` on an otherwise idle machine:

- digits (1,437 training / 360 test images, 16x16; 10% of the training rows held out of
  every private model to fit w): the demo's models; 6 epochs of stage 1, 6 of stage 2 with
  a fresh release per epoch, M_res 3 epochs per release (``public_epochs``), 2 folds;
  DP-SGD 20 epochs at batch 256. 23 runs per seed, 69 in all.
- cifar (a seeded, stratified subset of ``../shared/data/cifar10-jpg``, 1,000 training / 500
  test images, 32x32): the CIFAR bench's models (bench/delta_cifar.py); 3 epochs of stage 1,
  3 of stage 2; DP-SGD 6 epochs. (At 2,000 training images one Delta run takes about 95 s
  of stage 2 on one thread, which puts the 69 runs near an hour.)
- ``--quick``: digits with 3 + 3 epochs (DP-SGD 5), one seed, eps in {8, inf}.

Writes ``bench/results/delta_frontier_<data>.json`` and ``.png`` (``-quick`` with
``--quick``), and copies the full runs' plot to ``docs/delta_frontier_<data>.png``. Run
directories go to ``bench/results/delta_frontier_runs/<data>/`` (named by a hash of their
config, so a rerun reuses finished runs and a changed protocol starts new ones). Not part of
the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import logging
import math
import multiprocessing
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import (
    BalancedSampled,
    Composed,
    Event,
    Gaussian,
    RandomizedResponse,
    SelfComposed,
)
from asymflow.data import load_data
from asymflow.delta.runs import DeltaConfig
from asymflow.delta.train import RunResult, fork_stage1, train_delta
from asymflow.dpsgd import DpsgdConfig, step_accounting, train_dpsgd
from asymflow.dpsgd import calibrated_sigma as dpsgd_sigma

warnings.filterwarnings("ignore", message="overflow encountered in divide", category=RuntimeWarning)
warnings.filterwarnings("ignore", message="Full backward hook is firing")
logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's dropped RDP orders

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpg"
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"

EPSILONS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, math.inf)
QUICK_EPSILONS: tuple[float, ...] = (8.0, math.inf)
SEEDS: tuple[int, ...] = (0, 1, 2)
DELTA = 1e-5

DELTA_PROTOCOL: dict[str, Any] = {
    "release": "per-epoch",  # a fresh augmented view of every record in every stage-2 epoch
    "labels": "rr",  # randomized response, once (labels="clear" at eps = inf)
    "payload": "full",
    "combine": "weighted",
    "holdout": 0.1,
    "public_epochs": 3,
}
"""The Delta protocol of every Delta, main-only, naive-DP and original row (fields of
``DeltaConfig``; a field this version of ``DeltaConfig`` lacks is dropped with a warning and
listed in the JSON)."""
PADDED_PROTOCOL: dict[str, Any] = {**DELTA_PROTOCOL, "release": "padded", "sample_k": 2}
"""The padded-slots family: each record's residual in exactly ``sample_k`` of the stage-2
epochs (pure noise in its slot otherwise), accounted as balanced sampling."""
LABEL_SHARE = 0.5
"""Share of a row's total epsilon given to the labels (randomized response); the residual
gets the rest, as composed by the accountant (more than (1 - LABEL_SHARE) * eps: a Gaussian
and randomized response compose sub-additively under PLD)."""

DPSGD: dict[str, Any] = {
    "model": "resnet20",
    "norm": "group",
    "sampler": "balanced",
    "k": 1,
    "clip": 1.0,
    "momentum": 0.9,
    "augment": False,
}
"""Whole-network DP-SGD (BIS, k = 1: each record in exactly one step per epoch); the width,
batch, lr and epochs per data set are in :func:`dpsgd_config`."""


def memoize_padded_sigma() -> None:
    """Memoize the library's ``padded_sigma`` for this process. ``_Run.sigma`` recalibrates it
    on every call, about 15 times per padded run at seconds each (a balanced-sampling
    calibration); it is a pure function of (epsilon, delta, k, epochs), so caching it changes
    no result, only the wall time."""
    try:
        from asymflow.delta import padded, train
    except ImportError:  # a DeltaConfig without padded slots
        return
    cached = functools.lru_cache(maxsize=None)(padded.padded_sigma)
    padded.padded_sigma = cached
    if hasattr(train, "padded_sigma"):
        train.padded_sigma = cached


# ------------------------------------------------------------------------------ configs


def data_spec(data: str, quick: bool) -> str:
    if data == "digits":
        return "digits"
    n_train, n_test = (600, 300) if quick else (1000, 500)
    return f"cifar10:{CIFAR}@{n_train},{n_test}"


def base_config(data: str, quick: bool, seed: int) -> DeltaConfig:
    """The data set's Delta configuration before the protocol (models, epochs, lr)."""
    if data == "digits":
        base = DeltaConfig(threads=1)  # the demo's models and epochs
        if quick:
            base = base.replace(epochs_stage1=3, epochs_stage2=3)
    else:
        base = DeltaConfig(
            data=data_spec(data, quick),
            image_size=32,
            ir_channels=64,
            r=8,
            t=16,
            t_low=8,
            private_widths=(16, 64, 128),
            private_ranks=(8, 12, 24),
            public_arch="resnet20",
            public_width=1.0,
            epochs_stage1=1 if quick else 3,
            epochs_stage2=2 if quick else 3,
            batch_size=64,
            lr=0.05,
            flip=True,
            threads=1,
        )
    return base.replace(seed=seed, noise_seed=seed, delta=DELTA)


def known_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(DeltaConfig)}


def with_protocol(config: DeltaConfig, protocol: dict[str, Any]) -> DeltaConfig:
    """``config`` with the protocol's fields that ``DeltaConfig`` has; ``sample_k`` is capped
    at ``epochs_stage2`` (the quick runs have fewer epochs)."""
    fields = {k: v for k, v in protocol.items() if k in known_fields()}
    if "sample_k" in fields:
        fields["sample_k"] = min(int(fields["sample_k"]), max(1, config.epochs_stage2))
    return config.replace(**fields)


def dropped_fields(protocol: dict[str, Any]) -> list[str]:
    return sorted(set(protocol) - known_fields())


def dpsgd_config(data: str, quick: bool, seed: int, epsilon: float) -> DpsgdConfig:
    """Whole-network DP-SGD on the same training images, at ``target_epsilon = epsilon``.

    digits: width 0.25, batch 256, lr 1.0, momentum 0.9, 20 epochs: the best test accuracy
    at eps = 4 of a 15-point sweep on a scratch seed (7; width 0.25/0.5, batch 32-512, lr
    0.25-2, 10-30 epochs, augmentation off/on), 0.767 there against 0.54-0.74 for the others.
    cifar: the same settings scaled to the budget.
    """
    if data == "digits":
        scale = {"width": 0.25, "batch_size": 256, "epochs": 5 if quick else 20, "lr": 1.0}
    else:
        scale = {"width": 0.25, "batch_size": 256, "epochs": 2 if quick else 6, "lr": 1.0}
    return DpsgdConfig(
        data=data_spec(data, quick),
        target_epsilon=epsilon,
        delta=DELTA,
        seed=seed,
        sampler_seed=seed,
        noise_seed=seed,
        threads=1,
        eval_batch_size=500,
        **DPSGD,
        **scale,
    )


def with_dpsgd_sigma(config: DpsgdConfig, records: int) -> DpsgdConfig:
    """``config`` with sigma calibrated for its target epsilon on its exact schedule (what
    ``train_dpsgd`` computes itself; done once per epsilon here and shared by the seeds)."""
    steps = config.steps_for(records)
    accounting = step_accounting(config.partition_spec, config.sampler, has_shared=False)
    sigma, _ = dpsgd_sigma(config, steps, accounting)
    return dataclasses.replace(config, sigma=sigma, target_epsilon=None)


# ------------------------------------------------------------------------------ epsilon split


def residual_event(config: DeltaConfig, sigma: float) -> Event:
    """Every release of one record's residual at noise multiplier ``sigma``, as the run
    records it: ``residual_releases`` Gaussian releases ("once", "per-epoch"), or one
    BalancedSampled(sample_k, epochs_stage2, Gaussian) pass of padded slots ("padded")."""
    if config.release == "padded":
        return BalancedSampled(config.sample_k, max(1, config.epochs_stage2), Gaussian(sigma))
    return SelfComposed(Gaussian(sigma), config.residual_releases)


def total_epsilon(config: DeltaConfig, sigma: float, label: float, classes: int) -> float:
    """Certified epsilon of the residual releases composed with the label release."""
    event = Composed((residual_event(config, sigma), RandomizedResponse(label, classes)))
    return best_epsilon(event, config.delta).epsilon


def split_epsilon(
    config: DeltaConfig, total: float, classes: int = 10, tol: float = 2e-3
) -> tuple[float, float, float]:
    """(residual epsilon, label epsilon, planned total) for a row whose total is ``total``.

    The labels get LABEL_SHARE * total. The residual's noise multiplier sigma is the smallest
    (to ``tol`` relative, by bisection) whose residual event composed with the labels is
    certified at <= total (best of PLD and RDP, as the ledger computes it); the residual
    epsilon handed to the run is that event's own epsilon at sigma * (1 + tol), so that the
    run's calibration, which picks the smallest sigma meeting it, lands at or above sigma.
    """
    label = LABEL_SHARE * total
    low, high = 0.05, 1.0  # bracket sigma: total(low) > target >= total(high)
    while total_epsilon(config, high, label, classes) > total:
        low, high = high, high * 2
    while total_epsilon(config, low, label, classes) <= total:
        low, high = low / 2, low
    while high - low > tol * low:
        mid = math.sqrt(low * high)
        if total_epsilon(config, mid, label, classes) <= total:
            high = mid
        else:
            low = mid
    sigma = high * (1 + tol)
    residual = best_epsilon(residual_event(config, sigma), config.delta).epsilon
    return residual, label, total_epsilon(config, sigma, label, classes)


# ------------------------------------------------------------------------------ runs


@dataclasses.dataclass(frozen=True)
class Planned:
    """One run of the bench: its family ("delta", "padded", "naive-dp", "dp-sgd", "main-only",
    "original"), the column epsilon (None for main-only/original), the seed and its config."""

    family: str
    epsilon: float | None
    seed: int
    config: DeltaConfig | DpsgdConfig
    split: tuple[float, float, float] | None = None


def digest(config: DeltaConfig | DpsgdConfig) -> str:
    text = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def plan(
    data: str, quick: bool, families: set[str], cache: Path, seeds: int | None = None
) -> list[Planned]:
    """Every run, seed by seed; main-only first in each seed (the stage-1 source).

    The calibrations (epsilon splits, DP-SGD sigma) do not depend on the seed; they are
    computed once and kept in ``cache`` (a JSON file keyed by the configuration's hash)."""
    epsilons = QUICK_EPSILONS if quick else EPSILONS
    seeds = SEEDS[: seeds or (1 if quick else len(SEEDS))]
    padded = "sample_k" in known_fields() and "padded" in _release_modes()
    stored: dict[str, Any] = json.loads(cache.read_text()) if cache.is_file() else {}

    def calibrated(key: str, compute: Callable[[], Any]) -> Any:
        if key not in stored:
            stored[key] = compute()
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(stored, indent=1))
        return stored[key]

    records = len(load_data(data_spec(data, quick), progress=False).train)
    out = []
    for seed in seeds:
        base = with_protocol(base_config(data, quick, seed), DELTA_PROTOCOL)
        out.append(Planned("main-only", None, seed, base.replace(variant="main-only")))
        out.append(Planned("original", None, seed, base.replace(variant="original")))
        for eps in epsilons:
            if math.isinf(eps):
                inf = base.replace(epsilon=math.inf, labels="clear")
                out.append(Planned("delta", eps, seed, inf))
                continue
            families_here = [("delta", base), ("naive-dp", base.replace(variant="naive-dp"))]
            if padded:
                families_here.append(
                    ("padded", with_protocol(base_config(data, quick, seed), PADDED_PROTOCOL))
                )
            for family, config in families_here:
                if family not in families:
                    continue
                key = f"split {eps:g} {digest(config.replace(seed=0, noise_seed=0))}"
                split = tuple(calibrated(key, lambda c=config, e=eps: split_epsilon(c, e)))
                out.append(
                    Planned(
                        family,
                        eps,
                        seed,
                        config.replace(epsilon=split[0], label_epsilon=split[1]),
                        split,
                    )
                )
            if "dp-sgd" in families:
                target = dpsgd_config(data, quick, 0, eps)
                key = f"dpsgd sigma {digest(target)} records {records}"
                sigma = calibrated(key, lambda t=target: with_dpsgd_sigma(t, records).sigma)
                config = dataclasses.replace(
                    dpsgd_config(data, quick, seed, eps), sigma=sigma, target_epsilon=None
                )
                out.append(Planned("dp-sgd", eps, seed, config))
    return [p for p in out if p.family in families]


def _release_modes() -> tuple[str, ...]:
    from asymflow.delta import runs

    return tuple(getattr(runs, "RELEASE_MODES", ()))


def run_one(p: Planned, out: Path, progress: bool) -> dict[str, Any]:
    """Train (or reuse) one run; return its row."""
    seed_dir = out / f"seed{p.seed}"
    name = p.family if p.epsilon is None else f"{p.family}-eps{p.epsilon:g}"
    run_dir = seed_dir / f"{name}-{digest(p.config)}"
    began = time.perf_counter()
    row: dict[str, Any] = {
        "family": p.family,
        "epsilon_column": p.epsilon,
        "seed": p.seed,
        "run_dir": str(run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir),
    }
    if isinstance(p.config, DpsgdConfig):
        res = train_dpsgd(p.config, run_dir, progress=progress, resume=run_dir.exists())
        row.update(
            accuracy=res.test_acc,
            epsilon=res.epsilon,
            epsilon_method=res.method,
            sigma=res.sigma,
            dpsgd_target_epsilon=p.epsilon,
            steps_per_epoch=res.steps_per_epoch,
        )
    else:
        config = p.config
        source = _stage1_source(seed_dir, p.seed)
        forked = config.variant not in ("original", "main-only")
        if forked and not (run_dir / "config.json").exists():
            if source is None:
                raise RuntimeError("the main-only run of this seed must come first")
            fork_stage1(source, run_dir, config)
        result: RunResult = train_delta(config, run_dir, progress=progress, resume=True)
        if config.variant == "main-only":
            (seed_dir / "stage1_source").write_text(str(run_dir))
        eps = result.epsilon
        if config.variant == "original":
            eps = math.inf  # non-private: nothing is released, but nothing is protected either
        row.update(
            accuracy=result.accuracy,
            epsilon=eps,
            epsilon_method=result.epsilon_method,
            sigma=result.sigma,
            residual_epsilon=config.epsilon if config.releases_residual else None,
            label_epsilon=config.label_epsilon
            if config.releases_residual and config.labels != "clear"
            else None,
            planned_total=p.split[2] if p.split else None,
            accuracy_public_head=result.final.get("test_acc_public"),
            accuracy_main_head=result.final.get("test_acc_main"),
            residual_weight=result.residual_weight,
        )
    row["seconds"] = time.perf_counter() - began
    return row


def _stage1_source(seed_dir: Path, seed: int) -> Path | None:
    marker = seed_dir / "stage1_source"
    return Path(marker.read_text()) if marker.is_file() else None


# ------------------------------------------------------------------------------ summary

FAMILY_LABELS = {
    "delta": "Delta",
    "padded": "Delta, padded",
    "naive-dp": "naive-DP",
    "dp-sgd": "DP-SGD (whole network, BIS)",
    "main-only": "main-only",
    "original": "original (non-private)",
}
FAMILY_ORDER = tuple(FAMILY_LABELS)


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], None  # no spread from one seed
    return statistics.fmean(values), statistics.stdev(values)


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (family, column epsilon): mean and sd over seeds of accuracy and epsilon,
    and the paired difference to main-only of the same seed."""
    main = {r["seed"]: r["accuracy"] for r in rows if r["family"] == "main-only"}
    groups: dict[tuple[str, float | None], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["epsilon_column"]), []).append(r)
    out = []
    for (family, column), group in groups.items():
        acc, acc_sd = _mean_sd([g["accuracy"] for g in group])
        epsilons = [g["epsilon"] for g in group]
        diffs = [g["accuracy"] - main[g["seed"]] for g in group if g["seed"] in main]
        diff, diff_sd = _mean_sd(diffs)
        summary = {
            "family": family,
            "epsilon_column": column,
            "seeds": [g["seed"] for g in group],
            "accuracy_mean": acc,
            "accuracy_sd": acc_sd,
            "accuracy_per_seed": [g["accuracy"] for g in group],
            "epsilon_certified_mean": statistics.fmean(epsilons)
            if all(math.isfinite(e) for e in epsilons)
            else math.inf,
            "epsilon_certified_max": max(epsilons),
            "vs_main_only_mean": diff if family != "main-only" else None,
            "vs_main_only_sd": diff_sd if family != "main-only" else None,
            "above_main_only_by_2sd": (
                diff is not None and diff_sd is not None and len(diffs) > 1 and diff > 2 * diff_sd
            )
            if family != "main-only"
            else None,
            "seconds_mean": statistics.fmean(g["seconds"] for g in group),
        }
        for key in ("accuracy_public_head", "residual_weight", "residual_epsilon", "label_epsilon"):
            values = [g.get(key) for g in group if g.get(key) is not None]
            summary[f"{key}_mean"] = statistics.fmean(values) if values else None
        out.append(summary)

    def order(s: dict[str, Any]) -> tuple[int, float]:
        column = s["epsilon_column"]
        return FAMILY_ORDER.index(s["family"]), -1.0 if column is None else column

    return sorted(out, key=order)


def _f(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec) if isinstance(value, float) else str(value)


def _pct(mean: float | None, sd: float | None) -> str:
    if mean is None:
        return "-"
    return f"{100 * mean:.1f}" if sd is None else f"{100 * mean:.1f} ± {100 * sd:.1f}"


def print_table(console: Console, title: str, summary: list[dict[str, Any]]) -> None:
    table = Table(title=title)
    for col in (
        "run",
        "eps (column)",
        "eps certified",
        "eps residual / labels",
        "accuracy % (mean ± sd)",
        "vs main-only, pts",
        "M_res %",
        "w",
        "s/run",
    ):
        table.add_column(col, justify="right")
    for s in summary:
        diff = s["vs_main_only_mean"]
        mark = " *" if s["above_main_only_by_2sd"] else ""
        split = "-"
        if s["residual_epsilon_mean"] is not None:
            res, lab = s["residual_epsilon_mean"], s["label_epsilon_mean"]
            split = f"{_f(res, '.2f')} / {_f(lab, '.2f')}"
        table.add_row(
            FAMILY_LABELS[s["family"]],
            _f(s["epsilon_column"], "g"),
            "inf (non-private)" if s["family"] == "original" else _f(s["epsilon_certified_max"]),
            split,
            _pct(s["accuracy_mean"], s["accuracy_sd"]),
            "-" if diff is None else f"{_pct(diff, s['vs_main_only_sd'])}{mark}",
            "-"
            if s["accuracy_public_head_mean"] is None
            else f"{100 * s['accuracy_public_head_mean']:.1f}",
            _f(s["residual_weight_mean"], ".2f"),
            _f(s["seconds_mean"], ".0f"),
        )
    console.print(table)
    console.print(
        "eps certified: the largest over seeds, from each run's ledger (per record, training "
        "set); vs main-only: paired by seed, * = mean above 2 sd; M_res: public head alone."
    )


def plot(summary: list[dict[str, Any]], title: str, path: Path) -> None:
    """Accuracy against certified total epsilon (log x; inf at the right edge), error bars =
    sd over seeds, main-only and the original network as horizontal lines (band = sd). Left:
    every row; right: the same, zoomed on the band between main-only and the original."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [
        s["epsilon_certified_mean"]
        for s in summary
        if s["family"] not in ("main-only", "original")
        and math.isfinite(s["epsilon_certified_mean"])
        and s["epsilon_certified_mean"] > 0
    ]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 16.0)
    x_inf = hi * 2.8
    styles = {
        "delta": ("C0", "o", 1.0),
        "padded": ("C1", "s", 1.06),
        "naive-dp": ("C3", "v", 0.94),
        "dp-sgd": ("C2", "D", 1.03),
    }
    lines = {"main-only": ("k", "--"), "original": ("0.45", ":")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax in axes:
        for family, (color, marker, jitter) in styles.items():
            points = sorted(
                (s for s in summary if s["family"] == family), key=lambda s: s["epsilon_column"]
            )
            if not points:
                continue
            xs = [
                x_inf if math.isinf(s["epsilon_certified_mean"]) else s["epsilon_certified_mean"]
                for s in points
            ]
            ax.errorbar(
                [x * jitter for x in xs],
                [s["accuracy_mean"] for s in points],
                yerr=[s["accuracy_sd"] or 0.0 for s in points],
                color=color,
                marker=marker,
                ms=5,
                capsize=3,
                lw=1.2,
                label=FAMILY_LABELS[family],
            )
        for s in summary:
            if s["family"] in lines:
                color, ls = lines[s["family"]]
                mean, sd = s["accuracy_mean"], s["accuracy_sd"] or 0.0
                ax.axhline(mean, color=color, ls=ls, lw=1.2, label=FAMILY_LABELS[s["family"]])
                ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.08, lw=0)
        ax.set_xscale("log")
        ticks = [t for t in (0.5, 1, 2, 4, 8, 16, 32, 64) if lo / 1.5 <= t <= hi * 1.5]
        ax.set_xticks([*ticks, x_inf], [*(f"{t:g}" for t in ticks), "∞"])
        ax.minorticks_off()
        ax.set_xlim(lo / 1.6, x_inf * 1.3)
        ax.set_xlabel(f"certified total ε per record (δ = {DELTA:g}, from each run's ledger)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean ± sd over seeds)")
    axes[0].set_title("all rows", fontsize=10)
    axes[0].legend(fontsize=8, loc="lower right")
    by = {s["family"]: s for s in summary if s["family"] in lines}
    if by:
        low = min(s["accuracy_mean"] - 3 * (s["accuracy_sd"] or 0) for s in by.values())
        high = max(s["accuracy_mean"] + 2 * (s["accuracy_sd"] or 0) for s in by.values())
        delta_rows = [s for s in summary if s["family"] in ("delta", "padded")]
        low = min([low, *(s["accuracy_mean"] - (s["accuracy_sd"] or 0) for s in delta_rows)])
        margin = max(0.005, 0.15 * (high - low))
        axes[1].set_ylim(max(0.0, low - margin), min(1.0, high + margin))
    axes[1].set_title("zoom: Delta against main-only and the original network", fontsize=10)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _library() -> dict[str, Any]:
    """Where asymflow was imported from, and the commit of this checkout (with a flag if its
    src/ has uncommitted changes): the figures belong to that code."""
    import asymflow

    info: dict[str, Any] = {"asymflow_path": str(Path(asymflow.__file__).parent)}
    try:
        git = ["git", "-C", str(ROOT)]
        run = subprocess.run
        info["commit"] = run([*git, "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        info["commit"] = info["commit"].strip()
        dirty = run([*git, "status", "--porcelain", "src"], capture_output=True, text=True)
        info["src_dirty"] = bool(dirty.stdout.strip())
    except OSError:
        pass
    return info


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


# ------------------------------------------------------------------------------ main


def bench(data: str, args: argparse.Namespace, console: Console, log: Callable[[str], None]) -> int:
    if data == "cifar" and not CIFAR.is_dir():
        console.print(f"[yellow]cifar skipped: {CIFAR} not found (CIFAR-10 image folders)[/]")
        return 0
    suffix = "-quick" if args.quick else ""
    out = args.out / f"{data}{suffix}"
    families = set(args.families or FAMILY_ORDER)
    runs = plan(data, args.quick, families, out / "calibration.json", args.seeds)
    dropped = sorted(set(dropped_fields(DELTA_PROTOCOL)) | set(dropped_fields(PADDED_PROTOCOL)))
    if dropped:
        console.print(f"[yellow]DeltaConfig lacks {dropped}: dropped from the protocol[/]")
    if "sample_k" not in known_fields():
        console.print("[yellow]no release='padded' in this DeltaConfig: no padded rows[/]")
    log(f"{data}: {len(runs)} runs, {args.jobs} at a time")
    began = time.perf_counter()
    rows = run_all(runs, out, args.jobs, args.no_progress, data, log)
    seconds = time.perf_counter() - began
    summary = summarize(rows)
    title = f"Delta frontier on {data}{' (quick)' if args.quick else ''}"
    print_table(console, title, summary)
    console.print(f"wall time {seconds:.0f} s for {len(runs)} runs")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"delta_frontier_{data}{suffix}"
    sample = base_config(data, args.quick, 0)
    payload = {
        "data": data,
        "data_spec": data_spec(data, args.quick),
        "quick": args.quick,
        "seeds": sorted({r["seed"] for r in rows}),
        "delta": DELTA,
        "delta_protocol": DELTA_PROTOCOL,
        "padded_protocol": PADDED_PROTOCOL,
        "dropped_protocol_fields": dropped,
        "label_share": LABEL_SHARE,
        "base_config": with_protocol(sample, DELTA_PROTOCOL).to_dict(),
        "dpsgd_config": dpsgd_config(data, args.quick, 0, 8.0).to_dict(),
        "summary": summary,
        "rows": rows,
        "seconds": seconds,
        "library": _library(),
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(_json_safe(payload), indent=2))
    png = save_plot(summary, title, stem, copy=not args.quick and families == set(FAMILY_ORDER))
    log(f"wrote {RESULTS / f'{stem}.json'} and {png}")
    return 0


def run_all(
    runs: list[Planned],
    out: Path,
    jobs: int,
    no_progress: bool,
    data: str,
    log: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every planned run, ``jobs`` processes at a time (one torch thread each), in two waves:
    the main-only runs first (every other run of a seed forks their stage 1), then the rest.
    Rows come back in plan order."""
    began = time.perf_counter()
    done = 0

    def report(p: Planned, row: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        log(
            f"[{done}/{len(runs)}] {data} seed {p.seed} {p.family} eps {_f(p.epsilon, 'g')}: "
            f"acc {_f(row['accuracy'])} eps certified {_f(row['epsilon'])} "
            f"({row['seconds']:.0f} s, total {time.perf_counter() - began:.0f} s)"
        )

    rows: dict[int, dict[str, Any]] = {}
    first = [i for i, p in enumerate(runs) if p.family == "main-only"]
    waves = [first, [i for i in range(len(runs)) if i not in first]]
    if jobs == 1:
        progress = sys.stderr.isatty() and not no_progress
        for i in (i for wave in waves for i in wave):
            rows[i] = run_one(runs[i], out, progress)
            report(runs[i], rows[i])
        return [rows[i] for i in range(len(runs))]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=memoize_padded_sigma) as pool:
        for wave in waves:
            futures = {pool.submit(run_one, runs[i], out, False): i for i in wave}
            for future in as_completed(futures):
                i = futures[future]
                rows[i] = future.result()
                report(runs[i], rows[i])
    return [rows[i] for i in range(len(runs))]


def replot(data: str, quick: bool, docs: bool) -> None:
    """Redraw the plot of a finished bench from its JSON (no training)."""
    stem = f"delta_frontier_{data}{'-quick' if quick else ''}"
    payload = json.loads((RESULTS / f"{stem}.json").read_text())
    summary = [{k: math.inf if v == "inf" else v for k, v in s.items()} for s in payload["summary"]]
    title = f"Delta frontier on {data}{' (quick)' if quick else ''}"
    save_plot(summary, title, stem, copy=docs and not quick)


def save_plot(summary: list[dict[str, Any]], title: str, stem: str, copy: bool) -> Path:
    """``bench/results/<stem>.png`` and, with ``copy``, ``docs/<stem>.png``."""
    png = RESULTS / f"{stem}.png"
    plot(summary, f"{title}: accuracy vs certified total ε per record", png)
    if copy:
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(png, DOCS / png.name)
    return png


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", nargs="+", choices=("digits", "cifar"), default=["digits"], help="data sets"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 2 epsilons")
    parser.add_argument(
        "--families",
        nargs="+",
        choices=FAMILY_ORDER,
        help="only these row families (default: all; the docs plot needs all)",
    )
    parser.add_argument(
        "--seeds", type=int, choices=(1, 2, 3), help="seeds 0..N-1 (default 3; --quick: 1)"
    )
    parser.add_argument(
        "--jobs", type=int, choices=(1, 2, 3, 4), default=2, help="runs at a time (default 2)"
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "delta_frontier_runs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument(
        "--replot", action="store_true", help="only redraw the plots from the written JSON"
    )
    args = parser.parse_args()
    memoize_padded_sigma()
    console = Console() if sys.stdout.isatty() else Console(width=170)
    began = time.perf_counter()

    def log(message: str) -> None:
        console.print(f"[{time.perf_counter() - began:6.0f} s] {message}", highlight=False)

    for data in args.data:
        if args.replot:
            replot(data, args.quick, args.families is None)
        else:
            bench(data, args, console, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
