"""Tests of the image-folder source: layout, class order, decoding, size checks and the
validated, atomically written decode cache."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asymflow.data import CIFAR10_CLASSES, ImageData, load_folder
from asymflow.data import folders as folders_module
from tests.data.builders import class_color, write_image, write_tree

CIFAR10_JPG = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cifar10-jpg"


class DecodeCounter:
    """Wraps the decoder to count decoded files (a cache hit decodes none)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        original = folders_module._decode_image

        def counted(path: Path) -> np.ndarray:
            self.calls += 1
            return original(path)

        monkeypatch.setattr(folders_module, "_decode_image", counted)


def cache_files(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.rglob("*") if p.is_file())


def load(root: Path, cache_dir: Path, **kwargs: Any) -> ImageData:
    return load_folder(root, cache_dir=cache_dir, progress=False, workers=2, **kwargs)


def test_reads_tree_with_sorted_classes_and_exact_pixels(png_tree: Path, tmp_path: Path) -> None:
    data = load(png_tree, tmp_path / "cache")
    assert data.classes == ("a_cat", "b_dog")
    assert data.train.images.shape == (6, 5, 6, 3)  # (N, H, W, C) of 6x5 (W x H) PNGs
    assert data.test.images.shape == (4, 5, 6, 3)
    assert data.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    # write_tree gave b_dog label 0 and a_cat label 1 when drawing colours.
    assert tuple(data.train.images[0, 0, 0]) == class_color(1, 0)  # a_cat/0000.png
    assert tuple(data.train.images[5, 4, 5]) == class_color(0, 2)  # b_dog/0002.png
    assert data.name == "tree"


def test_given_classes_select_and_order_labels(png_tree: Path, tmp_path: Path) -> None:
    data = load(png_tree, tmp_path / "cache", classes=["b_dog", "a_cat"])
    assert data.classes == ("b_dog", "a_cat")
    assert tuple(data.train.images[0, 0, 0]) == class_color(0, 0)
    only = load(png_tree, tmp_path / "cache", classes=["a_cat"])
    assert only.classes == ("a_cat",) and len(only.train) == 3 and len(only.test) == 2


def test_unknown_class_is_rejected_with_the_available_ones(png_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"not found: \['c_cow'\]; available: \['a_cat', 'b_dog'\]"
    ):
        load(png_tree, tmp_path / "cache", classes=["a_cat", "c_cow"])


def test_test_class_missing_from_train_is_rejected(png_tree: Path, tmp_path: Path) -> None:
    write_image(png_tree / "test" / "z_extra" / "0000.png", (1, 2, 3))
    with pytest.raises(ValueError, match=r"missing from train: \['z_extra'\]"):
        load(png_tree, tmp_path / "cache")


def test_missing_split_directory_is_rejected(tmp_path: Path) -> None:
    write_tree(tmp_path / "t", ["a"], {"train": 1})
    with pytest.raises(ValueError, match="must contain train/ and test/"):
        load(tmp_path / "t", tmp_path / "cache")


def test_mismatched_image_size_names_the_file(png_tree: Path, tmp_path: Path) -> None:
    odd = png_tree / "train" / "b_dog" / "0009.png"
    write_image(odd, (0, 0, 0), size=(7, 5))
    with pytest.raises(ValueError, match=r"all images must share one size: .*0009\.png is 7x5"):
        load(png_tree, tmp_path / "cache")


