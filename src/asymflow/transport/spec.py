"""The public model agreed between the two sides: architecture, input shape, optimizer.

The private side tells the public server which M_res to build (the network without its stem,
Niu et al., CVPR 2024, arXiv 2312.05264, Sec. 3.4; DESIGN.md sec. 3) and which residual shape
(c, h, w) it will send. The server then refuses any payload of another shape. Nothing in a
spec is private: it is the same information as the run's configuration.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from asymflow.delta.contract import PublicConfig
from asymflow.models import public_model
from asymflow.models.resnet import ARCHS
from asymflow.public.local import LocalPublic

MAX_CLASSES = 1 << 16
"""Largest number of classes a spec may declare."""

MAX_SIDE = 4096
"""Largest channel count, height or width of the residual."""

MAX_SAMPLE_ELEMENTS = 1 << 26
"""Largest c*h*w of one residual (8 MiB of bits per sample)."""


def _int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {name}={value!r}")
    return value


def _float(name: str, value: object, low: float, high: float, *, open_low: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float)
    if ok:
        x = float(value)  # type: ignore[arg-type]
        ok = math.isfinite(x) and (low < x if open_low else low <= x) and x <= high
    if not ok:
        bracket = "(" if open_low else "["
        raise ValueError(
            f"{name} must be a number in {bracket}{low}, {high}], got {name}={value!r}"
        )
    return float(value)  # type: ignore[arg-type]


def _bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {name}={value!r}")
    return value


@dataclass(frozen=True)
class PublicSpec:
    """What the public server builds for one private side.

    ``shape`` is the residual's (c, h, w); M_res is ``public_model(arch, c, classes,
    width=width)`` initialized after ``torch.manual_seed(init_seed)``, trained by
    :class:`LocalPublic` with SGD (``momentum``, ``weight_decay``), optional crops
    (``augment``) and mirrors (``flip``), and evaluated in batches of ``eval_batch_size``.
    """

    arch: str
    shape: tuple[int, int, int]
    classes: int
    width: float
    init_seed: int
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = False
    flip: bool = False
    eval_batch_size: int = 256
    correct_label_noise: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {tuple(ARCHS)}, got arch={self.arch!r}")
        if not isinstance(self.shape, tuple | list) or len(self.shape) != 3:
            raise ValueError(f"shape must be (c, h, w), got shape={self.shape!r}")
        shape = tuple(_int(f"shape[{i}]", d, 1, MAX_SIDE) for i, d in enumerate(self.shape))
        if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
            raise ValueError(
                f"shape must have c*h*w <= {MAX_SAMPLE_ELEMENTS}, got {shape} "
                f"({math.prod(shape)} elements)"
            )
        object.__setattr__(self, "shape", shape)
        _int("classes", self.classes, 2, MAX_CLASSES)
        object.__setattr__(self, "width", _float("width", self.width, 0.0, 16.0, open_low=True))
        _int("init_seed", self.init_seed, 0, 2**63 - 1)
        object.__setattr__(self, "momentum", _float("momentum", self.momentum, 0.0, 0.999))
        object.__setattr__(
            self, "weight_decay", _float("weight_decay", self.weight_decay, 0.0, 1.0)
        )
        _bool("augment", self.augment)
        _bool("flip", self.flip)
        _bool("correct_label_noise", self.correct_label_noise)
        _int("eval_batch_size", self.eval_batch_size, 1, 1 << 16)

    @classmethod
    def from_config(
        cls, config: PublicConfig, *, classes: int, shape: tuple[int, int, int]
    ) -> PublicSpec:
        """The spec of ``config``'s M_res on residuals of ``shape``; the same model and
        optimizer as the in-process public side of ``train_delta``."""
        if not isinstance(config, PublicConfig):
            raise TypeError(f"config must be a DeltaConfig, got {type(config).__name__}")
        return cls(
            arch=config.public_arch,
            shape=tuple(shape),  # type: ignore[arg-type]
            classes=classes,
            width=config.public_width,
            init_seed=config.seed + 1,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
            augment=config.public_augment,
            flip=config.flip,
            eval_batch_size=config.eval_batch_size,
        )

    def factory(self) -> Callable[[], nn.Module]:
        """A zero-argument factory of a freshly initialized M_res."""

        def build() -> nn.Module:
            torch.manual_seed(self.init_seed)
            return public_model(self.arch, self.shape[0], self.classes, width=self.width)

        return build

    def public_options(self) -> dict[str, Any]:
        """The keyword arguments of :class:`LocalPublic` (and its subclasses) for this spec."""
        return {
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "augment": self.augment,
            "flip": self.flip,
            "correct_label_noise": self.correct_label_noise,
            "eval_batch_size": self.eval_batch_size,
        }

    def make_public(self) -> LocalPublic:
        """A fresh in-process public side for this spec."""
        return LocalPublic(self.factory(), **self.public_options())

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (inverse of :meth:`from_dict`)."""
        out = asdict(self)
        out["shape"] = list(self.shape)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PublicSpec:
        """Rebuild from :meth:`to_dict`; unknown or missing fields raise ``ValueError``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"spec must be an object, got {type(data).__name__}")
        names = set(cls.__dataclass_fields__)
        if set(data) != names:
            raise ValueError(
                f"spec must have exactly the fields {sorted(names)}; "
                f"missing {sorted(names - set(data))}, unknown {sorted(set(data) - names)}"
            )
        shape = data["shape"]
        if not isinstance(shape, list | tuple):
            raise ValueError(f"shape must be (c, h, w), got shape={shape!r}")
        return cls(**{**data, "shape": tuple(shape)})
