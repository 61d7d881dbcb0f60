"""How much can a public head learn from one sanitized residual at finite epsilon? An oracle.

    python bench/delta_oracle.py            # digits, the demo's setting, about a minute

M_bb and the decomposition are those of the demo's default setting (frozen seeded M_bb, r=8,
t/t'=16/8; no training needed: the backbone is data-independent). Each test image's payload
(the c x h x w residual, or its channel mean) is clipped to norm C = 1 and gets N(0, sigma^2)
per element, sigma calibrated for one release at epsilon (delta = 1e-5), or for the padded
protocol's k = 1 of T = 6 epochs (the demo's stage 2). The oracle classifies by the nearest
*true* class mean of the clipped training payloads, argmax_k <x, mu_k> - ||mu_k||^2 / 2: the
optimal rule if the classes differed only in their means under isotropic noise. A real public
model must estimate those means from noisy releases with noisy labels, so it does worse; the
float payload (no 1-bit quantization) also flatters it. The table shows why at epsilon <= 8 the
public head carries little: the class means differ by a small fraction of C.

Prints a table, writes bench/results/delta_oracle.json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from asymflow.delta.padded import padded_sigma
from asymflow.delta.private import calibrated_sigma
from asymflow.delta.runs import DeltaConfig
from asymflow.delta.train import build_private, input_stats, load_run_data, payload_view
from asymflow.runfiles import jsonable

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0, math.inf)


def payloads(config: DeltaConfig) -> tuple[dict[str, torch.Tensor], ...]:
    """Clipped (norm <= 1) flat payloads of the train and test images, by payload kind."""
    data = load_run_data(config)
    model = build_private(config, data.train.image_shape[2], len(data.classes))
    model.freeze_backbone()
    model.eval()
    mean, std = (torch.tensor(s).view(1, -1, 1, 1) for s in input_stats(config, data))
    out = []
    for split in (data.train, data.test):
        x = (torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            residual = torch.cat([model.residual(x[i : i + 256]) for i in range(0, len(x), 256)])
        kinds = {}
        for kind in ("full", "channel-mean"):
            flat = payload_view(residual, config.replace(payload=kind)).flatten(1)
            kinds[kind] = flat / torch.clamp(flat.norm(dim=1, keepdim=True), min=1.0)
        out.append(kinds)
    return out[0], out[1], torch.from_numpy(data.train.labels), torch.from_numpy(data.test.labels)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="noise draws per cell")
    args = parser.parse_args()
    console = Console() if sys.stdout.isatty() else Console(width=140)
    torch.manual_seed(0)
    began = time.perf_counter()
    config = DeltaConfig()
    train, test, y_train, y_test = payloads(config)
    classes = int(y_train.max()) + 1
    rows = []
    for eps in EPSILONS:
        sigmas = {"one release": 0.0, "padded k=1 of T=6": 0.0}
        if math.isfinite(eps):
            sigmas = {
                "one release": calibrated_sigma(eps, 1e-5, 1),
                "padded k=1 of T=6": padded_sigma(eps, 1e-5, 1, 6),
            }
        for protocol, sigma in sigmas.items():
            if math.isinf(eps) and protocol != "one release":
                continue
            row = {"epsilon": eps, "protocol": protocol, "sigma": sigma}
            for kind in ("full", "channel-mean"):
                means = torch.stack([train[kind][y_train == k].mean(0) for k in range(classes)])
                gaps = torch.cdist(means, means)
                accs = []
                for _ in range(args.repeats):
                    noisy = test[kind] + sigma * torch.randn_like(test[kind])
                    score = noisy @ means.T - 0.5 * (means**2).sum(1)
                    accs.append(float((score.argmax(1) == y_test).float().mean()))
                row[f"{kind}_accuracy"] = float(np.mean(accs))
                row[f"{kind}_min_gap"] = float(gaps[gaps > 0].min())
                row[f"{kind}_dims"] = int(train[kind].shape[1])
            rows.append(row)
    table = Table(title="Oracle public head (true class means) on digits test payloads")
    for col in ("ε", "protocol", "σ", "full payload acc", "channel-mean acc"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}",
            r["protocol"],
            f"{r['sigma']:.3f}",
            f"{100 * r['full_accuracy']:.1f}%",
            f"{100 * r['channel-mean_accuracy']:.1f}%",
        )
    console.print(table)
    first = rows[0]
    console.print(
        f"closest class means: {first['full_min_gap']:.3f} apart (full, "
        f"{first['full_dims']} dims), {first['channel-mean_min_gap']:.3f} (channel mean, "
        f"{first['channel-mean_dims']} dims), in units of the clip norm C = 1"
    )
    seconds = time.perf_counter() - began
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "delta_oracle.json").write_text(
        json.dumps(jsonable({"rows": rows, "seconds": seconds}), indent=2)
    )
    console.print(f"wall time {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
