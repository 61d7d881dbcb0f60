"""The two DP-SGD step paths on digits: our ``private_step`` against Opacus's ``DPOptimizer``.

    python bench/dpsgd_paths.py            # 3 settings x 3 seeds x 2 paths (~5 min on 1 core)
    python bench/dpsgd_paths.py --quick    # 1 epoch, 1 seed

Both paths run the same model, batches (our samplers, same seeds), per-sample gradients
(Opacus's ``GradSampleModule``), clip norm C, multiplier sigma and divisor (the declared
``batch_size`` B, a public constant), and draw masks then noise from the same per-epoch
generator:

- ``own``: :func:`asymflow.dpsgd.train.private_step`, as ``asymflow dpsgd train`` runs it
  (``loss_reduction="sum"``; mask, clip, sum, N(0, sigma^2 C^2), divide by B);
- ``opacus``: stock ``PrivacyEngine.make_private`` with our sampler's loader and accountant
  (``poisson_sampling=False``, ``loss_reduction="mean"``, ``expected_batch_size`` set to B), the
  way Opacus users write the loop. For ``split:d`` the per-record masks are applied by
  overwriting ``p.grad_sample`` between ``backward()`` and ``step()``; partial splitting (a
  shared part clipped to its own C_shared) has no such shim and is not run.

The two paths train in lockstep on the same batches, alternating which one steps first, so that
both see the same load on the (shared) machine. Per setting and path: the median wall time of
one step (forward, backward, aggregation, accountant, update; batch loading excluded), the
median over steps of the ratio opacus / own on the same batch (mean over seeds), and the test
accuracy after the run, mean +- sd over the seeds. ``first_step_max_diff`` is the
largest |theta_own - theta_opacus| after one step from the same state, batch and generator:
the two mechanisms are the same up to rounding (Opacus clips with C / (||g|| + 1e-6)).
Prints a table and writes bench/results/dpsgd_paths.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from opacus import GradSampleModule, PrivacyEngine
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.nn import functional

from asymflow.data import load_data
from asymflow.dpsgd.loader import make_sampler, private_loader
from asymflow.dpsgd.opacus_accountant import AsymflowAccountant
from asymflow.dpsgd.partition import PartitionPlan, plan_partition, step_accounting
from asymflow.dpsgd.runs import DpsgdConfig
from asymflow.dpsgd.train import private_step
from asymflow.models import build_model

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS: dict[str, dict[str, Any]] = {
    "default (balanced k=1)": {},
    "balanced k=2": {"k": 2},
    "poisson split:2": {"sampler": "poisson", "partition": "split:2"},
}
SIGMA = 1.0


def _model(config: DpsgdConfig, data: Any) -> nn.Module:
    _, _, channels = data.train.image_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return build_model(
            config.model,
            num_classes=len(data.classes),
            in_channels=channels,
            norm=config.norm,
            width=config.width,
        )


def _generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(1000 * seed + epoch)


@torch.no_grad()
def _accuracy(model: nn.Module, dataset: Any) -> float:
    model.eval()
    x, y = dataset.get_batch(range(len(dataset)))
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


class OwnPath:
    """``asymflow dpsgd train``'s step."""

    def __init__(self, config: DpsgdConfig, model: nn.Module, plan: PartitionPlan, sampler: Any):
        self.config, self.plan = config, plan
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        self.params = plan.parameters(model)
        self.optimizer = torch.optim.SGD(self.params, lr=config.lr, momentum=config.momentum)
        accounting = step_accounting(config.partition_spec, config.sampler, has_shared=False)
        self.accountant = AsymflowAccountant(
            sampler, step_event=accounting.event, methods=config.methods
        )
        self.generator = torch.Generator()

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        private_step(
            self.module,
            self.params,
            self.plan,
            batch,
            optimizer=self.optimizer,
            accountant=self.accountant,
            clip=self.config.clip,
            sigma=SIGMA,
            normalizer=self.config.batch_size,
            generator=self.generator,
        )


class OpacusPath:
    """Stock ``PrivacyEngine.make_private`` with our sampler's loader and our accountant."""

    def __init__(self, config: DpsgdConfig, model: nn.Module, plan: PartitionPlan, sampler: Any):
        self.plan = plan
        self.params = plan.parameters(model)
        engine = PrivacyEngine()
        engine.accountant = AsymflowAccountant(sampler, methods=config.methods)
        self.module, self.optimizer, _ = engine.make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum),
            data_loader=private_loader(_Empty(), sampler),
            noise_multiplier=SIGMA,
            max_grad_norm=config.clip,
            poisson_sampling=False,
            noise_generator=torch.Generator(),
        )
        # make_private sets int(N / len(loader)): N/T for BIS, and private under add/remove.
        self.optimizer.expected_batch_size = config.batch_size

    @property
    def generator(self) -> torch.Generator:
        return self.optimizer.generator

    @generator.setter
    def generator(self, value: torch.Generator) -> None:
        self.optimizer.generator = value

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = batch
        self.optimizer.zero_grad()
        functional.cross_entropy(self.module(x), y).backward()
        if self.plan.spec.kind != "none":  # the per-record masks, drawn before the noise
            shapes = [p.shape for p in self.params]
            masks = self.plan.draw_masks(len(y), shapes, self.generator)
            for p, m in zip(self.params, masks, strict=True):
                if m is not None:
                    p.grad_sample = p.grad_sample * m
        self.optimizer.step()


