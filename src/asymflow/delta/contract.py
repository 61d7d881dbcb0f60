"""The public side's contract: what may cross from the private side to the public side.

Both ends import this module and nothing else of each other (DESIGN.md sec. 2, 5): the
payload types (:class:`SanitizedResidual`: clipped, noised, 1-bit residuals; :class:`NoisyLabels`
and :class:`NoisyLabelGradients`: label-DP releases), each carrying its privacy event; the
protocols a public side answers (:class:`PublicSide`, :class:`StepwisePublicSide`) and its
training arguments (:class:`TrainArgs`); the layouts of the payloads (:class:`Layout`, followed
by the wire codec and by a run's release files); the checks both ends apply to what crosses; the
fields of a run's configuration that decide the public model (:class:`PublicConfig`), and a
trained run's public side (:func:`trained_public`).
The public side trains M_res on what it receives and returns z_res (Niu et al., CVPR 2024,
arXiv 2312.05264, Sec. 3.4).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from asymflow.accounting.events import (
    Event,
    Gaussian,
    NonPrivate,
    RandomizedResponse,
    event_from_dict,
)

WIRE_VERSION = 1
"""Version of the payload format (:class:`SanitizedResidual`)."""

DEFAULT_MODEL = "res"
"""The name of the public model when no cross-fitting is used."""


# ------------------------------------------------------------------------------ payloads


@dataclass(frozen=True)
class SanitizedResidual:
    """Bit-packed sanitized residuals of a batch, with the privacy event of their release.

    ``bits`` is uint8 of shape (N, ceil(c*h*w/8)); bit j of sample i is 1[noisy residual >= 0]
    at flat position j of its (c, h, w) tensor (numpy ``packbits`` order, big-endian in a byte).
    """

    bits: np.ndarray
    shape: tuple[int, int, int]
    event: Event
    version: int = WIRE_VERSION

    def __post_init__(self) -> None:
        if self.bits.dtype != np.uint8 or self.bits.ndim != 2:
            raise ValueError("bits must be a 2-D uint8 array")
        if len(self.shape) != 3 or any(int(d) < 1 for d in self.shape):
            raise ValueError(f"shape must be (c, h, w) with positive sizes, got {self.shape}")
        if self.bits.shape[1] != self.bytes_per_sample:
            raise ValueError(
                f"bits must have ceil(c*h*w/8) = {self.bytes_per_sample} bytes per sample, "
                f"got {self.bits.shape[1]}"
            )

    @property
    def bytes_per_sample(self) -> int:
        """ceil(c*h*w / 8): one bit per residual element."""
        return math.ceil(math.prod(self.shape) / 8)

    def __len__(self) -> int:
        return self.bits.shape[0]

    def unpack(self) -> Tensor:
        """The public model's input: a float tensor (N, c, h, w) of +-1."""
        flat = np.unpackbits(self.bits, axis=1, count=math.prod(self.shape))
        signs = torch.from_numpy(flat.astype(np.float32)).mul_(2).sub_(1)
        return signs.reshape(len(self), *self.shape)

    def subset(self, index: np.ndarray | slice) -> SanitizedResidual:
        """The residuals of some samples (no new release)."""
        return SanitizedResidual(self.bits[index], self.shape, self.event, self.version)


def as_labels(labels: np.ndarray | Tensor, classes: int) -> np.ndarray:
    """``labels`` as an int64 array of classes in [0, ``classes``), or ``ValueError``."""
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes must be an integer >= 2, got classes={classes!r}")
    array = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {array.dtype} {array.shape}")
    if len(array) and (array.min() < 0 or array.max() >= classes):
        raise ValueError(
            f"labels must satisfy 0 <= label < classes={classes}, "
            f"got range [{array.min()}, {array.max()}]"
        )
    return array.astype(np.int64)


def keep_probability(epsilon: float, classes: int) -> float:
    """p = e^eps / (e^eps + K - 1), the k-ary RR keep probability (Kairouz et al. 2016)."""
    if not (math.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"epsilon must be a finite number > 0, got epsilon={epsilon}")
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 2:
        raise ValueError(f"classes must be an integer >= 2, got classes={classes!r}")
    return 1.0 / (1.0 + (classes - 1) * math.exp(-epsilon))


