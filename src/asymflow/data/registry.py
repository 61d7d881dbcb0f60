"""Data specs: one string names a data set, as on the command line (``--data SPEC``).

``digits``, ``synthetic`` or ``synthetic:N`` (N train images, ceil(N/5) test images; default
N=1000), ``folder:PATH``, ``cifar10:PATH`` and ``cifar100:PATH``. Any spec may end in
``@TRAIN,TEST`` to keep a seeded, class-stratified subset of TRAIN training and TEST test
images (e.g. ``cifar10:PATH@10000,2000``), so that CPU-budget runs stay reproducible.
A CIFAR ``PATH`` may be the python-pickle release (the ``cifar-*-batches-py`` /
``cifar-*-python`` directory or its parent) or an image-folder tree
``PATH/{train,test}/<class>/``, read with the CIFAR label order.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from asymflow.data.cifar import CIFAR10_CLASSES, load_cifar10, load_cifar100
from asymflow.data.dataset import ImageData, ImageSplit
from asymflow.data.digits import load_digits
from asymflow.data.folders import load_folder
from asymflow.data.synthetic import synthetic

__all__ = ["SPEC_FORMS", "load_data"]

SPEC_FORMS = (
    "digits",
    "synthetic[:N]",
    "folder:PATH",
    "cifar10:PATH",
    "cifar100:PATH",
    "<spec>@TRAIN,TEST",
)
_SYNTHETIC_DEFAULT = 1000


def _is_folder_tree(path: Path) -> bool:
    return (path / "train").is_dir() and (path / "test").is_dir()


def stratified_subset(split: ImageSplit, size: int, seed: int = 0) -> ImageSplit:
    """``size`` images of ``split`` with every class represented as evenly as possible, chosen
    by a seeded permutation (the same ``size`` and ``seed`` always give the same images)."""
    if size >= len(split.labels):
        return split
    order = np.random.default_rng(seed).permutation(len(split.labels))
    # Rank of each image within its class in the permuted order; take the lowest ranks first.
    ranks = np.empty(len(order), dtype=np.int64)
    for cls in np.unique(split.labels):
        members = order[split.labels[order] == cls]
        ranks[members] = np.arange(len(members))
    chosen = np.sort(order[np.argsort(ranks[order], kind="stable")[:size]])
    return ImageSplit(split.images[chosen], split.labels[chosen], split.classes)


def _parse_subset(spec: str, suffix: str) -> tuple[int, int]:
    parts = suffix.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 1 for p in parts):
        raise ValueError(f"a subset suffix must be @TRAIN,TEST with integers >= 1, got {spec!r}")
    return int(parts[0]), int(parts[1])


def load_data(
    spec: str, *, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> ImageData:
    """The data set named by ``spec`` (see the module docstring). ``cache_dir`` and
    ``progress`` apply to image folders."""
    if not isinstance(spec, str):
        raise ValueError(f"spec must be a str, one of {', '.join(SPEC_FORMS)}; got {spec!r}")
    base, at, suffix = spec.rpartition("@")
    if at:
        n_train, n_test = _parse_subset(spec, suffix)
        data = load_data(base, cache_dir=cache_dir, progress=progress)
        return ImageData(
            stratified_subset(data.train, n_train),
            stratified_subset(data.test, n_test),
            f"{data.name}@{n_train},{n_test}",
        )
    kind, sep, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind == "digits" and not sep:
        return load_digits()
    if kind == "synthetic":
        if not sep:
            n = _SYNTHETIC_DEFAULT
        elif arg.strip().isdigit() and int(arg) >= 1:
            n = int(arg)
        else:
            raise ValueError(f"synthetic:N needs an integer N >= 1, got spec={spec!r}")
        return synthetic(n, -(-n // 5))
    if kind in ("folder", "cifar10", "cifar100") and sep:
        if not arg:
            raise ValueError(f"{kind}:PATH needs a non-empty PATH, got spec={spec!r}")
        path = Path(arg).expanduser()
        if not path.exists():
            raise ValueError(f"{kind}:PATH must name an existing directory, {path} does not exist")
        if kind == "folder":
            return load_folder(path, cache_dir=cache_dir, progress=progress)
        if _is_folder_tree(path):
            order = CIFAR10_CLASSES if kind == "cifar10" else None
            return load_folder(path, classes=order, cache_dir=cache_dir, progress=progress)
        return load_cifar10(path) if kind == "cifar10" else load_cifar100(path)
    raise ValueError(f"unknown data spec {spec!r}; expected one of: {', '.join(SPEC_FORMS)}")
