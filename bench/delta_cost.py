"""Wall time of Delta's private side against the original network run entirely in private.

    python bench/delta_cost.py              # digits and CIFAR, batch 1/64/256 (~1 min idle)
    python bench/delta_cost.py --quick      # fewer repeats, a smoke test (~2 min)
    python bench/delta_cost.py --profile    # torch.profiler table of one private step first

Per sample, split by component: stem M_bb, decomposition (SVD + block DCT, and their backward
in stage 1), M_main (forward, backward and the SGD step), sanitizer (clip, noise, 1 bit, packing)
and ledger writes (the durable row before a release and its "released" mark), for

- ``train s1``: a stage-1 step (M_main learns from the main part; nothing leaves; M_bb is
  frozen at its seeded init by default, trained too with ``backbone="trained"``);
- ``train s2``: a stage-2 step with a per-epoch release, as ``asymflow.delta.train`` runs it:
  the release pass (M_bb, decomposition, sanitizer in cache-sized chunks; one ledger row per
  release of the whole training set, so its cost is divided by the training-set size) and
  M_main's step on the features that pass computed for the same views (each view is
  decomposed once per epoch);
- ``infer``: a query batch as ``asymflow.delta.infer`` serves it (ledger row, M_bb,
  decomposition, M_main, sanitizer, "released" mark);

beside the original network (``original_model``, what ``variant="original"`` trains): one SGD
step (training) or one forward pass (inference) on the same batch, with channels-last weights
like M_main's (its faster layout on CPU too, 5-25%, so the comparison is like for like).
Private and original steps are interleaved in one process with the same threads; a row's ratio
is the median over repeats of (private / original) of adjacent measurements, which cancels most
of the load of a shared machine. Absolute times are noisy; ratios are what to read. The
decomposition writes the residual over the IR, as ``PrivateModel.decompose`` does.
The allocator matters too: with glibc's defaults, tensors above its mmap threshold get fresh
pages on every allocation, which the original network's large activations pay more often.
``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824`` keeps
freed memory for reuse (recorded in the JSON).

Configurations: digits (the ``DeltaConfig`` defaults: 16x16 images, IR 32 channels, r=8,
t/t'=16/8, the demo widths, ResNet-20 at width 0.5; the bundled digits images) and the CIFAR
bench's (32x32, IR 64 channels, r=8, t/t'=16/8, widths (16, 64, 128), ranks (8, 12, 24),
ResNet-20; synthetic 32x32 images with a natural 1/f amplitude spectrum, no download).
Also reported: the fraction of IR energy kept private, ||main||^2/||X||^2, by the
decomposition in use and by the exact SVD on the same IRs (the best a rank-r basis can do).

Prints a table, writes bench/results/delta_cost.json and docs/delta_cost.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import Tensor
from torch.nn import functional

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.data import load_digits
from asymflow.delta.decompose import decompose
from asymflow.delta.private import PrivateModel, release_chunk_rows
from asymflow.delta.runs import DeltaConfig
from asymflow.delta.sanitize import Sanitizer
from asymflow.delta.train import build_original, build_private
from delta_cifar import PRIVATE_RANKS, PRIVATE_WIDTHS  # the CIFAR bench's private model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CHART = ROOT / "docs" / "delta_cost.png"

CIFAR_TRAIN_SIZE = 50_000
CLASSES = 10
COMPONENTS = ("stem", "decomp", "main", "sanitize", "ledger")
MODES = ("train s1", "train s2", "infer")


def configs() -> dict[str, DeltaConfig]:
    digits = DeltaConfig(threads=1)
    cifar = replace(
        digits,
        image_size=32,
        ir_channels=64,
        r=8,
        t=16,
        t_low=8,
        private_widths=PRIVATE_WIDTHS,
        private_ranks=PRIVATE_RANKS,
        public_arch="resnet20",
        public_width=1.0,
    )
    return {"digits": digits, "cifar": cifar}


def natural_images(n: int, size: int, seed: int = 0) -> Tensor:
    """Synthetic RGB images (n, 3, size, size) with a 1/f amplitude spectrum and correlated
    channels, standardized per channel: the second-order statistics of natural images."""
    gen = torch.Generator().manual_seed(seed)
    f = torch.fft.fftfreq(size)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2).clamp_min(1.0 / size)
    phase = torch.rand(n, 1, size, size, generator=gen) * 2 * math.pi
    gray = torch.fft.ifft2(torch.polar(1.0 / radius, phase)).real
    tint = 0.2 * torch.randn(n, 3, size, size, generator=gen)
    x = gray + tint * gray.std()
    return (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)


def inputs(name: str, config: DeltaConfig, n: int) -> tuple[Tensor, int]:
    """n normalized images of the configuration and its training-set size."""
    if name == "digits":
        data = load_digits(size=config.image_size)
        images = torch.from_numpy(data.train.images).permute(0, 3, 1, 2).float() / 255.0
        images = (images - images.mean((0, 2, 3), keepdim=True)) / images.std(
            (0, 2, 3), keepdim=True
        )
        idx = torch.arange(n) % len(images)
        return images[idx], len(data.train)
    return natural_images(n, config.image_size), CIFAR_TRAIN_SIZE


class Clock:
    """Accumulates wall time per component: ``with clock("stem"): ...``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._name = ""
        self._began = 0.0

    def __call__(self, name: str) -> Clock:
        self._name = name
        return self

    def __enter__(self) -> None:
        self._began = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds[self._name] += time.perf_counter() - self._began


