"""Fixtures for the data tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from asymflow.data.cifar import CIFAR10_CLASSES
from tests.data.builders import cifar_rows, dump, write_tree


@pytest.fixture
def png_tree(tmp_path: Path) -> Path:
    """PNG tree: b_dog (drawn with colour label 0), a_cat (label 1); 3 train, 2 test each."""
    root = tmp_path / "tree"
    write_tree(root, ["b_dog", "a_cat"], {"train": 3, "test": 2})
    return root


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Callable[..., Path]:
    """A builder of ``cifar-10-batches-py`` directories with ``n`` rows per batch file."""

    def build(n: int = 4, style: str = "py2", seed: int = 0) -> Path:
        rng = np.random.default_rng(seed)
        root = tmp_path / f"cifar-{style}-{seed}" / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        for name in names:
            batch = {
                b"batch_label": name.encode(),
                b"labels": [int(v) for v in rng.integers(0, 10, n)],
                b"data": cifar_rows(rng, n),
                b"filenames": [f"img_{i}.png".encode() for i in range(n)],
            }
            dump(root / name, batch, style)
        meta = {
            b"num_cases_per_batch": n,
            b"label_names": [c.encode() for c in CIFAR10_CLASSES],
            b"num_vis": 3072,
        }
        dump(root / "batches.meta", meta, style)
        return root

    return build
