"""Image splits as uint8 NHWC arrays, and their torch view: per-channel normalized float CHW
tensors with the standard CIFAR augmentation (zero-pad 4, random crop, horizontal flip;
He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, sec. 4.2).

Normalization is ``x ← (x/255 − mean_c) / std_c`` with the channel statistics of the *train*
split. Augmentation runs on ``x/255`` before normalization, so padded pixels are black, as in
the usual torchvision pipeline (RandomCrop, RandomHorizontalFlip, ToTensor, Normalize).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional
from torch.utils.data import Dataset

__all__ = [
    "ImageData",
    "ImageSplit",
    "TensorImageDataset",
    "augment_batch",
    "channel_stats",
    "crop_and_flip",
]

_STATS_CHUNK = 4096
"""Images per chunk when summing channel statistics (bounds the float64 temporary)."""


@dataclass(frozen=True, slots=True, eq=False)
class ImageSplit:
    """One split: ``images`` uint8 (N, H, W, C), ``labels`` int64 (N,) indexing ``classes``.
    Compared by identity (the arrays make value equality ambiguous)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        images, labels, classes = self.images, self.labels, self.classes
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            got = (
                f"{images.dtype} array of shape {images.shape}"
                if isinstance(images, np.ndarray)
                else type(images).__name__
            )
            raise ValueError(f"images must be a uint8 array of shape (N, H, W, C), got {got}")
        if min(images.shape[1:]) < 1:
            raise ValueError(f"images must have H, W, C >= 1, got shape {images.shape}")
        if not isinstance(labels, np.ndarray) or labels.dtype != np.int64 or labels.ndim != 1:
            got = (
                f"{labels.dtype} array of shape {labels.shape}"
                if isinstance(labels, np.ndarray)
                else type(labels).__name__
            )
            raise ValueError(f"labels must be an int64 array of shape (N,), got {got}")
        if len(labels) != len(images):
            raise ValueError(
                f"labels must have one entry per image, got {len(labels)} labels "
                f"for {len(images)} images"
            )
        if not isinstance(classes, tuple) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"classes must be a tuple of str, got {classes!r}")
        if len(classes) < 1 or len(set(classes)) != len(classes):
            raise ValueError(f"classes must be non-empty and distinct, got {classes!r}")
        if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
            raise ValueError(
                f"labels must satisfy 0 <= label < {len(classes)} (the number of classes), "
                f"got range [{labels.min()}, {labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every image."""
        _, h, w, c = self.images.shape
        return (h, w, c)


@dataclass(frozen=True, slots=True, eq=False)
class ImageData:
    """A named data set: a train and a test split over the same classes and image shape."""

    train: ImageSplit
    test: ImageSplit
    name: str

    def __post_init__(self) -> None:
        if self.train.classes != self.test.classes:
            raise ValueError(
                "train and test must share classes, got "
                f"train.classes={self.train.classes!r}, test.classes={self.test.classes!r}"
            )
        if self.train.image_shape != self.test.image_shape:
            raise ValueError(
                "train and test must share the image shape (H, W, C), got "
                f"{self.train.image_shape} and {self.test.image_shape}"
            )

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names; label ``i`` is ``classes[i]``."""
        return self.train.classes

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the train split on the [0, 1] scale."""
        return channel_stats(self.train)

    def tensor_datasets(
        self, *, augment: bool = True, seed: int = 0
    ) -> tuple[TensorImageDataset, TensorImageDataset]:
        """(train, test) datasets normalized with the train statistics; only train augments."""
        mean, std = self.channel_stats()
        train = TensorImageDataset(
            self.train, train=True, mean=mean, std=std, augment=augment, seed=seed
        )
        test = TensorImageDataset(self.test, train=False, mean=mean, std=std, seed=seed)
        return train, test


def channel_stats(split: ImageSplit) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of ``images/255`` over the split."""
    if len(split) == 0:
        raise ValueError("split must hold at least one image to compute channel statistics")
    c = split.images.shape[-1]
    total = np.zeros(c)
    total_sq = np.zeros(c)
    for start in range(0, len(split), _STATS_CHUNK):
        chunk = split.images[start : start + _STATS_CHUNK].reshape(-1, c).astype(np.float64)
        total += chunk.sum(axis=0)
        total_sq += np.square(chunk).sum(axis=0)
    count = split.images[..., 0].size
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    return tuple(float(m) / 255 for m in mean), tuple(float(s) / 255 for s in np.sqrt(var))


def _check_batch(x: Tensor, padding: int) -> None:
    if not isinstance(x, Tensor) or x.ndim != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a tensor of shape (N, C, H, W), got {got}")
    if isinstance(padding, bool) or operator.index(padding) < 0:
        raise ValueError(f"padding must be an integer >= 0, got padding={padding!r}")


def crop_and_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, *, padding: int = 4) -> Tensor:
    """Zero-pad ``x`` (N, C, H, W) by ``padding``, crop H×W at offset (dy, dx), then mirror the
    samples where ``flip`` is true. One gather for the whole batch; offsets lie in [0, 2·padding].
    """
    _check_batch(x, padding)
    n, _, h, w = x.shape
    span = 2 * padding
    for name, offset in (("dy", dy), ("dx", dx)):
        if offset.shape != (n,) or offset.dtype.is_floating_point:
            raise ValueError(f"{name} must be an integer tensor of shape ({n},)")
        if n and (int(offset.min()) < 0 or int(offset.max()) > span):
            raise ValueError(f"{name} must lie in [0, 2*padding] = [0, {span}]")
    if flip.shape != (n,):
        raise ValueError(f"flip must be a bool tensor of shape ({n},), got {tuple(flip.shape)}")
    device = x.device
    pads = (padding, padding, padding, padding)
    padded = functional.pad(x, pads).permute(0, 2, 3, 1)  # N, H + 2p, W + 2p, C
    rows = dy.to(device, torch.long)[:, None] + torch.arange(h, device=device)
    cols = dx.to(device, torch.long)[:, None] + torch.arange(w, device=device)
    cols = torch.where(flip.to(device, torch.bool)[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    out = padded[batch, rows[:, :, None], cols[:, None, :]]  # N, H, W, C
    return out.permute(0, 3, 1, 2).contiguous()


def augment_batch(
    x: Tensor, generator: torch.Generator | None = None, *, padding: int = 4, flip: bool = True
) -> Tensor:
    """Standard augmentation of a whole (N, C, H, W) batch: random crop with zero padding
    ``padding`` (offsets uniform on [0, 2·padding]²) and, if ``flip``, a horizontal flip with
    probability 1/2. Vectorized; the draws come from ``generator`` (default: torch's global
    generator on ``x``'s device).
    """
    _check_batch(x, padding)
    n = x.shape[0]
    device = generator.device if generator is not None else x.device
    span = 2 * padding + 1
    dy = torch.randint(0, span, (n,), generator=generator, device=device)
    dx = torch.randint(0, span, (n,), generator=generator, device=device)
    mirror = torch.randint(0, 2, (n,), generator=generator, device=device).bool()
    if not flip:
        mirror.zero_()
    return crop_and_flip(x, dy, dx, mirror, padding=padding)


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer (Steele, Lea, Flood, OOPSLA 2014), vectorized over uint64."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class TensorImageDataset(Dataset[tuple[Tensor, Tensor]]):
    """An :class:`ImageSplit` as (float CHW tensor, int64 label) pairs, normalized per channel.

    Augmentation runs iff ``train and augment``. Each draw is a counter-based hash of
    ``(seed, epoch, index, k)``, where ``k`` counts earlier fetches of that index by this
    object, so results do not depend on how indices are batched and every pass differs.
    DataLoader worker processes hold copies of the counters: with ``num_workers > 0`` call
    :meth:`set_epoch` each epoch. ``__getitems__`` makes a DataLoader fetch, crop and flip a
    whole batch at once.
    """

    def __init__(
        self,
        split: ImageSplit,
        *,
        train: bool,
        mean: Sequence[float],
        std: Sequence[float],
        augment: bool = True,
        seed: int = 0,
        padding: int = 4,
    ) -> None:
        c = split.images.shape[-1]
        if len(mean) != c or len(std) != c:
            raise ValueError(
                f"mean and std must have one entry per channel ({c}), "
                f"got len(mean)={len(mean)}, len(std)={len(std)}"
            )
        if not all(s > 0 for s in std):
            raise ValueError(f"std must be > 0 in every channel, got std={tuple(std)}")
        if isinstance(padding, bool) or operator.index(padding) < 0:
            raise ValueError(f"padding must be an integer >= 0, got padding={padding!r}")
        self.split = split
        self.train = train
        self.augment = bool(train and augment)
        self.padding = int(padding)
        self._seed = np.uint64(operator.index(seed) & 0xFFFFFFFFFFFFFFFF)
        self._epoch = 0
        self._draws = np.zeros(len(split), dtype=np.uint64)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)

    def __len__(self) -> int:
        return len(self.split)

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names of the split."""
        return self.split.classes

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation stream of pass ``epoch`` and reset the per-index counters."""
        epoch = operator.index(epoch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got epoch={epoch}")
        self._epoch = epoch
        self._draws[:] = 0

    def _augment_params(self, idx: np.ndarray) -> tuple[Tensor, Tensor, Tensor]:
        draws = self._draws[idx]
        np.add.at(self._draws, idx, np.uint64(1))
        # A repeated index within one batch gets consecutive draw counters.
        if len(idx) > 1:
            order = np.argsort(idx, kind="stable")
            sorted_idx = idx[order]
            starts = np.r_[True, sorted_idx[1:] != sorted_idx[:-1]]
            run_start = np.maximum.accumulate(np.where(starts, np.arange(len(idx)), 0))
            rank = np.empty(len(idx), dtype=np.uint64)
            rank[order] = (np.arange(len(idx)) - run_start).astype(np.uint64)
            draws = draws + rank
        with np.errstate(over="ignore"):
            h = _mix64(self._seed ^ _mix64(np.full(len(idx), self._epoch, dtype=np.uint64)))
            h = _mix64(h ^ idx.astype(np.uint64))
            h = _mix64(h ^ draws)
        span = np.uint64(2 * self.padding + 1)
        dy = (h % span).astype(np.int64)
        dx = ((h >> np.uint64(21)) % span).astype(np.int64)
        flip = ((h >> np.uint64(42)) & np.uint64(1)).astype(bool)
        return torch.from_numpy(dy), torch.from_numpy(dx), torch.from_numpy(flip)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) float32 and labels (B,) int64 for ``indices``, vectorized."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"indices must lie in [0, {len(self)}), got {indices!r}")
        idx = idx % max(len(self), 1)
        x = torch.from_numpy(self.split.images[idx]).permute(0, 3, 1, 2).float().div_(255.0)
        if self.augment:
            dy, dx, flip = self._augment_params(idx)
            x = crop_and_flip(x, dy, dx, flip, padding=self.padding)
        x = (x - self._mean) / self._std
        return x.contiguous(), torch.from_numpy(self.split.labels[idx])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x, y = self.get_batch([operator.index(index)])
        return x[0], y[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        """Batched fetch used by ``torch.utils.data.DataLoader``; collate stacks the pairs."""
        x, y = self.get_batch(indices)
        return list(zip(x.unbind(0), y.unbind(0), strict=True))