class Bench:
    """The models, optimizers, sanitizer and ledger of one configuration."""

    def __init__(self, config: DeltaConfig, x: Tensor, n_train: int, ledger: PrivacyLedger):
        self.config = config
        self.x = x
        self.n_train = n_train
        self.ledger = ledger
        self.y = torch.arange(len(x)) % CLASSES
        self.private = build_private(config, 3, CLASSES)  # stage 1
        if config.backbone == "frozen":  # the default: M_bb fixed at its seeded init
            self.private.freeze_backbone()
        self.frozen = build_private(config, 3, CLASSES)  # stage 2: M_bb frozen
        self.frozen.freeze_backbone()
        # like M_main (PrivateModel), the original network in its faster channels-last layout
        self.original = build_original(config, 3, CLASSES).to(memory_format=torch.channels_last)
        self.opt_private = self.sgd(self.private)
        self.opt_frozen = self.sgd(self.frozen)
        self.opt_original = self.sgd(self.original)
        self.sanitizer = Sanitizer(config.clip, 1.0, seed=0)

    def sgd(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=1e-3, momentum=c.momentum, weight_decay=c.weight_decay)

    def penalty(self, model: PrivateModel) -> Tensor:
        return model.main.orthogonality_penalty(self.config.alpha)

    def stage1(self, x: Tensor, y: Tensor, clock: Clock) -> None:
        """train.py run_stage1 for a private variant, each backward timed with its forward
        (M_bb's only with ``backbone="trained"``)."""
        model = self.private
        model.train()
        trained = not model.backbone_frozen
        with clock("stem"), torch.set_grad_enabled(trained):
            ir = model.ir(x)
            ir_leaf = ir.detach().requires_grad_(trained)
        with clock("decomp"):
            feats = model.features_of_ir(ir_leaf)
            feats_leaf = feats.detach().requires_grad_(trained)
        with clock("main"):
            z = model.main(feats_leaf)
            loss = functional.cross_entropy(z, y) + self.penalty(model)
            self.opt_private.zero_grad(set_to_none=True)
            loss.backward()
        if trained:
            with clock("decomp"):
                feats.backward(feats_leaf.grad)
            with clock("stem"):
                ir.backward(ir_leaf.grad)
        with clock("main"):
            self.opt_private.step()

    def stage2(self, x: Tensor, y: Tensor, clock: Clock) -> None:
        """train.py stage 2 with a per-epoch release: release pass, then M_main's step."""
        model = self.frozen
        sanitizer = self.sanitizer
        began = time.perf_counter()  # one row per release of the whole training set
        release = sanitizer.record_release(self.ledger, dataset="bench", scope="train")
        release.done()
        clock.seconds["ledger"] += (time.perf_counter() - began) * len(x) / self.n_train
        model.eval()
        c = self.config
        rows = release_chunk_rows(c.ir_channels * c.image_size**2, c.eval_batch_size)
        kept = []
        for i in range(0, len(x), rows):  # train.py's release chunks
            with torch.no_grad():
                with clock("stem"):
                    ir = model.ir(x[i : i + rows])
                with clock("decomp"):
                    dec = decompose(ir, r=model.r, t=model.t, t_low=model.t_low, overwrite=True)
            with clock("sanitize"):
                sanitizer.sanitize(dec.residual, release)
            kept.append(dec.features)  # M_main's input, from the same decomposition
        model.train()
        feats = torch.cat(kept)
        with clock("main"):
            z = model.combine(model.main(feats), torch.zeros(len(x), CLASSES))
            loss = functional.cross_entropy(z, y) + self.penalty(model)
            self.opt_frozen.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_frozen.step()

    def infer(self, x: Tensor, clock: Clock) -> None:
        """infer.py _batch_logits for Delta (the public logits are not the private side's)."""
        model = self.frozen
        model.eval()
        with clock("ledger"):
            release = self.sanitizer.record_release(self.ledger, dataset="bench", scope="query")
        with torch.no_grad():
            with clock("stem"):
                ir = model.ir(x)
            with clock("decomp"):
                dec = decompose(ir, r=model.r, t=model.t, t_low=model.t_low, overwrite=True)
            with clock("main"):
                model.main(dec.features)
            with clock("sanitize"):
                self.sanitizer.sanitize(dec.residual, release)
        with clock("ledger"):
            release.done()

    def original_train(self, x: Tensor, y: Tensor, clock: Clock) -> None:
        self.original.train()
        with clock("total"):
            loss = functional.cross_entropy(self.original(x), y)
            self.opt_original.zero_grad(set_to_none=True)
            loss.backward()
            self.opt_original.step()

    def original_infer(self, x: Tensor, clock: Clock) -> None:
        self.original.eval()
        with clock("total"), torch.no_grad():
            self.original(x)

    @torch.no_grad()
    def energy(self, n: int = 256) -> dict[str, float]:
        """Mean ||main||^2/||X||^2 of the decomposition in use and of the exact SVD."""
        model = self.private
        model.eval()
        ir = model.ir(self.x[:n])
        kw = {"r": model.r, "t": model.t, "t_low": model.t_low}
        fast = decompose(ir, **kw).energy_fraction
        exact = decompose(ir.double(), exact=True, **kw).energy_fraction
        return {
            "energy_private": float(fast.mean()),
            "energy_private_exact_svd": float(exact.mean()),
            "energy_gap_worst": float((exact - fast).max()),
        }


