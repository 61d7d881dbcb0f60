"""The private environment of Delta: backbone M_bb, decomposition, low-rank M_main, sanitizer.

x -> X = M_bb(x) (c x h x w) -> per-sample top-r SVD with block-DCT low-pass:
features_i = DCT_low(u_i^T X) (r channels at h t'/t x w t'/t) feed M_main, giving z_main;
the residual X - main leaves only through the sanitizer (Niu et al., CVPR 2024,
arXiv 2312.05264, Sec. 3.2-3.3; DESIGN.md sec. 3).

Gradients in stage 1 flow through the projection u_i^T X with the singular vectors u_i held
fixed (they are recomputed every forward pass): features are linear in X for a given basis,
which avoids back-propagating through power iteration.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from asymflow.accounting.events import Event, NonPrivate
from asymflow.accounting.gaussian import gaussian_sigma_for_epsilon
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.decompose import Decomposition, block_dct_low, decompose, top_singular
from asymflow.delta.sanitize import Release, SanitizedResidual, Sanitizer
from asymflow.models import Backbone, LowRankResNet

NO_NOISE = "residual without noise"
"""The ``NonPrivate.what`` of an epsilon = inf release (sign bits of the raw tensor)."""


class ReleaseMechanism(Protocol):
    """What turns a private tensor into a payload that may leave: :class:`Sanitizer` or
    :class:`SignQuantizer`. ``record_release`` writes the ledger row before ``sanitize``."""

    @property
    def event(self) -> Event: ...

    def record_release(
        self, ledger: PrivacyLedger, *, dataset: str, scope: str, note: str = ...
    ) -> Release: ...

    def sanitize(self, residual: Tensor, release: Release) -> SanitizedResidual: ...


class SignQuantizer:
    """epsilon = inf: bits 1[R >= 0] of the raw tensor, no clipping and no noise (sigma = 0).

    The release is recorded as ``NonPrivate("residual without noise")``, so the ledger reports
    epsilon = inf for every record it touches.
    """

    def __init__(self) -> None:
        self._event = NonPrivate(NO_NOISE)
        self.sigma = 0.0

    @property
    def event(self) -> Event:
        return self._event

    def record_release(
        self, ledger: PrivacyLedger, *, dataset: str, scope: str, note: str = "residual release"
    ) -> Release:
        row = ledger.record(self._event, dataset=dataset, scope=scope, note=note)
        return Release(row, self._event, ledger)

    def sanitize(self, residual: Tensor, release: Release) -> SanitizedResidual:
        if release.event != self._event:
            raise ValueError("release was recorded for a different mechanism")
        if residual.dim() != 4:
            raise ValueError(f"residual must have shape (B, c, h, w), got {tuple(residual.shape)}")
        bits = np.packbits((residual.detach().flatten(1) >= 0).numpy(), axis=1)
        return SanitizedResidual(bits, tuple(residual.shape[1:]), self._event)


@lru_cache(maxsize=64)
def calibrated_sigma(epsilon: float, delta: float, releases: int) -> float:
    """Smallest sigma whose certified epsilon over ``releases`` Gaussian releases is <= epsilon
    (cached: the bisection takes seconds)."""
    return gaussian_sigma_for_epsilon(epsilon, delta, releases)


def make_mechanism(
    epsilon: float, delta: float, clip: float, *, releases: int = 1, seed: int | None = None
) -> Sanitizer | SignQuantizer:
    """The sanitizer calibrated so that ``releases`` releases cost <= epsilon at ``delta``;
    ``epsilon = inf`` gives the :class:`SignQuantizer`."""
    if isinstance(releases, bool) or not isinstance(releases, int) or releases < 1:
        raise ValueError(f"releases must be an integer >= 1, got releases={releases!r}")
    if math.isinf(epsilon) and epsilon > 0:
        return SignQuantizer()
    return Sanitizer(clip, calibrated_sigma(float(epsilon), float(delta), releases), seed=seed)


def mechanism_for_event(event: Event, clip: float, *, seed: int | None = None) -> ReleaseMechanism:
    """Rebuild the mechanism of a recorded release (e.g. for inference queries)."""
    if isinstance(event, NonPrivate):
        return SignQuantizer()
    sigma = getattr(event, "sigma", None)
    if sigma is None:
        raise ValueError(f"event must be Gaussian or NonPrivate, got {event!r}")
    return Sanitizer(clip, float(sigma), seed=seed)


def concat_released(parts: Sequence[SanitizedResidual]) -> SanitizedResidual:
    """Join chunks of one release (same shape and event) into one payload."""
    if not parts:
        raise ValueError("parts must hold at least one SanitizedResidual")
    first = parts[0]
    for p in parts[1:]:
        if p.shape != first.shape or p.event != first.event:
            raise ValueError("parts must share shape and event to be joined")
    return SanitizedResidual(np.concatenate([p.bits for p in parts]), first.shape, first.event)


class PrivateModel(nn.Module):
    """M_bb + decomposition + M_main. ``forward(x)`` is z_main."""

    def __init__(
        self, backbone: Backbone, main: LowRankResNet, *, r: int, t: int, t_low: int
    ) -> None:
        super().__init__()
        if main.in_channels != r:
            raise ValueError(f"main.in_channels must equal r={r}, got {main.in_channels}")
        self.backbone = backbone
        self.main = main
        self.r, self.t, self.t_low = r, t, t_low
        self.backbone_frozen = False

    def freeze_backbone(self) -> None:
        """Stage 2: M_bb is fixed (weights and normalization statistics), so the released
        residuals stay consistent with the ones the private side computes later."""
        self.backbone_frozen = True
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.backbone.eval()

    def train(self, mode: bool = True) -> PrivateModel:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def ir(self, x: Tensor) -> Tensor:
        """X = M_bb(x), the intermediate representation (B, c, h, w)."""
        return self.backbone(x)

    def features_of_ir(self, ir: Tensor) -> Tensor:
        """DCT_low(u_i^T X) for the top-r left singular vectors u_i of X (fixed basis)."""
        b, c, h, w = ir.shape
        m = ir.reshape(b, c, h * w)
        with torch.no_grad():
            _, u, _ = top_singular(m.detach(), self.r)
        projected = torch.einsum("bcr,bcn->brn", u, m).reshape(b, self.r, h, w)
        coef, _ = block_dct_low(projected, self.t, self.t_low)
        return coef

    def features(self, x: Tensor) -> Tensor:
        """M_main's input: r low-frequency principal maps (B, r, h t'/t, w t'/t)."""
        return self.features_of_ir(self.ir(x))

    def main_logits(self, x: Tensor) -> Tensor:
        """z_main = M_main(features(x))."""
        return self.main(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.main_logits(x)

    @torch.no_grad()
    def decompose(self, x: Tensor) -> Decomposition:
        """The full decomposition of M_bb(x): features, main part and residual."""
        return decompose(self.ir(x), r=self.r, t=self.t, t_low=self.t_low)

    @torch.no_grad()
    def residual(self, x: Tensor) -> Tensor:
        """X - main: what may leave, but only through the sanitizer."""
        return self.decompose(x).residual


def release_tensors(
    mechanism: ReleaseMechanism,
    chunks: Iterable[Tensor],
    *,
    ledger: PrivacyLedger,
    dataset: str,
    scope: str,
    note: str,
) -> tuple[SanitizedResidual, Release]:
    """One recorded release of every record in ``scope``: write the ledger row first, then
    sanitize each chunk (an iterable of (B, c, h, w) tensors, computed lazily after the row is
    committed) and join them. Call ``release.done()`` once the payload is handed on."""
    release = mechanism.record_release(ledger, dataset=dataset, scope=scope, note=note)
    parts = [mechanism.sanitize(chunk, release) for chunk in chunks]
    return concat_released(parts), release
