"""An Opacus accountant that accounts with our samplers' events, our accountants and our ledger.

``accountant.step(noise_multiplier=sigma, sample_rate=r)`` is called once per optimizer step,
after the noise has been added and before ``optimizer.step()`` changes any parameter (by
:func:`asymflow.dpsgd.train.private_step`, or by Opacus's ``DPOptimizer.pre_step``). Opacus's
``sample_rate`` is ``1/len(data_loader)``, which is meaningless for Balanced Iteration
Subsampling; this adapter ignores it and accounts the sampler it was built with:

- ``BalancedIterationSampler`` BIS(k, T): one ``BalancedSampled(k, T, step_event(sigma))`` per
  pass of T steps (Dong, Chen, Ozgur, ICML 2025; random allocation, Feldman & Shenfeld 2025),
  not one event per step. The noise multiplier must stay constant within a pass.
- ``PoissonSampler``: ``PoissonSampled(q, step_event(sigma))`` per step (Mironov, Talwar, Zhang
  2019).
- ``ShuffleSampler``: refused; no certified bound exists (Chua et al., ICML 2024).

Ledger (write-ahead): at the first step of a BIS pass one row covering the whole pass is written,
before that step's update is applied; for Poisson one row per epoch of the sampler's ``steps``
steps, ``PoissonSampled`` with ``count=steps``. A new block also starts whenever the sampler
begins a new iteration, so an abandoned pass is never merged into the next one. A run that stops
early over-reports, never under-reports. Rows are marked released when their block is over.

The history keeps Opacus's shape, a list of ``(noise_multiplier, sample_rate, num_steps)`` with
our sampler's rate (q, or k/T); :meth:`get_epsilon` recomputes epsilon with
:func:`asymflow.accounting.best_epsilon` from the recorded BIS passes (a started pass counts in
full, as in the ledger) or from the Poisson steps taken.

Being an ``IAccountant``, the accountant also plugs into a stock Opacus loop (a
documented adapter, not used by the package; plain DP-SGD only, since ``DPOptimizer`` cannot
mask per record). Opacus 1.6 builds accountants by name only, so assign this one before
``make_private``, which attaches the step hook of ``privacy_engine.accountant``; keep our
sampler's batches; and make ``DPOptimizer`` divide the noisy sum by a declared batch size B::

    engine = PrivacyEngine()
    engine.accountant = AsymflowAccountant(sampler, ledger=ledger)
    model, optimizer, loader = engine.make_private(
        ..., data_loader=private_loader(dataset, sampler), poisson_sampling=False
    )
    optimizer.expected_batch_size = B

``make_private`` would set ``int(N / len(loader))``: N/T for BIS, wrong by a factor k, and a
function of the record count N, which add/remove DP does not treat as public. With B declared,
the division is post-processing of the Gaussian sum, as in ``private_step``
(bench/dpsgd_paths.py runs this loop against ``private_step``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from opacus.accountants import IAccountant

from asymflow.accounting.accountant import UnsupportedEventError
from asymflow.accounting.best import (
    CERTIFIED_METHODS,
    DEFAULT_METHODS,
    EpsilonReport,
    best_epsilon,
    check_methods,
)
from asymflow.accounting.events import (
    BalancedSampled,
    Composed,
    Event,
    Gaussian,
    PoissonSampled,
    SelfComposed,
)
from asymflow.accounting.ledger import ALL_SCOPE, PrivacyLedger
from asymflow.sampling import BalancedIterationSampler, PoissonSampler, ShuffleSampler

__all__ = ["MECHANISM", "AsymflowAccountant", "sampler_description"]

MECHANISM = "asymflow"

AccountedSampler = PoissonSampler | BalancedIterationSampler


def sampler_description(sampler: AccountedSampler) -> dict[str, Any]:
    """The sampler's privacy-relevant parameters (not its seed), JSON-ready."""
    if isinstance(sampler, BalancedIterationSampler):
        return {
            "kind": "balanced",
            "num_samples": sampler.num_samples,
            "k": sampler.k,
            "steps": sampler.steps,
        }
    return {
        "kind": "poisson",
        "num_samples": sampler.num_samples,
        "q": sampler.q,
        "steps": sampler.steps,
    }


def _check_sigma(noise_multiplier: object) -> float:
    if isinstance(noise_multiplier, bool) or not isinstance(noise_multiplier, int | float):
        raise ValueError(f"noise_multiplier must be a number > 0, got {noise_multiplier!r}")
    sigma = float(noise_multiplier)
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(
            f"noise_multiplier must be a finite number > 0 for a certified bound, got {sigma}"
        )
    return sigma


