import json
import math
from dataclasses import dataclass

import pytest

from asymflow.runfiles import fields_from_json, fields_to_json, jsonable


@dataclass(frozen=True)
class _Record:
    name: str
    widths: tuple[int, ...]
    epsilon: float
    lower: float
    rows: list[dict[str, float]]


def test_fields_round_trip_through_strict_json_with_tuples_and_infinities() -> None:
    record = _Record("run", (8, 16), math.inf, -math.inf, [{"acc": 0.5}])
    data = fields_to_json(record)
    assert data == {
        "name": "run",
        "widths": [8, 16],
        "epsilon": "inf",
        "lower": "-inf",
        "rows": [{"acc": 0.5}],
    }
    text = json.dumps(data, allow_nan=False)  # standard JSON: no Infinity literal
    back = fields_from_json(_Record, json.loads(text))
    assert back == record  # the list field stays a list, the tuple field is a tuple again


def test_fields_from_json_converts_by_the_declared_field_types() -> None:
    data = {"name": "inf", "widths": [], "epsilon": "-inf", "lower": 0.0, "rows": [{"a": 1}]}
    back = fields_from_json(_Record, data)
    assert back.name == "inf" and back.epsilon == -math.inf  # str field kept, float converted
    assert back.widths == () and back.rows == [{"a": 1}]


def test_jsonable_writes_strict_json() -> None:
    payload = {1: (math.inf, -math.inf, math.nan), "b": [{"c": 0.5}]}
    assert jsonable(payload) == {"1": ["inf", "-inf", None], "b": [{"c": 0.5}]}
    json.dumps(jsonable(payload), allow_nan=False)


def test_fields_from_json_refuses_unknown_keys() -> None:
    data = fields_to_json(_Record("run", (), 1.0, 0.0, []))
    with pytest.raises(ValueError, match="keys must be among _Record fields"):
        fields_from_json(_Record, {**data, "extra": 1})
