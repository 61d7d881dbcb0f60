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

_NORM_PART = 256
"""Elements per float32 partial norm in :func:`norm_upper_bound`."""
_U32, _U64 = 2.0**-24, 2.0**-53
_TINY = 2.0**-60
"""Rows whose float32 sum of squares is below this are recomputed in float64 (underflow)."""


def norm_upper_bound(flat: Tensor) -> Tensor:
    """Per row of ``flat`` (B, n) float32, a float64 number >= the exact ||row||_2, within
    ~2e-5 relative: the clip must never let a norm above C through.

    Partial norms of m = 256 elements in float32 (as fast as one float32 norm), summed in
    float64. Squaring and summing m nonnegative terms in any order, then the square root and
    its exact square in float64, round each term at most m + 2 times, so the result is at
    least (1 - gamma_{2m}) times the exact partial sum of squares, gamma_k = k u / (1 - k u),
    u = 2^-24, with room to spare (Higham 2002, Lemma 3.1 and eq. 4.4). The float64 sum of the
    partials loses at most n 2^-52. Rows whose float32 result overflows (entries above ~1e19)
    or is below 2^-60 (where float32 underflow, even flushed to zero, could matter) are
    recomputed in float64, exact but for the same n 2^-52; above 2^-60, underflow loses less
    than 2n 2^-126, i.e. 1e-9 relative for n < 2^30. Dividing by 1 - gamma_{2m} - n 2^-52 - 1e-9
    makes the result an upper bound. (A float32 norm of the whole row comes out low by up to
    ~3e-6 at 262,144 elements.)
    """
    rows, n = flat.shape
    whole = n - n % _NORM_PART
    parts = torch.linalg.vector_norm(flat[:, :whole].reshape(rows, -1, _NORM_PART), dim=2)
    squares = parts.double().square().sum(1) + flat[:, whole:].double().square().sum(1)
    redo = ~(squares >= _TINY) | torch.isinf(squares)
    if bool(redo.any()):
        squares[redo] = flat[redo].double().square().sum(1)
    k = 2 * _NORM_PART
    slack = 1 - k * _U32 / (1 - k * _U32) - n * 2 * _U64 - 1e-9
    return torch.sqrt(squares / slack)


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
        norms = norm_upper_bound(flat)
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
