"""What an attacker on the public side sees of an image, for the privacy audits.

Delta's private side computes X = M_bb(x) and the decomposition X = main + residual, and only
the residual leaves, clipped, noised and quantized to one bit (Niu et al., CVPR 2024,
arXiv 2312.05264, Sec. 3.2-3.3; DESIGN.md sec. 3). The audits compare four views:

- ``ir``: the float IR X sent in clear (the unprotected split-learning baseline);
- ``sign``: the residual's sign bits without noise (epsilon = inf, :class:`SignQuantizer`);
- ``delta``: the sanitized bits at the sigma calibrated for ``epsilon`` (:class:`Sanitizer`);
- ``none``: nothing at all (the attacker only knows the data distribution).

The ``sign`` and ``delta`` views are produced by the production mechanisms through
:func:`release_tensors` and unpacked with :meth:`SanitizedResidual.unpack`, exactly as the
public side receives them. Their releases are written to a throw-away ledger: the audit
sanitizes auxiliary and held-out images of its own, not a run's records, so nothing is
charged to any run's budget.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from asymflow.accounting.ledger import PrivacyLedger
from asymflow.delta.decompose import decompose
from asymflow.delta.private import make_mechanism, release_tensors
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.models import Backbone

__all__ = ["VIEW_KINDS", "PublicViewer", "ViewSpec"]

ViewKind = Literal["ir", "sign", "delta", "none"]
VIEW_KINDS: tuple[str, ...] = ("ir", "sign", "delta", "none")
RESIDUAL_CACHE = 4
"""Image sets whose residuals a :class:`PublicViewer` keeps (the audits use at most four)."""


@dataclass(frozen=True)
class ViewSpec:
    """One view of the audit tables; ``epsilon`` is needed (and only allowed) for ``delta``."""

    kind: ViewKind
    epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in VIEW_KINDS:
            raise ValueError(f"kind must be one of {VIEW_KINDS}, got kind={self.kind!r}")
        if self.kind == "delta":
            eps = self.epsilon
            if eps is None or not (isinstance(eps, int | float) and 0 < eps < math.inf):
                raise ValueError(
                    f"epsilon must be a finite number > 0 for a delta view, got epsilon={eps!r}"
                )
        elif self.epsilon is not None:
            raise ValueError(f"epsilon is only allowed for kind='delta', got kind={self.kind!r}")

    @property
    def label(self) -> str:
        """The row name in the audit tables."""
        if self.kind == "delta":
            return f"Delta eps={self.epsilon:g}"
        return {
            "ir": "raw IR in clear",
            "sign": "residual, no noise (eps=inf)",
            "none": "nothing (mean image)",
        }[self.kind]

    @property
    def releases_bits(self) -> bool:
        """True for the views that are a released :class:`SanitizedResidual`."""
        return self.kind in ("sign", "delta")

    @classmethod
    def parse(cls, text: str) -> ViewSpec:
        """``ir``, ``sign``, ``none`` or ``delta:EPS`` (as on a command line)."""
        kind, sep, arg = text.strip().lower().partition(":")
        if kind == "delta" and sep:
            try:
                return cls("delta", float(arg))
            except ValueError:
                pass
        elif kind in ("ir", "sign", "none") and not sep:
            return cls(kind)  # type: ignore[arg-type]
        raise ValueError(f"view must be 'ir', 'sign', 'none' or 'delta:EPS', got {text!r}")


class PublicViewer:
    """The private side's fixed pipeline (M_bb, normalization, decomposition, sanitizer
    parameters), used to produce the public views of uint8 NHWC images.

    ``source`` says where M_bb came from (a run directory or a fixed random initialization).
    """

    def __init__(
        self,
        backbone: Backbone,
        *,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        r: int,
        t: int,
        t_low: int,
        clip: float = 1.0,
        delta: float = 1e-5,
        source: str = "random init",
        batch_size: int = 256,
    ) -> None:
        if len(mean) != backbone.in_channels or len(std) != backbone.in_channels:
            raise ValueError(
                f"mean and std must have one entry per input channel ({backbone.in_channels})"
            )
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"clip must be a finite number > 0, got clip={clip}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must satisfy 0 < delta < 1, got delta={delta}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got batch_size={batch_size}")
        self.backbone = backbone.eval()
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.r, self.t, self.t_low = r, t, t_low
        self.clip, self.delta = float(clip), float(delta)
        self.source = source
        self.batch_size = batch_size
        self._residuals: dict[str, Tensor] = {}

    @classmethod
    def random(
        cls,
        *,
        in_channels: int = 3,
        ir_channels: int = 64,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        r: int = 8,
        t: int = 16,
        t_low: int = 8,
        clip: float = 1.0,
        delta: float = 1e-5,
        seed: int = 0,
    ) -> PublicViewer:
        """M_bb at a fixed random initialization (``torch.manual_seed(seed)``); batch norm in
        evaluation mode with its initial statistics, i.e. conv3x3 + PReLU."""
        torch.manual_seed(seed)
        backbone = Backbone(in_channels, ir_channels)
        return cls(
            backbone,
            mean=mean,
            std=std,
            r=r,
            t=t,
            t_low=t_low,
            clip=clip,
            delta=delta,
            source=f"random init (seed {seed})",
        )

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike[str]) -> PublicViewer:
        """The trained, frozen M_bb of a Delta run, with the run's normalization,
        decomposition sizes, clip norm and delta."""
        from asymflow.delta.infer import load_system
        from asymflow.delta.private import PrivateModel

        system = load_system(run_dir, seed=0)
        if not isinstance(system.model, PrivateModel):
            raise ValueError(
                f"run_dir must hold a Delta-family run with a private backbone, got variant "
                f"{system.config.variant!r}"
            )
        c = system.config
        return cls(
            system.model.backbone,
            mean=system.mean,
            std=system.std,
            r=c.r,
            t=c.t,
            t_low=c.t_low,
            clip=c.clip,
            delta=c.delta,
            source=f"trained ({Path(run_dir)})",
        )

    @property
    def ir_channels(self) -> int:
        """Channels of X."""
        return self.backbone.ir_channels

    def normalize(self, images: np.ndarray) -> Tensor:
        """uint8 (N, H, W, C) -> (x/255 - mean) / std, float (N, C, H, W)."""
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 array of shape (N, H, W, C)")
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    @torch.no_grad()
    def _chunks(self, images: np.ndarray, what: Literal["ir", "residual"]) -> Iterator[Tensor]:
        for start in range(0, len(images), self.batch_size):
            ir = self.backbone(self.normalize(images[start : start + self.batch_size]))
            if what == "ir":
                yield ir
            else:
                yield decompose(ir, r=self.r, t=self.t, t_low=self.t_low).residual

    def residual(self, images: np.ndarray) -> Tensor:
        """X - main for ``images`` (N, c, h, w), deterministic; the residuals of the last
        ``RESIDUAL_CACHE`` image sets are kept, keyed by a digest of the pixels, so several
        views of the same images decompose them once."""
        key = hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()
        key += str(images.shape)
        if key not in self._residuals:
            while len(self._residuals) >= RESIDUAL_CACHE:
                self._residuals.pop(next(iter(self._residuals)))
            self._residuals[key] = torch.cat(list(self._chunks(images, "residual")))
        return self._residuals[key]

    def release(self, images: np.ndarray, spec: ViewSpec, *, seed: int) -> SanitizedResidual:
        """The bits the public side receives for ``images`` under a ``sign`` or ``delta``
        view (noise seeded by ``seed``), through the production release path."""
        if not spec.releases_bits:
            raise ValueError(f"spec must be a 'sign' or 'delta' view, got kind={spec.kind!r}")
        epsilon = math.inf if spec.kind == "sign" else float(spec.epsilon)  # type: ignore[arg-type]
        mechanism = make_mechanism(epsilon, self.delta, self.clip, seed=seed)
        with (
            tempfile.TemporaryDirectory(prefix="asymflow-audit-") as tmp,
            PrivacyLedger(Path(tmp) / "audit-ledger.sqlite") as ledger,
        ):
            residual = self.residual(images)
            payload, release = release_tensors(
                mechanism,
                residual.split(self.batch_size),
                ledger=ledger,
                dataset="audit",
                scope="all",
                note=f"audit: {spec.label}",
            )
            release.done()
        return payload

    def sigma(self, spec: ViewSpec) -> float | None:
        """The noise multiplier of a view's release (0 for ``sign``, None without release)."""
        if not spec.releases_bits:
            return None
        epsilon = math.inf if spec.kind == "sign" else float(spec.epsilon)  # type: ignore[arg-type]
        return float(make_mechanism(epsilon, self.delta, self.clip, seed=0).sigma)

    def view(self, images: np.ndarray, spec: ViewSpec, *, seed: int) -> Tensor | None:
        """The attacker's input for ``images``: float IR (N, c, h, w) for ``ir``, unpacked +-1
        bits for ``sign``/``delta``, ``None`` for ``none``."""
        if spec.kind == "none":
            return None
        if spec.kind == "ir":
            return torch.cat(list(self._chunks(images, "ir")))
        return self.release(images, spec, seed=seed).unpack()