@dataclass(frozen=True)
class NoisyLabels:
    """Labels as released to the public side: int64 (N,) in [0, classes), and their event
    (``RandomizedResponse`` or ``NonPrivate``). Serializable: an array, an int, an event."""

    labels: np.ndarray
    classes: int
    event: Event

    def __post_init__(self) -> None:
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int64:
            raise TypeError("labels must be an int64 numpy array")
        as_labels(self.labels, self.classes)
        if not isinstance(self.event, RandomizedResponse | NonPrivate):
            raise TypeError(
                f"event must be RandomizedResponse or NonPrivate, got {type(self.event).__name__}"
            )
        if isinstance(self.event, RandomizedResponse) and self.event.classes != self.classes:
            raise ValueError(
                f"event.classes must equal classes={self.classes}, got {self.event.classes}"
            )
        self.labels.setflags(write=False)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def keep_probability(self) -> float:
        """P(released label = true label): e^eps/(e^eps + K - 1) for RR, 1 in clear."""
        if isinstance(self.event, RandomizedResponse):
            return keep_probability(self.event.epsilon, self.classes)
        return 1.0


@dataclass(frozen=True)
class NoisyLabelGradients:
    """d CE / d z_res for a batch of public rows, as released: float32 (B, K) values of
    softmax(z_res) - e_y + N(0, (sqrt(2) sigma)^2 I), and the per-row event Gaussian(sigma)."""

    values: np.ndarray
    event: Gaussian

    def __post_init__(self) -> None:
        if not isinstance(self.values, np.ndarray) or self.values.dtype != np.float32:
            raise TypeError("values must be a float32 numpy array")
        if self.values.ndim != 2 or self.values.shape[1] < 2:
            shape = self.values.shape
            raise ValueError(f"values must have shape (rows, classes >= 2), got {shape}")
        if not np.isfinite(self.values).all():
            raise ValueError("values must be finite")
        if not isinstance(self.event, Gaussian):
            raise TypeError(f"event must be Gaussian, got {type(self.event).__name__}")
        self.values.setflags(write=False)

    def __len__(self) -> int:
        return len(self.values)


# ------------------------------------------------------------------------------ layouts

PartKind = Literal["array", "int", "ints", "event"]


@dataclass(frozen=True)
class Part:
    """One part of a payload: its ``key``, the attribute it fills (``attr``, default the
    key) and its kind: a numpy array, an int, a tuple of ints or a privacy event."""

    key: str
    kind: PartKind
    attr: str = ""

    @property
    def field(self) -> str:
        return self.attr or self.key


@dataclass(frozen=True)
class Layout:
    """The parts of a payload type, in their order: the one declaration both of its
    serializations follow. The wire codec sends part ``key`` with one rule a key, in this
    order (transport/wire.py); a run's release file keeps the same parts as named arrays
    (:meth:`to_arrays`). Both rebuild the payload through its constructor and its checks."""

    cls: type
    parts: tuple[Part, ...]

    def to_arrays(self, payload: Any) -> dict[str, np.ndarray]:
        """The payload's parts as arrays named by attribute (an event as its JSON text)."""
        out = {}
        for part in self.parts:
            value = getattr(payload, part.field)
            if part.kind == "event":
                value = json.dumps(value.to_dict())
            out[part.field] = np.asarray(value, dtype=np.int64 if "int" in part.kind else None)
        return out

    def from_arrays(self, arrays: Mapping[str, np.ndarray]) -> Any:
        """The payload of :meth:`to_arrays`' arrays (other names are ignored)."""
        values: dict[str, Any] = {}
        for part in self.parts:
            array = arrays[part.field]
            if part.kind == "array":
                values[part.field] = np.ascontiguousarray(array)
            elif part.kind == "int":
                values[part.field] = int(array)
            elif part.kind == "ints":
                values[part.field] = tuple(int(d) for d in array)
            else:
                values[part.field] = event_from_dict(json.loads(str(array)))
        return self.cls(**values)


RESIDUAL_LAYOUT = Layout(
    SanitizedResidual,
    (Part("shape", "ints"), Part("version", "int"), Part("event", "event"), Part("bits", "array")),
)
LABELS_LAYOUT = Layout(
    NoisyLabels,
    (Part("classes", "int"), Part("event", "event"), Part("values", "array", attr="labels")),
)


