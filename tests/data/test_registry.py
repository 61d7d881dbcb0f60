"""Tests of data specs: every form resolves to its source, and bad specs name the forms."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from asymflow.data import CIFAR10_CLASSES, load_data
from tests.data.builders import write_tree


def test_digits_spec() -> None:
    data = load_data("digits")
    assert data.name == "digits" and len(data.train) + len(data.test) == 1797


def test_synthetic_specs() -> None:
    default = load_data("synthetic")
    assert (len(default.train), len(default.test)) == (1000, 200)
    small = load_data("synthetic:12")
    assert (len(small.train), len(small.test)) == (12, 3)


def test_folder_spec(png_tree: Path, tmp_path: Path) -> None:
    data = load_data(f"folder:{png_tree}", cache_dir=tmp_path / "cache", progress=False)
    assert data.classes == ("a_cat", "b_dog") and len(data.train) == 6


def test_cifar10_spec_reads_pickles(cifar10_dir: Callable[..., Path]) -> None:
    root = cifar10_dir(n=2)
    for path in (root, root.parent):
        data = load_data(f"cifar10:{path}")
        assert data.name == "cifar10" and len(data.train) == 10


def test_cifar10_spec_reads_image_folders_in_cifar_order(tmp_path: Path) -> None:
    root = tmp_path / "cifar10-jpg"
    write_tree(root, list(reversed(CIFAR10_CLASSES)), {"train": 1, "test": 1}, size=(4, 4))
    data = load_data(f"cifar10:{root}", cache_dir=tmp_path / "cache", progress=False)
    assert data.classes == CIFAR10_CLASSES
    assert np.array_equal(data.train.labels, np.arange(10))


@pytest.mark.parametrize(
    "spec",
    ["mnist", "digits:8", "folder", "cifar10", "", "imagenet:/data"],
)
def test_unknown_specs_list_the_forms(spec: str) -> None:
    with pytest.raises(ValueError, match=r"unknown data spec .*expected one of: digits, synthetic"):
        load_data(spec)


@pytest.mark.parametrize("spec", ["synthetic:0", "synthetic:abc", "synthetic:-3"])
def test_bad_synthetic_size_is_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match="synthetic:N needs an integer N >= 1"):
        load_data(spec)


def test_empty_or_missing_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a non-empty PATH"):
        load_data("folder:")
    with pytest.raises(ValueError, match="must name an existing directory"):
        load_data(f"cifar100:{tmp_path / 'absent'}")


def test_subset_suffix_is_stratified_and_reproducible():
    data = load_data("synthetic:500@100,30")
    again = load_data("synthetic:500@100,30")
    assert len(data.train.labels) == 100 and len(data.test.labels) == 30
    assert np.bincount(data.train.labels).tolist() == [10] * 10
    assert np.array_equal(data.train.images, again.train.images)


@pytest.mark.parametrize("spec", ["synthetic:50@10", "synthetic:50@a,b", "synthetic:50@0,5"])
def test_bad_subset_suffix_is_refused(spec):
    with pytest.raises(ValueError, match="@TRAIN,TEST"):
        load_data(spec)
