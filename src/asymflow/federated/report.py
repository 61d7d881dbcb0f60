"""``report.md`` and ``report.png`` of a federated run: test accuracy and the certified
client-level epsilon per round, the schedule, and the ledger rows."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from asymflow.accounting.ledger import LEDGER_FILENAME, PrivacyLedger
from asymflow.federated.runs import read_config, read_metrics, read_result

__all__ = ["PLOT_FILE", "REPORT_FILE", "plot_rounds", "write_report"]

REPORT_FILE = "report.md"
PLOT_FILE = "report.png"


def plot_rounds(metrics: list[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Two panels over rounds: test accuracy, and the certified client-level epsilon."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rounds = [int(m["round"]) for m in metrics]
    fig, (ax_acc, ax_eps) = plt.subplots(1, 2, figsize=(9, 3.4))
    ax_acc.plot(rounds, [float(m["test_acc"]) for m in metrics], marker="o", ms=3)
    ax_acc.set_xlabel("round")
    ax_acc.set_ylabel("test accuracy")
    ax_acc.grid(alpha=0.3)
    eps = [float(m["epsilon"]) if math.isfinite(float(m["epsilon"])) else math.nan for m in metrics]
    ax_eps.plot(rounds, eps, marker="o", ms=3, color="tab:red")
    ax_eps.set_xlabel("round")
    ax_eps.set_ylabel("client-level epsilon (certified)")
    ax_eps.grid(alpha=0.3)
    for ax in (ax_acc, ax_eps):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value: Any, digits: int = 3) -> str:
    if isinstance(value, str):
        return value
    value = float(value)
    return "inf" if math.isinf(value) else f"{value:.{digits}f}"


def write_report(run_dir: str | os.PathLike[str]) -> Path:
    """Write ``report.md`` and ``report.png`` into a finished run directory; return the
    report's path."""
    run = Path(run_dir)
    config = read_config(run)
    result = read_result(run)
    metrics = read_metrics(run)
    title = (
        f"{config.data}: {config.clients} clients, {config.sampler}, {config.subnetwork}, "
        f"sigma={result.sigma:.3g}"
    )
    plot_rounds(metrics, run / PLOT_FILE, title=title)
    schedule = (
        f"Poisson, q = {config.rate:.4g} per round"
        if config.sampler == "poisson"
        else f"BIS: each client in exactly k = {config.k} of every T = {config.period} rounds"
    )
    lines = [
        "# Federated run (client-level DP)",
        "",
        f"- data: `{config.data}`, split `{config.split}`"
        + (f" (alpha = {config.alpha})" if config.split == "dirichlet" else "")
        + f", {config.clients} clients",
        f"- model: {config.model} (GroupNorm, width {config.width})",
        f"- rounds: {config.rounds}; sampling: {schedule}; fixed denominator "
        f"m = {config.expected_clients:.4g} clients",
        f"- subnetwork: `{config.subnetwork}`; clip C = {config.clip}; "
        f"noise multiplier sigma = {result.sigma:.4g}"
        + (" (calibrated)" if result.calibrated else ""),
        f"- accounting: {result.accounting}",
        f"- **certified client-level epsilon = {_fmt(result.epsilon)} at delta = "
        f"{result.delta:g}** ({result.method}); final test accuracy {_fmt(result.test_acc)}",
        f"- wall time: {result.seconds:.1f} s",
        "",
        f"![accuracy and epsilon per round]({PLOT_FILE})",
        "",
        "| round | test accuracy | epsilon |",
        "|---:|---:|---:|",
    ]
    lines += [f"| {m['round']} | {_fmt(m['test_acc'])} | {_fmt(m['epsilon'])} |" for m in metrics]
    ledger_path = run / LEDGER_FILENAME
    if ledger_path.is_file():
        with PrivacyLedger(ledger_path) as ledger:
            entries = ledger.entries()
        lines += ["", f"## Ledger ({len(entries)} rows)", ""]
        shown = entries if len(entries) <= 12 else entries[:6] + entries[-6:]
        for i, e in enumerate(shown):
            if len(entries) > 12 and i == 6:
                lines.append(f"- ... {len(entries) - 12} more rows ...")
            lines.append(f"- #{e.id} x{e.count} `{type(e.event).__name__}` ({e.status}): {e.note}")
    path = run / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
