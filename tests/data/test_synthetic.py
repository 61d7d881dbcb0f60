"""Tests of the seeded synthetic source: determinism, balance and learnability."""

from __future__ import annotations

import numpy as np
import pytest

from asymflow.data import ImageData, synthetic


def nearest_class_mean_accuracy(data: ImageData) -> float:
    x_train = data.train.images.reshape(len(data.train), -1).astype(np.float64)
    x_test = data.test.images.reshape(len(data.test), -1).astype(np.float64)
    k = len(data.classes)
    means = np.stack([x_train[data.train.labels == c].mean(axis=0) for c in range(k)])
    dist = ((x_test[:, None, :] - means[None]) ** 2).sum(axis=-1)
    return float((dist.argmin(axis=1) == data.test.labels).mean())


def test_shapes_dtypes_and_names() -> None:
    data = synthetic(30, 12, classes=4, size=8, channels=1)
    assert data.train.images.shape == (30, 8, 8, 1) and data.test.images.shape == (12, 8, 8, 1)
    assert data.train.images.dtype == np.uint8 and data.train.labels.dtype == np.int64
    assert data.classes == ("class0", "class1", "class2", "class3")
    assert data.name == "synthetic"


def test_same_seed_is_identical_and_other_seed_differs() -> None:
    a, b, c = synthetic(50, 10, seed=3), synthetic(50, 10, seed=3), synthetic(50, 10, seed=4)
    assert np.array_equal(a.train.images, b.train.images)
    assert np.array_equal(a.test.labels, b.test.labels)
    assert not np.array_equal(a.train.images, c.train.images)


def test_labels_are_balanced() -> None:
    data = synthetic(100, 30, classes=10)
    assert np.all(np.bincount(data.train.labels) == 10)
    assert np.all(np.bincount(data.test.labels) == 3)


def test_test_split_does_not_depend_on_num_train() -> None:
    small, large = synthetic(10, 20, seed=1), synthetic(200, 20, seed=1)
    assert np.array_equal(small.test.images, large.test.images)


def test_nearest_class_mean_beats_chance_by_a_wide_margin() -> None:
    data = synthetic(500, 200, classes=10, seed=0)
    assert nearest_class_mean_accuracy(data) > 0.8  # chance is 0.1


def test_more_noise_makes_the_task_harder() -> None:
    easy = synthetic(200, 200, size=4, channels=1, seed=0)
    hard = synthetic(200, 200, size=4, channels=1, seed=0, noise=400.0)
    assert nearest_class_mean_accuracy(hard) < nearest_class_mean_accuracy(easy)


def test_empty_test_split_is_allowed() -> None:
    assert len(synthetic(5, 0).test) == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train": -1}, "num_train must be an integer >= 0"),
        ({"classes": 0}, "classes must be an integer >= 1"),
        ({"size": 0}, "size must be an integer >= 1"),
        ({"channels": True}, "channels must be an integer >= 1"),
        ({"noise": -1.0}, "noise must be a finite number >= 0"),
    ],
)
def test_invalid_arguments_name_the_parameter(kwargs: dict, message: str) -> None:
    args = {"num_train": 10, "num_test": 2} | kwargs
    with pytest.raises(ValueError, match=message):
        synthetic(**args)
