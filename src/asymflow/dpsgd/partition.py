"""Model partitioning for DP-SGD: which parameters a record's clipped gradient may touch.

Dong, Chen, Ozgur, "Leveraging Randomness in Model and Data Partitioning for Privacy
Amplification", ICML 2025 (arXiv 2503.03043), Sec. 3-4; ACCOUNTING.md sec. 3:

- ``split:d``: the trainable parameters are cut into d disjoint blocks B_1..B_d (whole tensors or
  whole layers, balanced by parameter count). At every step each record i draws
  b_i ~ U{1..d}, independently of everything else, and its per-sample gradient is zeroed
  outside B_{b_i} *before* clipping: g_i <- 1[B_{b_i}] * g_i, then g_i <- g_i min(1, C/||g_i||).
  Gaussian noise N(0, sigma^2 C^2) goes on every coordinate of every block. Per step this is
  the 1-of-d random-allocation pair of the Gaussian mechanism, ``ModelPartitioned(d, ...)``.
- ``dropout:0.5``: each coordinate of a record's gradient is kept independently with
  probability 1/2, then clipped; noise on all coordinates. For a mask m the complement 1 - m is
  equally likely, so given the pair {m, 1 - m} the record updates one of two disjoint blocks
  uniformly: a 2-split, and by joint convexity the mixture over pairs is dominated by the same
  pair (their Cor. 3.7). Recorded as ``Dropout(0.5, ...)``. Other rates are refused.
- ``shared``: parameters every record updates (partial splitting). The shared part and the split
  part are clipped separately, to C_shared and C, each with noise sigma times its own clip norm.

How each case is accounted is decided by :func:`step_accounting`; see its docstring for the
two cases where no partition amplification is claimed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from asymflow.accounting.events import Composed, Dropout, Event, Gaussian, ModelPartitioned

__all__ = [
    "PARTITION_KINDS",
    "SHARED",
    "UNITS",
    "PartitionPlan",
    "PartitionSpec",
    "StepAccounting",
    "plan_partition",
    "step_accounting",
]

PARTITION_KINDS: tuple[str, ...] = ("none", "split", "dropout")
UNITS: tuple[str, ...] = ("layer", "tensor")
SHARED = -1
"""``PartitionPlan.block_of`` value of a parameter that every record updates."""

DROPOUT_RATE = 0.5
"""The only dropout rate with a known reduction to splitting (Dong, Chen, Ozgur 2025, Cor. 3.7)."""


@dataclass(frozen=True, slots=True)
class PartitionSpec:
    """A partitioning mode as written on the command line: ``none``, ``split:d`` or
    ``dropout:0.5``. ``parts`` is d for a split and 2 for dropout (its reduction)."""

    kind: str = "none"
    parts: int = 1

    def __post_init__(self) -> None:
        if self.kind not in PARTITION_KINDS:
            raise ValueError(f"kind must be one of {PARTITION_KINDS}, got kind={self.kind!r}")
        if isinstance(self.parts, bool) or not isinstance(self.parts, int):
            raise ValueError(f"parts must be an integer, got parts={self.parts!r}")
        if self.kind == "none" and self.parts != 1:
            raise ValueError(f"parts must be 1 without partitioning, got parts={self.parts}")
        if self.kind == "split" and self.parts < 2:
            raise ValueError(f"parts must satisfy parts >= 2 for split:d, got parts={self.parts}")
        if self.kind == "dropout" and self.parts != 2:
            raise ValueError(f"parts must be 2 for dropout:0.5 (Cor. 3.7), got parts={self.parts}")

    @classmethod
    def parse(cls, text: str) -> PartitionSpec:
        """``"none"``, ``"split:d"`` (integer d >= 2) or ``"dropout:0.5"``."""
        if not isinstance(text, str):
            raise ValueError(f"partition must be a string such as 'split:4', got {text!r}")
        kind, sep, arg = text.strip().lower().partition(":")
        if kind == "none" and not sep:
            return cls()
        if kind == "split" and sep:
            if not arg.strip().isdigit() or int(arg) < 2:
                raise ValueError(
                    f"partition split:d needs an integer d >= 2, got partition={text!r}"
                )
            return cls("split", int(arg))
        if kind == "dropout" and sep:
            try:
                rate = float(arg)
            except ValueError:
                rate = math.nan
            if rate != DROPOUT_RATE:
                raise ValueError(
                    "partition dropout:r is only supported at r = 0.5, which reduces to "
                    "split:2 (Dong, Chen, Ozgur 2025, Cor. 3.7); other rates have no certified "
                    f"amplification here, got partition={text!r}"
                )
            return cls("dropout", 2)
        raise ValueError(
            f"partition must be 'none', 'split:d' (d >= 2) or 'dropout:0.5', got {text!r}"
        )

    def __str__(self) -> str:
        if self.kind == "split":
            return f"split:{self.parts}"
        if self.kind == "dropout":
            return f"dropout:{DROPOUT_RATE}"
        return "none"


@dataclass(frozen=True, slots=True)
class StepAccounting:
    """How one noisy step is accounted: the inner event ``event(sigma)`` that the sampler wraps.

    The effective Gaussian multiplier is ``sigma / sigma_divisor``; ``parts`` > 1 claims
    partition amplification (``ModelPartitioned``, or ``Dropout(0.5)`` when ``dropout``).
    Calibration: if ``s = noise_for_epsilon(..., parts=parts).sigma``, then
    ``sigma = s * sigma_divisor`` gives exactly the calibrated event.
    """

    parts: int
    dropout: bool
    sigma_divisor: float
    note: str
    shared: bool = False

    def event(self, sigma: float) -> Event:
        """The per-step event at noise multiplier ``sigma`` (clip norms are the unit)."""
        base = Gaussian(sigma / self.sigma_divisor)
        if self.dropout:
            split: Event = Dropout(DROPOUT_RATE, base)
        elif self.parts > 1:
            split = ModelPartitioned(self.parts, base)
        else:
            return base
        return Composed((base, split)) if self.shared else split


def step_accounting(spec: PartitionSpec, sampler: str, *, has_shared: bool) -> StepAccounting:
    """The accounting of one step of ``spec`` under ``sampler`` ("poisson" or "balanced").

    - no partitioning: ``Gaussian(sigma)``;
    - split/dropout without a shared part, Poisson sampling: ``ModelPartitioned(d, Gaussian)``
      (``Dropout(0.5, Gaussian)``), bounded by our RDP and PLD accountants;
    - split/dropout with BIS: no accountant bounds ``BalancedSampled(k, T, ModelPartitioned)``,
      so the step is accounted conservatively WITHOUT partition amplification as
      ``Gaussian(sigma)``: the clipped contribution has norm <= C and every coordinate gets
      N(0, sigma^2 C^2), so the plain Gaussian pair dominates it;
    - with a shared part: the shared and the split update come from the SAME batch, so adding the
      RDP of two separately subsampled events would under-report (for two Gaussian parts, the
      joint Poisson-subsampled mechanism is the subsampled Gaussian with multiplier sigma/sqrt(2),
      whose RDP exceeds twice that at sigma). Under Poisson sampling the step is the joint event
      ``Composed((Gaussian(sigma), ModelPartitioned(d, Gaussian(sigma))))`` under one sampling
      decision, which our accountants bound (likelihood ratios multiply). Under BIS, in units of
      their own clip norms the two parts have joint sensitivity sqrt(1 + 1), so the step is
      accounted as ``Gaussian(sigma/sqrt(2))``, without partition amplification.
    """
    if sampler not in ("poisson", "balanced"):
        raise ValueError(f"sampler must be 'poisson' or 'balanced', got sampler={sampler!r}")
    if spec.kind == "none":
        if has_shared:
            raise ValueError("shared parameters need partition 'split:d' or 'dropout:0.5'")
        return StepAccounting(1, False, 1.0, "plain DP-SGD: Gaussian(sigma) per step")
    if has_shared and sampler == "poisson":
        parts = 2 if spec.kind == "dropout" else spec.parts
        return StepAccounting(
            parts,
            spec.kind == "dropout",
            1.0,
            f"partial {spec}: shared and split parts clipped separately on the same Poisson "
            f"batch; accounted as the joint step Composed((Gaussian, {spec})) under one "
            "sampling decision",
            shared=True,
        )
    if has_shared:
        return StepAccounting(
            1,
            False,
            math.sqrt(2.0),
            f"partial {spec} with balanced sampling: shared and split parts clipped separately "
            "on the same batch; accounted as Gaussian(sigma/sqrt(2)) per step (joint "
            "sensitivity sqrt(2)), without partition amplification",
        )
    if sampler == "balanced":
        return StepAccounting(
            1,
            False,
            1.0,
            f"{spec} with balanced sampling: no accountant bounds "
            "BalancedSampled(k, T, ModelPartitioned(...)); accounted conservatively as "
            "BalancedSampled(k, T, Gaussian(sigma)), without partition amplification",
        )
    if spec.kind == "dropout":
        return StepAccounting(
            2, True, 1.0, "dropout:0.5, accounted as Dropout(0.5, Gaussian(sigma)) = split:2"
        )
    return StepAccounting(
        spec.parts, False, 1.0, f"{spec}: ModelPartitioned({spec.parts}, Gaussian(sigma))"
    )


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    """Trainable parameters ``names`` (with ``sizes`` elements) and their roles.

    ``block_of[j]`` is the block of parameter j in ``0..num_blocks-1``, or :data:`SHARED`.
    Without partitioning and with dropout every non-shared parameter is in block 0.
    """

    spec: PartitionSpec
    unit: str
    names: tuple[str, ...]
    sizes: tuple[int, ...]
    block_of: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.names) == len(self.sizes) == len(self.block_of)):
            raise ValueError("names, sizes and block_of must have the same length")
        if not self.names:
            raise ValueError("a partition plan needs at least one trainable parameter")
        blocks = self.num_blocks
        for name, b in zip(self.names, self.block_of, strict=True):
            if not (b == SHARED or 0 <= b < blocks):
                raise ValueError(f"block_of[{name!r}] must be -1 or in [0, {blocks}), got {b}")
        if all(b == SHARED for b in self.block_of):
            raise ValueError("at least one parameter must be outside the shared set")
        if self.spec.kind == "split":
            used = {b for b in self.block_of if b != SHARED}
            if used != set(range(blocks)):
                raise ValueError(f"every one of the {blocks} blocks must hold a parameter")

    @property
    def num_blocks(self) -> int:
        """d for ``split:d``, else 1 (dropout masks coordinates, not blocks)."""
        return self.spec.parts if self.spec.kind == "split" else 1

    @property
    def blocks(self) -> tuple[tuple[str, ...], ...]:
        """Parameter names of each block."""
        return tuple(
            tuple(n for n, b in zip(self.names, self.block_of, strict=True) if b == block)
            for block in range(self.num_blocks)
        )

    @property
    def shared(self) -> tuple[str, ...]:
        """Names of the parameters every record updates."""
        return tuple(n for n, b in zip(self.names, self.block_of, strict=True) if b == SHARED)

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Number of parameter elements in each block."""
        sizes = [0] * self.num_blocks
        for size, b in zip(self.sizes, self.block_of, strict=True):
            if b != SHARED:
                sizes[b] += size
        return tuple(sizes)

    @property
    def shared_size(self) -> int:
        """Number of parameter elements in the shared set."""
        return sum(s for s, b in zip(self.sizes, self.block_of, strict=True) if b == SHARED)

    def parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """``model``'s parameters in plan order; the names must match the plan's."""
        found = dict(model.named_parameters())
        missing = [n for n in self.names if n not in found]
        if missing:
            raise ValueError(f"model must have the plan's parameters, missing {missing[:5]}")
        return [found[n] for n in self.names]

    def draw_masks(
        self, batch_size: int, shapes: Sequence[torch.Size], generator: torch.Generator
    ) -> list[Tensor | None]:
        """Per-sample multiplicative masks, one per parameter (``None``: keep everything).

        split:d: b_i ~ U{0..d-1} per record, mask_j[i] = 1[b_i = block_of[j]] of shape
        (B, 1, ..., 1). dropout:0.5: i.i.d. Bernoulli(1/2) per record and coordinate, shape
        (B, *shape). Shared parameters and plain DP-SGD get ``None``.
        """
        if len(shapes) != len(self.names):
            raise ValueError(f"shapes must list {len(self.names)} parameter shapes")
        device = generator.device
        if self.spec.kind == "split":
            chosen = torch.randint(
                0, self.num_blocks, (batch_size,), generator=generator, device=device
            )
            masks: list[Tensor | None] = []
            for shape, b in zip(shapes, self.block_of, strict=True):
                if b == SHARED:
                    masks.append(None)
                else:
                    keep = (chosen == b).to(torch.float32)
                    masks.append(keep.view(batch_size, *([1] * len(shape))))
            return masks
        if self.spec.kind == "dropout":
            return [
                None
                if b == SHARED
                else (
                    torch.rand((batch_size, *shape), generator=generator, device=device)
                    < 1 - DROPOUT_RATE
                ).to(torch.float32)
                for shape, b in zip(shapes, self.block_of, strict=True)
            ]
        return [None] * len(self.names)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready summary: mode, unit, block sizes and names, shared names."""
        return {
            "partition": str(self.spec),
            "unit": self.unit,
            "block_sizes": list(self.block_sizes),
            "shared_size": self.shared_size,
            "blocks": [list(b) for b in self.blocks],
            "shared": list(self.shared),
        }


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _unit_key(name: str, unit: str) -> str:
    return name.rsplit(".", 1)[0] if unit == "layer" and "." in name else name


def plan_partition(
    model: nn.Module,
    spec: PartitionSpec | str = "none",
    *,
    shared: Sequence[str] = (),
    unit: str = "layer",
) -> PartitionPlan:
    """Assign ``model``'s trainable parameters to the blocks of ``spec``.

    ``shared`` lists name prefixes (module or parameter names, e.g. ``"stem"``, ``"body.fc"``)
    whose parameters every record updates. For ``split:d`` the remaining units (``unit="layer"``:
    all parameters of one module together; ``"tensor"``: each parameter tensor) are assigned by
    longest-processing-time-first greedy balancing: largest unit first, each to the block with
    the fewest elements so far (Graham 1969: at most 4/3 of the optimal largest block).
    """
    if isinstance(spec, str):
        spec = PartitionSpec.parse(spec)
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {UNITS}, got unit={unit!r}")
    if isinstance(shared, str):
        raise ValueError(f"shared must be a sequence of name prefixes, got shared={shared!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model must have at least one trainable parameter")
    names = tuple(n for n, _ in named)
    sizes = tuple(p.numel() for _, p in named)
    for prefix in shared:
        if not any(_matches(n, prefix) for n in names):
            modules = sorted({_unit_key(n, "layer") for n in names})
            raise ValueError(
                f"shared prefix {prefix!r} must match a trainable parameter; modules with "
                f"parameters: {modules[:12]}{' ...' if len(modules) > 12 else ''}"
            )
    if shared and spec.kind == "none":
        raise ValueError("shared parameters need partition 'split:d' or 'dropout:0.5'")
    is_shared = [any(_matches(n, s) for s in shared) for n in names]
    block_of = [SHARED if s else 0 for s in is_shared]
    if all(is_shared):
        raise ValueError("shared must leave at least one trainable parameter to split")
    if spec.kind == "split":
        units: dict[str, list[int]] = {}
        for j, name in enumerate(names):
            if not is_shared[j]:
                units.setdefault(_unit_key(name, unit), []).append(j)
        if len(units) < spec.parts:
            raise ValueError(
                f"parts must satisfy 2 <= parts <= {len(units)} (the number of non-shared "
                f"{unit}s), got parts={spec.parts}"
            )
        order = sorted(units.values(), key=lambda js: (-sum(sizes[j] for j in js), js[0]))
        load = [0] * spec.parts
        for js in order:
            target = min(range(spec.parts), key=lambda b: (load[b], b))
            load[target] += sum(sizes[j] for j in js)
            for j in js:
                block_of[j] = target
    return PartitionPlan(spec, unit, names, sizes, tuple(block_of))
