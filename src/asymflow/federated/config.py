"""Configuration of a federated run with client-level differential privacy.

One :class:`FederatedConfig` describes the whole run: the data and how it is split among the
N clients, the model, the client sampler over rounds, the random subnetwork, the clipping and
noise of the server-side Gaussian mechanism, and the clients' local training. It round-trips
through JSON (``config.json`` of the run directory) and through Flower's flat run config
(``[tool.flwr.app.config]`` / ``flwr run --run-config``), so the simulation and the deployment
engine run the same thing.

Sampling over rounds, with N clients and R rounds:

- ``poisson``: every client joins each round independently with probability q (default k/T);
  R rounds. Expected clients per round: m = qN.
- ``balanced``: Balanced Iteration Subsampling over rounds: R rounds form ceil(R/T) passes of
  T = ``period`` rounds, and every client joins a uniformly random k-subset of the T rounds of
  each pass (Dong, Chen, Ozgur, ICML 2025, arXiv 2503.03043). Expected clients: m = kN/T.

m is the FIXED denominator of the aggregate (McMahan et al., ICLR 2018, "Learning
Differentially Private Recurrent Language Models", Alg. 1, estimator f_f with uniform weights).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from asymflow.accounting.best import CERTIFIED_METHODS, DEFAULT_METHODS
from asymflow.dpsgd.partition import UNITS, PartitionSpec
from asymflow.runfiles import (
    check_choice,
    check_int,
    check_noise,
    check_number,
    config_from_dict,
    config_to_dict,
)

__all__ = ["MODELS", "SAMPLERS", "SPLITS", "FederatedConfig"]

SAMPLERS: tuple[str, ...] = ("poisson", "balanced")
SPLITS: tuple[str, ...] = ("iid", "dirichlet")
MODELS: tuple[str, ...] = ("resnet20", "resnet18", "resnet34")

_OPTIONAL_INT = ("sampler_seed", "noise_seed")
_OPTIONAL_FLOAT = ("q", "sigma", "target_epsilon")
_TUPLES = ("methods",)


@dataclass(frozen=True)
class FederatedConfig:
    """Everything that defines a federated run; the defaults fit the digits data on a CPU.

    - Data: ``data`` (a :func:`asymflow.data.load_data` spec) split among ``clients`` clients,
      ``split="iid"`` (uniform random shards) or ``"dirichlet"`` (per-class proportions drawn
      from Dir(``alpha``), Hsu, Qi, Brown 2019, arXiv 1909.06335).
    - Sampling: ``sampler`` "poisson" (rate ``q``, default k/T) or "balanced" (k of every T =
      ``period`` rounds; a partial last pass is accounted in full). ``rounds`` = R.
    - Subnetwork: ``subnetwork`` "none" or "split:d": each sampled client trains one uniformly
      random block of d disjoint parameter blocks (:func:`asymflow.dpsgd.plan_partition`).
    - Privacy: each client update is clipped to ``clip`` = C, the sum gets N(0, sigma^2 C^2) on
      every coordinate. Exactly one of ``sigma`` and ``target_epsilon`` (at ``delta``) is given.
    - Local training: ``local_epochs`` of SGD (``lr``, ``momentum``, ``batch_size``); the
      server applies the noisy mean update with ``server_lr``.
    - ``sampler_seed`` / ``noise_seed`` = None (production) draw from the OS's secure source and
      are never stored: the guarantee needs the sampling, block choices and noise to be secret.
    - ``parallelism``: clients trained at once by the simulation engine (Ray CPUs).
    """

    data: str = "digits"
    model: str = "resnet20"
    width: float = 0.25
    clients: int = 10
    rounds: int = 20
    sampler: str = "poisson"
    k: int = 2
    period: int = 5
    q: float | None = None
    subnetwork: str = "none"
    partition_unit: str = "layer"
    sigma: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    clip: float = 1.0
    server_lr: float = 1.0
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    split: str = "iid"
    alpha: float = 0.5
    seed: int = 0
    sampler_seed: int | None = None
    noise_seed: int | None = None
    methods: tuple[str, ...] = DEFAULT_METHODS
    eval_batch_size: int = 256
    threads: int = 1
    parallelism: int = 1
    round_timeout: float = 3600.0

    def __post_init__(self) -> None:
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be a data spec such as 'digits', got {self.data!r}")
        check_choice("model", self.model, MODELS)
        check_number("width", self.width, 0.0, 16.0, open_low=True)
        check_int("clients", self.clients, 1)
        check_int("rounds", self.rounds, 1)
        check_choice("sampler", self.sampler, SAMPLERS)
        check_int("k", self.k, 1)
        check_int("period", self.period, 1)
        if self.k > self.period:
            raise ValueError(
                f"k must satisfy 1 <= k <= period, got k={self.k}, period={self.period}"
            )
        if self.q is not None:
            check_number("q", self.q, 0.0, 1.0, open_low=True)
            if self.sampler != "poisson":
                raise ValueError(f"q applies to sampler 'poisson' only, got sampler={self.sampler}")
        spec = PartitionSpec.parse(self.subnetwork)
        if spec.kind == "dropout":
            raise ValueError(
                "subnetwork must be 'none' or 'split:d' (d >= 2); dropout masks are not "
                f"supported for federated clients, got subnetwork={self.subnetwork!r}"
            )
        check_choice("partition_unit", self.partition_unit, UNITS)
        check_noise(self.sigma, self.target_epsilon, self.delta, self.clip)
        check_number("server_lr", self.server_lr, 0.0, 100.0, open_low=True)
        check_int("local_epochs", self.local_epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        check_number("lr", self.lr, 0.0, 100.0, open_low=True)
        check_number("momentum", self.momentum, 0.0, 0.999)
        check_choice("split", self.split, SPLITS)
        check_number("alpha", self.alpha, 0.0, 1e6, open_low=True)
        check_int("seed", self.seed, 0)
        for name in ("sampler_seed", "noise_seed"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0)
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.methods or any(m not in CERTIFIED_METHODS for m in self.methods):
            raise ValueError(
                f"methods must be a non-empty subset of {sorted(CERTIFIED_METHODS)}, "
                f"got methods={self.methods!r}"
            )
        check_int("eval_batch_size", self.eval_batch_size, 1)
        check_int("threads", self.threads, 1)
        check_int("parallelism", self.parallelism, 1)
        check_number("round_timeout", self.round_timeout, 0.0, 1e7, open_low=True)

    # ------------------------------------------------------------------ derived quantities

    @property
    def partition_spec(self) -> PartitionSpec:
        """The parsed ``subnetwork``."""
        return PartitionSpec.parse(self.subnetwork)

    @property
    def parts(self) -> int:
        """d, the number of disjoint blocks (1 without a subnetwork)."""
        return self.partition_spec.parts

    @property
    def passes(self) -> int:
        """ceil(R / T): BIS passes started by R rounds (a partial last pass counts in full)."""
        return -(-self.rounds // self.period)

    @property
    def rate(self) -> float:
        """Per-round participation probability of a client: q (Poisson) or k/T (balanced)."""
        if self.sampler == "poisson" and self.q is not None:
            return float(self.q)
        return self.k / self.period

    @property
    def expected_clients(self) -> float:
        """m = rate * N, the fixed denominator of the aggregate."""
        return self.rate * self.clients

    # ------------------------------------------------------------------ serialization

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples as lists)."""
        return config_to_dict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FederatedConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused."""
        return config_from_dict(cls, data)

    def to_run_config(self) -> dict[str, bool | int | float | str]:
        """Flower's flat run config: kebab-case keys, scalar values; None is left out and
        tuples become comma-separated strings (``[tool.flwr.app.config]``)."""
        out: dict[str, bool | int | float | str] = {}
        for key, value in asdict(self).items():
            if value is None:
                continue
            if isinstance(value, tuple | list):
                value = ",".join(str(v) for v in value)
            out[key.replace("_", "-")] = value
        return out

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederatedConfig:
        """Inverse of :meth:`to_run_config`; keys outside the config (e.g. ``run-dir``) are
        ignored, so one ``[tool.flwr.app.config]`` table can carry both."""
        by_key = {f.name.replace("_", "-"): f.name for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in run_config.items():
            name = by_key.get(key)
            if name is None:
                continue
            if name in _TUPLES:
                value = tuple(s.strip() for s in str(value).split(",") if s.strip())
            elif name in _OPTIONAL_INT and isinstance(value, float) and value.is_integer():
                value = int(value)
            elif name in _OPTIONAL_FLOAT and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif name in ("width", "clip", "server_lr", "lr", "momentum", "alpha", "delta"):
                if isinstance(value, int) and not isinstance(value, bool):
                    value = float(value)
            elif name == "round_timeout" and isinstance(value, int):
                value = float(value)
            kwargs[name] = value
        return cls(**kwargs)
