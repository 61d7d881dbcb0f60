"""Client-level privacy accounting of a federated run, written ahead into the run's ledger.

The unit of privacy is one client's whole data set (add/remove one client). The released
objects are the noisy global models, one per round (:mod:`asymflow.federated.aggregate`).
The event of a round, with sigma the noise multiplier (noise std sigma * C, C the clip norm):

- Poisson(q), no subnetwork: ``PoissonSampled(q, Gaussian(sigma))`` per round (Mironov,
  Talwar, Zhang 2019);
- Poisson(q), ``split:d``: ``PoissonSampled(q, ModelPartitioned(d, Gaussian(sigma)))`` per round:
  a sampled client's clipped update lies in one uniformly random block of d and every block
  is noised, the 1-of-d random-allocation pair (Dong, Chen, Ozgur, ICML 2025, arXiv
  2503.03043, Sec. 3-4; ACCOUNTING.md sec. 3);
- BIS(k, T): ``BalancedSampled(k, T, Gaussian(sigma))`` once per pass of T rounds (random
  allocation over rounds). With ``split:d`` this is conservative: no accountant here bounds
  BIS combined with partitioning, so the partition amplification is NOT claimed; the plain
  Gaussian pair dominates each round because the clipped update has norm <= C and every
  coordinate is noised (:func:`asymflow.dpsgd.partition.step_accounting`).

Write-ahead: the row of a round (Poisson) or of a pass (BIS, at its first round) is committed
to ``ledger.sqlite`` before the round's noisy model is computed and released; a started pass
counts in full. Resume: a process writes its own row for every block it releases in, so a
redone Poisson round gets a second row, and a run resumed in the middle of a BIS pass records
a whole new pass at its first round (the cut rows stay: epsilon over-counts, never
under-counts). With the seeds None the resumed process samples and noises afresh, so the rest
of the pass is a fresh BIS pass, as its row assumes; with both seeds fixed it repeats exactly
what the cut process drew. The epsilon reported after each round is recomputed from the
ledger's rows, with consecutive identical rows merged into one ``SelfComposed`` (the same
composition, computed once instead of row by row).
"""

from __future__ import annotations

from dataclasses import dataclass

from asymflow.accounting.accountant import UnsupportedEventError
from asymflow.accounting.best import CERTIFIED_METHODS, EpsilonReport, best_epsilon
from asymflow.accounting.calibrate import noise_for_epsilon
from asymflow.accounting.events import (
    BalancedSampled,
    Composed,
    Event,
    PoissonSampled,
    SelfComposed,
)
from asymflow.accounting.ledger import LedgerEntry, PrivacyLedger
from asymflow.dpsgd.partition import StepAccounting, step_accounting
from asymflow.federated.config import FederatedConfig

__all__ = [
    "ClientLevelAccountant",
    "Noise",
    "block_event",
    "compacted_event",
    "expected_event",
    "round_accounting",
    "run_noise",
]


def round_accounting(config: FederatedConfig) -> StepAccounting:
    """The accounting of one round's Gaussian step (partition amplification only with Poisson;
    see the module docstring)."""
    return step_accounting(config.partition_spec, config.sampler, has_shared=False)


def block_event(config: FederatedConfig, sigma: float) -> Event:
    """One ledger row's event: a Poisson round, or a BIS pass."""
    step = round_accounting(config).event(sigma)
    if config.sampler == "poisson":
        return PoissonSampled(config.rate, step)
    return BalancedSampled(config.k, config.period, step)


