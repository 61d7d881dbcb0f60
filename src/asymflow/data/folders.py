"""Image folders ``ROOT/{train,test}/<class>/*.{png,jpg,jpeg}``, decoded with Pillow to RGB
uint8 and cached on disk.

The cache is one ``.npz`` per (root, class selection, per-class limit) under
``<cache_dir>/<sha256(absolute root)[:16]>/``. Beside the arrays it stores a fingerprint: the
SHA-256 of the selected files' relative paths, labels, sizes and mtimes. A cache whose
fingerprint differs from the folder's current one is stale and is rebuilt. Writes go to a
temporary file that replaces the cache atomically, so an interrupted run never leaves a
corrupt cache behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import operator
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from asymflow.data.dataset import ImageData, ImageSplit

__all__ = ["IMAGE_SUFFIXES", "default_cache_dir", "load_folder"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
"""File suffixes read as images (case-insensitive); other files are ignored."""
_SUFFIXES = tuple(IMAGE_SUFFIXES)
SPLITS = ("train", "test")
_CACHE_VERSION = 1
_CHUNK = 64
"""Files per thread-pool task."""


@dataclass(frozen=True, slots=True)
class _Entry:
    """One image file: path relative to the root (POSIX), label, size in bytes, mtime in ns."""

    rel: str
    label: int
    size: int
    mtime_ns: int


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/asymflow/folders``, by default ``~/.cache/asymflow/folders``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "asymflow" / "folders"


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(
        e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith(".")
    )


def _resolve_classes(root: Path, classes: Sequence[str] | None) -> tuple[str, ...]:
    train_dirs = _class_dirs(root / "train")
    test_dirs = _class_dirs(root / "test")
    if classes is None:
        if not train_dirs:
            raise ValueError(f"root must hold class directories in {root / 'train'}, found none")
        extra = sorted(set(test_dirs) - set(train_dirs))
        if extra:
            raise ValueError(
                f"every class directory in {root / 'test'} must also exist in "
                f"{root / 'train'}; missing from train: {extra}"
            )
        return tuple(train_dirs)
    if isinstance(classes, str) or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"classes must be a sequence of class directory names, got {classes!r}")
    chosen = tuple(classes)
    if not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"classes must be non-empty and distinct, got {chosen!r}")
    missing = [c for c in chosen if c not in train_dirs]
    if missing:
        raise ValueError(
            f"classes must name directories of {root / 'train'}; not found: {missing}; "
            f"available: {train_dirs}"
        )
    return chosen


def _list_split(
    root: Path, split: str, classes: tuple[str, ...], limit: int | None
) -> list[_Entry]:
    entries: list[_Entry] = []
    for label, name in enumerate(classes):
        class_dir = root / split / name
        if not class_dir.is_dir():
            continue
        names = sorted(
            e.name
            for e in os.scandir(class_dir)
            if e.name.lower().endswith(_SUFFIXES) and not e.name.startswith(".") and e.is_file()
        )
        for file_name in names[:limit]:
            st = os.stat(os.path.join(class_dir, file_name))
            rel = f"{split}/{name}/{file_name}"
            entries.append(_Entry(rel, label, st.st_size, st.st_mtime_ns))
    return entries


def _fingerprint(classes: tuple[str, ...], listing: dict[str, list[_Entry]]) -> str:
    h = hashlib.sha256(json.dumps({"version": _CACHE_VERSION, "classes": classes}).encode())
    for split in SPLITS:
        for e in listing[split]:
            h.update(f"{e.rel}\0{e.label}\0{e.size}\0{e.mtime_ns}\n".encode())
    return h.hexdigest()


def _cache_file(cache_dir: Path, root: Path, classes: tuple[str, ...], limit: int | None) -> Path:
    root_key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    selection = json.dumps({"classes": classes, "limit_per_class": limit})
    selection_key = hashlib.sha256(selection.encode()).hexdigest()[:16]
    return cache_dir / root_key / f"images-{selection_key}.npz"


def _decode_image(path: Path) -> np.ndarray:
    """The image at ``path`` as RGB uint8 (H, W, 3)."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc


