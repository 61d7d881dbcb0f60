"""The sanitizer: the only way a residual leaves the private environment.

Per sample: clip R <- R / max(1, ||R||_2 / C); add N(0, sigma^2 C^2 I); quantize to one bit
1[R_noisy >= 0]; pack 8 bits per byte. Steps 2-3 are the Gaussian mechanism (sensitivity C)
followed by post-processing (Niu et al. 2024, Sec. 3.3; DESIGN.md sec. 3); the bits are drawn
with exactly that law, without drawing the Gaussian (:mod:`asymflow.delta.noisy_sign`). The
privacy event is written to the ledger before any bit is handed on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from asymflow.accounting.events import BalancedSampled, Event, Gaussian, PoissonSampled
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.contract import SanitizedResidual
from asymflow.delta.noisy_sign import KeyStream, noisy_sign_bits

_NORM_BLOCK_ELEMENTS = 1 << 20
"""Residual elements per float64 copy while computing the norms (8 MiB)."""


class Sanitizer:
    """Clip, noise and quantize residuals; every call is one recorded release per sample.

    With ``seed=None`` (production) the noise keystream is keyed from the operating system's
    cryptographically secure source (``secrets``); tests pass a fixed seed.

    A per-record release is not inside a noisy sum, so subsampling alone does not amplify it
    (against D' = D minus x, a sampled record's element cannot exist without x: delta >= q).
    ``sampling`` (the Gaussian's :class:`PoissonSampled` or :class:`BalancedSampled` wrapper)
    is therefore accepted only with ``padded_slots``, the public number of slots of a padded
    release (:mod:`asymflow.delta.padded`), where it is the exact per-slot event.
    """

    def __init__(
        self,
        clip: float,
        sigma: float,
        *,
        seed: int | None = None,
        sampling: PoissonSampled | BalancedSampled | None = None,
        padded_slots: int | None = None,
    ) -> None:
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got clip={clip}")
        self.clip = float(clip)
        gaussian = Gaussian(sigma)  # validates sigma
        self.event: Event = gaussian
        if sampling is not None:
            if padded_slots is None:
                raise ValueError(
                    "sampling must be None for an unpadded release: subsampling does not "
                    "amplify a per-record release (delta >= q); pad it (padded_slots) or "
                    "account it as a Gaussian release"
                )
            if not isinstance(sampling, PoissonSampled | BalancedSampled) or (
                sampling.event != gaussian
            ):
                raise ValueError(
                    f"sampling must be PoissonSampled or BalancedSampled of Gaussian({sigma}), "
                    f"got {sampling!r}"
                )
            self.event = sampling
        elif padded_slots is not None:
            raise ValueError("padded_slots must come with a sampling event, got sampling=None")
        self.sigma = float(sigma)
        self._stream = KeyStream(seed)

    @classmethod
    def for_epsilon(
        cls,
        epsilon: float,
        delta: float,
        clip: float,
        *,
        releases: int = 1,
        seed: int | None = None,
    ) -> Sanitizer:
        """Noise calibrated so that ``releases`` sanitizations of a sample cost <= epsilon."""
        from asymflow.accounting.gaussian import gaussian_sigma_for_epsilon  # heavy: scipy

        return cls(clip, gaussian_sigma_for_epsilon(epsilon, delta, releases), seed=seed)

    def record_release(
        self, ledger: PrivacyLedger, *, dataset: str, scope: str, note: str = "residual release"
    ) -> Release:
        """Write (and commit) one release of every record in ``scope`` to the ledger."""
        row = ledger.record(self.event, dataset=dataset, scope=scope, note=note)
        return Release(row, self.event, ledger)

    def sanitize(self, residual: Tensor, release: Release) -> SanitizedResidual:
        """Sanitize residuals (B, c, h, w) of records covered by an already recorded release."""
        if release.event != self.event:
            raise ValueError("release was recorded for a different noise level")
        if residual.dim() != 4:
            raise ValueError(f"residual must have shape (B, c, h, w), got {tuple(residual.shape)}")
        return SanitizedResidual(self._bits(residual), tuple(residual.shape[1:]), self.event)

    def _bits(self, residual: Tensor) -> np.ndarray:
        """Packed 1[R / max(1, ||R|| / C) + N(0, sigma^2 C^2) >= 0] per sample, drawn as
        1[R + sigma C max(1, ||R|| / C) Z >= 0] (the same bit: the clip is a positive scale)."""
        flat = residual.detach().flatten(1).float().contiguous()
        # ||R|| in float64, a block of rows at a time: a float32 sum of squares comes out low
        # by up to ~3e-6 relative at 262,144 elements, i.e. clips to slightly more than C
        rows = max(1, _NORM_BLOCK_ELEMENTS // max(1, flat.shape[1]))
        norms = torch.cat([part.double().norm(dim=1) for part in flat.split(rows)])
        if not bool(torch.isfinite(norms).all()):
            raise ValueError("residual must be finite, got inf or nan entries")
        scale = torch.clamp(norms / self.clip, min=1.0) * (self.sigma * self.clip)
        return noisy_sign_bits(flat.numpy(), scale.numpy(), self._stream)


@dataclass(frozen=True)
class Release:
    """Proof that a release was written to the ledger before any residual is sanitized."""

    row_id: int
    event: Event
    ledger: PrivacyLedger

    def done(self) -> None:
        """Mark the ledger row released (informational: pending rows count too)."""
        self.ledger.mark_released(self.row_id)
