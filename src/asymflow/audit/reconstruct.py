"""Model inversion from what the public side sees: a learned decoder from the view to the image.

Threat model (Niu et al., CVPR 2024, arXiv 2312.05264, Sec. 5, "model inversion"; the
learning-based inversion of He, Zhang, Lee, "Model Inversion Attacks against Collaborative
Inference", ACSAC 2019, Sec. 4.3): the attacker holds the public view v(x) of private images
(:mod:`asymflow.audit.views`) and auxiliary images from the same distribution, which it pushes
through the same pipeline. It fits a small convolutional decoder D on the auxiliary pairs,

    D = argmin_D  sum_aux || x - (x_bar + f_D(v(x))) ||_2^2,

with x in [0, 1], x_bar the auxiliary mean image and the last layer of f_D initialized to zero
(so D starts at the mean image), keeping the epoch with the lowest error on held-out auxiliary
images (epoch 0, the mean image itself, included). Then it reconstructs the private images
x_hat = D(v(x)) and the audit reports PSNR and SSIM (:mod:`asymflow.audit.quality`).

The ``none`` view has no input, and its reconstruction is the mean image x_bar: the
"no residual at all" baseline. DESIGN.md sec. 3 quotes SSIM 0.18 (no DP), 0.09 (eps = 1.4)
and 0.08 (no residual) on CIFAR-100.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor, nn
from torch.nn import functional

from asymflow.audit.quality import psnr, ssim
from asymflow.audit.views import PublicViewer, ViewSpec

__all__ = [
    "DEFAULT_VIEWS",
    "DecoderConfig",
    "ReconstructionResult",
    "ReconstructionRow",
    "audit_reconstruction",
    "image_grid",
    "train_decoder",
]

DEFAULT_VIEWS: tuple[ViewSpec, ...] = (
    ViewSpec("ir"),
    ViewSpec("sign"),
    ViewSpec("delta", 9.0),
    ViewSpec("delta", 1.4),
    ViewSpec("none"),
)
"""The rows of the reconstruction table, most to least revealing."""


@dataclass(frozen=True)
class DecoderConfig:
    """Decoder width and training schedule (Adam, constant ``lr``, MSE on [0, 1] pixels)."""

    width: int = 32
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("width", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {name}={value!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise ValueError(f"epochs must be an integer >= 0, got epochs={self.epochs!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got lr={self.lr}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(
                f"val_fraction must satisfy 0 < val_fraction < 1, got {self.val_fraction}"
            )


class Decoder(nn.Module):
    """x_hat = x_bar + f(v): 1x1 conv (c -> width), two 3x3 convs with ReLU, 3x3 conv to the
    image channels (zero-initialized, so the untrained decoder outputs the mean image)."""

    def __init__(self, in_channels: int, out_channels: int, mean_image: Tensor, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, out_channels, 3, padding=1),
        )
        last = self.net[-1]
        assert isinstance(last, nn.Conv2d)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        self.register_buffer("mean_image", mean_image.clone())

    def forward(self, v: Tensor) -> Tensor:
        return self.mean_image + self.net(v)


def _to_unit(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


@torch.no_grad()
def _mse(model: nn.Module, v: Tensor, x: Tensor, batch: int) -> float:
    model.eval()
    total = 0.0
    for s in range(0, len(x), batch):
        total += float(
            functional.mse_loss(model(v[s : s + batch]), x[s : s + batch], reduction="sum")
        )
    return total / max(1, x.numel())


def train_decoder(v: Tensor, x: Tensor, config: DecoderConfig) -> tuple[Decoder, dict[str, Any]]:
    """Fit :class:`Decoder` from views ``v`` (N, c, h, w) to images ``x`` (N, C, h, w) in
    [0, 1]; returns the state with the lowest held-out MSE and a training log."""
    if len(v) != len(x) or v.shape[-2:] != x.shape[-2:]:
        raise ValueError(
            f"v and x must pair up with the same spatial size, got {tuple(v.shape)} "
            f"and {tuple(x.shape)}"
        )
    if len(x) < 2:
        raise ValueError(f"at least 2 auxiliary images are needed, got {len(x)}")
    gen = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(x), generator=gen)
    n_val = max(1, round(config.val_fraction * len(x)))
    val, fit = order[:n_val], order[n_val:]
    torch.manual_seed(config.seed)
    model = Decoder(v.shape[1], x.shape[1], x[fit].mean(0), config.width)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    best = _mse(model, v[val], x[val], config.batch_size)
    log: dict[str, Any] = {"val_mse": [best], "best_epoch": 0}
    best_state = copy.deepcopy(model.state_dict())
    for epoch in range(1, config.epochs + 1):
        model.train()
        perm = fit[torch.randperm(len(fit), generator=gen)]
        for s in range(0, len(perm), config.batch_size):
            idx = perm[s : s + config.batch_size]
            loss = functional.mse_loss(model(v[idx]), x[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        err = _mse(model, v[val], x[val], config.batch_size)
        log["val_mse"].append(err)
        if err < best:
            best, log["best_epoch"] = err, epoch
            best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model, log


@dataclass(frozen=True)
class ReconstructionRow:
    """Scores of one view on the private images (means over images, with standard errors)."""

    view: str
    kind: str
    epsilon: float | None
    sigma: float | None
    psnr: float
    psnr_se: float
    ssim: float
    ssim_se: float
    best_epoch: int | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ReconstructionResult:
    """The table (one row per view), the backbone's origin and the reconstructions."""

    rows: list[ReconstructionRow]
    backbone: str
    aux_images: int
    private_images: int
    originals: Tensor = field(repr=False)
    reconstructions: dict[str, Tensor] = field(repr=False, default_factory=dict)

    def row(self, kind: str, epsilon: float | None = None) -> ReconstructionRow:
        """The row of view ``kind`` (and ``epsilon`` for ``delta``)."""
        for r in self.rows:
            if r.kind == kind and (epsilon is None or r.epsilon == epsilon):
                return r
        raise KeyError(f"no row for view kind={kind!r}, epsilon={epsilon!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "aux_images": self.aux_images,
            "private_images": self.private_images,
            "rows": [r.to_dict() for r in self.rows],
        }