def test_undecodable_file_is_named(png_tree: Path, tmp_path: Path) -> None:
    (png_tree / "train" / "a_cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"cannot decode image .*broken\.png"):
        load(png_tree, tmp_path / "cache")


def test_jpeg_upper_case_suffixes_count_and_other_files_do_not(tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    write_image(root / "train" / "a" / "x.JPG", (255, 255, 255))
    write_image(root / "train" / "a" / "y.jpeg", (0, 0, 0))
    write_image(root / "train" / "a" / ".hidden.png", (0, 0, 0))
    (root / "train" / "a" / "notes.txt").write_text("ignored")
    (root / "test").mkdir()
    data = load(root, tmp_path / "cache")
    assert len(data.train) == 2 and len(data.test) == 0
    assert data.train.images[0].min() > 240 and data.train.images[1].max() < 15  # lossy JPEG


def test_limit_per_class_keeps_the_first_files(png_tree: Path, tmp_path: Path) -> None:
    data = load(png_tree, tmp_path / "cache", limit_per_class=1)
    assert data.train.labels.tolist() == [0, 1] and data.test.labels.tolist() == [0, 1]
    assert tuple(data.train.images[0, 0, 0]) == class_color(1, 0)


def test_limit_per_class_must_be_positive(png_tree: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="limit_per_class must be None or an integer >= 1"):
        load(png_tree, tmp_path / "cache", limit_per_class=0)


def test_cache_hit_decodes_nothing(
    png_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = DecodeCounter(monkeypatch)
    first = load(png_tree, tmp_path / "cache")
    assert counter.calls == 10
    second = load(png_tree, tmp_path / "cache")
    assert counter.calls == 10
    assert np.array_equal(first.train.images, second.train.images)
    assert np.array_equal(first.test.labels, second.test.labels)
    assert second.classes == first.classes
    assert [p.suffix for p in cache_files(tmp_path / "cache")] == [".npz"]


def test_cache_is_rebuilt_when_a_file_is_added(
    png_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = DecodeCounter(monkeypatch)
    load(png_tree, tmp_path / "cache")
    write_image(png_tree / "train" / "a_cat" / "0003.png", (9, 9, 9))
    data = load(png_tree, tmp_path / "cache")
    assert counter.calls == 10 + 11
    assert len(data.train) == 7 and tuple(data.train.images[3, 0, 0]) == (9, 9, 9)
    load(png_tree, tmp_path / "cache")
    assert counter.calls == 21  # the rebuilt cache is valid again


def test_cache_is_rebuilt_when_a_file_changes(png_tree: Path, tmp_path: Path) -> None:
    load(png_tree, tmp_path / "cache")
    target = png_tree / "test" / "b_dog" / "0001.png"
    stat = target.stat()
    write_image(target, (1, 2, 3))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    data = load(png_tree, tmp_path / "cache")
    assert tuple(data.test.images[-1, 0, 0]) == (1, 2, 3)


def test_cache_keys_on_the_class_selection(
    png_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = DecodeCounter(monkeypatch)
    load(png_tree, tmp_path / "cache")
    load(png_tree, tmp_path / "cache", classes=["a_cat"])
    load(png_tree, tmp_path / "cache")
    load(png_tree, tmp_path / "cache", classes=["a_cat"])
    assert counter.calls == 10 + 5
    assert len(cache_files(tmp_path / "cache")) == 2


def test_corrupt_cache_is_rebuilt_with_a_warning(png_tree: Path, tmp_path: Path) -> None:
    expected = load(png_tree, tmp_path / "cache")
    (cache_file,) = cache_files(tmp_path / "cache")
    cache_file.write_bytes(cache_file.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable image cache"):
        data = load(png_tree, tmp_path / "cache")
    assert np.array_equal(data.train.images, expected.train.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(png_tree, tmp_path / "cache")  # repaired: no further warning


def test_interrupted_cache_write_keeps_the_old_cache_and_no_temp_file(
    png_tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    load(png_tree, tmp_path / "cache")
    (cache_file,) = cache_files(tmp_path / "cache")
    before = cache_file.read_bytes()
    write_image(png_tree / "train" / "a_cat" / "0003.png", (9, 9, 9))

    def killed(file: object, **arrays: object) -> None:
        file.write(b"PK partial")  # type: ignore[attr-defined]
        raise KeyboardInterrupt

    monkeypatch.setattr(folders_module.np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        load(png_tree, tmp_path / "cache")
    assert cache_files(tmp_path / "cache") == [cache_file]
    assert cache_file.read_bytes() == before


def test_cache_disabled_writes_nothing(png_tree: Path, tmp_path: Path) -> None:
    load(png_tree, tmp_path / "cache", cache=False)
    assert not (tmp_path / "cache").exists()


def test_cache_lives_under_a_hash_of_the_absolute_root(png_tree: Path, tmp_path: Path) -> None:
    load(png_tree, tmp_path / "cache")
    (cache_file,) = cache_files(tmp_path / "cache")
    assert cache_file.parent.parent == tmp_path / "cache"
    assert len(cache_file.parent.name) == 16


def test_default_cache_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert folders_module.default_cache_dir() == tmp_path / "asymflow" / "folders"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert folders_module.default_cache_dir() == Path.home() / ".cache" / "asymflow" / "folders"


def test_progress_bar_goes_to_stderr(
    png_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    load_folder(png_tree, cache=False, progress=True, workers=1)
    out, err = capsys.readouterr()
    assert out == "" and "decoding tree" in err


@pytest.mark.skipif(
    not CIFAR10_JPG.is_dir(), reason=f"CIFAR-10 image folders not present at {CIFAR10_JPG}"
)
def test_cifar10_jpg_smoke(tmp_path: Path) -> None:
    every = load(CIFAR10_JPG, tmp_path / "cache", limit_per_class=1)
    assert every.classes == CIFAR10_CLASSES  # CIFAR-10's label order is alphabetical
    subset = load(
        CIFAR10_JPG, tmp_path / "cache", classes=["cat", "dog", "ship"], limit_per_class=4
    )
    assert subset.train.images.shape == (12, 32, 32, 3)
    assert subset.test.images.shape == (12, 32, 32, 3)
    assert subset.train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert subset.train.images.std() > 20  # real photographs, not blank decodes
