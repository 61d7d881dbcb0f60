"""The three audits as plain functions of command-line-like arguments.

``asymflow audit reconstruct|membership|canary`` and ``bench/audit.py`` call these: each loads
what it needs (a data spec, optionally a Delta run directory), runs the audit, writes its JSON
(and, for reconstruction, the PNG grid) to ``out_dir`` when given, and returns the JSON-ready
dictionary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asymflow.audit.canary import SamplerSetting, audit_canary
from asymflow.audit.membership import PublicTraining, audit_membership
from asymflow.audit.reconstruct import DecoderConfig, audit_reconstruction, image_grid
from asymflow.audit.views import PublicViewer, ViewSpec
from asymflow.data import ImageData, load_data
from asymflow.runfiles import jsonable

__all__ = [
    "DEFAULT_CANARY_SETTINGS",
    "load_viewer",
    "run_canary",
    "run_membership",
    "run_reconstruction",
]

DEFAULT_CANARY_SETTINGS: tuple[tuple[SamplerSetting, float], ...] = (
    (SamplerSetting("poisson", steps=1, q=1.0), 0.5),
    (SamplerSetting("balanced", steps=1, k=1), 0.5),
    (SamplerSetting("poisson", steps=10, q=0.1), 1.0),
    (SamplerSetting("balanced", steps=10, k=1), 1.0),
    (SamplerSetting("balanced", steps=8, k=2), 1.0),
    (SamplerSetting("poisson", steps=100, q=0.01), 0.5),
    (SamplerSetting("balanced", steps=100, k=1), 0.5),
)
"""(sampler, sigma) rows of the canary table: no subsampling first (where the audit is
tight), then subsampled passes at the same expected batch fraction for Poisson and BIS."""


def _write(out_dir: str | os.PathLike[str] | None, name: str, payload: dict[str, Any]) -> None:
    if out_dir is None:
        return
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=2, sort_keys=True) + "\n")


def load_viewer(
    data: ImageData,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    ir_channels: int = 64,
    r: int = 8,
    t: int = 16,
    t_low: int = 8,
    clip: float = 1.0,
    delta: float = 1e-5,
    seed: int = 0,
) -> PublicViewer:
    """The trained M_bb of ``run_dir`` if given, else a fixed random init with the other
    arguments (normalized with ``data``'s training statistics)."""
    if run_dir is not None:
        return PublicViewer.from_run(run_dir)
    mean, std = data.channel_stats()
    return PublicViewer.random(
        in_channels=data.train.image_shape[2],
        ir_channels=ir_channels,
        mean=mean,
        std=std,
        r=r,
        t=t,
        t_low=t_low,
        clip=clip,
        delta=delta,
        seed=seed,
    )


def _data(spec: str | None, run_dir: str | os.PathLike[str] | None) -> ImageData:
    if spec is None:
        if run_dir is None:
            raise ValueError("data must be given when no run_dir is")
        from asymflow.delta.runs import read_config
        from asymflow.delta.train import load_run_data

        return load_run_data(read_config(run_dir))
    return load_data(spec, progress=False)


def run_reconstruction(
    data: str | None,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    views: Sequence[str] = ("ir", "sign", "delta:9", "delta:1.4", "none"),
    aux: int | None = None,
    private: int | None = None,
    decoder: DecoderConfig | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    grid: str | os.PathLike[str] | None = None,
    seed: int = 0,
    threads: int = 1,
    viewer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Model inversion: the decoder is trained on ``aux`` training images and scored on
    ``private`` test images, both drawn by a permutation seeded with ``seed`` (the image
    folders are sorted by class, so a prefix would hold few classes). Writes
    ``reconstruction.json`` to ``out_dir`` and the PNG grid to ``grid`` (default
    ``out_dir/reconstruction.png``)."""
    torch.set_num_threads(threads)
    dataset = _data(data, run_dir)
    viewer = load_viewer(dataset, run_dir=run_dir, seed=seed, **(viewer_kwargs or {}))
    rng = np.random.default_rng(seed)
    pick_aux = np.sort(rng.permutation(len(dataset.train))[: aux or len(dataset.train)])
    pick_private = rng.permutation(len(dataset.test))[: private or len(dataset.test)]
    aux_images = dataset.train.images[pick_aux]
    private_images = dataset.test.images[pick_private]
    result = audit_reconstruction(
        viewer,
        aux_images,
        private_images,
        views=[ViewSpec.parse(v) for v in views],
        decoder=decoder,
        noise_seed=seed,
    )
    payload = {"data": dataset.name, **result.to_dict()}
    if grid is None and out_dir is not None:
        grid = Path(out_dir) / "reconstruction.png"
    if grid is not None:
        payload["grid"] = str(image_grid(result, grid))
    _write(out_dir, "reconstruction.json", payload)
    return payload


def run_membership(
    data: str | None,
    *,
    run_dir: str | os.PathLike[str] | None = None,
    views: Sequence[str] = ("sign", "delta:1.4"),
    members: int = 500,
    training: PublicTraining | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    threads: int = 1,
    viewer_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """ML-Leaks and loss-threshold attacks on M_res, members drawn from the training and test
    images together. With ``run_dir`` the run's M_res architecture is used. Writes
    ``membership.json`` to ``out_dir``."""
    torch.set_num_threads(threads)
    dataset = _data(data, run_dir)
    viewer = load_viewer(dataset, run_dir=run_dir, seed=seed, **(viewer_kwargs or {}))
    images = np.concatenate([dataset.train.images, dataset.test.images])
    labels = np.concatenate([dataset.train.labels, dataset.test.labels])
    factory = None
    if run_dir is not None:
        from asymflow.delta.runs import read_config
        from asymflow.delta.train import build_public_factory

        factory = build_public_factory(read_config(run_dir), len(dataset.classes))
    results = audit_membership(
        viewer,
        images,
        labels,
        classes=len(dataset.classes),
        views=[ViewSpec.parse(v) for v in views],
        members=members,
        training=training,
        model_factory=factory,
        seed=seed,
    )
    payload = {
        "data": dataset.name,
        "backbone": viewer.source,
        "members": members,
        "rows": [r.to_dict() for r in results],
    }
    _write(out_dir, "membership.json", payload)
    return payload


def run_canary(
    settings: Sequence[tuple[SamplerSetting, float]] = DEFAULT_CANARY_SETTINGS,
    *,
    trials: int = 10_000,
    delta: float = 1e-5,
    confidence: float = 0.95,
    out_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    threads: int = 1,
) -> dict[str, Any]:
    """One canary audit per (sampler, sigma); writes ``canary.json`` to ``out_dir``."""
    torch.set_num_threads(threads)
    rows = [
        audit_canary(
            setting,
            sigma=sigma,
            delta=delta,
            trials=trials,
            confidence=confidence,
            seed=seed + i,
        ).to_dict()
        for i, (setting, sigma) in enumerate(settings)
    ]
    payload = {"trials": trials, "delta": delta, "confidence": confidence, "rows": rows}
    _write(out_dir, "canary.json", payload)
    return payload
