"""The Flower ``ServerApp``: sampling, private aggregation, accounting, evaluation and the run
directory, the same code under the simulation engine and the deployment engine.

:func:`serve` runs a whole federated training on a Flower ``Grid``:

1. sigma: ``config.sigma`` or calibrated to ``target_epsilon`` on the exact schedule
   (:func:`asymflow.federated.privacy.run_noise`);
2. a Flower ``FedAvg`` (it waits for the N nodes and builds the messages; no client
   evaluation) wrapped by :class:`asymflow.federated.strategy.ClientLevelDp` (our sampling,
   the blocks, the ledger row, the masked/clipped/noised aggregate with the fixed mean);
3. ``Strategy.start`` runs the rounds; after each one the server evaluates the released model
   on its test split, appends a ``metrics.jsonl`` row with the client-level epsilon so far and
   checkpoints the model (``ckpt/round{N}.pt``);
4. ``ckpt/final.pt``, ``result.json``, ``report.md`` and ``report.png``.

``resume=True`` continues the run in ``run_dir`` (same config) from its latest round
checkpoint: Flower's round 1 is the next round, the ledger keeps the rows of the cut round
(see :mod:`asymflow.federated.privacy`), and a finished run is summarized again.

The normalization constants sent to the clients are the channel statistics of the server's
TEST split (public), so no statistic of client data is needed or released.

``app`` (this module) is the deployment entry point: it reads the run config of
``flwr run`` (:meth:`FederatedConfig.from_run_config`, plus ``run-dir``, default
``runs/fl-<run id>`` relative to the ServerApp's working directory, and ``resume``, default
false). :func:`make_server_app`
builds the same app around a given config for :func:`asymflow.federated.run_federated`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.data import load_data
from asymflow.data.dataset import TensorImageDataset, channel_stats
from asymflow.federated.client_app import (
    IN_CHANNELS_KEY,
    NORM_MEAN_KEY,
    NORM_STD_KEY,
    NUM_CLASSES_KEY,
)
from asymflow.federated.config import FederatedConfig
from asymflow.federated.network import (
    build_network,
    load_weights,
    partition_plan,
    test_accuracy,
    weights_of,
)
from asymflow.federated.privacy import ClientLevelAccountant, run_noise
from asymflow.federated.report import write_report
from asymflow.federated.runs import (
    CONFIG_FILE,
    RESULT_FILE,
    FederatedResult,
    append_metrics,
    atomic_write_json,
    check_resumable,
    latest_round,
    load_round,
    read_metrics,
    read_result,
    save_final_model,
    save_round,
    truncate_metrics,
)
from asymflow.federated.selection import ClientSelector
from asymflow.federated.strategy import ClientLevelDp, arrays_to_weights, weights_to_arrays
from asymflow.progress import EpochBars
from asymflow.runfiles import SAMPLING_NOISE_SEEDS

__all__ = [
    "RESUME_KEY",
    "RUN_DIR_KEY",
    "SECRET_KEYS",
    "app",
    "client_config",
    "make_server_app",
    "serve",
]

RUN_DIR_KEY = "run-dir"
RESUME_KEY = "resume"
SECRET_KEYS = frozenset({"sampler-seed", "noise-seed"})
"""Run-config keys never sent to clients: the sampling and the noise must stay secret."""


def client_config(
    config: FederatedConfig,
    *,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    classes: int,
    channels: int,
) -> dict[str, Any]:
    """What every training message carries besides the block: the run config without its
    secrets, the normalization constants and the model's shape."""
    out: dict[str, Any] = {k: v for k, v in config.to_run_config().items() if k not in SECRET_KEYS}
    out[NORM_MEAN_KEY] = [float(m) for m in mean]
    out[NORM_STD_KEY] = [float(s) for s in std]
    out[NUM_CLASSES_KEY] = int(classes)
    out[IN_CHANNELS_KEY] = int(channels)
    return out