def check_payload(data: object, labels: object = None) -> None:
    """Refuse anything but a :class:`SanitizedResidual` (and :class:`NoisyLabels` or None)
    with ``TypeError``: raw tensors and plain label arrays never cross the boundary."""
    if not isinstance(data, SanitizedResidual):
        raise TypeError(
            f"data must be a SanitizedResidual (clipped, noised, 1-bit), got {type(data).__name__}"
        )
    if labels is not None and not isinstance(labels, NoisyLabels):
        raise TypeError(
            f"labels must be NoisyLabels (a label-DP release) or None, got {type(labels).__name__}"
        )
    if labels is not None and len(labels) != len(data):
        raise ValueError(f"labels must have one entry per sample ({len(data)}), got {len(labels)}")


def dataset_id(data: SanitizedResidual, labels: NoisyLabels | None) -> str:
    """Content hash of a payload: uploading the same payload twice gives the same id."""
    digest = hashlib.sha256()
    digest.update(repr((data.shape, data.version, data.event.to_dict())).encode())
    digest.update(np.ascontiguousarray(data.bits).tobytes())
    if labels is not None:
        digest.update(repr((labels.classes, labels.event.to_dict())).encode())
        digest.update(np.ascontiguousarray(labels.labels).tobytes())
    return digest.hexdigest()[:20]


def checked_rows(indices: np.ndarray, n: int) -> np.ndarray:
    """``indices`` as a non-empty 1-D integer array of rows in [0, n), or ``ValueError``."""
    rows = np.asarray(indices)
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer) or len(rows) == 0:
        raise ValueError("indices must be a non-empty 1-D integer array")
    if rows.min() < 0 or rows.max() >= n:
        raise ValueError(f"indices must lie in [0, {n}), got [{rows.min()}, {rows.max()}]")
    return rows


# ------------------------------------------------------------------------------ training


@dataclass(frozen=True)
class TrainArgs:
    """How the public side trains model ``model`` on an uploaded data set: ``epochs`` epochs
    over its rows ``indices`` (default all) in batches of ``batch_size``, the order and crops
    drawn from ``seed``, the learning rate a cosine from ``lr`` over ``total_epochs`` (default
    ``start_epoch + epochs``) starting at ``start_epoch``."""

    epochs: int
    batch_size: int
    lr: float
    seed: int
    start_epoch: int = 0
    total_epochs: int | None = None
    model: str = DEFAULT_MODEL
    indices: np.ndarray | None = field(default=None, compare=False)

    @property
    def total(self) -> int:
        """Epochs of the cosine schedule."""
        return self.start_epoch + self.epochs if self.total_epochs is None else self.total_epochs

    def rows(self, n: int) -> np.ndarray:
        """The rows trained on, of a data set of ``n``: ``indices`` checked, or all."""
        return np.arange(n) if self.indices is None else checked_rows(self.indices, n)