def timed(step: Callable[[Clock], None], calls: int) -> dict[str, float]:
    """Seconds per call of each component over ``calls`` calls of ``step``."""
    clock = Clock()
    for _ in range(calls):
        step(clock)
    return {k: v / calls for k, v in clock.seconds.items()}


def measure(bench: Bench, batch: int, repeats: int, min_seconds: float) -> list[dict]:
    """Interleaved private and original steps at ``batch``; one row per mode."""
    offsets = torch.randperm(len(bench.x) - batch + 1, generator=torch.Generator().manual_seed(0))

    def data(i: int) -> tuple[Tensor, Tensor]:
        start = int(offsets[i % len(offsets)])
        return bench.x[start : start + batch], bench.y[start : start + batch]

    counter = iter(range(10**9))
    steps: dict[str, Callable[[Clock], None]] = {
        "train s1": lambda c: bench.stage1(*data(next(counter)), c),
        "train s2": lambda c: bench.stage2(*data(next(counter)), c),
        "infer": lambda c: bench.infer(data(next(counter))[0], c),
        "original train": lambda c: bench.original_train(*data(next(counter)), c),
        "original infer": lambda c: bench.original_infer(data(next(counter))[0], c),
    }
    # warm up, and size each measurement to >= min_seconds of work
    calls = {}
    for name, step in steps.items():
        began = time.perf_counter()
        timed(step, 2)
        per_call = (time.perf_counter() - began) / 2
        calls[name] = max(1, math.ceil(min_seconds / per_call))
    samples: dict[str, list[dict[str, float]]] = defaultdict(list)
    for rep in range(repeats):
        order = list(steps) if rep % 2 == 0 else list(reversed(steps))
        for name in order:
            samples[name].append(timed(steps[name], calls[name]))
    rows = []
    for mode in MODES:
        reference = "original infer" if mode == "infer" else "original train"
        private = samples[mode]
        original = [s["total"] for s in samples[reference]]
        totals = [sum(s.values()) for s in private]
        per_sample = 1e3 / batch
        row = {
            "mode": mode,
            "batch": batch,
            **{
                f"{k}_ms": per_sample * statistics.median(s.get(k, 0.0) for s in private)
                for k in COMPONENTS
            },
            "private_ms": per_sample * statistics.median(totals),
            "original_ms": per_sample * statistics.median(original),
            "ratio": statistics.median(p / o for p, o in zip(totals, original, strict=True)),
            "repeats": repeats,
            "calls_per_repeat": calls[mode],
        }
        rows.append(row)
    return rows