class AsymflowAccountant(IAccountant):
    """Opacus ``IAccountant`` backed by asymflow's events, accountants and ledger.

    ``step_event(sigma)`` is the event of one noisy step at multiplier ``sigma`` with the clip
    norm as unit (default ``Gaussian``; model partitioning passes
    :meth:`asymflow.dpsgd.partition.StepAccounting.event`). ``ledger`` rows go to ``dataset``
    and ``scope`` with ``note``. ``methods`` are the certified methods of :meth:`get_epsilon`.
    """

    def __init__(
        self,
        sampler: AccountedSampler,
        *,
        ledger: PrivacyLedger | None = None,
        dataset: str = "train",
        scope: str = ALL_SCOPE,
        step_event: Callable[[float], Event] = Gaussian,
        note: str = "dp-sgd",
        methods: tuple[str, ...] = DEFAULT_METHODS,
    ) -> None:
        super().__init__()
        if isinstance(sampler, ShuffleSampler):
            raise ValueError(
                "sampler must be a PoissonSampler or BalancedIterationSampler: shuffled "
                "fixed-size batches have no certified DP-SGD bound (Chua et al., 'How Private "
                "are DP-SGD Implementations?', ICML 2024); use "
                "BalancedIterationSampler(num_samples, k=1, steps=num_samples // batch_size)"
            )
        if not isinstance(sampler, PoissonSampler | BalancedIterationSampler):
            raise TypeError(
                "sampler must be a PoissonSampler or BalancedIterationSampler, got "
                f"{type(sampler).__name__}"
            )
        if ledger is not None and not isinstance(ledger, PrivacyLedger):
            raise TypeError(f"ledger must be a PrivacyLedger or None, got {type(ledger).__name__}")
        methods = check_methods(methods)
        self.sampler = sampler
        self.ledger = ledger
        self.dataset = dataset
        self.scope = scope
        self.step_event = step_event
        self.note = note
        self.methods = methods
        self.history: list[tuple[float, float, int]] = []
        self.ledger_rows: list[int] = []
        self._released = 0
        self.blocks: list[tuple[float, int]] = []  # (sigma, count) of every recorded block
        self._block_sigma: float | None = None
        self._block_len = 0
        self._in_block = 0
        self._row_epoch = -1
        self._opacus_rate: float | None = None
        self._check_supported(self._block_event(1.0))

    # ---------------------------------------------------------------- the sampler's events

    @property
    def kind(self) -> str:
        """The sampler kind: "balanced" or "poisson"."""
        return "balanced" if isinstance(self.sampler, BalancedIterationSampler) else "poisson"

    @property
    def period(self) -> int:
        """Steps per pass (BIS) or per epoch (Poisson): the sampler's ``steps``."""
        return self.sampler.steps

    @property
    def sample_rate(self) -> float:
        """q for Poisson; k/T, the fraction of steps a record joins, for BIS."""
        if isinstance(self.sampler, BalancedIterationSampler):
            return self.sampler.k / self.sampler.steps
        return self.sampler.q

    def _block_event(self, sigma: float) -> Event:
        """BIS: one pass; Poisson: one step."""
        inner = self.step_event(sigma)
        if isinstance(self.sampler, BalancedIterationSampler):
            return BalancedSampled(self.sampler.k, self.sampler.steps, inner)
        return PoissonSampled(self.sampler.q, inner)

    def _check_supported(self, event: Event) -> None:
        if not any(CERTIFIED_METHODS[m]().supports(event) for m in self.methods):
            hint = (
                "; with balanced sampling use step_event=Gaussian (no partition "
                "amplification), the conservative choice"
                if self.kind == "balanced"
                else ""
            )
            raise UnsupportedEventError(
                f"no certified accountant among {self.methods} bounds {event!r}{hint}"
            )

    # ---------------------------------------------------------------- Opacus interface

    def step(self, *, noise_multiplier: float, sample_rate: float) -> None:
        """Account one optimizer step at ``noise_multiplier``, first writing the ledger row of a
        new pass (BIS) or epoch (Poisson) if this step starts one.

        A block (pass or epoch) starts when the previous one has had its ``steps`` steps or
        when the sampler has begun a new iteration (its ``epoch`` counter moved), so an
        abandoned pass is never merged into the next one. Opacus's ``sample_rate`` is only
        checked to stay constant: a change means several sampler batches per optimizer step
        (gradient accumulation), which these events do not describe.
        """
        sigma = _check_sigma(noise_multiplier)
        if self._opacus_rate is None:
            self._opacus_rate = float(sample_rate)
        elif float(sample_rate) != self._opacus_rate:
            raise ValueError(
                "sample_rate must stay constant: one sampler batch per optimizer step "
                f"(gradient accumulation is not accounted), got {sample_rate} after "
                f"{self._opacus_rate}"
            )
        new_iteration = self.sampler.epoch != self._row_epoch
        if self._block_sigma is None or new_iteration or self._in_block >= self._block_len:
            self._record(sigma, self.period)
        elif sigma != self._block_sigma:
            if self.kind == "balanced":
                raise ValueError(
                    "noise_multiplier must stay constant within a BIS pass: got "
                    f"{sigma} at step {self._in_block} of a pass recorded at {self._block_sigma}"
                )
            # Poisson: the row already written over-reports its remaining steps (still valid).
            self._record(sigma, self._block_len - self._in_block)
        self._in_block += 1
        if self.history and self.history[-1][0] == sigma:
            last_sigma, rate, count = self.history[-1]
            self.history[-1] = (last_sigma, rate, count + 1)
        else:
            self.history.append((sigma, self.sample_rate, 1))

    def _record(self, sigma: float, steps: int) -> None:
        """Write the row of a block of ``steps`` steps: one BIS pass, or ``steps`` Poisson
        steps; the write is committed before this returns (write-ahead)."""
        event = self._block_event(sigma)
        self._check_supported(event)
        if self.kind == "balanced":
            count = 1
            what = f"BIS pass (k={self.sampler.k}, T={self.period}); {self.note}"
        else:
            count = steps
            what = f"Poisson steps (q={self.sample_rate:.6g}) x {steps}; {self.note}"
        self.finish()  # the previous block's updates have all been applied
        if self.ledger is not None:
            row = self.ledger.record(
                event, dataset=self.dataset, scope=self.scope, count=count, note=what
            )
            self.ledger_rows.append(row)
        self.blocks.append((sigma, count))
        self._block_sigma = sigma
        self._block_len = steps
        self._in_block = 0
        self._row_epoch = self.sampler.epoch

    def finish(self) -> None:
        """Mark every ledger row written so far as released (informational; call it when
        training stops). Rows are marked automatically when the next block starts."""
        if self.ledger is not None:
            for row in self.ledger_rows[self._released :]:
                self.ledger.mark_released(row)
        self._released = len(self.ledger_rows)

    def event(self) -> Event:
        """The composed event so far: every started BIS pass in full (as in the ledger), or
        every Poisson step taken."""
        if self.kind == "balanced":
            runs = [(sigma, count) for sigma, count in self.blocks]
        else:
            runs = [(sigma, count) for sigma, _, count in self.history]
        return Composed(tuple(SelfComposed(self._block_event(s), n) for s, n in runs))

    def epsilon_report(self, delta: float) -> EpsilonReport:
        """:func:`best_epsilon` of :meth:`event` at ``delta``."""
        return best_epsilon(self.event(), delta, self.methods)

    def get_epsilon(self, delta: float, *args: Any, **kwargs: Any) -> float:
        """Certified epsilon at ``delta`` of the steps so far (Opacus interface)."""
        return self.epsilon_report(delta).epsilon

    def __len__(self) -> int:
        return sum(count for _, _, count in self.history)

    @classmethod
    def mechanism(cls) -> str:
        return MECHANISM

    def state_dict(self, destination: Any = None) -> Any:
        """Opacus's ``{"history", "mechanism"}`` plus the sampler and ledger coverage."""
        if destination is None:
            destination = OrderedDict()
        destination = super().state_dict(destination)
        destination["sampler"] = sampler_description(self.sampler)
        destination["step_event"] = self.step_event(1.0).to_dict()
        destination["blocks"] = [list(b) for b in self.blocks]
        destination["block_sigma"] = self._block_sigma
        destination["block_len"] = self._block_len
        destination["in_block"] = self._in_block
        destination["row_epoch"] = self._row_epoch
        destination["opacus_rate"] = self._opacus_rate
        return destination

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the sampler and step event must match."""
        super().load_state_dict(state_dict)  # checks "history" and "mechanism"
        expected = sampler_description(self.sampler)
        if state_dict.get("sampler") != expected:
            raise ValueError(
                f"state_dict sampler must be {expected}, got {state_dict.get('sampler')}"
            )
        if state_dict.get("step_event") != self.step_event(1.0).to_dict():
            raise ValueError("state_dict step_event must match this accountant's step_event")
        self.history = [(float(s), float(r), int(n)) for s, r, n in state_dict["history"]]
        self.blocks = [(float(s), int(n)) for s, n in state_dict.get("blocks", [])]
        block_sigma = state_dict.get("block_sigma")
        self._block_sigma = None if block_sigma is None else float(block_sigma)
        self._block_len = int(state_dict.get("block_len", 0))
        self._in_block = int(state_dict.get("in_block", 0))
        self._row_epoch = int(state_dict.get("row_epoch", -1))
        rate = state_dict.get("opacus_rate")
        self._opacus_rate = None if rate is None else float(rate)
