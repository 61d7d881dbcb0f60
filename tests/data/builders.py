"""Builders for the data tests: tiny PNG trees and CIFAR pickles in the genuine layout."""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image


def class_color(label: int, index: int) -> tuple[int, int, int]:
    """A distinct RGB colour per (label, file index), so decoded pixels can be checked."""
    return (40 * label + 10, 7 * index + 3, 200 - 30 * label)


def write_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (6, 5)) -> None:
    """A solid ``size`` = (width, height) image; lossless for .png."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def write_tree(
    root: Path, classes: Sequence[str], per_class: dict[str, int], size: tuple[int, int] = (6, 5)
) -> None:
    """``root/{split}/{class}/{i:04d}.png`` with ``per_class[split]`` solid images per class."""
    for split, count in per_class.items():
        for label, name in enumerate(classes):
            for i in range(count):
                write_image(root / split / name / f"{i:04d}.png", class_color(label, i), size)


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes str and bytes as Python 2 ``str`` (BINSTRING opcodes), as cPickle did for the
    genuine CIFAR files; combined with protocol 2 the output matches their structure."""

    def _save_py2_str(self, data: bytes) -> None:
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(data)

    def save_bytes(self, obj: bytes) -> None:
        self._save_py2_str(obj)

    def save_str(self, obj: str) -> None:
        self._save_py2_str(obj.encode("latin1"))

    dispatch: ClassVar[dict[type, Callable[..., None]]] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def py2_dumps(obj: Any) -> bytes:
    """``obj`` pickled like Python 2 cPickle protocol 2 with numpy 1 global names."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def dump(path: Path, obj: Any, style: str) -> None:
    """Pickle ``obj`` to ``path`` as 'py2' (the genuine files' layout) or 'py3' (protocol 4)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = py2_dumps(obj) if style == "py2" else pickle.dumps(obj, protocol=4)
    path.write_bytes(data)


def cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
