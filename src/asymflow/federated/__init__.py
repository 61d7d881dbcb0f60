"""Federated training on Flower (flwr 1.x Message API) with client-level differential privacy,
random subnetworks and server-side accounting (DESIGN.md sec. 2 and 5).

Each round the server samples clients by Poisson(q) or by Balanced Iteration Subsampling over
rounds (every client in exactly k of every T rounds), gives each sampled client a uniformly
random block of ``split:d`` (Dong, Chen, Ozgur, ICML 2025, arXiv 2503.03043), clips every
update to C on the server, adds N(0, sigma^2 C^2) to every coordinate of the sum and divides
by the FIXED expected number of clients (McMahan et al., ICLR 2018, DP-FedAvg). The round's
client-level event is written to the run's ledger before its model is released.

- :mod:`.config`: :class:`FederatedConfig`;
- :mod:`.shards`: IID / Dirichlet split of the data among clients;
- :mod:`.selection`: clients and blocks per round (our samplers over client ids);
- :mod:`.aggregate`: mask, clip, noise on all coordinates, fixed denominator (no Flower);
- :mod:`.privacy`: the events, calibration and the write-ahead ledger;
- :mod:`.strategy`: :class:`ClientLevelDp`, the Flower strategy wrapper;
- :mod:`.client_app` / :mod:`.server_app`: the Flower ``ClientApp`` / ``ServerApp`` (``app``);
- :mod:`.simulation`: :func:`run_federated` on the simulation engine;
- :mod:`.deploy`: a Flower App directory for ``flwr run`` on the deployment engine;
- :mod:`.report`: ``report.md`` and ``report.png``.

The Flower-dependent modules are imported lazily: this package imports without Flower.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from asymflow.federated.aggregate import (
    ClientUpdate,
    InvalidUpdateError,
    apply_update,
    masked_clipped,
    noisy_mean_update,
    noisy_sum,
)
from asymflow.federated.config import FederatedConfig
from asymflow.federated.deploy import app_pyproject, write_flower_app
from asymflow.federated.privacy import ClientLevelAccountant, expected_event, run_noise
from asymflow.federated.runs import FederatedResult, read_config, read_metrics, read_result
from asymflow.federated.selection import ClientSelector, RoundAssignment
from asymflow.federated.shards import split_indices

if TYPE_CHECKING:
    from asymflow.federated.simulation import run_federated

__all__ = [
    "ClientLevelAccountant",
    "ClientSelector",
    "ClientUpdate",
    "FederatedConfig",
    "FederatedResult",
    "InvalidUpdateError",
    "RoundAssignment",
    "app_pyproject",
    "apply_update",
    "expected_event",
    "masked_clipped",
    "noisy_mean_update",
    "noisy_sum",
    "read_config",
    "read_metrics",
    "read_result",
    "run_federated",
    "run_noise",
    "split_indices",
    "write_flower_app",
]


def __getattr__(name: str) -> Any:
    """Lazy access to :func:`run_federated` (imports Flower)."""
    if name == "run_federated":
        from asymflow.federated.simulation import run_federated

        return run_federated
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
