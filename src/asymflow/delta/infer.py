"""Delta inference: z = z_main + w log_softmax(z_res), each query batch's residual released
with a ledger row.

The private side computes M_bb, the decomposition and z_main = M_main(features); it sanitizes
the query's residual (the same clip/noise/1-bit mechanism as in training, recorded in the
ledger first, scope ``query:{batch}``), sends it, receives z_res and adds the logits weighted
by the trust w fitted in training (:class:`~asymflow.delta.private.ResidualWeight`)
(Niu et al., CVPR 2024, arXiv 2312.05264, Sec. 3.4; DESIGN.md sec. 3 "Inference").
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from asymflow.accounting.events import event_from_dict
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.contract import PublicSide, ensemble_logits
from asymflow.delta.private import PrivateModel, ReleaseMechanism, mechanism_for_event
from asymflow.delta.runs import (
    DeltaConfig,
    latest_checkpoint,
    load_checkpoint,
    load_release,
    read_config,
)
from asymflow.delta.train import (
    build_original,
    build_private,
    build_public_factory,
    input_stats,
    load_run_data,
    payload_view,
)
from asymflow.public.local import LocalPublic

__all__ = ["DeltaSystem", "evaluate_run", "infer", "load_system"]


@dataclass
class DeltaSystem:
    """A trained variant ready for queries: the private model (or the original network), the
    public side, the release mechanism and the input normalization."""

    config: DeltaConfig
    model: nn.Module
    public: PublicSide | None
    mechanism: ReleaseMechanism | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    run_dir: Path | None = None

    def normalize(self, images: Tensor | np.ndarray) -> Tensor:
        """uint8 NHWC images -> normalized float NCHW; float NCHW tensors pass unchanged."""
        if isinstance(images, np.ndarray):
            if images.dtype != np.uint8 or images.ndim != 4:
                raise ValueError(
                    f"images must be uint8 (N, H, W, C) or a float tensor (N, C, H, W), "
                    f"got {images.dtype} {images.shape}"
                )
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
            mean = torch.tensor(self.mean).view(1, -1, 1, 1)
            std = torch.tensor(self.std).view(1, -1, 1, 1)
            return (x - mean) / std
        if not isinstance(images, Tensor) or images.dim() != 4 or not images.is_floating_point():
            raise ValueError("images must be a float tensor (N, C, H, W) or uint8 (N, H, W, C)")
        return images


def _release_event(run_dir: Path, state: dict[str, Any], config: DeltaConfig) -> Any:
    """The privacy event of the training release, to sanitize queries alike: from the
    checkpoint's release reference (format 2), an embedded copy (format 1), or the file."""
    names = ["train"] + [f"train_epoch{e}" for e in range(config.epochs_stage2, 0, -1)]
    for name in names:
        ref = state["released"].get(name)
        if isinstance(ref, Tensor):  # format 1: the payload itself
            with np.load(io.BytesIO(ref.numpy().tobytes()), allow_pickle=False) as data:
                return event_from_dict(json.loads(str(data["event"])))
        if ref is not None:
            return event_from_dict(json.loads(ref["event"]))
        arrays = load_release(run_dir, name)
        if arrays is not None:
            return event_from_dict(json.loads(str(arrays["event"])))
    raise FileNotFoundError(f"no released training payload found in {run_dir}")


def load_system(
    run_dir: str | os.PathLike[str],
    *,
    public: PublicSide | None = None,
    seed: int | None = None,
) -> DeltaSystem:
    """Rebuild a trained run from its latest checkpoint. Queries are sanitized with the noise
    level of the training release (``seed=None``: noise from the OS's secure source)."""
    run_dir = Path(run_dir)
    config = read_config(run_dir)
    found = latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"run_dir must hold a checkpoint, got {run_dir}")
    state = load_checkpoint(found[2])
    meta = state.get("meta")
    if meta is None:  # pragma: no cover - checkpoints always carry it
        data = load_run_data(config)
        h, w, c = data.train.image_shape
        mean, std = input_stats(config, data)
        meta = {"classes": len(data.classes), "image_shape": [h, w, c], "mean": mean, "std": std}
    classes = int(meta["classes"])
    in_channels = int(meta["image_shape"][2])
    if config.variant == "original":
        model: nn.Module = build_original(config, in_channels, classes)
    else:
        model = build_private(config, in_channels, classes)
        assert isinstance(model, PrivateModel)
        model.freeze_backbone()
        if state.get("format", 1) < 2:  # format 1 had no trust weight: z_main + z_res
            weights = {"residual_weight.weight": torch.ones(()), **state["model"]}
            state = {**state, "model": weights}
    model.load_state_dict(state["model"])
    model.eval()
    mechanism = None
    if config.releases_residual:
        if public is None:
            public = LocalPublic(
                build_public_factory(config, classes), eval_batch_size=config.eval_batch_size
            )
            if state["public"] is not None:
                public.load_state_dict(state["public"])
        mechanism = mechanism_for_event(
            _release_event(run_dir, state, config), config.clip, seed=seed
        )
    return DeltaSystem(
        config=config,
        model=model,
        public=public,
        mechanism=mechanism,
        mean=tuple(float(m) for m in meta["mean"]),
        std=tuple(float(s) for s in meta["std"]),
        run_dir=run_dir,
    )