def serve(
    grid: Grid,
    config: FederatedConfig,
    run_dir: str | os.PathLike[str],
    *,
    progress: bool = False,
    resume: bool = False,
) -> FederatedResult:
    """Run ``config`` on ``grid`` into ``run_dir`` and return the summary (module docstring)."""
    began = time.perf_counter()
    run_path = Path(run_dir)
    resuming = check_resumable(run_path, config, resume, seed_pair=SAMPLING_NOISE_SEEDS)
    if resuming and (run_path / RESULT_FILE).is_file():
        return read_result(run_path)
    run_path.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_path / CONFIG_FILE, config.to_dict())
    torch.set_num_threads(config.threads)
    noise = run_noise(config)
    data = load_data(config.data, progress=progress)
    mean, std = channel_stats(data.test)
    test_set = TensorImageDataset(data.test, train=False, mean=mean, std=std)
    channels = data.test.image_shape[2]
    model = build_network(config, num_classes=len(data.classes), in_channels=channels)
    plan = partition_plan(model, config)
    done = 0
    found = latest_round(run_path) if resuming else None
    if found is not None:
        done, path = found
        load_weights(model, load_round(path, config))
    if resuming:
        truncate_metrics(run_path, done)
    metrics: list[dict[str, Any]] = read_metrics(run_path)
    ledger = PrivacyLedger.for_run(run_path)
    try:
        accountant = ClientLevelAccountant(config, noise.sigma, ledger, note=noise.note)
        strategy = ClientLevelDp(
            FedAvg(
                fraction_train=1.0,
                fraction_evaluate=0.0,
                min_train_nodes=config.clients,
                min_evaluate_nodes=0,
                min_available_nodes=config.clients,
            ),
            config=config,
            sigma=noise.sigma,
            plan=plan,
            selector=ClientSelector(config, seed=config.sampler_seed),
            accountant=accountant,
            noise_seed=config.noise_seed,
            client_config=client_config(
                config, mean=mean, std=std, classes=len(data.classes), channels=channels
            ),
            first_round=min(done + 1, config.rounds),
        )
        with EpochBars(progress, "federated") as bars:
            bars.stage("rounds", config.rounds, done)

            def evaluate(flower_round: int, arrays: Any) -> MetricRecord | None:
                if flower_round == 0 and metrics and metrics[-1]["round"] == done:
                    return None  # the starting model, evaluated before the cut
                server_round = done + flower_round
                weights = arrays_to_weights(arrays)
                load_weights(model, weights)
                acc = test_accuracy(model, test_set, config.eval_batch_size)
                report = strategy.last_epsilon if server_round > 0 else None
                row = {
                    "round": server_round,
                    "test_acc": acc,
                    "epsilon": 0.0 if report is None else report.epsilon,
                    "epsilon_method": "none" if report is None else report.method,
                    "delta": config.delta,
                    "sigma": noise.sigma,
                    "seconds": time.perf_counter() - began,
                }
                append_metrics(run_path, row)
                metrics.append(row)
                if server_round > 0:
                    save_round(run_path, server_round, weights, config)
                    info = f"acc {acc:.3f}  eps {row['epsilon']:.3f}"
                    bars.epoch_at(server_round, info)
                return MetricRecord({"accuracy": acc, "epsilon": float(row["epsilon"])})

            if done < config.rounds:
                strategy.start(
                    grid=grid,
                    initial_arrays=weights_to_arrays(weights_of(model)),
                    num_rounds=config.rounds - done,
                    timeout=config.round_timeout,
                    evaluate_fn=evaluate,
                )
        save_final_model(run_path, weights_of(model), config)
        final = accountant.epsilon()
    finally:
        ledger.close()
    result = FederatedResult(
        run_dir=str(run_path),
        sigma=noise.sigma,
        epsilon=final.epsilon,
        delta=config.delta,
        method=final.method,
        test_acc=float(metrics[-1]["test_acc"]) if metrics else 0.0,
        rounds=config.rounds,
        clients=config.clients,
        expected_clients=config.expected_clients,
        sampler=config.sampler,
        subnetwork=config.subnetwork,
        accounting=noise.note,
        calibrated=noise.planned_epsilon is not None,
        seconds=time.perf_counter() - began,
        metrics=metrics,
    )
    atomic_write_json(run_path / RESULT_FILE, result.to_dict())
    write_report(run_path)
    return result


def make_server_app(
    config: FederatedConfig,
    run_dir: str | os.PathLike[str],
    *,
    progress: bool = False,
    resume: bool = False,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """A ``ServerApp`` that runs :func:`serve` with ``config`` (the simulation passes no run
    config of its own); ``wrap_grid`` may wrap the runtime's grid first."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        wrapped = grid if wrap_grid is None else wrap_grid(grid)
        serve(wrapped, config, run_dir, progress=progress, resume=resume)

    return server


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Deployment entry point (``flwr run``): the config comes from the run config."""
    run_config = dict(context.run_config)
    config = FederatedConfig.from_run_config(run_config)
    run_dir = str(run_config.get(RUN_DIR_KEY) or f"runs/fl-{context.run_id}")
    serve(grid, config, run_dir, progress=False, resume=bool(run_config.get(RESUME_KEY, False)))