def profile(bench: Bench, batch: int, console: Console) -> None:
    """torch.profiler: the operators of one stage-1 step, one stage-2 step and one query."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x, y = bench.x[:batch], bench.y[:batch]
    for name, step in (
        ("train s1", lambda c: bench.stage1(x, y, c)),
        ("train s2", lambda c: bench.stage2(x, y, c)),
        ("infer", lambda c: bench.infer(x, c)),
    ):
        timed(step, 1)
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            timed(step, 2)
        console.print(f"[bold]{name}[/], batch {batch}")
        console.print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


def print_table(console: Console, results: list[dict]) -> None:
    table = Table(title="Delta private side vs the original network in private (ms per sample)")
    for col in ("config", "mode", "B", *COMPONENTS, "private", "original", "ratio", "energy"):
        table.add_column(col, justify="left" if col in ("config", "mode") else "right")
    for res in results:
        for row in res["rows"]:
            ratio = row["ratio"]
            target = 0.25 if res["config"] == "cifar" else 1.0
            style = "green" if ratio <= target else "red"
            table.add_row(
                res["config"],
                row["mode"],
                str(row["batch"]),
                *(f"{row[f'{k}_ms']:.3f}" for k in COMPONENTS),
                f"{row['private_ms']:.3f}",
                f"{row['original_ms']:.3f}",
                f"[{style}]{ratio:.3f}[/]",
                f"{res['energy']['energy_private']:.4f}",
            )
    console.print(table)
    console.print(
        "targets: cifar ratio <= 0.25 (train and infer), digits <= 1; energy: ||main||^2/||X||^2 "
        "(exact SVD: "
        + ", ".join(f"{r['config']} {r['energy']['energy_private_exact_svd']:.4f}" for r in results)
        + ")"
    )


def chart(results: list[dict], path: Path, before: list[dict] | None = None) -> None:
    """Private side per sample as a fraction of the original network's, split by component;
    with ``before`` (an earlier run's results), its ratio as a black tick on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results) + 1, 4.2), squeeze=False)
    colors = dict(zip(COMPONENTS, plt.get_cmap("tab10").colors, strict=False))
    for ax, res in zip(axes[0], results, strict=True):
        labels, bottoms = [], []
        rows = res["rows"]
        for i, row in enumerate(rows):
            labels.append(f"{row['mode']}\nB={row['batch']}")
            bottom = 0.0
            for k in COMPONENTS:
                share = row[f"{k}_ms"] / row["original_ms"]
                ax.bar(i, share, bottom=bottom, color=colors[k], label=k if i == 0 else None)
                bottom += share
            bottoms.append(bottom)
        old = {
            (row["mode"], row["batch"]): row["private_ms"] / row["original_ms"]
            for r in before or []
            if r["config"] == res["config"]
            for row in r["rows"]
        }
        ticks = [old.get((row["mode"], row["batch"])) for row in rows]
        top = min(max(bottoms + [t for t in ticks if t is not None]) * 1.1, 2.5)
        for i, tick in enumerate(ticks):
            if tick is not None:
                label = "before (sum)" if i == 0 else None
                ax.plot(i, min(tick, top * 0.99), "k_", ms=18, mew=2, label=label)
        for i, b in enumerate(bottoms):
            if b > top:
                ax.text(i, top * 0.97, f"{b:.1f}", ha="center", va="top", fontsize=7)
        target = 0.25 if res["config"] == "cifar" else 1.0
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(target, color="red", ls="--", lw=0.8, label="target")
        ax.set_ylim(0, top)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("private side / original network (wall time)")
        ax.set_title(f"{res['config']}: energy kept private {res['energy']['energy_private']:.3f}")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (both sides)")
    parser.add_argument("--batches", default="1,64,256", help="comma-separated batch sizes")
    parser.add_argument("--configs", default="digits,cifar", help="digits, cifar or both")
    parser.add_argument("--profile", action="store_true", help="torch.profiler tables first")
    parser.add_argument("--json", type=Path, default=RESULTS / "delta_cost.json")
    parser.add_argument("--chart", type=Path, default=CHART)
    parser.add_argument("--before", type=Path, help="an earlier JSON, drawn as ticks on the chart")
    parser.add_argument("--replot", action="store_true", help="redraw the chart from --json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console(width=150)
    batches = [int(b) for b in args.batches.split(",")]
    repeats = 3 if args.quick else 7
    min_seconds = 0.05 if args.quick else 0.15
    before = json.loads(args.before.read_text())["results"] if args.before else None
    if args.replot:
        chart(json.loads(args.json.read_text())["results"], args.chart, before)
        return 0
    results = []
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.for_run(tmp)
        for name in args.configs.split(","):
            config = configs()[name]
            x, n_train = inputs(name, config, max(batches) * 4)
            bench = Bench(config, x, n_train, ledger)
            if args.profile:
                profile(bench, 64, console)
            rows = []
            for batch in batches:
                rows += measure(bench, batch, repeats, min_seconds)
                console.print(f"{name} B={batch} done ({time.perf_counter() - began:.0f} s)")
            energy = bench.energy()
            results.append(
                {"config": name, "settings": config.to_dict(), "rows": rows, "energy": energy}
            )
        ledger.close()
    print_table(console, results)
    out = {
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),  # the allocator's settings
        "seconds": time.perf_counter() - began,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    chart(results, args.chart, before)
    console.print(f"wrote {args.json} and {args.chart} ({out['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
