"""Delta inference: every query batch is a recorded release before its bits leave, and the
prediction is z_main + w log_softmax(z_res) with the trust weight w fitted in training."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import torch

from asymflow.accounting.events import Gaussian
from asymflow.accounting.ledger import PrivacyLedger
from asymflow.data import load_data
from asymflow.delta.contract import ensemble_logits
from asymflow.delta.infer import evaluate_run, infer, load_system
from asymflow.delta.private import SignQuantizer, calibrated_sigma
from asymflow.delta.sanitize import SanitizedResidual
from asymflow.delta.train import fork_stage1, read_result, train_delta


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny):
    """A trained tiny Delta run and its main-only sibling (same stage 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("infer")
    config = tiny()
    train_delta(config, root / "delta", progress=False)
    fork_stage1(root / "delta", root / "main", config.replace(variant="main-only"))
    train_delta(config.replace(variant="main-only"), root / "main", progress=False, resume=True)
    torch.set_num_threads(threads)
    return root


class LedgerCheckingPublic:
    """Wraps a public side; each new payload must find its query's row already recorded."""

    def __init__(self, inner, ledger: PrivacyLedger) -> None:
        self.inner = inner
        self.ledger = ledger
        self.payloads: list[SanitizedResidual] = []

    def logits(self, data, **kwargs):
        assert isinstance(data, SanitizedResidual)
        if not any(p is data for p in self.payloads):
            self.payloads.append(data)
        scopes = [e.scope for e in self.ledger.entries(dataset="q")]
        assert scopes == [f"query:{i}" for i in range(len(self.payloads))]
        return self.inner.logits(data, **kwargs)


def test_each_query_batch_is_recorded_before_its_residual_leaves(runs, tmp_path):
    system = load_system(runs / "delta")
    images = load_data("synthetic:160").test.images[:20]
    with PrivacyLedger.for_run(tmp_path / "queries") as ledger:
        system.public = LedgerCheckingPublic(system.public, ledger)
        logits = infer(system, images, batch_size=8, ledger=ledger, dataset="q")
        entries = ledger.entries(dataset="q")
        assert [e.scope for e in entries] == ["query:0", "query:1", "query:2"]
        sigma = calibrated_sigma(1.4, 1e-5, 1)
        assert all(e.event == Gaussian(sigma) and e.status == "released" for e in entries)
        assert ledger.epsilon(1e-5, dataset="q", scope="query:1").epsilon <= 1.4
    assert logits.shape == (20, 10)


def test_combined_logits_are_main_plus_weighted_public_log_probabilities(runs, tmp_path):
    system = load_system(runs / "delta")
    assert system.model.residual_weight.value == read_result(runs / "delta")["residual_weight"]
    system.model.residual_weight.weight.fill_(0.7)  # whatever was fitted, w is what is used
    system.mechanism = SignQuantizer()  # deterministic bits, to recompute them here
    x = system.normalize(load_data("synthetic:160").test.images[:12])
    with PrivacyLedger.for_run(tmp_path / "q") as ledger:
        logits = infer(system, x, batch_size=5, ledger=ledger)
    expected = []
    for batch in x.split(5):  # the power iteration's start vectors depend on the batch
        dec = system.model.decompose(batch)
        z_main = system.model.main(dec.features)
        bits = np.packbits((dec.residual.flatten(1) >= 0).numpy(), axis=1)
        payload = SanitizedResidual(bits, (8, 16, 16), SignQuantizer().event)
        z_res = ensemble_logits(system.public, payload, ("fold0", "fold1"))
        expected.append(z_main + 0.7 * torch.log_softmax(z_res, 1))
    torch.testing.assert_close(logits, torch.cat(expected), rtol=1e-4, atol=1e-4)


def test_inference_needs_the_checkpoint_but_not_the_training_release(runs, tmp_path):
    copy = tmp_path / "delta"
    shutil.copytree(runs / "delta", copy)
    for path in copy.glob("released*.npz"):
        path.unlink()
    system = load_system(copy, seed=0)
    assert system.mechanism is not None
    assert system.mechanism.event == Gaussian(calibrated_sigma(1.4, 1e-5, 1))
    images = load_data("synthetic:160").test.images[:4]
    with PrivacyLedger.for_run(tmp_path / "q") as ledger:
        assert infer(system, images, ledger=ledger).shape == (4, 10)


def test_main_only_inference_releases_nothing(runs, tmp_path):
    images = load_data("synthetic:160").test.images[:10]
    with PrivacyLedger.for_run(tmp_path / "q") as ledger:
        logits = infer(runs / "main", images, ledger=ledger)
        assert ledger.entries() == []
    assert logits.shape == (10, 10)


def test_evaluate_run_queries_the_test_split_through_the_run_ledger(runs):
    out = evaluate_run(runs / "delta", batch_size=16)
    assert 0.0 <= out["accuracy"] <= 1.0
    assert out["queries"] == 32 and out["batches"] == 2
    assert out["epsilon_per_query"] == pytest.approx(1.4, abs=5e-3)
    with PrivacyLedger.for_run(runs / "delta") as ledger:
        rows = ledger.entries(dataset="synthetic:160/test-queries")
    assert [r.scope for r in rows] == ["query:0", "query:1"]


def test_bad_queries_are_refused(runs):
    system = load_system(runs / "main")
    with pytest.raises(ValueError, match="batch_size"):
        infer(system, torch.zeros(1, 3, 16, 16), batch_size=0)
    with pytest.raises(ValueError, match="images"):
        infer(system, np.zeros((1, 16, 16, 3), np.float32))
    assert not math.isnan(float(infer(system, torch.zeros(2, 3, 16, 16)).sum()))
