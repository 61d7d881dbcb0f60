"""The audit commands (what ``asymflow audit ...`` calls): files written, a trained backbone
picked up from a Delta run directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from asymflow.audit.canary import SamplerSetting
from asymflow.audit.commands import run_canary, run_membership, run_reconstruction
from asymflow.audit.membership import PublicTraining
from asymflow.audit.reconstruct import DecoderConfig
from asymflow.audit.views import PublicViewer
from asymflow.delta.runs import DeltaConfig
from asymflow.delta.train import train_delta

TINY_VIEWER = {"ir_channels": 8, "r": 2, "t": 8, "t_low": 4}


def test_run_canary_writes_one_row_per_setting(tmp_path: Path) -> None:
    settings = [(SamplerSetting("balanced", steps=2, k=1), 1.0)]
    payload = run_canary(settings, trials=500, out_dir=tmp_path)
    saved = json.loads((tmp_path / "canary.json").read_text())
    assert saved["rows"][0]["sampler"] == "BIS(k=1, T=2)" == payload["rows"][0]["sampler"]
    row = saved["rows"][0]
    assert row["epsilon_lower"] <= row["certified_epsilon"]


def test_run_reconstruction_writes_the_table_and_the_grid(tmp_path: Path) -> None:
    payload = run_reconstruction(
        "synthetic:100",
        views=("ir", "none"),
        private=10,
        decoder=DecoderConfig(width=4, epochs=1),
        out_dir=tmp_path,
        viewer_kwargs=TINY_VIEWER,
    )
    assert (tmp_path / "reconstruction.png").is_file()
    saved = json.loads((tmp_path / "reconstruction.json").read_text())
    assert (
        [r["kind"] for r in saved["rows"]] == ["ir", "none"] == [r["kind"] for r in payload["rows"]]
    )
    assert saved["private_images"] == 10 and saved["aux_images"] == 100


def test_run_membership_writes_both_attacks(tmp_path: Path) -> None:
    payload = run_membership(
        "synthetic:60",
        views=("delta:1.4",),
        members=16,
        training=PublicTraining(epochs=1, batch_size=16),
        out_dir=tmp_path,
        viewer_kwargs=TINY_VIEWER,
    )
    row = json.loads((tmp_path / "membership.json").read_text())["rows"][0]
    assert row["kind"] == "delta" and row["ml_leaks"]["members"] == 16
    assert set(row["loss"]) >= {"accuracy", "auc", "tpr_at_1pct_fpr"}
    assert payload["backbone"] == "random init (seed 0)"


def test_viewer_from_run_uses_the_trained_frozen_backbone(tmp_path: Path) -> None:
    config = DeltaConfig(
        data="synthetic:64",
        ir_channels=8,
        r=2,
        t=8,
        t_low=4,
        private_widths=(8,),
        private_ranks=(2,),
        public_width=0.25,
        epochs_stage1=1,
        epochs_stage2=1,
        batch_size=32,
        public_folds=1,
        clip=0.5,
        noise_seed=0,
    )
    train_delta(config, tmp_path / "run", progress=False)
    viewer = PublicViewer.from_run(tmp_path / "run")
    state = torch.load(
        sorted((tmp_path / "run" / "ckpt").glob("stage2_*.pt"))[-1], weights_only=True
    )["model"]
    assert torch.equal(viewer.backbone.conv.weight, state["backbone.conv.weight"])
    assert (viewer.r, viewer.t, viewer.t_low, viewer.clip) == (2, 8, 4, 0.5)
    assert viewer.source.startswith("trained (")