@runtime_checkable
class PublicSide(Protocol):
    """What the private side may call on the public side.

    The public side may hold several models (by name, e.g. one per cross-fitting fold); each
    trains on an uploaded data set or a subset of its rows.
    """

    def upload(self, data: SanitizedResidual, labels: NoisyLabels | None = None) -> str:
        """Store released residuals (and label-DP labels); return the data set's id."""
        ...

    def train(self, dataset_id: str, epochs: int, **options: Any) -> dict[str, float]:
        """Train on an uploaded, labelled data set; ``epochs`` and the keyword ``options``
        (``batch_size``, ``lr`` and ``seed`` required) are the fields of :class:`TrainArgs`."""
        ...

    def logits(self, data: SanitizedResidual, *, model: str = DEFAULT_MODEL) -> Tensor:
        """z_res (N, classes) of released residuals from model ``model``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The public side's models and optimizer states (for checkpoints)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        ...


@runtime_checkable
class StepwisePublicSide(PublicSide, Protocol):
    """A public side that can also train step by step on released label gradients
    (``labels="grad"``): per batch, :meth:`step_logits` returns z_res and the private side
    answers with noisy dL/dz_res for :meth:`step_apply`."""

    def step_logits(
        self,
        dataset_id: str,
        indices: np.ndarray,
        *,
        lr: float,
        seed: int,
        step: int,
        model: str = DEFAULT_MODEL,
    ) -> Tensor:
        """z_res (B, classes) of the rows ``indices`` of an uploaded data set, in training mode."""
        ...

    def step_apply(self, gradients: NoisyLabelGradients, *, model: str = DEFAULT_MODEL) -> None:
        """One optimizer step of ``model`` along the released gradients of its pending batch."""
        ...


class TrainsWithArgs:
    """:meth:`PublicSide.train` for an implementation of :meth:`train_with`: the keyword
    arguments become one :class:`TrainArgs` (an unknown or missing name is a ``TypeError``)."""

    def train(self, dataset_id: str, epochs: int, **options: Any) -> dict[str, float]:
        return self.train_with(dataset_id, TrainArgs(epochs, **options))

    def train_with(self, dataset_id: str, args: TrainArgs) -> dict[str, float]:
        """Train on an uploaded, labelled data set as ``args`` says; return its metrics."""
        raise NotImplementedError


@dataclass(frozen=True)
class StepArgs:
    """One step of :meth:`StepwisePublicSide.step_logits`: z_res of the rows ``indices`` of an
    uploaded data set from model ``model`` in training mode, augmented with the seed of
    (``seed``, ``step``); the optimizer step that follows uses ``lr``."""

    indices: np.ndarray = field(compare=False)
    lr: float
    seed: int
    step: int
    model: str = DEFAULT_MODEL


class StepsWithArgs:
    """:meth:`StepwisePublicSide.step_logits` for an implementation of
    :meth:`step_logits_with`: the keyword arguments become one :class:`StepArgs`."""

    def step_logits(self, dataset_id: str, indices: np.ndarray, **options: Any) -> Tensor:
        return self.step_logits_with(dataset_id, StepArgs(indices, **options))

    def step_logits_with(self, dataset_id: str, args: StepArgs) -> Tensor:
        """z_res (B, classes) of one step as ``args`` says, in training mode."""
        raise NotImplementedError


# ------------------------------------------------------------------------------ cross-fitting


def fold_model_names(folds: int) -> tuple[str, ...]:
    """Model names for ``folds``-fold cross-fitting: ``("res",)`` for 1, else fold0, fold1..."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ValueError(f"folds must be an integer >= 1, got folds={folds!r}")
    return (DEFAULT_MODEL,) if folds == 1 else tuple(f"fold{k}" for k in range(folds))


def ensemble_logits(public: PublicSide, data: SanitizedResidual, models: tuple[str, ...]) -> Tensor:
    """Mean of the public models' logits: z_res at test time under cross-fitting."""
    return torch.stack([public.logits(data, model=m) for m in models]).mean(0)


# ------------------------------------------------------------------------------ the model


@runtime_checkable
class PublicConfig(Protocol):
    """The fields of a run's configuration (``DeltaConfig``) that decide M_res and its
    optimizer: all the public side learns of the private side's settings."""

    public_arch: str
    public_width: float
    seed: int
    momentum: float
    weight_decay: float
    public_augment: bool
    flip: bool
    eval_batch_size: int


@dataclass(frozen=True)
class TrainedPublic:
    """The public side of a trained run: its configuration, the classes and residual shape
    (c, h, w) of its M_res, and the public models' state of its last checkpoint (or None)."""

    config: PublicConfig
    classes: int
    shape: tuple[int, int, int]
    state: Mapping[str, Any] | None


def trained_public(run_dir: str | os.PathLike[str]) -> TrainedPublic:
    """:class:`TrainedPublic` of the run in ``run_dir``, from its config and last checkpoint."""
    from asymflow.delta import runs  # runs imports this module: import on use

    config = runs.read_config(run_dir)
    found = runs.latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"run_dir must hold a checkpoint, got {run_dir}")
    state = runs.load_checkpoint(Path(found[2]))
    meta = state["meta"]
    shape = (config.ir_channels, int(meta["image_shape"][0]), int(meta["image_shape"][1]))
    return TrainedPublic(config, int(meta["classes"]), shape, state.get("public"))