class _Empty(torch.utils.data.Dataset[Any]):
    """make_private needs a loader; the bench feeds the batches itself."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.zeros(1), 0

    def __len__(self) -> int:
        return 1


PATHS = {"own": OwnPath, "opacus": OpacusPath}


def run(config: DpsgdConfig, data: Any) -> dict[str, dict[str, Any]]:
    """Train ``config`` with both paths in lockstep on the same batches, alternating which path
    steps first, so that both see the same load on the machine; per path, the step wall times
    and the final test accuracy."""
    train_set, test_set = data.tensor_datasets(augment=config.augment, seed=config.seed)
    steps = config.steps_for(len(train_set))
    sampler = make_sampler(
        config.sampler, len(train_set), steps=steps, k=config.k, seed=config.sampler_seed
    )
    models = {path: _model(config, data) for path in PATHS}
    runners = {
        path: kind(
            config, models[path], plan_partition(models[path], config.partition_spec), sampler
        )
        for path, kind in PATHS.items()
    }
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    loader = private_loader(train_set, sampler)
    for epoch in range(1, config.epochs + 1):
        train_set.set_epoch(epoch)
        sampler.set_epoch(epoch - 1)
        for runner in runners.values():
            runner.generator = _generator(config.noise_seed, epoch)
        for i, batch in enumerate(loader):
            order = list(PATHS) if i % 2 == 0 else list(reversed(PATHS))
            for path in order:
                began = time.perf_counter()
                runners[path].step(batch)
                times[path].append(time.perf_counter() - began)
    return {
        path: {
            "step_ms_median": 1e3 * statistics.median(times[path]),
            "ratio_to_own_median": statistics.median(
                t / o for t, o in zip(times[path], times["own"], strict=True)
            ),
            "steps": len(times[path]),
            "test_acc": _accuracy(models[path], test_set),
        }
        for path in PATHS
    }


def first_step_difference(config: DpsgdConfig, data: Any) -> float:
    """max |theta_own - theta_opacus| after one step from the same state, batch and noise."""
    train_set, _ = data.tensor_datasets(augment=False, seed=config.seed)
    steps = config.steps_for(len(train_set))
    sampler = make_sampler(config.sampler, len(train_set), steps=steps, k=config.k, seed=0)
    batch = next(iter(private_loader(train_set, sampler)))
    finals = []
    for path in ("own", "opacus"):
        model = _model(config, data)
        runner = PATHS[path](config, model, plan_partition(model, config.partition_spec), sampler)
        runner.generator = _generator(0, 1)
        runner.step(batch)
        finals.append([p.detach().clone() for p in model.parameters()])
    return max(float((a - b).abs().max()) for a, b in zip(*finals, strict=True))


def _fmt(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch, 1 seed")
    parser.add_argument("--out", type=Path, default=RESULTS / "dpsgd_paths.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    seeds = [0] if args.quick else [0, 1, 2]
    data = load_data("digits", progress=False)
    rows: list[dict[str, Any]] = []
    for name, overrides in SETTINGS.items():
        base = DpsgdConfig(sigma=SIGMA, **overrides, **({"epochs": 1} if args.quick else {}))
        per_seed = []
        for seed in seeds:
            config = DpsgdConfig.from_dict(
                {**base.to_dict(), "seed": seed, "sampler_seed": seed, "noise_seed": seed}
            )
            per_seed.append(run(config, data))
        diff = first_step_difference(base, data)
        for path in PATHS:
            results = [r[path] for r in per_seed]
            rows.append(
                {
                    "setting": name,
                    "path": path,
                    "config": {**base.to_dict(), "seed": seeds},
                    "step_ms_median": statistics.fmean(r["step_ms_median"] for r in results),
                    "ratio_to_own": statistics.fmean(r["ratio_to_own_median"] for r in results),
                    "test_acc": [r["test_acc"] for r in results],
                    "steps": results[0]["steps"],
                    "first_step_max_diff": diff if path == "opacus" else 0.0,
                }
            )
    table = Table(title=f"DP-SGD step paths on digits (sigma={SIGMA}, C=1, B=64, 1 thread)")
    for col in ("setting", "path", "steps", "ms/step", "vs own", "test acc", "1st-step diff"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["setting"],
            r["path"],
            str(r["steps"]),
            f"{r['step_ms_median']:.1f}",
            f"{r['ratio_to_own']:.3f}",
            _fmt(r["test_acc"]),
            f"{r['first_step_max_diff']:.1e}",
        )
    Console(width=120).print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": {"python": sys.version.split()[0], "platform": platform.platform()},
        "torch": torch.__version__,
        "seeds": seeds,
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
