"""Run-directory files shared by the Delta, DP-SGD and federated runs.

- :func:`atomic_write_bytes` / :func:`atomic_write_json`: temp file in the same directory,
  fsync, ``os.replace``, so that readers see the old or the new file, never a torn one;
- :func:`append_metrics` / :func:`read_metrics` / :func:`write_metrics`: ``metrics.jsonl``,
  one fsynced JSON object a line; a torn (undecodable) line is skipped on reading;
- :func:`read_config` / :func:`write_config`: ``config.json`` through a config's
  ``to_dict`` / ``from_dict``; :func:`check_resumable`: whether a run directory may be continued;
- :func:`fields_to_json` / :func:`fields_from_json`: a dataclass's fields as JSON and back;
  :func:`jsonable`: any payload as strict JSON (no Infinity or NaN literals).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from types import UnionType
from typing import Any, Self, TypeVar, Union, get_args, get_origin, get_type_hints

__all__ = [
    "CONFIG_FILE",
    "METRICS_FILE",
    "SAMPLING_NOISE_SEEDS",
    "JsonFields",
    "append_metrics",
    "atomic_write_bytes",
    "atomic_write_json",
    "check_resumable",
    "fields_from_json",
    "fields_to_json",
    "jsonable",
    "read_config",
    "read_metrics",
    "write_config",
    "write_metrics",
]

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SAMPLING_NOISE_SEEDS = ("sampler_seed", "noise_seed")
"""The seed pair of the DP-SGD and federated configs that a resume needs both or neither of."""

T = TypeVar("T")


# ------------------------------------------------------------------------------ files


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    """Write ``payload`` to ``path`` via a temporary file in the same directory, fsync and
    ``os.replace``, so that readers see the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    """:func:`atomic_write_bytes` of pretty JSON."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def jsonable(obj: Any) -> Any:
    """JSON-ready copy: tuples as lists, +-inf as the strings "inf"/"-inf", NaN as null
    ("no such value"), recursively."""
    if isinstance(obj, dict):
        return {str(key): jsonable(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(value) for value in obj]
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
    return obj


_INFINITIES = {"inf": math.inf, "-inf": -math.inf}


def _field_to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _admits(hint: Any, kind: type) -> bool:
    """Whether the type ``hint`` is ``kind``, ``kind[...]`` or a union with one of them."""
    if hint is kind or get_origin(hint) is kind:
        return True
    return get_origin(hint) in (Union, UnionType) and any(_admits(a, kind) for a in get_args(hint))


def _field_from_json(hint: Any, value: Any) -> Any:
    if isinstance(value, list) and _admits(hint, tuple):
        return tuple(value)
    if isinstance(value, str) and value in _INFINITIES and _admits(hint, float):
        return _INFINITIES[value]
    return value


def fields_to_json(record: Any) -> dict[str, Any]:
    """JSON-ready fields of a dataclass (a config or a result): tuples as lists, and the
    infinities JSON lacks as the strings ``"inf"`` / ``"-inf"``."""
    return {k: _field_to_json(v) for k, v in asdict(record).items()}


def fields_from_json(cls: type[T], data: Mapping[str, Any]) -> T:
    """Inverse of :func:`fields_to_json`, by the fields' declared types (lists back to tuples
    only for tuple fields, "inf"/"-inf" back to floats only for float fields); unknown keys
    are refused."""
    hints = get_type_hints(cls)
    unknown = sorted(set(data) - {f.name for f in fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise ValueError(f"keys must be among {cls.__name__} fields, got {unknown}")
    return cls(**{k: _field_from_json(hints[k], v) for k, v in data.items()})


class JsonFields:
    """Base of the dataclasses stored as JSON (configs, results): :meth:`to_dict` is
    :func:`fields_to_json`, :meth:`from_dict` its inverse :func:`fields_from_json`."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (:func:`fields_to_json`)."""
        return fields_to_json(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        return fields_from_json(cls, data)


def write_config(run_dir: Path, config: JsonFields) -> None:
    """Write ``config.json`` (``config.to_dict()``) atomically."""
    atomic_write_json(run_dir / CONFIG_FILE, config.to_dict())


def read_config(run_dir: str | os.PathLike[str], from_dict: Callable[[Mapping[str, Any]], T]) -> T:
    """``from_dict`` of the ``config.json`` of a run directory."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"run_dir must hold a {CONFIG_FILE}, got run_dir={str(run_dir)!r}")
    return from_dict(json.loads(path.read_text()))


def check_resumable(
    run_dir: Path, config: JsonFields, resume: bool, *, seed_pair: tuple[str, str] | None = None
) -> bool:
    """Whether ``run_dir`` holds a run to continue with ``config``.

    Refuses an existing run unless ``resume``, and a ``config.json`` that differs from
    ``config`` (naming the fields). With ``seed_pair = (sampling, noise)``, a resume with only
    one of those two config fields fixed is refused too: the redone step would reuse its
    sampling with fresh noise (a second release of the same batch that no row bounds as
    independent), or its noise on fresh sampling (a noise draw used twice).
    """
    path = run_dir / CONFIG_FILE
    if not path.exists():
        return False
    if not resume:
        raise FileExistsError(
            f"run_dir already holds a run ({run_dir}); pass resume=True or use a new directory"
        )
    stored, given = json.loads(path.read_text()), config.to_dict()
    differ = sorted(k for k in given.keys() | stored.keys() if stored.get(k) != _json(given.get(k)))
    if differ:
        raise ValueError(
            f"config must equal the run's {CONFIG_FILE} to resume; differing fields: {differ}"
        )
    if seed_pair is not None:
        sampling, noise = (given[name] for name in seed_pair)
        if (sampling is None) != (noise is None):
            raise ValueError(
                f"{seed_pair[0]} and {seed_pair[1]} must both be set or both be None to "
                f"resume, got {seed_pair[0]}={sampling}, {seed_pair[1]}={noise}"
            )
    return True


def _json(value: Any) -> Any:
    """``value`` as it reads back from JSON (nested tuples as lists)."""
    return json.loads(json.dumps(value))


def _metrics_line(row: Mapping[str, Any]) -> str:
    return json.dumps(dict(row), sort_keys=True) + "\n"


def append_metrics(run_dir: Path, row: Mapping[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl`` (flushed and fsynced)."""
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
        handle.write(_metrics_line(row))
        handle.flush()
        os.fsync(handle.fileno())


def write_metrics(run_dir: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace ``metrics.jsonl`` by ``rows`` atomically (a resume drops the rows written after
    its checkpoint, so that a redone epoch is listed once)."""
    atomic_write_bytes(run_dir / METRICS_FILE, "".join(map(_metrics_line, rows)).encode())


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All rows of ``metrics.jsonl`` (empty if there is none); a torn last line is skipped."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
