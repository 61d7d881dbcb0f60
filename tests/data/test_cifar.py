"""Tests of the CIFAR python-pickle loaders and their restricted unpickler."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from asymflow.data import (
    CIFAR10_CLASSES,
    UnsafePickleError,
    load_cifar10,
    load_cifar100,
    read_cifar_pickle,
)
from tests.data.builders import cifar_rows, dump, py2_dumps


class RunsShell:
    """A pickle payload that would run a shell command on load."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


class CallsEval:
    """A payload that would evaluate Python code on load."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, ("__import__('os').getcwd()",))


def raw_batch(path: Path) -> dict[bytes, object]:
    """The batch as written, read back with the unrestricted pickle (test files only)."""
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


@pytest.mark.parametrize("style", ["py2", "py3"])
def test_cifar10_round_trip(cifar10_dir: Callable[..., Path], style: str) -> None:
    root = cifar10_dir(n=4, style=style)
    data = load_cifar10(root)
    assert data.classes == CIFAR10_CLASSES and data.name == "cifar10"
    assert data.train.images.shape == (20, 32, 32, 3) and data.test.images.shape == (4, 32, 32, 3)
    assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int64
    batch = raw_batch(root / "data_batch_2")
    row = batch[b"data"][1]
    image = data.train.images[4 + 1]
    # Each row is the red plane, then green, then blue, each 32x32 row-major.
    assert image[0, 0, 0] == row[0] and image[0, 0, 1] == row[1024] and image[0, 0, 2] == row[2048]
    assert image[2, 5, 1] == row[1024 + 2 * 32 + 5]
    assert np.array_equal(image, row.reshape(3, 32, 32).transpose(1, 2, 0))
    assert data.train.labels[4:8].tolist() == batch[b"labels"]


def test_py2_style_pickle_uses_only_numpy_1_globals(cifar10_dir: Callable[..., Path]) -> None:
    raw = (cifar10_dir(style="py2") / "data_batch_1").read_bytes()
    assert b"cnumpy.core.multiarray\n_reconstruct" in raw and b"_codecs" not in raw


def test_parent_directory_is_accepted(cifar10_dir: Callable[..., Path]) -> None:
    root = cifar10_dir()
    assert len(load_cifar10(root.parent).train) == 20


def test_missing_batch_is_named(cifar10_dir: Callable[..., Path]) -> None:
    root = cifar10_dir()
    (root / "data_batch_5").unlink()
    with pytest.raises(ValueError, match="data_batch_5 is missing"):
        load_cifar10(root)


def test_non_cifar_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no batches\.meta under"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (b"data", np.zeros((4, 3071), np.uint8), "must have 3072 columns"),
        (b"data", np.zeros((4, 3072), np.int64), "must be a uint8 array"),
        (b"data", [0] * 4, "must be a uint8 array"),
        (b"labels", [0, 1, 2], "must be 4 integers"),
        (b"labels", [0, 1, 2, 10], r"must lie in \[0, 10\)"),
        (b"labels", ["a", "b", "c", "d"], "must be 4 integers"),
    ],
)
def test_malformed_batches_are_rejected(
    cifar10_dir: Callable[..., Path], field: bytes, value: object, message: str
) -> None:
    root = cifar10_dir(n=4)
    batch = raw_batch(root / "test_batch")
    batch[field] = value
    dump(root / "test_batch", batch, "py2")
    with pytest.raises(ValueError, match=message):
        load_cifar10(root)


def test_truncated_pickle_is_a_value_error(cifar10_dir: Callable[..., Path]) -> None:
    root = cifar10_dir()
    path = root / "data_batch_1"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot read CIFAR pickle"):
        load_cifar10(root)


def test_malicious_pickle_is_refused_and_never_runs(
    cifar10_dir: Callable[..., Path], tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    root = cifar10_dir()
    batch = raw_batch(root / "data_batch_3")
    batch[b"labels"] = RunsShell(f"touch {marker}")
    (root / "data_batch_3").write_bytes(py2_dumps(batch))
    with pytest.raises(UnsafePickleError, match=r"refused global (posix|nt|os)\.system"):
        load_cifar10(root)
    assert not marker.exists()
    # The payload is live: the unrestricted unpickler would have run it.
    pickle.loads((root / "data_batch_3").read_bytes(), encoding="bytes")
    assert marker.exists()


def test_python3_protocol_2_bytes_are_refused(tmp_path: Path) -> None:
    """Python 3 pickles bytes at protocol 2 via _codecs.encode, which the genuine files lack."""
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": b"x"}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"refused global _codecs\.encode"):
        read_cifar_pickle(path)


@pytest.mark.parametrize(
    ("payload", "refused"),
    [
        (CallsEval(), "builtins.eval"),
        ({b"data": np.zeros(3, np.uint8).view(np.recarray)}, "numpy.rec.recarray"),
        ({b"x": np.int64(3)}, "multiarray.scalar"),
    ],
)
def test_every_global_outside_the_allow_list_is_refused(
    tmp_path: Path, payload: object, refused: str
) -> None:
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(UnsafePickleError, match=rf"refused global \S*{refused}"):
        read_cifar_pickle(path)


def test_protocol_5_arrays_are_refused_by_name(tmp_path: Path) -> None:
    """Protocol 5 rebuilds arrays with numpy's _frombuffer, outside the genuine files' set."""
    path = tmp_path / "batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros(3, np.uint8)}, protocol=5))
    with pytest.raises(UnsafePickleError, match=r"numpy\._core\.numeric\._frombuffer"):
        read_cifar_pickle(path)


def test_persistent_ids_are_refused(tmp_path: Path) -> None:
    class WithPersistentId(pickle.Pickler):
        def persistent_id(self, obj: object) -> str | None:
            return "external" if obj == "ref" else None

    path = tmp_path / "batch"
    with open(path, "wb") as fh:
        WithPersistentId(fh, protocol=4).dump({b"data": "ref"})
    with pytest.raises(UnsafePickleError, match="refused persistent id"):
        read_cifar_pickle(path)


def test_unsafe_pickle_error_is_a_value_error() -> None:
    assert issubclass(UnsafePickleError, ValueError)


def test_non_dict_pickle_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "batch"
    path.write_bytes(py2_dumps([1, 2, 3]))
    with pytest.raises(ValueError, match="must hold a dict with string keys"):
        read_cifar_pickle(path)


def write_cifar100(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(1)
    base = root / "cifar-100-python"
    fine = [f"fine{i:02d}" for i in range(100)]
    coarse = [f"coarse{i:02d}" for i in range(20)]
    dump(base / "meta", {b"fine_label_names": fine, b"coarse_label_names": coarse}, "py2")
    for name in ("train", "test"):
        batch = {
            b"data": cifar_rows(rng, n),
            b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
            b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
        }
        dump(base / name, batch, "py2")
    return base


def test_cifar100_fine_labels_by_default_and_coarse_on_request(tmp_path: Path) -> None:
    base = write_cifar100(tmp_path)
    fine = load_cifar100(base)
    assert len(fine.classes) == 100 and fine.classes[7] == "fine07" and fine.name == "cifar100"
    assert fine.train.labels.tolist() == raw_batch(base / "train")[b"fine_labels"]
    coarse = load_cifar100(tmp_path, label_mode="coarse")
    assert len(coarse.classes) == 20
    assert coarse.test.labels.tolist() == raw_batch(base / "test")[b"coarse_labels"]
    assert np.array_equal(fine.train.images, coarse.train.images)


def test_cifar100_rejects_unknown_label_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="label_mode must be 'fine' or 'coarse'"):
        load_cifar100(write_cifar100(tmp_path), label_mode="medium")  # type: ignore[arg-type]
