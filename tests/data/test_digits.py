"""Tests of the scikit-learn digits source: shapes, labels, split and determinism."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits as sklearn_digits

from asymflow.data import ImageData, load_digits
from asymflow.data.digits import DIGIT_CLASSES


@pytest.fixture(scope="module")
def default_digits() -> ImageData:
    return load_digits()


def test_default_digits_are_16x16_rgb_uint8_with_an_80_20_split(default_digits: ImageData) -> None:
    train, test = default_digits.train, default_digits.test
    assert train.images.shape[1:] == (16, 16, 3) and test.images.shape[1:] == (16, 16, 3)
    assert train.images.dtype == np.uint8
    assert len(train) + len(test) == 1797
    assert len(test) == 360  # ceil(0.2 * 1797)
    assert default_digits.classes == DIGIT_CLASSES == tuple("0123456789")
    assert default_digits.name == "digits"


def test_labels_are_int64_digits_and_match_sklearn(default_digits: ImageData) -> None:
    all_labels = np.concatenate([default_digits.train.labels, default_digits.test.labels])
    assert all_labels.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(all_labels), np.bincount(sklearn_digits().target))


def test_split_is_stratified(default_digits: ImageData) -> None:
    counts = np.bincount(default_digits.train.labels) + np.bincount(default_digits.test.labels)
    test_counts = np.bincount(default_digits.test.labels, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 1)


def test_three_channels_replicate_gray(default_digits: ImageData) -> None:
    images = default_digits.train.images
    assert np.array_equal(images[..., 0], images[..., 1])
    assert np.array_equal(images[..., 0], images[..., 2])


def test_same_seed_gives_identical_data_and_other_seed_another_split(
    default_digits: ImageData,
) -> None:
    again = load_digits(seed=0)
    assert np.array_equal(again.train.images, default_digits.train.images)
    assert np.array_equal(again.test.labels, default_digits.test.labels)
    other = load_digits(seed=1)
    assert not np.array_equal(other.test.images, default_digits.test.images)


def test_native_size_keeps_the_original_pixels() -> None:
    data = load_digits(size=8, channels=1, test_fraction=0.5)
    assert data.train.images.shape[1:] == (8, 8, 1)
    original = sklearn_digits().images
    expected = np.round(original * 255 / 16).astype(np.uint8)
    # Every train image is one of the originals (the split only reorders).
    keys = {img.tobytes() for img in expected}
    assert all(img[..., 0].tobytes() in keys for img in data.train.images)


def test_configurable_size_and_channels() -> None:
    data = load_digits(size=32, channels=1)
    assert data.train.images.shape[1:] == (32, 32, 1)
    assert data.train.images.max() > 200  # strokes survive bilinear upsampling


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size must be >= 1"),
        ({"channels": 2}, "channels must be 1 or 3"),
        ({"test_fraction": 1.0}, "test_fraction must satisfy 0 < test_fraction < 1"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_digits(**kwargs)