@contextlib.contextmanager
def _progress_bar(total: int, description: str, enabled: bool) -> Iterator[Callable[[int], None]]:
    if not enabled:
        yield lambda _n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _decode_all(root: Path, entries: list[_Entry], workers: int, progress: bool) -> np.ndarray:
    """Decode every entry into one (N, H, W, 3) array; all images must share one size."""
    first_path = root / entries[0].rel
    first = _decode_image(first_path)
    out = np.empty((len(entries), *first.shape), dtype=np.uint8)
    out[0] = first

    def work(lo: int, hi: int) -> int:
        for i in range(lo, hi):
            path = root / entries[i].rel
            image = _decode_image(path)
            if image.shape != first.shape:
                raise ValueError(
                    f"all images must share one size: {path} is {image.shape[1]}x"
                    f"{image.shape[0]} (WxH), but {first_path} is {first.shape[1]}x{first.shape[0]}"
                )
            out[i] = image
        return hi - lo

    with (
        _progress_bar(len(entries), f"decoding {root.name}", progress) as advance,
        ThreadPoolExecutor(max_workers=workers) as pool,
    ):
        advance(1)
        futures = [
            pool.submit(work, lo, min(lo + _CHUNK, len(entries)))
            for lo in range(1, len(entries), _CHUNK)
        ]
        try:
            for future in as_completed(futures):
                advance(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return out


def _read_cache(path: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    """The cached arrays if ``path`` holds a readable cache with ``fingerprint``, else None."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["fingerprint"]) != fingerprint:
                return None
            return {key: z[key] for key in z.files if key != "fingerprint"}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        warnings.warn(f"ignoring unreadable image cache {path}: {exc}", stacklevel=3)
        return None


def _write_cache(path: Path, fingerprint: str, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and ``fingerprint`` to ``path`` atomically (temp file + os.replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, fingerprint=np.array(fingerprint), **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _to_data(arrays: dict[str, np.ndarray], name: str) -> ImageData:
    classes = tuple(str(c) for c in arrays["classes"])
    splits = {s: ImageSplit(arrays[f"{s}_images"], arrays[f"{s}_labels"], classes) for s in SPLITS}
    return ImageData(train=splits["train"], test=splits["test"], name=name)


def load_folder(
    root: str | os.PathLike[str],
    *,
    classes: Sequence[str] | None = None,
    limit_per_class: int | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> ImageData:
    """Read ``root/{train,test}/<class>/*`` as uint8 (N, H, W, 3) RGB images.

    Labels follow ``classes`` (default: the train class directories, sorted); when given,
    only those classes are read, in that order. ``limit_per_class`` keeps the first files
    (by name) of each class and split. Decoding uses ``workers`` threads and shows a progress
    bar on stderr if ``progress``; ``cache_dir`` defaults to :func:`default_cache_dir`.
    """
    root_path = Path(root).expanduser().resolve()
    for split in SPLITS:
        if not (root_path / split).is_dir():
            raise ValueError(
                f"root must contain train/ and test/ directories, {root_path / split} is missing"
            )
    if limit_per_class is not None:
        if isinstance(limit_per_class, bool) or operator.index(limit_per_class) < 1:
            raise ValueError(
                f"limit_per_class must be None or an integer >= 1, got {limit_per_class!r}"
            )
        limit_per_class = operator.index(limit_per_class)
    if workers is None:
        workers = min(16, os.cpu_count() or 1)
    elif isinstance(workers, bool) or operator.index(workers) < 1:
        raise ValueError(f"workers must be None or an integer >= 1, got workers={workers!r}")

    chosen = _resolve_classes(root_path, classes)
    listing = {s: _list_split(root_path, s, chosen, limit_per_class) for s in SPLITS}
    if not listing["train"]:
        suffixes = sorted(IMAGE_SUFFIXES)
        raise ValueError(f"root must hold {suffixes} images in {root_path / 'train'}, found none")
    fingerprint = _fingerprint(chosen, listing)
    name = root_path.name
    cache_path = None
    if cache:
        base = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        cache_path = _cache_file(base.resolve(), root_path, chosen, limit_per_class)
        cached = _read_cache(cache_path, fingerprint)
        if cached is not None:
            try:
                return _to_data(cached, name)
            except (KeyError, ValueError) as exc:
                warnings.warn(f"rebuilding invalid image cache {cache_path}: {exc}", stacklevel=2)

    entries = listing["train"] + listing["test"]
    images = _decode_all(root_path, entries, workers, progress)
    n_train = len(listing["train"])
    labels = np.fromiter((e.label for e in entries), dtype=np.int64, count=len(entries))
    arrays = {
        "classes": np.array(chosen, dtype=str),
        "train_images": images[:n_train],
        "train_labels": labels[:n_train],
        "test_images": images[n_train:],
        "test_labels": labels[n_train:],
    }
    data = _to_data(arrays, name)
    if cache_path is not None:
        try:
            _write_cache(cache_path, fingerprint, arrays)
        except OSError as exc:
            warnings.warn(f"could not write image cache {cache_path}: {exc}", stacklevel=2)
    return data
