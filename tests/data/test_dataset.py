"""Tests of ImageSplit/ImageData validation, channel statistics, augmentation and the
normalized torch dataset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from asymflow.data import (
    ImageData,
    ImageSplit,
    TensorImageDataset,
    augment_batch,
    channel_stats,
    crop_and_flip,
    synthetic,
)


def make_split(n: int = 8, size: int = 6, channels: int = 3, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    return ImageSplit(images, labels, ("a", "b"))


def reference_crop_flip(
    x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, padding: int
) -> torch.Tensor:
    """The per-sample loop the vectorized crop must reproduce."""
    n, c, h, w = x.shape
    padded = torch.zeros(n, c, h + 2 * padding, w + 2 * padding, dtype=x.dtype)
    padded[:, :, padding : padding + h, padding : padding + w] = x
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def test_image_split_rejects_non_uint8_images() -> None:
    split = make_split()
    with pytest.raises(ValueError, match="images must be a uint8 array"):
        ImageSplit(split.images.astype(np.float32), split.labels, split.classes)


def test_image_split_rejects_non_int64_labels() -> None:
    split = make_split()
    with pytest.raises(ValueError, match="labels must be an int64 array"):
        ImageSplit(split.images, split.labels.astype(np.int32), split.classes)


def test_image_split_rejects_label_count_mismatch() -> None:
    split = make_split()
    with pytest.raises(ValueError, match="one entry per image"):
        ImageSplit(split.images, split.labels[:-1], split.classes)


def test_image_split_rejects_labels_outside_classes() -> None:
    split = make_split()
    with pytest.raises(ValueError, match="0 <= label < 2"):
        ImageSplit(split.images, split.labels + 1, split.classes)


def test_image_data_rejects_mismatched_classes() -> None:
    split = make_split()
    other = ImageSplit(split.images, split.labels, ("x", "y"))
    with pytest.raises(ValueError, match="share classes"):
        ImageData(split, other, "bad")


def test_image_data_rejects_mismatched_image_shape() -> None:
    with pytest.raises(ValueError, match="share the image shape"):
        ImageData(make_split(size=6), make_split(size=5), "bad")


def test_channel_stats_match_numpy() -> None:
    split = make_split(n=20)
    mean, std = channel_stats(split)
    flat = split.images.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(mean, flat.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(axis=0), rtol=1e-9)


def test_channel_stats_reject_empty_split() -> None:
    empty = ImageSplit(np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, np.int64), ("a",))
    with pytest.raises(ValueError, match="at least one image"):
        channel_stats(empty)


def test_augment_batch_keeps_shape_and_dtype() -> None:
    x = torch.rand(16, 3, 12, 10)
    out = augment_batch(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert out.dtype == x.dtype


def test_augment_batch_is_deterministic_under_seeded_generator() -> None:
    x = torch.rand(16, 3, 8, 8)
    a = augment_batch(x, torch.Generator().manual_seed(7))
    b = augment_batch(x, torch.Generator().manual_seed(7))
    c = augment_batch(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_augment_batch_changes_images() -> None:
    x = torch.rand(32, 3, 8, 8) + 0.1  # no zeros, so padding is visible
    out = augment_batch(x, torch.Generator().manual_seed(0))
    changed = (out != x).flatten(1).any(dim=1)
    assert changed.float().mean() > 0.8  # only the centred, unflipped crop (p = 1/162) is x
    assert (out == 0).flatten(1).any(dim=1).any()  # some crops bring in zero padding


def test_augment_batch_without_padding_only_flips() -> None:
    x = torch.rand(64, 3, 5, 5)
    out = augment_batch(x, torch.Generator().manual_seed(1), padding=0)
    same = (out == x).flatten(1).all(dim=1)
    mirrored = (out == x.flip(-1)).flatten(1).all(dim=1)
    assert torch.all(same | mirrored)
    assert same.any() and mirrored.any()


def test_crop_and_flip_matches_per_sample_loop() -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(40, 2, 7, 9, generator=gen)
    dy = torch.randint(0, 9, (40,), generator=gen)
    dx = torch.randint(0, 9, (40,), generator=gen)
    flip = torch.randint(0, 2, (40,), generator=gen).bool()
    expected = reference_crop_flip(x, dy, dx, flip, padding=4)
    assert torch.equal(crop_and_flip(x, dy, dx, flip, padding=4), expected)


def test_crop_and_flip_centre_is_identity_and_flip_mirrors() -> None:
    x = torch.rand(3, 3, 6, 6)
    centre = torch.full((3,), 4)
    assert torch.equal(crop_and_flip(x, centre, centre, torch.zeros(3, dtype=torch.bool)), x)
    mirrored = crop_and_flip(x, centre, centre, torch.ones(3, dtype=torch.bool))
    assert torch.equal(mirrored, x.flip(-1))


def test_crop_and_flip_corner_shift_pads_with_zeros() -> None:
    x = torch.ones(1, 1, 6, 6)
    out = crop_and_flip(x, torch.tensor([0]), torch.tensor([8]), torch.tensor([False]))
    assert torch.all(out[0, 0, :4] == 0)  # top rows come from the padding
    assert torch.all(out[0, 0, :, 2:] == 0)  # shifted 4 right: the last 4 columns are padding
    assert torch.all(out[0, 0, 4:, :2] == 1)


def test_crop_and_flip_rejects_offsets_beyond_padding() -> None:
    x = torch.rand(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"dy must lie in \[0, 2\*padding\]"):
        crop_and_flip(x, torch.tensor([9]), torch.tensor([0]), torch.tensor([False]))


def test_augment_batch_rejects_non_batch_input() -> None:
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(N, C, H, W\)"):
        augment_batch(torch.rand(3, 8, 8))


def test_tensor_dataset_normalizes_with_given_stats() -> None:
    data = synthetic(200, 20, seed=1)
    mean, std = data.channel_stats()
    ds = TensorImageDataset(data.train, train=True, mean=mean, std=std, augment=False)
    x, y = ds.get_batch(np.arange(len(ds)))
    assert x.shape == (200, 3, 16, 16) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    np.testing.assert_allclose(x.mean(dim=(0, 2, 3)).numpy(), np.zeros(3), atol=1e-4)
    np.testing.assert_allclose(x.std(dim=(0, 2, 3), correction=0).numpy(), np.ones(3), atol=1e-3)


def test_tensor_dataset_augmentation_does_not_depend_on_batching() -> None:
    data = synthetic(30, 5, seed=2)
    train, _ = data.tensor_datasets(seed=5)
    again, _ = data.tensor_datasets(seed=5)
    batched, _ = train.get_batch(list(range(10)))
    single = torch.stack([again[i][0] for i in range(10)])
    assert torch.equal(batched, single)


def test_tensor_dataset_draws_fresh_augmentation_each_pass_and_replays_after_set_epoch() -> None:
    data = synthetic(64, 5, seed=2)
    train, _ = data.tensor_datasets(seed=0)
    first, _ = train.get_batch(range(64))
    second, _ = train.get_batch(range(64))
    assert not torch.equal(first, second)
    train.set_epoch(0)
    assert torch.equal(train.get_batch(range(64))[0], first)
    train.set_epoch(1)
    assert not torch.equal(train.get_batch(range(64))[0], first)


def test_tensor_dataset_repeated_index_in_one_batch_gets_distinct_draws() -> None:
    data = synthetic(4, 1, seed=0)
    train, _ = data.tensor_datasets(seed=0)
    x, _ = train.get_batch([0] * 16)
    assert len({tuple(row.flatten().tolist()) for row in x}) > 1


def test_test_split_is_never_augmented() -> None:
    data = synthetic(20, 20, seed=3)
    mean, std = data.channel_stats()
    _, test = data.tensor_datasets(augment=True)
    plain = TensorImageDataset(data.test, train=True, mean=mean, std=std, augment=False)
    assert torch.equal(test.get_batch(range(20))[0], plain.get_batch(range(20))[0])


def test_dataloader_fetches_whole_batches() -> None:
    data = synthetic(50, 10, seed=4)
    train, _ = data.tensor_datasets()
    loader = DataLoader(train, batch_size=16, shuffle=True)
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]
    assert batches[0][0].shape == (16, 3, 16, 16)


def test_empty_batch_has_batch_shape() -> None:
    data = synthetic(10, 2)
    train, _ = data.tensor_datasets()
    x, y = train.get_batch([])
    assert x.shape == (0, 3, 16, 16) and y.shape == (0,)


def test_tensor_dataset_rejects_wrong_stat_length_and_nonpositive_std() -> None:
    split = make_split()
    with pytest.raises(ValueError, match="one entry per channel"):
        TensorImageDataset(split, train=True, mean=(0.5,), std=(0.2,))
    with pytest.raises(ValueError, match="std must be > 0"):
        TensorImageDataset(split, train=True, mean=(0.5,) * 3, std=(0.2, 0.0, 0.2))


def test_tensor_dataset_rejects_out_of_range_index() -> None:
    train, _ = synthetic(5, 1).tensor_datasets()
    with pytest.raises(IndexError, match="indices must lie in"):
        train.get_batch([5])
