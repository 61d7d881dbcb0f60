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

from asymflow.accounting.best import DEFAULT_METHODS, check_methods
from asymflow.checks import check_choice, check_int, check_noise, check_number
from asymflow.dpsgd.partition import UNITS, PartitionSpec
from asymflow.runfiles import JsonFields
from asymflow.settings import setting

__all__ = ["MODELS", "SAMPLERS", "SPLITS", "FederatedConfig"]

SAMPLERS: tuple[str, ...] = ("poisson", "balanced")
SPLITS: tuple[str, ...] = ("iid", "dirichlet")
MODELS: tuple[str, ...] = ("resnet20", "resnet18", "resnet34")

# Help panels of the fields' command-line options (asymflow fl run|app).
_SAMPLING = "Client sampling"
_NOISE = "Noise and subnetwork"
_MODEL = "Data, model and local training"
_RUN = "Run"

_OPTIONAL_INT = ("sampler_seed", "noise_seed")
_OPTIONAL_FLOAT = ("q", "sigma", "target_epsilon")
_TUPLES = ("methods",)


@dataclass(frozen=True)
class FederatedConfig(JsonFields):
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

    data: str = setting(
        "digits",
        "digits, synthetic[:N], folder:PATH, cifar10:PATH or cifar100:PATH.",
        _MODEL,
        metavar="SPEC",
    )
    model: str = setting("resnet20", "Network (GroupNorm).", _MODEL, choices=MODELS)
    width: float = setting(0.25, "Width multiplier, in (0, 16].", _MODEL)
    clients: int = setting(10, "Number of clients N, >= 1.", _SAMPLING)
    rounds: int = setting(20, "Rounds R, >= 1.", _SAMPLING)
    sampler: str = setting(
        "poisson",
        "poisson (each client joins a round with probability q) or balanced (each client in "
        "exactly k of every T = --period rounds).",
        _SAMPLING,
        choices=SAMPLERS,
    )
    k: int = setting(2, "Rounds each client joins per period, 1 <= k <= T.", _SAMPLING)
    period: int = setting(5, "Period T in rounds, >= k.", _SAMPLING)
    q: float | None = setting(
        None, "Poisson rate 0 < q <= 1 (--sampler poisson only).", _SAMPLING, unset="k/T"
    )
    subnetwork: str = setting(
        "none",
        "Each sampled client trains one random block of d disjoint parameter blocks (split:d, "
        "d >= 2).",
        _NOISE,
        metavar="[none|split:d]",
    )
    partition_unit: str = "layer"
    sigma: float | None = setting(
        None, "Noise multiplier σ in (0, 1e6]. Give --sigma or --target-epsilon.", _NOISE
    )
    target_epsilon: float | None = setting(
        None,
        "Calibrate σ so that the client-level ε of all rounds is at most this, in (0, 1e4]. "
        "Give --sigma or --target-epsilon.",
        _NOISE,
    )
    delta: float = setting(1e-5, "Target δ, 0 < δ < 1.", _NOISE)
    clip: float = setting(1.0, "Clip norm C of each client update, in (0, 1e6].", _NOISE)
    server_lr: float = setting(1.0, "Server learning rate, in (0, 100].", _MODEL)
    local_epochs: int = setting(1, "Local epochs per round, >= 1.", _MODEL)
    batch_size: int = setting(32, "Local batch size, >= 1.", _MODEL)
    lr: float = setting(0.1, "Local learning rate, in (0, 100].", _MODEL)
    momentum: float = 0.0
    split: str = setting(
        "iid",
        "How the data is split among clients: iid or dirichlet (Dir(--alpha) class proportions).",
        _MODEL,
        choices=SPLITS,
    )
    alpha: float = setting(0.5, "Dirichlet α, in (0, 1e6].", _MODEL)
    seed: int = setting(0, "Seed of the initialization and data split, >= 0.", _RUN)
    sampler_seed: int | None = setting(
        None,
        "Seed of the client sampling and blocks, >= 0; fixed only for tests and exact replays: "
        "the guarantee needs it secret.",
        _RUN,
        unset="drawn from the OS",
    )
    noise_seed: int | None = setting(
        None,
        "Seed of the server's noise, >= 0; fixed only for tests and exact replays: the "
        "guarantee needs it secret.",
        _RUN,
        unset="drawn from the OS",
    )
    methods: tuple[str, ...] = DEFAULT_METHODS
    eval_batch_size: int = 256
    threads: int = setting(1, "torch threads per client, >= 1.", _RUN)
    parallelism: int = setting(1, "Clients trained at once (simulation), >= 1.", _RUN)
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
        object.__setattr__(self, "methods", check_methods(self.methods))
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
