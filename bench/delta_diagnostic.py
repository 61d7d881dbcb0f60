"""Does Delta's public flow add accuracy when nothing is noised? The noiseless diagnostic.

    python bench/delta_diagnostic.py --data digits   # headroom + demo settings, 3 seeds
    python bench/delta_diagnostic.py --data cifar    # CIFAR-10 subset, headroom setting
    python bench/delta_diagnostic.py --quick         # a smoke run of a minute or two

Everything here is noiseless *everywhere*: epsilon = inf residuals (sign bits of the raw
residual) and clear labels, so the table measures the residual path itself, not privacy.
Each stage-2 epoch releases a fresh augmented view of every image and M_main trains on the
same views (``release="per-epoch"``). The ladder shows what each step of the protocol loses:

- float residual: M_res trained on the un-quantized residual (this bench's own loop, same
  model, optimizer and views), combined with main-only's M_main through w fitted on the
  held-out rows;
- c-channel sign bits: Delta at epsilon = inf, w fitted on held-out rows (``weighted``), and
  the plain sum z_main + z_res with M_main trained on the combined loss (``sum``);
- channel-mean sign bits: the 1 x h x w mean over channels that the reference code sends;
- the earlier demo protocol: epsilon = inf residual but randomized-response labels at
  epsilon = 2, released once, one public epoch (the confounded diagnostic).

M_bb is frozen at its seeded initialization (the default: what a finite-epsilon run needs
for its guarantee); "main-only, trained backbone" shows what training M_bb in the clear adds.
On CIFAR (2,000/500 images, 3 + 3 epochs, about 40 minutes on a loaded 2-core machine) the
whole ladder runs for the first seed only, the headline rows for all three.
The headroom setting makes M_main weak on purpose (r = 1, a 4 x 4 low band, narrow M_main)
so that original minus main-only is large enough to see whether the residual closes it.
"Gap closed" is (acc - main-only) / (original - main-only), from the seed means.
Prints one table per setting and writes bench/results/delta_diagnostic_<data>.json and
docs/delta_diagnostic_<data>.png (M_res's own test accuracy per stage-2 epoch).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table
from torch.nn import functional

from asymflow.delta.infer import load_system
from asymflow.delta.private import PrivateModel, ResidualWeight
from asymflow.delta.runs import DeltaConfig
from asymflow.delta.train import (
    build_public_factory,
    fork_stage1,
    holdout_split,
    load_run_data,
    stage2_views,
    train_delta,
)
from asymflow.public.local import cosine_lr

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10-jpg"
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs"
SEEDS = (0, 1, 2)


def settings(data: str, quick: bool) -> dict[str, DeltaConfig]:
    """The base configuration of each setting (the variants are derived in :func:`ladder`)."""
    threads = {"threads": 1}
    if data == "digits":
        narrow = {"r": 1, "t_low": 4, "private_widths": (8, 16, 32), "private_ranks": (2, 4, 8)}
        base = DeltaConfig(**threads)
        if quick:
            base = base.replace(epochs_stage1=2, epochs_stage2=2, public_epochs=2)
        return {"digits, headroom": base.replace(**narrow), "digits, demo setting": base}
    n_train, n_test = (600, 300) if quick else (2000, 500)
    base = DeltaConfig(
        data=f"cifar10:{CIFAR}@{n_train},{n_test}",
        image_size=32,
        ir_channels=64,
        r=2,
        t=16,
        t_low=4,
        private_widths=(8, 16, 32),
        private_ranks=(2, 4, 8),
        public_arch="resnet20",
        public_width=0.5,
        epochs_stage1=1 if quick else 3,
        epochs_stage2=1 if quick else 3,
        public_epochs=2,
        flip=True,
        **threads,
    )
    return {"cifar, headroom": base}


def ladder(base: DeltaConfig, full: bool) -> dict[str, DeltaConfig]:
    """The runs of one setting and seed; ``full=False``: only the headline rows."""
    clear = base.replace(epsilon=math.inf, labels="clear")
    runs = {
        "main-only": base.replace(variant="main-only"),
        "original": base.replace(variant="original"),
        "bits, weighted": clear,
        "main-only, trained backbone": base.replace(variant="main-only", backbone="trained"),
    }
    if full:
        runs["bits, sum"] = clear.replace(combine="sum")
        runs["channel-mean bits, weighted"] = clear.replace(payload="channel-mean")
        runs["old protocol (RR labels, once, 1 public epoch)"] = base.replace(
            epsilon=math.inf, labels="rr", label_epsilon=2.0, release="once", public_epochs=1
        )
    return runs


def float_rung(main_dir: Path, config: DeltaConfig) -> dict[str, Any]:
    """M_res on the float residual of the same views (clear labels), trained on the rows M_main
    trained on; w fitted on the held-out rows with main-only's M_main (no noise, no bits)."""
    torch.manual_seed(config.seed)
    system = load_system(main_dir)
    model = system.model
    assert isinstance(model, PrivateModel)
    data = load_run_data(config)
    mean = torch.tensor(system.mean).view(1, -1, 1, 1)
    std = torch.tensor(system.std).view(1, -1, 1, 1)
    fit, held = holdout_split(len(data.train), config.holdout, config.seed)
    labels = torch.from_numpy(data.train.labels)
    net = build_public_factory(config, len(data.classes))()
    opt = torch.optim.SGD(
        net.parameters(), lr=0.0, momentum=config.momentum, weight_decay=config.weight_decay
    )
    epochs = config.epochs_stage2 * config.public_epochs
    steps = math.ceil(len(fit) / config.batch_size)

    def residuals(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([model.residual(x[i : i + 256]) for i in range(0, len(x), 256)])

    def logits(r: torch.Tensor) -> torch.Tensor:
        net.eval()
        with torch.no_grad():
            return torch.cat([net(r[i : i + 256]) for i in range(0, len(r), 256)])

    test_x = (torch.from_numpy(data.test.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    test_r = residuals(test_x)
    test_y = torch.from_numpy(data.test.labels)
    per_epoch = []
    for stage2_epoch in range(1, config.epochs_stage2 + 1):
        views = stage2_views(config, data.train.images, stage2_epoch, mean, std)
        r = residuals(views[torch.from_numpy(fit)])
        y = labels[torch.from_numpy(fit)]
        for inner in range(config.public_epochs):
            e = (stage2_epoch - 1) * config.public_epochs + inner
            gen = torch.Generator().manual_seed(config.seed * 1_000_003 + e)
            order = torch.randperm(len(fit), generator=gen)
            net.train()
            for i in range(steps):
                idx = order[i * config.batch_size : (i + 1) * config.batch_size]
                for group in opt.param_groups:
                    group["lr"] = cosine_lr(config.public_lr, e * steps + i, epochs * steps)
                loss = functional.cross_entropy(net(r[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        per_epoch.append(float((logits(test_r).argmax(1) == test_y).float().mean()))
    train_x = (torch.from_numpy(data.train.images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    held_x = train_x[torch.from_numpy(held)]
    model.eval()
    with torch.no_grad():
        z_main_held = model.main(model.features(held_x))
        z_main_test = model.main(model.features(test_x))
    weight = ResidualWeight()
    w = weight.fit(z_main_held, logits(residuals(held_x)), labels[torch.from_numpy(held)])
    combined = weight(z_main_test, logits(test_r))
    return {
        "accuracy": float((combined.argmax(1) == test_y).float().mean()),
        "public": per_epoch[-1],
        "public_per_epoch": per_epoch,
        "w": w,
    }


def run_seed(setting: DeltaConfig, seed: int, out: Path, full: bool) -> dict[str, dict[str, Any]]:
    """Every run of the ladder for one seed: stage 1 once (in main-only), forked."""
    runs = ladder(setting.replace(seed=seed), full)
    rows: dict[str, dict[str, Any]] = {}
    main_dir = out / "main-only"
    for name, config in runs.items():
        run_dir = out / name.split(" (")[0].replace(", ", "-").replace(" ", "-")
        forked = config.variant != "original" and config.backbone == setting.backbone
        if name != "main-only" and forked and not run_dir.exists():
            fork_stage1(main_dir, run_dir, config)
        result = train_delta(config, run_dir, progress=False, resume=True)
        public = [m.get("test_acc_public") for m in result.metrics if m["stage"] == 2]
        rows[name] = {
            "accuracy": result.accuracy,
            "public": result.final.get("test_acc_public"),
            "public_per_epoch": [p for p in public if p is not None],
            "w": result.residual_weight,
            "seconds": result.seconds,
        }
        if name == "main-only" and full:
            began = time.perf_counter()
            rows["float residual, weighted"] = float_rung(main_dir, config)
            rows["float residual, weighted"]["seconds"] = time.perf_counter() - began
    return rows


def mean_sd(values: list[float | None]) -> tuple[float | None, float | None]:
    got = [v for v in values if v is not None]
    if not got:
        return None, None
    return float(np.mean(got)), float(np.std(got, ddof=1)) if len(got) > 1 else 0.0


def pm(values: list[float | None]) -> str:
    mean, sd = mean_sd(values)
    return "-" if mean is None else f"{100 * mean:.1f} ± {100 * (sd or 0):.1f}"


def summarize(per_seed: list[dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    names = list(dict.fromkeys(n for rows in per_seed for n in rows))
    main = mean_sd([rows["main-only"]["accuracy"] for rows in per_seed])[0] or 0.0
    orig = mean_sd([rows["original"]["accuracy"] for rows in per_seed])[0] or 0.0
    out = []
    for name in names:
        rows = [r[name] for r in per_seed if name in r]
        acc, acc_sd = mean_sd([r["accuracy"] for r in rows])
        pub, pub_sd = mean_sd([r["public"] for r in rows])
        curves = [r["public_per_epoch"] for r in rows if r["public_per_epoch"]]
        out.append(
            {
                "run": name,
                "accuracy": acc,
                "accuracy_sd": acc_sd,
                "accuracies": [r["accuracy"] for r in rows],
                "public": pub,
                "public_sd": pub_sd,
                "public_per_epoch": np.mean(curves, 0).tolist() if curves else [],
                "w": mean_sd([r["w"] for r in rows])[0],
                "gap_closed": (acc - main) / (orig - main)
                if acc is not None and orig != main and name not in ("main-only", "original")
                else None,
                "seconds": float(np.sum([r["seconds"] for r in rows])),
            }
        )
    return out


def plot(results: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 3.8), squeeze=False)
    for ax, (setting, rows) in zip(axes[0], results.items(), strict=True):
        for i, r in enumerate(rows):
            if r["public_per_epoch"]:
                xs = range(1, len(r["public_per_epoch"]) + 1)
                ax.plot(xs, r["public_per_epoch"], marker="o", color=f"C{i}", label=r["run"])
        by = {r["run"]: r for r in rows}
        for name, style in (("main-only", "--"), ("original", ":")):
            ax.axhline(by[name]["accuracy"], color="k", ls=style, lw=1, label=name)
        ax.set_title(f"{setting}: M_res alone (test), mean of seeds", fontsize=9)
        ax.set_xlabel("stage-2 epoch")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=("digits", "cifar"), default="digits")
    parser.add_argument("--quick", action="store_true", help="one seed, tiny budget")
    parser.add_argument("--out", type=Path, default=RESULTS / "delta_diagnostic_runs")
    args = parser.parse_args()
    console = Console() if sys.stdout.isatty() else Console(width=170)
    if args.data == "cifar" and not CIFAR.is_dir():
        console.print(f"[yellow]skipped: {CIFAR} not found (CIFAR-10 image folders)[/]")
        return 0
    torch.set_num_threads(1)
    seeds = SEEDS[:1] if args.quick else SEEDS
    began = time.perf_counter()
    results: dict[str, list[dict[str, Any]]] = {}
    for k, (setting, base) in enumerate(settings(args.data, args.quick).items()):
        per_seed = []
        for seed in seeds:
            out = args.out / f"{args.data}{'-quick' if args.quick else ''}" / f"{k}" / f"{seed}"
            full = k == 0 and (args.data == "digits" or seed == seeds[0])  # CIFAR: CPU budget
            per_seed.append(run_seed(base, seed, out, full=full))
            console.print(f"{setting}, seed {seed}: {time.perf_counter() - began:.0f} s")
        rows = summarize(per_seed)
        results[setting] = rows
        table = Table(title=f"{setting}: noiseless (ε = ∞, clear labels), {len(seeds)} seeds")
        for col in ("run", "accuracy %", "M_res alone %", "w", "gap closed", "M_res per epoch"):
            table.add_column(col, justify="right")
        for r in rows:
            seeds_of = [p for p in per_seed if r["run"] in p]
            table.add_row(
                r["run"],
                pm([p[r["run"]]["accuracy"] for p in seeds_of]),
                pm([p[r["run"]]["public"] for p in seeds_of]),
                "-" if r["w"] is None else f"{r['w']:.2f}",
                "-" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%",
                " ".join(f"{100 * a:.0f}" for a in r["public_per_epoch"]),
            )
        console.print(table)
    seconds = time.perf_counter() - began
    console.print(f"wall time {seconds:.0f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = f"delta_diagnostic_{args.data}{'_quick' if args.quick else ''}"
    payload = {"quick": args.quick, "seeds": list(seeds), "settings": results, "seconds": seconds}
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2))
    DOCS.mkdir(exist_ok=True)
    plot(results, (RESULTS if args.quick else DOCS) / f"{name}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
