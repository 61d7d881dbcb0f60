"""labels="grad" through a real public server: one StepLogits / StepApply round trip per batch.

The run matches the in-process one exactly; a server SIGKILLed before a step is applied
comes back from its snapshot, the client sends the batch's StepLogits again and the SAME
recorded gradients, and the ledger is that of the uninterrupted run.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from asymflow.accounting.events import Gaussian
from asymflow.delta.labels import NoisyLabelGradients
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.delta.train import train_delta
from asymflow.transport.auth import KeyFiles
from asymflow.transport.client import PublicServerError, RetryPolicy
from tests.delta.conftest import tiny_config
from tests.transport.conftest import ServerProcess, tls_args
from tests.transport.test_remote import (
    KillAndRestart,
    ledger_rows,
    metric_rows,
    remote,
    train_result_final,
)

CONFIG = tiny_config(labels="grad", epochs_stage2=2)
"""2 stage-2 epochs x 2 fold models x ceil(80 / 32) = 3 batches: 12 steps per run."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train_delta(CONFIG, run_dir, progress=False)
    return run_dir


@pytest.fixture(scope="module")
def server(keys: KeyFiles) -> Iterator[ServerProcess]:
    process = ServerProcess(tls_args(keys), wait=False)
    yield process
    process.stop()


def gradient_rows(run_dir: Path) -> list[tuple[object, ...]]:
    return [row for row in ledger_rows(run_dir) if "noisy gradients" in str(row[-1])]


def test_grad_labels_through_the_server_match_the_in_process_run_exactly(
    server, keys, reference, tmp_path
):
    server.ready()
    run_dir = tmp_path / "remote"
    with remote(server.address, keys, config=CONFIG, classes=10) as public:
        result = train_delta(CONFIG, run_dir, progress=False, public=public)
        assert public.server_seconds > 0
    assert metric_rows(run_dir) == metric_rows(reference)
    assert result.final == train_result_final(reference)
    assert ledger_rows(run_dir) == ledger_rows(reference)
    assert len(gradient_rows(run_dir)) == 2
    assert server.count("rpc=StepApply phase=done") == 12


def test_a_step_is_refused_without_its_logits_and_applied_at_most_once(server, keys):
    server.ready()
    with remote(server.address, keys, config=CONFIG, classes=10) as public:
        data = SanitizedResidual(np.zeros((4, 256), np.uint8), (8, 16, 16), Gaussian(2.0))
        key = public.upload(data)
        gradients = NoisyLabelGradients(np.zeros((4, 10), np.float32), Gaussian(3.0))
        with pytest.raises(ValueError, match="no pending step"):
            public.step_apply(gradients)
        z = public.step_logits(key, np.arange(4), lr=0.1, seed=0, step=0)
        assert z.shape == (4, 10)
        public.step_apply(gradients)
        with pytest.raises(PublicServerError, match="indices must lie in"):
            public.step_logits(key, np.array([0, 4]), lr=0.1, seed=0, step=1)


def test_a_server_killed_before_a_step_resumes_it_with_the_same_gradients(
    keys, reference, tmp_path
):
    # Kill when the 5th step is about to be applied (epoch 1, fold 1, second batch), after
    # the gradients left the private side; the spare restores the snapshot of step 4.
    supervisor = KillAndRestart(
        keys, tmp_path / "state", [("rpc=StepApply phase=start", "rpc=StepApply phase=done", 4)]
    )
    run_dir = tmp_path / "run"
    try:
        patient = RetryPolicy(deadline=60.0)
        with remote(supervisor.listen, keys, config=CONFIG, classes=10, retry=patient) as public:
            result = train_delta(CONFIG, run_dir, progress=False, public=public)
        assert not supervisor.errors, supervisor.errors
        assert len(supervisor.killed) == 1
        assert supervisor.killed[0].count("rpc=StepApply phase=done") == 4
        final = supervisor.current
        assert final.count("restored session") == 1
        assert final.count("rpc=StepApply phase=done") == 8
    finally:
        supervisor.close()
    assert metric_rows(run_dir) == metric_rows(reference)
    assert result.final == train_result_final(reference)
    assert ledger_rows(run_dir) == ledger_rows(reference)  # no gradient released twice
