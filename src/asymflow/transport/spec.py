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

from asymflow.checks import check_bool, check_choice, check_int, check_number
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
        check_choice("arch", self.arch, tuple(ARCHS))
        if not isinstance(self.shape, tuple | list) or len(self.shape) != 3:
            raise ValueError(f"shape must be (c, h, w), got shape={self.shape!r}")
        shape = tuple(check_int(f"shape[{i}]", d, 1, MAX_SIDE) for i, d in enumerate(self.shape))
        if math.prod(shape) > MAX_SAMPLE_ELEMENTS:
            raise ValueError(
                f"shape must have c*h*w <= {MAX_SAMPLE_ELEMENTS}, got {shape} "
                f"({math.prod(shape)} elements)"
            )
        object.__setattr__(self, "shape", shape)
        check_int("classes", self.classes, 2, MAX_CLASSES)
        for name, high in (("width", 16.0), ("momentum", 0.999), ("weight_decay", 1.0)):
            value = check_number(name, getattr(self, name), 0.0, high, open_low=name == "width")
            object.__setattr__(self, name, value)
        check_int("init_seed", self.init_seed, 0, 2**63 - 1)
        for name in ("augment", "flip", "correct_label_noise"):
            check_bool(name, getattr(self, name))
        check_int("eval_batch_size", self.eval_batch_size, 1, 1 << 16)

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
