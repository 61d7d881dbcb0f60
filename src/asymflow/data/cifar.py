"""CIFAR-10 and CIFAR-100 in their standard python-pickle release (Krizhevsky, 2009, "Learning
Multiple Layers of Features from Tiny Images"): ``cifar-10-batches-py`` and ``cifar-100-python``.

The pickles are read with a restricted unpickler. The genuine files (cPickle protocol 2,
Python 2) hold dicts of bytes, lists, ints and numpy arrays; rebuilding an array needs exactly
the globals in :data:`ALLOWED_GLOBALS`. Any other global is refused with
:class:`UnsafePickleError` before it is resolved, so a crafted pickle cannot run code.
Each row of ``data`` is 3072 bytes: the 32×32 red plane, then green, then blue, row-major.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any, Literal

import numpy as np

from asymflow.data.dataset import ImageData, ImageSplit

__all__ = [
    "ALLOWED_GLOBALS",
    "CIFAR10_CLASSES",
    "UnsafePickleError",
    "load_cifar10",
    "load_cifar100",
    "read_cifar_pickle",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10's label order, as in ``batches.meta``."""

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 (the genuine files)
        ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)
"""The (module, name) pairs a CIFAR pickle may reference: numpy array reconstruction only."""

_SIDE = 32
_ROW = 3 * _SIDE * _SIDE


class UnsafePickleError(ValueError):
    """A pickle referenced a global outside :data:`ALLOWED_GLOBALS` (or a persistent id)."""


def _reconstruct() -> Callable[..., Any]:
    try:
        module = import_module("numpy._core.multiarray")
    except ImportError:  # numpy < 2
        module = import_module("numpy.core.multiarray")
    return module._reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only :data:`ALLOWED_GLOBALS`; refuses everything else by name."""

    def __init__(self, file: Any, *, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            allowed = ", ".join(f"{m}.{n}" for m, n in sorted(ALLOWED_GLOBALS))
            raise UnsafePickleError(
                f"refused global {module}.{name} in {self._source}: a CIFAR pickle may only "
                f"reference {allowed}"
            )
        if name == "_reconstruct":
            return _reconstruct()
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refused persistent id {pid!r} in {self._source}")


def read_cifar_pickle(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load one CIFAR pickle file with the restricted unpickler; keys come back as str."""
    path = Path(path)
    with open(path, "rb") as fh:
        try:
            obj = _RestrictedUnpickler(fh, source=str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as exc:  # malformed input: any unpickling failure
            raise ValueError(f"cannot read CIFAR pickle {path}: {exc}") from exc
    if not isinstance(obj, dict) or not all(isinstance(k, bytes | str) for k in obj):
        raise ValueError(f"a CIFAR pickle must hold a dict with string keys, {path} does not")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise ValueError(f"CIFAR pickle {path} lacks the key {key!r}; has {sorted(batch)}")
    return batch[key]


def _names(meta: dict[str, Any], key: str, path: Path) -> tuple[str, ...]:
    names = _field(meta, key, path)
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise ValueError(f"{key} in {path} must be a list of strings")
    return tuple(n.decode("utf-8") if isinstance(n, bytes) else n for n in names)


def _batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 32, 32, 3) and labels (N,) of one batch file, validated."""
    batch = read_cifar_pickle(path)
    data = _field(batch, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"data in {path} must be a uint8 array of shape (N, {_ROW}), got {got}")
    if data.shape[1] != _ROW:
        raise ValueError(f"data in {path} must have {_ROW} columns, got shape {data.shape}")
    raw = _field(batch, label_key, path)
    labels = np.asarray(raw)
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(data):
        raise ValueError(
            f"{label_key} in {path} must be {len(data)} integers (one per row of data), "
            f"got {labels.dtype} of shape {labels.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{label_key} in {path} must lie in [0, {num_classes}), "
            f"got range [{labels.min()}, {labels.max()}]"
        )
    images = data.reshape(-1, 3, _SIDE, _SIDE).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _split(files: list[Path], label_key: str, classes: tuple[str, ...]) -> ImageSplit:
    parts = [_batch(f, label_key, len(classes)) for f in files]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return ImageSplit(images, labels, classes)


def _locate(path: str | os.PathLike[str], subdir: str, marker: str) -> Path:
    root = Path(path).expanduser()
    for candidate in (root, root / subdir):
        if (candidate / marker).is_file():
            return candidate
    raise ValueError(f"path must be a {subdir} directory or its parent; no {marker} under {root}")


def load_cifar10(path: str | os.PathLike[str]) -> ImageData:
    """CIFAR-10 from ``cifar-10-batches-py`` (``path`` is that directory or its parent)."""
    root = _locate(path, "cifar-10-batches-py", "batches.meta")
    meta_path = root / "batches.meta"
    classes = _names(read_cifar_pickle(meta_path), "label_names", meta_path)
    train_files = [root / f"data_batch_{i}" for i in range(1, 6)]
    for f in [*train_files, root / "test_batch"]:
        if not f.is_file():
            raise ValueError(f"path must hold data_batch_1..5 and test_batch; {f} is missing")
    return ImageData(
        train=_split(train_files, "labels", classes),
        test=_split([root / "test_batch"], "labels", classes),
        name="cifar10",
    )


def load_cifar100(
    path: str | os.PathLike[str], *, label_mode: Literal["fine", "coarse"] = "fine"
) -> ImageData:
    """CIFAR-100 from ``cifar-100-python`` with its 100 fine or 20 coarse labels."""
    if label_mode not in ("fine", "coarse"):
        raise ValueError(f"label_mode must be 'fine' or 'coarse', got {label_mode!r}")
    root = _locate(path, "cifar-100-python", "meta")
    meta_path = root / "meta"
    classes = _names(read_cifar_pickle(meta_path), f"{label_mode}_label_names", meta_path)
    for f in (root / "train", root / "test"):
        if not f.is_file():
            raise ValueError(f"path must hold the files train and test; {f} is missing")
    key = f"{label_mode}_labels"
    return ImageData(
        train=_split([root / "train"], key, classes),
        test=_split([root / "test"], key, classes),
        name="cifar100" if label_mode == "fine" else "cifar100-coarse",
    )
