"""Does a public learner see any difference between the two samplers of the released bit?

    python bench/noisy_sign_law.py          # digits, about 30 seconds

The sanitizer releases b = 1[x + sigma Z >= 0] per element of the clipped residual x. It used
to draw Z (a Gaussian per element); it now draws b itself with the same law
(:mod:`asymflow.delta.noisy_sign`). The tests check the law element by element; this bench
checks it end to end, on what the public side does with the bits. Payloads: the digits demo's
residuals (frozen seeded M_bb, r = 8, t/t' = 16/8), clipped to norm C = 1, at small sigmas
where the bits carry class information (at the demo's epsilon they carry almost none). A
logistic regression (scikit-learn) trains on the bits of the training images with clear
labels (this tests the residual's bits, not the labels' noise) and is scored on fresh bits of
the test images; 3 seeds per row, mean and sd.

Prints a table, writes bench/results/noisy_sign_law.json.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from sklearn.linear_model import LogisticRegression

from asymflow.delta.noisy_sign import KeyStream, noisy_sign_bits
from asymflow.delta.runs import DeltaConfig
from delta_oracle import payloads

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
SIGMAS = (0.002, 0.005, 0.02)
SEEDS = (0, 1, 2)
Sampler = Callable[[np.ndarray, float, int], np.ndarray]


def gaussian_draw(x: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """1[x + sigma Z >= 0] with Z drawn per element (the old sanitizer's way)."""
    z = np.random.default_rng(seed).standard_normal(x.shape, dtype=np.float32)
    return (x + sigma * z >= 0).astype(np.float32)


def noisy_sign(x: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    """The same bit from :func:`noisy_sign_bits` (the sanitizer's way now)."""
    packed = noisy_sign_bits(x, np.full(len(x), sigma), KeyStream(seed))
    return np.unpackbits(packed, axis=1)[:, : x.shape[1]].astype(np.float32)


def accuracy(sampler: Sampler, sigma: float, seed: int, data: tuple[np.ndarray, ...]) -> float:
    x_train, y_train, x_test, y_test = data
    model = LogisticRegression(max_iter=300, C=0.05)
    model.fit(2 * sampler(x_train, sigma, 2 * seed) - 1, y_train)
    return 100 * float(model.score(2 * sampler(x_test, sigma, 2 * seed + 1) - 1, y_test))


def main() -> None:
    torch.set_num_threads(1)
    began = time.perf_counter()
    train, test, y_train, y_test = payloads(DeltaConfig())
    data = (train["full"].numpy(), y_train.numpy(), test["full"].numpy(), y_test.numpy())
    rows = []
    for sigma in SIGMAS:
        for name, sampler in (("gaussian draw", gaussian_draw), ("noisy_sign", noisy_sign)):
            accs = [accuracy(sampler, sigma, seed, data) for seed in SEEDS]
            rows.append(
                {
                    "sigma": sigma,
                    "sampler": name,
                    "mean": statistics.mean(accs),
                    "sd": statistics.stdev(accs),
                    "accuracies": accs,
                }
            )
    table = Table(title="Logistic regression on the released bits (digits test accuracy, %)")
    for column in ("sigma", "sampler", "mean ± sd over 3 seeds"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["sigma"]), row["sampler"], f"{row['mean']:.1f} ± {row['sd']:.1f}")
    Console().print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "noisy_sign_law.json"
    report = {"rows": rows, "seconds": time.perf_counter() - began}
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
