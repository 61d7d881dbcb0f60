"""The payload layouts of the contract: the arrays of a run's release files, unchanged since
the files were first written, and a round trip through them."""

from __future__ import annotations

import json

import numpy as np

from asymflow.accounting.events import Gaussian, RandomizedResponse
from asymflow.delta.contract import (
    LABELS_LAYOUT,
    RESIDUAL_LAYOUT,
    NoisyLabels,
    SanitizedResidual,
)


def _residual() -> SanitizedResidual:
    bits = np.arange(6, dtype=np.uint8).reshape(3, 2)
    return SanitizedResidual(bits, (1, 3, 4), Gaussian(2.0))


def test_residual_file_arrays_keep_their_names_and_dtypes() -> None:
    arrays = RESIDUAL_LAYOUT.to_arrays(_residual())
    assert set(arrays) == {"bits", "shape", "event", "version"}
    assert arrays["bits"].dtype == np.uint8 and arrays["shape"].tolist() == [1, 3, 4]
    assert arrays["shape"].dtype == np.int64 and arrays["version"].dtype == np.int64
    assert json.loads(str(arrays["event"])) == Gaussian(2.0).to_dict()


def test_a_file_written_before_the_layouts_reads_back() -> None:
    """The arrays train.py wrote by hand before the layouts existed."""
    event = RandomizedResponse(1.0, 3)
    old = {
        "labels": np.array([0, 2, 1], dtype=np.int64),
        "classes": np.asarray(3, dtype=np.int64),
        "event": np.asarray(json.dumps(event.to_dict())),
        "ledger_row": np.asarray(7, dtype=np.int64),
    }
    labels = LABELS_LAYOUT.from_arrays(old)
    assert labels.labels.tolist() == [0, 2, 1] and labels.classes == 3 and labels.event == event


def test_payloads_round_trip_through_their_layouts() -> None:
    residual = RESIDUAL_LAYOUT.from_arrays(RESIDUAL_LAYOUT.to_arrays(_residual()))
    assert residual.shape == (1, 3, 4) and residual.event == Gaussian(2.0)
    np.testing.assert_array_equal(residual.bits, _residual().bits)
    labels = NoisyLabels(np.array([1, 0], dtype=np.int64), 2, RandomizedResponse(0.5, 2))
    back = LABELS_LAYOUT.from_arrays(LABELS_LAYOUT.to_arrays(labels))
    assert back.labels.tolist() == [1, 0] and back.event == labels.event