def expected_event(config: FederatedConfig, sigma: float, rounds: int | None = None) -> Event:
    """The composed event after ``rounds`` rounds (default all): R Poisson rounds, or the
    ceil(r/T) BIS passes started by them."""
    r = config.rounds if rounds is None else rounds
    count = r if config.sampler == "poisson" else -(-r // config.period)
    return SelfComposed(block_event(config, sigma), count)


@dataclass(frozen=True)
class Noise:
    """The noise multiplier of a run and, when calibrated, its planned certified epsilon."""

    sigma: float
    planned_epsilon: float | None
    note: str


def run_noise(config: FederatedConfig) -> Noise:
    """``config.sigma``, or the smallest sigma whose certified epsilon over the whole schedule
    is <= ``target_epsilon`` (:func:`asymflow.accounting.noise_for_epsilon`, same events)."""
    accounting = round_accounting(config)
    if config.sigma is not None:
        return Noise(float(config.sigma), None, accounting.note)
    assert config.target_epsilon is not None
    schedule = (
        {"steps": config.rounds, "q": config.rate}
        if config.sampler == "poisson"
        else {"steps": config.period, "k": config.k, "epochs": config.passes}
    )
    calibration = noise_for_epsilon(
        config.target_epsilon,
        config.delta,
        config.sampler,
        parts=accounting.parts,
        methods=config.methods,
        **schedule,
    )
    return Noise(calibration.sigma * accounting.sigma_divisor, calibration.epsilon, accounting.note)


def compacted_event(entries: list[LedgerEntry]) -> Event:
    """``Composed`` of the rows with runs of identical consecutive events merged:
    ``SelfComposed(e, a)`` then ``SelfComposed(e, b)`` is ``SelfComposed(e, a + b)``."""
    runs: list[tuple[Event, int]] = []
    for entry in entries:
        if runs and runs[-1][0] == entry.event:
            runs[-1] = (entry.event, runs[-1][1] + entry.count)
        else:
            runs.append((entry.event, entry.count))
    return Composed(tuple(SelfComposed(e, n) for e, n in runs))


class ClientLevelAccountant:
    """Writes each round's client-level event to ``ledger`` before its release and reports
    the certified epsilon recomputed from the ledger."""

    def __init__(
        self, config: FederatedConfig, sigma: float, ledger: PrivacyLedger, *, note: str = ""
    ) -> None:
        self.config = config
        self.sigma = float(sigma)
        self.ledger = ledger
        self.note = note
        self.rows: list[int] = []
        self._released = 0
        self._block: int | None = None
        event = block_event(config, self.sigma)
        if not any(CERTIFIED_METHODS[m]().supports(event) for m in config.methods):
            raise UnsupportedEventError(
                f"no certified accountant among {config.methods} bounds {event!r}"
            )

    def before_release(self, server_round: int) -> None:
        """Record (and fsync) the row covering round ``server_round`` unless this accountant
        already wrote its block's: every Poisson round, the first round of each BIS pass, and
        the first round of a resumed process in the middle of a pass."""
        if server_round < 1:
            raise ValueError(f"server_round must be >= 1, got server_round={server_round}")
        config = self.config
        poisson = config.sampler == "poisson"
        block = server_round if poisson else (server_round - 1) // config.period
        if block == self._block:
            return
        self._block = block
        if poisson:
            what = f"round {server_round}: Poisson(q={config.rate:.6g}) client sampling"
        else:
            what = f"pass {block + 1}: BIS(k={config.k}, T={config.period}) over rounds"
            if (server_round - 1) % config.period:
                what += f" (resumed at round {server_round})"
        note = f"federated client-level; {what}; sigma={self.sigma:.6g}; {self.note}"
        row = self.ledger.record(
            block_event(config, self.sigma), dataset=config.data, count=1, note=note
        )
        self.rows.append(row)

    def after_release(self) -> None:
        """Mark the rows written so far as released (informational)."""
        for row in self.rows[self._released :]:
            self.ledger.mark_released(row)
        self._released = len(self.rows)

    def event(self) -> Event:
        """The composed event of every recorded row (compacted)."""
        return compacted_event(self.ledger.entries(dataset=self.config.data))

    def epsilon(self) -> EpsilonReport:
        """Certified client-level epsilon at ``config.delta`` of everything recorded."""
        return best_epsilon(self.event(), self.config.delta, self.config.methods)
