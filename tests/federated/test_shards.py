"""Splitting the training data among clients: IID and Dirichlet label skew."""

from __future__ import annotations

import numpy as np
import pytest

from asymflow.federated.shards import split_indices


def _labels(n: int = 600, classes: int = 6) -> np.ndarray:
    return np.random.default_rng(0).integers(0, classes, n)


@pytest.mark.parametrize("split", ["iid", "dirichlet"])
def test_shards_are_disjoint_and_cover_the_data(split: str) -> None:
    labels = _labels()
    shards = split_indices(labels, 7, split=split, alpha=0.3, seed=4)
    assert len(shards) == 7
    joined = np.concatenate(shards)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))


def test_iid_shard_sizes_differ_by_at_most_one() -> None:
    sizes = [len(s) for s in split_indices(_labels(), 7, split="iid", seed=1)]
    assert max(sizes) - min(sizes) <= 1


def test_split_is_a_deterministic_function_of_the_seed() -> None:
    a = split_indices(_labels(), 5, split="dirichlet", alpha=0.5, seed=2)
    b = split_indices(_labels(), 5, split="dirichlet", alpha=0.5, seed=2)
    c = split_indices(_labels(), 5, split="dirichlet", alpha=0.5, seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_small_alpha_skews_the_labels_more_than_iid() -> None:
    labels = _labels(3000)

    def mean_classes_per_client(shards: list[np.ndarray]) -> float:
        # classes holding >= 5% of the client's data
        out = []
        for s in shards:
            counts = np.bincount(labels[s], minlength=6)
            out.append(int((counts >= 0.05 * max(1, len(s))).sum()))
        return float(np.mean(out))

    skewed = mean_classes_per_client(split_indices(labels, 10, split="dirichlet", alpha=0.1))
    iid = mean_classes_per_client(split_indices(labels, 10, split="iid"))
    assert iid == 6
    assert skewed < 4


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="num_clients"):
        split_indices(_labels(), 0)
    with pytest.raises(ValueError, match="split must be"):
        split_indices(_labels(), 2, split="shards")
    with pytest.raises(ValueError, match="alpha"):
        split_indices(_labels(), 2, split="dirichlet", alpha=0.0)
