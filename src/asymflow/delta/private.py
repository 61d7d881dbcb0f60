"""The private environment of Delta: backbone M_bb, decomposition, low-rank M_main, sanitizer.

x -> X = M_bb(x) (c x h x w) -> per-sample top-r SVD with block-DCT low-pass:
features_i = DCT_low(u_i^T X) (r channels at h t'/t x w t'/t) feed M_main, giving z_main;
the residual X - main leaves only through the sanitizer (Niu et al., CVPR 2024,
arXiv 2312.05264, Sec. 3.2-3.3; DESIGN.md sec. 3). The prediction combines the public logits
z_res through a learned trust weight, z = z_main + w * log_softmax(z_res)
(:class:`ResidualWeight`).

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
from torch.nn import functional

from asymflow.accounting.events import BalancedSampled, Event, NonPrivate, PoissonSampled
from asymflow.accounting.gaussian import gaussian_sigma_for_epsilon
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.decompose import (
    Decomposition,
    block_dct_coefficients,
    decompose,
    principal_basis,
)
from asymflow.delta.sanitize import Release, SanitizedResidual, Sanitizer
from asymflow.models import Backbone, LowRankResNet

NO_NOISE = "residual without noise"
"""The ``NonPrivate.what`` of an epsilon = inf release (sign bits of the raw tensor)."""
RELEASE_BLOCK_BYTES = 4 << 20
"""float32 IR bytes per chunk of a release pass (see :func:`release_chunk_rows`)."""


def release_chunk_rows(ir_elements: int, limit: int) -> int:
    """Rows per chunk of a release pass, which runs M_bb, the decomposition and the sanitizer
    one chunk at a time: about :data:`RELEASE_BLOCK_BYTES` of IR, so that a chunk's
    intermediates stay in cache from one step to the next; at most ``limit``. On the CIFAR IR
    (64 x 32 x 32: 16 rows) the pass takes ~40% less time than with 256 rows on a busy CPU.
    The released bits do not depend on the chunking (each keystream is read in row order)."""
    if ir_elements < 1 or limit < 1:
        raise ValueError(
            f"ir_elements and limit must be >= 1, got ir_elements={ir_elements}, limit={limit}"
        )
    return max(1, min(limit, RELEASE_BLOCK_BYTES // (4 * ir_elements)))


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
    if isinstance(event, BalancedSampled | PoissonSampled):
        event = event.event  # a padded pass: each query is one Gaussian release
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


class ResidualWeight(nn.Module):
    """How much the private side trusts the public logits: a scalar w >= 0 in

        z = z_main + w * log_softmax(z_res).

    w is fitted on the private side in stage 2, with the true labels and out-of-fold z_res
    (a one-parameter stacking model, Wolpert 1992), by minimizing the same objective as M_main,

        L(w) = mean_i CE(z_main,i + w b_i, y_i),    b_i = log_softmax(z_res,i),

    exactly for the current z_main (:meth:`fit`), in alternation with M_main's SGD epochs
    (block-coordinate descent on the joint objective). It is post-processing of released
    outputs: no privacy cost. L is convex in w: L'(w) = mean_i (softmax(z_i) - e_{y_i}) . b_i
    and L''(w) = mean_i Var_{softmax(z_i)}(b_i) >= 0, so the minimizer over [0, w_max] is
    found by bisection on L'. An exact fit avoids what plain SGD on w does near w = 0:
    projected onto w >= 0, its gradient noise alone drifts w upwards.

    w starts at 0, so stage 2 starts from exactly the main-only prediction, and w > 0 only if
    the public head lowers the training loss beyond z_main (L'(0) < 0): an uninformative head
    is switched off. Negative trust is excluded: M_res is trained to predict y.

    ``log_softmax`` standardizes the public logits: it subtracts logsumexp(z_res) from every
    class, a per-sample constant that softmax ignores, so for a scalar w the prediction equals
    z_main + w z_res; but w then weighs log-probabilities, the quantity the public side's
    (forward-corrected) loss calibrates, whatever offset the public logits carry.
    """

    weight: Tensor

    def __init__(self, max_weight: float = 16.0) -> None:
        super().__init__()
        if not (math.isfinite(max_weight) and max_weight > 0):
            raise ValueError(f"max_weight must be a finite number > 0, got {max_weight}")
        self.max_weight = float(max_weight)
        self.register_buffer("weight", torch.zeros(()))

    @property
    def value(self) -> float:
        """w as a float."""
        return float(self.weight)

    def forward(self, z_main: Tensor, z_res: Tensor) -> Tensor:
        """z_main + w * log_softmax(z_res) (the shape of z_main)."""
        if z_res.shape != z_main.shape:
            raise ValueError(
                f"z_res must have the shape of z_main {tuple(z_main.shape)}, "
                f"got {tuple(z_res.shape)}"
            )
        return z_main + self.weight * functional.log_softmax(z_res, dim=1)

    @staticmethod
    def loss(z_main: Tensor, z_res: Tensor, labels: Tensor, weight: float) -> float:
        """L(w) = mean_i CE(z_main,i + w log_softmax(z_res,i), y_i)."""
        b = functional.log_softmax(z_res.double(), dim=1)
        return float(functional.cross_entropy(z_main.double() + weight * b, labels))

    @torch.no_grad()
    def fit(self, z_main: Tensor, z_res: Tensor, labels: Tensor, *, iterations: int = 60) -> float:
        """Set w = argmin_{0 <= w <= max_weight} L(w) (bisection on the monotone L') and
        return it as stored (float32). ``z_main``, ``z_res``: (N, K) logits of the same rows;
        ``labels``: (N,) true labels."""
        if z_main.shape != z_res.shape or z_main.dim() != 2 or labels.shape != z_main.shape[:1]:
            raise ValueError(
                "z_main and z_res must be (N, K) and labels (N,), got "
                f"{tuple(z_main.shape)}, {tuple(z_res.shape)}, {tuple(labels.shape)}"
            )
        a = z_main.double()
        b = functional.log_softmax(z_res.double(), dim=1)
        b_true = b.gather(1, labels.long().view(-1, 1)).squeeze(1)

        def slope(w: float) -> float:
            p = torch.softmax(a + w * b, dim=1)
            return float(((p * b).sum(1) - b_true).mean())

        low, high = 0.0, self.max_weight
        if len(labels) == 0 or not slope(low) < 0:
            w = low
        elif slope(high) <= 0:
            w = high
        else:
            for _ in range(iterations):
                mid = 0.5 * (low + high)
                low, high = (mid, high) if slope(mid) < 0 else (low, mid)
            w = 0.5 * (low + high)
        self.weight.fill_(w)
        return self.value


class PrivateModel(nn.Module):
    """M_bb + decomposition + M_main, and the trust weight w of the public logits.
    ``forward(x)`` is z_main; :meth:`combine` is z_main + w log_softmax(z_res)."""

    def __init__(
        self, backbone: Backbone, main: LowRankResNet, *, r: int, t: int, t_low: int
    ) -> None:
        super().__init__()
        if main.in_channels != r:
            raise ValueError(f"main.in_channels must equal r={r}, got {main.in_channels}")
        self.backbone = backbone
        # channels-last weights make oneDNN run M_main's narrow convolutions (and their batch
        # norms) in NHWC, ~25% faster on CPU for the same math; inputs may stay NCHW.
        self.main = main.to(memory_format=torch.channels_last)
        self.residual_weight = ResidualWeight()
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
        u = principal_basis(m, self.r)  # no autograd
        projected = torch.bmm(u.transpose(1, 2), m).reshape(b, self.r, h, w)
        return block_dct_coefficients(projected, self.t, self.t_low)

    def features(self, x: Tensor) -> Tensor:
        """M_main's input: r low-frequency principal maps (B, r, h t'/t, w t'/t)."""
        return self.features_of_ir(self.ir(x))

    def main_logits(self, x: Tensor) -> Tensor:
        """z_main = M_main(features(x))."""
        return self.main(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.main_logits(x)

    def combine(self, z_main: Tensor, z_res: Tensor) -> Tensor:
        """Delta's prediction z = z_main + w * log_softmax(z_res) (:class:`ResidualWeight`)."""
        return self.residual_weight(z_main, z_res)

    @torch.no_grad()
    def decompose(self, x: Tensor) -> Decomposition:
        """The full decomposition of M_bb(x): features, main part and residual (written over
        the IR, a temporary here, unless M_bb returned x's own memory)."""
        ir = self.ir(x)
        fresh = ir.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        return decompose(ir, r=self.r, t=self.t, t_low=self.t_low, overwrite=fresh)

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
