"""The Delta report: ``report.md`` with PNG plots, from run directories, and the digits demo.

Plots (matplotlib, Agg backend): test accuracy per epoch of every variant; the epsilon spent
per kind of release, recomputed from each run's ledger (residual release, labels, queries);
what the public side sees (the unpacked +-1 bits of a few channels next to the inputs). The
table lists the final accuracies, Delta's trust weight w in z = z_main + w log_softmax(z_res),
the certified epsilon with its method, private and public MACs, bytes sent per sample and the
energy fraction ||main||^2/||X||^2 kept private
(Niu et al., CVPR 2024, arXiv 2312.05264; DESIGN.md sec. 1 and 3).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asymflow.accounting.best import best_epsilon
from asymflow.accounting.events import NonPrivate
from asymflow.accounting.ledger import (
    LEDGER_FILENAME,
    LedgerEntry,
    PrivacyLedger,
    population_events,
)
from asymflow.delta.runs import PREVIEW_FILE, RESULT_FILE, DeltaConfig, read_config, read_metrics
from asymflow.delta.train import RunResult, fork_stage1, train_delta

__all__ = [
    "FrontierPoint",
    "RunSummary",
    "demo_configs",
    "load_run",
    "plot_frontier",
    "run_demo",
    "write_report",
]

RELEASE_KINDS: tuple[str, ...] = ("residual release", "labels", "queries")


@dataclass(frozen=True)
class RunSummary:
    """What the report needs from one run directory."""

    name: str
    run_dir: Path
    config: DeltaConfig
    metrics: list[dict[str, Any]]
    result: dict[str, Any]
    entries: list[LedgerEntry]
    epsilon_by_kind: dict[str, float | None]


def _kind(entry: LedgerEntry, config: DeltaConfig) -> str:
    if entry.dataset != config.data:
        return "queries"
    return "labels" if entry.note.startswith("labels") else "residual release"


def _epsilon_of(entries: list[LedgerEntry], delta: float) -> float | None:
    """Per-record epsilon of a group of rows: the worst population (dataset and scope; only
    the rows of one population compose)."""
    if not entries:
        return None
    events = population_events(entries).values()
    return max(best_epsilon(event, delta).epsilon for event in events)


def load_run(run_dir: str | os.PathLike[str], name: str | None = None) -> RunSummary:
    """Read config, metrics, result and ledger of a finished run."""
    path = Path(run_dir)
    config = read_config(path)
    result_path = path / RESULT_FILE
    if not result_path.is_file():
        raise FileNotFoundError(f"run_dir must hold a finished run ({RESULT_FILE}), got {path}")
    result = json.loads(result_path.read_text())
    entries: list[LedgerEntry] = []
    if (path / LEDGER_FILENAME).is_file():
        with PrivacyLedger(path / LEDGER_FILENAME) as ledger:
            entries = ledger.entries()
    by_kind = {
        kind: _epsilon_of([e for e in entries if _kind(e, config) == kind], config.delta)
        for kind in RELEASE_KINDS
    }
    return RunSummary(
        name=name or path.name,
        run_dir=path,
        config=config,
        metrics=read_metrics(path),
        result=result,
        entries=entries,
        epsilon_by_kind=by_kind,
    )


def _fmt_eps(value: Any) -> str:
    if value is None:
        return "—"
    if value == "inf" or (isinstance(value, float) and math.isinf(value)):
        return "∞"
    return f"{float(value):.3g}"


def _snr(result: dict[str, Any]) -> float:
    """1/(sigma sqrt(d)): RMS clipped signal C/sqrt(d) over the noise sigma C per element."""
    return 1.0 / (float(result["sigma"]) * math.sqrt(8 * int(result["bytes_per_sample"])))


def _fmt_acc(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"


def _fmt_macs(value: int) -> str:
    return "0" if not value else f"{value / 1e6:.2f}M"


def _plot_accuracy(runs: list[RunSummary], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    boundary = None
    for i, run in enumerate(runs):
        color = f"C{i}"
        rows = [r for r in run.metrics if r.get("test_acc") is not None]
        xs = [r["global_epoch"] for r in rows]
        ax.plot(xs, [r["test_acc"] for r in rows], marker="o", ms=3, label=run.name, color=color)
        if run.config.variant == "delta":
            pub = [r for r in run.metrics if r.get("test_acc_public") is not None]
            if pub:
                ax.plot(
                    [r["global_epoch"] for r in pub],
                    [r["test_acc_public"] for r in pub],
                    ls=":",
                    lw=1.2,
                    color=color,
                    label=f"{run.name}: public head alone",
                )
            boundary = run.config.epochs_stage1 + 0.5
    if boundary is not None:
        ax.axvline(boundary, color="k", lw=0.6, ls="--")
        ax.text(boundary, 0.02, " stage 2", fontsize=8)
    ax.set_xlabel("epoch (stage 1 then stage 2)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title("Test accuracy of each variant's prediction")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_epsilon(runs: list[RunSummary], path: Path) -> None:
    import matplotlib.pyplot as plt

    shown = [r for r in runs if any(v is not None for v in r.epsilon_by_kind.values())]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    finite = [
        v for r in shown for v in r.epsilon_by_kind.values() if v is not None and math.isfinite(v)
    ]
    cap = max(finite, default=1.0) * 1.3 or 1.0
    width = 0.8 / len(RELEASE_KINDS)
    labelled: set[str] = set()
    for k, kind in enumerate(RELEASE_KINDS):
        for i, run in enumerate(shown):
            value = run.epsilon_by_kind[kind]
            if value is None:
                continue
            x = i + (k - (len(RELEASE_KINDS) - 1) / 2) * width
            infinite = math.isinf(value)
            ax.bar(
                x,
                cap if infinite else value,
                width,
                color=f"C{k}",
                hatch="//" if infinite else None,
                alpha=0.5 if infinite else 0.9,
                label=None if kind in labelled else kind,
            )
            labelled.add(kind)
            ax.text(
                x,
                (cap if infinite else value) + cap * 0.01,
                _fmt_eps(value),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.legend(fontsize=8)
    ax.set_xticks(range(len(shown)), [r.name for r in shown], fontsize=8)
    delta = shown[0].config.delta if shown else 1e-5
    ax.set_ylabel(f"certified ε per record at δ={delta:g}")
    ax.set_title("ε spent by kind of release (from each run's ledger; hatched = ∞)")
    ax.set_ylim(0, cap * 1.12)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class FrontierPoint:
    """One point of the accuracy-epsilon frontier: ``group`` names the curve (e.g. "Delta"),
    ``epsilon`` the certified total epsilon per record (inf: no guarantee, 0: nothing left),
    ``sd`` the standard deviation over seeds (0 for one run)."""

    group: str
    epsilon: float
    accuracy: float
    sd: float = 0.0


def plot_frontier(points: Sequence[FrontierPoint], path: Path, *, title: str) -> None:
    """Accuracy against certified total epsilon per record, log x; epsilon = inf is drawn at
    the right edge, and the groups without any release (epsilon = 0: main-only, the original
    network) as horizontal lines with a band of one sd."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    finite = [p.epsilon for p in points if 0 < p.epsilon < math.inf]
    low, high = (min(finite), max(finite)) if finite else (1.0, 10.0)
    right = high * 2.5
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    groups = list(dict.fromkeys(p.group for p in points))
    for i, group in enumerate(groups):
        mine = sorted((p for p in points if p.group == group), key=lambda p: p.epsilon)
        color = f"C{i}"
        if all(p.epsilon == 0 for p in mine):
            for p in mine:
                ax.axhline(p.accuracy, color=color, ls="--", lw=1, label=f"{group} (ε = 0)")
                ax.axhspan(p.accuracy - p.sd, p.accuracy + p.sd, color=color, alpha=0.12)
            continue
        shown = [p for p in mine if 0 < p.epsilon < math.inf]
        if shown:
            ax.errorbar(
                [p.epsilon for p in shown],
                [p.accuracy for p in shown],
                yerr=[p.sd for p in shown],
                marker="o",
                ms=4,
                capsize=3,
                color=color,
                label=group,
            )
        for p in (p for p in mine if math.isinf(p.epsilon)):  # no guarantee: not joined
            ax.errorbar(
                [right],
                [p.accuracy],
                yerr=[p.sd],
                marker="s",
                mfc="none",
                ms=6,
                capsize=3,
                color=color,
                label=None if shown else group,
            )
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axvline(high * 1.6, color="k", lw=0.5, ls=":")
    ticks = [t for t in (0.5, 1, 2, 4, 8, 16, 32, 64) if low / 1.5 <= t <= high * 1.5]
    ax.set_xticks([*ticks, right], [*(f"{t:g}" for t in ticks), "∞"])
    ax.set_xlim(low / 1.5, right * 1.4)
    ax.set_xlabel("certified total ε per training record (ledger; ∞: no noise)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _frontier_points(runs: list[RunSummary]) -> list[FrontierPoint]:
    points = []
    for run in runs:
        accuracy = run.result.get("accuracy")
        if accuracy is None:
            continue
        eps = run.result["epsilon"]
        epsilon = math.inf if eps == "inf" else float(eps)
        group = {"delta": "Delta", "naive-dp": "naive-DP"}.get(run.config.variant, run.name)
        points.append(FrontierPoint(group, epsilon, float(accuracy)))
    return points


def _plot_public_view(runs: list[RunSummary], path: Path) -> bool:
    import matplotlib.pyplot as plt

    previews = []
    for run in runs:
        file = run.run_dir / PREVIEW_FILE
        if file.is_file():
            with np.load(file) as data:
                previews.append((run, data["images"], data["bits"]))
    if not previews:
        return False
    samples = min(2, *(len(p[1]) for p in previews))
    channels = previews[0][2].shape[1]
    rows = samples * len(previews)
    fig, axes = plt.subplots(
        rows, 1 + channels, figsize=(1.5 * (1 + channels), 1.5 * rows), squeeze=False
    )
    for block, (run, images, bits) in enumerate(previews):
        for s in range(samples):
            row = block * samples + s
            img = images[s]
            axes[row, 0].imshow(img if img.shape[-1] == 3 else img[..., 0], cmap="gray")
            axes[row, 0].set_ylabel(run.name if s == 0 else "", fontsize=7)
            for ch in range(channels):
                axes[row, 1 + ch].imshow(bits[s, ch], cmap="gray", vmin=-1, vmax=1)
                if row == 0:
                    axes[row, 1 + ch].set_title(f"bits, ch {ch}", fontsize=8)
            if row == 0:
                axes[row, 0].set_title("input (private)", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("What the public side sees: the 1-bit sanitized payload", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ledger_lines(run: RunSummary) -> list[str]:
    lines = []
    for e in run.entries:
        event = json.dumps(e.event.to_dict())
        lines.append(
            f"| {e.id} | {e.dataset} | {e.scope} | {e.count} | `{event}` | {e.note} | {e.status} |"
        )
    return lines


def write_report(
    runs: Sequence[str | os.PathLike[str] | RunResult | RunSummary],
    out_dir: str | os.PathLike[str],
    *,
    title: str = "Delta: private learning with asymmetric flows",
    names: Sequence[str] | None = None,
) -> Path:
    """Write ``out_dir/report.md`` and its PNGs for finished runs; return the report's path."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summaries: list[RunSummary] = []
    for i, run in enumerate(runs):
        name = names[i] if names is not None else None
        if isinstance(run, RunSummary):
            summaries.append(run)
        elif isinstance(run, RunResult):
            summaries.append(load_run(run.run_dir, name))
        else:
            summaries.append(load_run(run, name))
    if not summaries:
        raise ValueError("runs must name at least one finished run")
    _plot_accuracy(summaries, out / "accuracy.png")
    _plot_epsilon(summaries, out / "epsilon.png")
    has_view = _plot_public_view(summaries, out / "public_view.png")
    plot_frontier(
        _frontier_points(summaries),
        out / "frontier.png",
        title="Accuracy against the certified ε each training record spent",
    )
    c0 = summaries[0].config
    lines = [
        f"# {title}",
        "",
        f"Data `{c0.data}`; IR {c0.ir_channels} channels; rank r={c0.r}, DCT blocks "
        f"t/t'={c0.t}/{c0.t_low}; M_res = {c0.public_arch} (width {c0.public_width}); "
        f"{c0.epochs_stage1} + {c0.epochs_stage2} epochs; δ={c0.delta:g}. "
        "Method: Niu et al., *All Rivers Run to the Sea: Private Learning with Asymmetric "
        "Flows*, CVPR 2024 (arXiv 2312.05264).",
        "",
        "## Final results",
        "",
        "| run | variant | test acc | main head | public head | combined | w | "
        "ε (certified, method) | σ | private MACs | public MACs | bytes/sample sent "
        "| IR energy in the main part |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in summaries:
        r = run.result
        final = r["final"]
        eps = r["epsilon"]
        eps_text = f"{_fmt_eps(eps)} ({r['epsilon_method']})" if run.entries else "0 (nothing left)"
        sigma = "—" if r.get("sigma") is None else f"{r['sigma']:.3g}"
        energy = r.get("energy_fraction")
        weight = r.get("residual_weight")
        lines.append(
            f"| {run.name} | {run.config.variant} | **{_fmt_acc(r['accuracy'])}** | "
            f"{_fmt_acc(final.get('test_acc_main'))} | {_fmt_acc(final.get('test_acc_public'))} | "
            f"{_fmt_acc(final.get('test_acc_combined'))} | "
            f"{'—' if weight is None else f'{weight:.3g}'} | {eps_text} | {sigma} | "
            f"{_fmt_macs(r['private_macs'])} | {_fmt_macs(r['public_macs'])} | "
            f"{r['bytes_per_sample']} | {'—' if energy is None else f'{100 * energy:.1f}%'} |"
        )
    snr = [
        f"{run.name}: 1/(σ√d) = {_snr(run.result):.4f}"
        for run in summaries
        if run.result.get("sigma")
    ]
    if snr:
        lines += [
            "",
            "Largest possible per-element signal-to-noise ratio of the released bits: the "
            "payload is clipped to ‖R‖₂ ≤ C over d elements and noised with N(0, σ²C²) per "
            "element, so the root-mean-square signal per element is at most C/√d against a noise "
            "of σC (" + "; ".join(snr) + "). At such ratios the public head stays near chance "
            "here, and Delta's accuracy at finite ε comes from M_main.",
        ]
    lines += [
        "",
        "Delta's combined prediction is z = z_main + w·log_softmax(z_res): w ≥ 0 is the private "
        "side's trust in the public head, fitted in stage 2 with the true labels on held-out "
        "rows that no private model trains on, with out-of-fold z_res there (post-processing "
        "of the release, no privacy cost). It starts at 0 (the main-only prediction) and grows "
        "only as far as z_res lowers the held-out loss, so an uninformative public head is "
        "switched off (w ≈ 0). With `combine=sum`, w = 1: the plain sum z_main + z_res.",
        "",
        "*IR energy in the main part* is ‖main‖²/‖X‖², a property of the decomposition, **not a "
        "privacy measure**: energy kept private is not information kept private. Without noise "
        "the public head alone classifies most images from the residual bits (see the "
        "public-head column of an ε = ∞ run). What the public side can learn is bounded by the "
        "certified ε, and measured by `asymflow audit`.",
        "",
        "ε is recomputed from each run's ledger over every row that touches a training record "
        "(residual release(s) ⊕ labels); *original* and *main-only* release nothing (their "
        "whole computation stays private). MACs are per sample for one forward pass "
        "(decomposition not included). Bytes/sample: the bit-packed payload "
        "(`SanitizedResidual.bytes_per_sample`); labels add one value per sample, once.",
        "",
        "## Accuracy against ε",
        "",
        "![frontier](frontier.png)",
        "",
        "Main-only and the original network release nothing (ε = 0: dashed lines). Delta "
        "can only add accuracy through the public head, whose signal is bounded by ε: one "
        "Gaussian release at noise multiplier σ carries at most 1/σ² of signal per record.",
        "",
        "## Accuracy per epoch",
        "",
        "![accuracy](accuracy.png)",
        "",
        "## ε spent by kind of release",
        "",
        "![epsilon](epsilon.png)",
        "",
        "| run | " + " | ".join(RELEASE_KINDS) + " |",
        "|---|" + "---|" * len(RELEASE_KINDS),
    ]
    for run in summaries:
        cells = " | ".join(_fmt_eps(run.epsilon_by_kind[k]) for k in RELEASE_KINDS)
        lines.append(f"| {run.name} | {cells} |")
    leaks = [
        run.name for run in summaries if any(isinstance(e.event, NonPrivate) for e in run.entries)
    ]
    if leaks:
        lines += [
            "",
            f"**Non-private releases** (ε = ∞) in: {', '.join(leaks)} — see the ledger rows "
            "below (`NonPrivate` events: labels sent in clear or residuals without noise).",
        ]
    if has_view:
        lines += [
            "",
            "## What the public side sees",
            "",
            "![public view](public_view.png)",
            "",
            "Each row: a private input image, then the ±1 bits of the first channels of its "
            "sanitized payload (white = 1). At finite ε the per-sample clip and the Gaussian "
            "noise dominate the sign of each element.",
        ]
    lines += ["", "## Ledgers", ""]
    for run in summaries:
        if not run.entries:
            continue
        lines += [
            f"### {run.name}",
            "",
            "| id | dataset | scope | count | event | note | status |",
            "|---|---|---|---|---|---|---|",
            *_ledger_lines(run),
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------ demo


def demo_configs(*, quick: bool = False) -> dict[str, DeltaConfig]:
    """The demo's runs by name: Delta at epsilon = 1.4, the noiseless diagnostic (epsilon = inf
    and clear labels: nothing noised anywhere), main-only, naive-DP and the original network.

    ``quick``: a few seconds on small synthetic data (for tests).
    """
    base = DeltaConfig()
    if quick:
        base = DeltaConfig(
            data="synthetic:160",
            ir_channels=8,
            r=2,
            private_widths=(8, 16),
            private_ranks=(2, 4),
            public_width=0.25,
            epochs_stage1=1,
            epochs_stage2=2,
            batch_size=32,
        )
    return {
        "delta": base,
        "delta-eps-inf": base.replace(epsilon=math.inf, labels="clear"),
        "main-only": base.replace(variant="main-only"),
        "naive-dp": base.replace(variant="naive-dp"),
        "original": base.replace(variant="original"),
    }


def run_demo(
    out_dir: str | os.PathLike[str], *, progress: bool = True, quick: bool = False
) -> Path:
    """Train the demo variants on digits (``quick``: synthetic) into ``out_dir/<name>/`` and
    write ``out_dir/report.md``; return its path.

    Stage 1 (identical for Delta, main-only and naive-DP, and releasing nothing) is trained
    once and forked; finished runs in ``out_dir`` are reused (the call resumes).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    configs = demo_configs(quick=quick)
    began = time.perf_counter()
    dirs = []
    for name, config in configs.items():
        run_dir = out / name
        if (
            name != "delta"
            and config.variant != "original"
            and not (run_dir / "config.json").exists()
        ):
            fork_stage1(out / "delta", run_dir, config)
        train_delta(config, run_dir, progress=progress, resume=True)
        dirs.append(run_dir)
    path = write_report(
        dirs,
        out,
        title="Delta demo on the digits data set"
        if not quick
        else "Delta demo (quick, synthetic data)",
    )
    seconds = time.perf_counter() - began
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"\nDemo wall-clock time: {seconds:.0f} s.\n")
    return path