def _se(values: Tensor) -> float:
    return float(values.std(unbiased=True) / math.sqrt(len(values))) if len(values) > 1 else 0.0


def audit_reconstruction(
    viewer: PublicViewer,
    aux_images: np.ndarray,
    private_images: np.ndarray,
    *,
    views: Sequence[ViewSpec] = DEFAULT_VIEWS,
    decoder: DecoderConfig | None = None,
    noise_seed: int = 0,
) -> ReconstructionResult:
    """Train one decoder per view on ``aux_images`` and score its reconstructions of
    ``private_images`` (both uint8 NHWC from the same distribution, disjoint).

    The two sets are sanitized with independent noise (seeds ``noise_seed`` and
    ``noise_seed + 1``); the private images never reach the decoder's training.
    """
    decoder = decoder or DecoderConfig()
    x_aux, x_priv = _to_unit(aux_images), _to_unit(private_images)
    rows, recon = [], {}
    for spec in views:
        began = time.perf_counter()
        best_epoch: int | None = None
        if spec.kind == "none":
            x_hat = x_aux.mean(0, keepdim=True).expand_as(x_priv)
        else:
            v_aux = viewer.view(aux_images, spec, seed=noise_seed)
            v_priv = viewer.view(private_images, spec, seed=noise_seed + 1)
            assert v_aux is not None and v_priv is not None
            model, log = train_decoder(v_aux, x_aux, decoder)
            best_epoch = int(log["best_epoch"])
            with torch.no_grad():
                x_hat = torch.cat(
                    [
                        model(v_priv[s : s + decoder.batch_size])
                        for s in range(0, len(v_priv), decoder.batch_size)
                    ]
                )
        x_hat = x_hat.clamp(0, 1)
        p, s = psnr(x_hat, x_priv), ssim(x_hat, x_priv)
        rows.append(
            ReconstructionRow(
                view=spec.label,
                kind=spec.kind,
                epsilon=spec.epsilon,
                sigma=viewer.sigma(spec),
                psnr=float(p.mean()),
                psnr_se=_se(p),
                ssim=float(s.mean()),
                ssim_se=_se(s),
                best_epoch=best_epoch,
                seconds=time.perf_counter() - began,
            )
        )
        recon[spec.label] = x_hat
    return ReconstructionResult(
        rows=rows,
        backbone=viewer.source,
        aux_images=len(aux_images),
        private_images=len(private_images),
        originals=x_priv,
        reconstructions=recon,
    )


def image_grid(
    result: ReconstructionResult,
    path: str | Path,
    *,
    columns: int = 8,
    scale: int = 3,
    label_width: int = 190,
) -> Path:
    """Write a PNG: the first ``columns`` private images in the top row, each view's
    reconstructions of them in the rows below, the row name on the left."""
    originals = result.originals[:columns]
    rows = [("original", originals)] + [
        (name, x[:columns]) for name, x in result.reconstructions.items()
    ]
    n, _, h, w = originals.shape
    cell_h, cell_w, pad = h * scale, w * scale, 2
    canvas = Image.new(
        "RGB",
        (label_width + n * (cell_w + pad) + pad, len(rows) * (cell_h + pad) + pad),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    for i, (name, images) in enumerate(rows):
        y0 = pad + i * (cell_h + pad)
        draw.text((4, y0 + cell_h // 2 - 6), name, fill="black")
        pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j in range(n):
            tile = pixels[j]
            if tile.shape[2] == 1:
                tile = np.repeat(tile, 3, axis=2)
            img = Image.fromarray(np.ascontiguousarray(tile), "RGB").resize(
                (cell_w, cell_h), Image.Resampling.NEAREST
            )
            canvas.paste(img, (label_width + pad + j * (cell_w + pad), y0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    return out