@torch.no_grad()
def infer(
    source: str | os.PathLike[str] | DeltaSystem,
    images: Tensor | np.ndarray,
    *,
    batch_size: int = 256,
    ledger: PrivacyLedger | None = None,
    dataset: str = "queries",
    scope_prefix: str = "query",
) -> Tensor:
    """Logits of ``images`` (normalized float NCHW, or uint8 NHWC) in batches.

    Delta: z_main + w log_softmax(z_res) (z_res: mean of the public models' logits, w: the
    trust weight fitted in training); main-only: z_main;
    naive-dp: z_res; original: the network's logits.
    For the variants that release, every batch is one recorded release on ``dataset`` with
    scope ``f"{scope_prefix}:{batch_index}"``, written to ``ledger`` (default: the run's own
    ledger when ``source`` is a run directory) before its residual is sanitized.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got batch_size={batch_size!r}")
    system = source if isinstance(source, DeltaSystem) else load_system(source)
    x_all = system.normalize(images)
    releases = system.config.releases_residual
    own_ledger = None
    if releases and ledger is None:
        if system.run_dir is None:
            raise ValueError("ledger must be given for a variant that releases residuals")
        own_ledger = ledger = PrivacyLedger.for_run(system.run_dir)
    try:
        out = []
        for i, start in enumerate(range(0, len(x_all), batch_size)):
            out.append(
                _batch_logits(
                    system, x_all[start : start + batch_size], i, ledger, dataset, scope_prefix
                )
            )
        classes = out[0].shape[1] if out else 0
        return torch.cat(out) if out else torch.empty(0, classes)
    finally:
        if own_ledger is not None:
            own_ledger.close()


def _batch_logits(
    system: DeltaSystem,
    x: Tensor,
    index: int,
    ledger: PrivacyLedger | None,
    dataset: str,
    scope_prefix: str,
) -> Tensor:
    variant = system.config.variant
    model = system.model
    model.eval()
    if variant == "original":
        return model(x)
    assert isinstance(model, PrivateModel)
    dec = model.decompose(x)
    z_main = model.main(dec.features)
    if variant == "main-only":
        return z_main
    assert system.mechanism is not None and system.public is not None and ledger is not None
    release = system.mechanism.record_release(
        ledger, dataset=dataset, scope=f"{scope_prefix}:{index}", note="query release"
    )
    leaving = payload_view(model.ir(x) if variant == "naive-dp" else dec.residual, system.config)
    payload = system.mechanism.sanitize(leaving, release)
    z_res = ensemble_logits(system.public, payload, system.config.public_models)
    release.done()
    return z_res if variant == "naive-dp" else model.combine(z_main, z_res)


def evaluate_run(
    run_dir: str | os.PathLike[str], *, batch_size: int = 256, public: PublicSide | None = None
) -> dict[str, Any]:
    """Accuracy of a trained run on its data set's test split, queried through :func:`infer`
    (each batch recorded in the run's ledger on dataset ``"<data>/test-queries"``), with
    ``public`` as the public side (default: an in-process one holding the run's M_res).

    Returns the accuracy, the number of queries and the certified epsilon the queries spent.
    """
    system = load_system(run_dir, public=public)
    data = load_run_data(system.config)
    dataset = f"{system.config.data}/test-queries"
    with PrivacyLedger.for_run(Path(run_dir)) as ledger:
        logits = infer(
            system, data.test.images, batch_size=batch_size, ledger=ledger, dataset=dataset
        )
        report = ledger.epsilon(system.config.delta, dataset=dataset, scope="query:0")
    accuracy = float((logits.argmax(1) == torch.from_numpy(data.test.labels)).float().mean())
    eps = float(report.epsilon)
    return {
        "run_dir": str(run_dir),
        "variant": system.config.variant,
        "accuracy": accuracy,
        "queries": len(data.test),
        "batches": math.ceil(len(data.test) / batch_size),
        "epsilon_per_query": "inf" if math.isinf(eps) else eps,
        "epsilon_method": report.method,
        "delta": system.config.delta,
    }
