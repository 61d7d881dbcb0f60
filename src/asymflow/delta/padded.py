"""Padded slots: a per-record residual release that subsampling does amplify.

A residual leaves per record, not inside a noisy sum, so subsampling alone does not amplify
it: against D' = D minus {x}, an element released for x cannot exist without x, so
delta >= q. Padding removes that tell. Every release epoch e = 1..T sends exactly ``slots``
elements (N_pub, a public constant >= the record count). Record j owns slot pi(j), pi a
secret, uniformly random injection of the records into the slots, and its slot carries

    S_e = clip_C(R_j,e) + N(0, sigma^2 C^2 I)   if j is sampled in epoch e,
    S_e = N(0, sigma^2 C^2 I)                   otherwise, and in every unowned slot,

each quantized to sign bits. Each record is sampled in exactly k of the T epochs, a uniform
k-subset drawn independently of the other records (Balanced Iteration Subsampling; Dong,
Chen, Ozgur, ICML 2025, arXiv 2503.03043). A slot's label is its record's label-DP release
(randomized response, once, its own ledger row), or a uniform label drawn once for an unowned
slot: every slot shows the same label in every epoch.

Claim: the T padded releases are dominated by BalancedSampled(k, T, Gaussian(sigma)), the
event the ledger records once before the first epoch. Proof: couple D and D' through the
same injection of the other records (the restriction of a uniform injection is uniform) and
the same draws for them: every slot but x's has one law under both, and x's slot turns into
an unowned one. Conditioned on pi, x's slot is (A_e 1[e in S] + Z_e)_{e<=T} against (Z_e),
Z_e iid N(0, sigma^2 C^2 I), ||A_e|| <= C: only the projection on A_e differs, and the
kernel y -> (a/C) y + N(0, sigma^2 (C^2 - a^2)) maps the pair at norm C onto the pair at
norm a <= C, so the worst case is the k-of-T pair E_S N(C 1_S, sigma^2 C^2 I_T) vs
N(0, sigma^2 C^2 I_T) (ACCOUNTING.md sec. 2). Mixing over pi (the same law on both sides)
cannot increase a hockey-stick divergence (joint convexity), the label of x's slot is
randomized response against a uniform label (likelihood ratio within e^{+-epsilon}: the label
row's event covers it), and the sign bits are post-processing.
"""

from __future__ import annotations

import io
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from asymflow.accounting.calibrate import noise_for_epsilon
from asymflow.accounting.events import BalancedSampled, Gaussian
from asymflow.runfiles import atomic_write_bytes

PLAN_FILE = "slots.npz"
"""The slot plan of a padded run (private: it stays in the run directory)."""


def padded_event(sigma: float, k: int, epochs: int) -> BalancedSampled:
    """The per-slot event of a padded pass: k of T epochs carry the record's residual."""
    return BalancedSampled(k, epochs, Gaussian(sigma))


@lru_cache(maxsize=64)
def padded_sigma(epsilon: float, delta: float, k: int, epochs: int) -> float:
    """Smallest sigma whose certified BalancedSampled(k, epochs, Gaussian(sigma)) epsilon at
    ``delta`` is <= ``epsilon`` (our k-of-T accountants, asymflow.accounting.calibrate; cached:
    the bisection takes seconds)."""
    return noise_for_epsilon(epsilon, delta, "balanced", epochs, k=k).sigma


@dataclass(frozen=True)
class SlotPlan:
    """Who owns which slot and in which epochs each record is sampled.

    ``owner``: (slots,) int64, the record in each slot or -1; ``sampled``: (T, N) bool, column
    j true in exactly k epochs; ``filler``: (slots,) int64, the uniform label an unowned slot
    carries in every epoch (drawn once: a label that changed between epochs would tell an
    unowned slot from an owned one); ``row``: the ledger row of the pass (recorded before the
    plan is used); ``started``: the epochs whose release has begun (a restarted release of one
    of them is recorded again).
    """

    owner: np.ndarray
    sampled: np.ndarray
    filler: np.ndarray
    row: int
    started: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        owned = self.owner[self.owner >= 0]
        records = self.sampled.shape[1]
        if len(owned) != records or len(np.unique(owned)) != records:
            raise ValueError(f"owner must place each of the {records} records in one slot")
        counts = self.sampled.sum(0)
        if len(counts) and counts.min() != counts.max():
            raise ValueError("sampled must put every record in the same number k of epochs")

    @property
    def slots(self) -> int:
        return len(self.owner)

    @property
    def k(self) -> int:
        return int(self.sampled[:, 0].sum()) if self.sampled.shape[1] else 1

    @property
    def epochs(self) -> int:
        return self.sampled.shape[0]

    def slot_of(self) -> np.ndarray:
        """(N,) the slot of every record (pi)."""
        slot = np.empty(self.sampled.shape[1], dtype=np.int64)
        owned = np.flatnonzero(self.owner >= 0)
        slot[self.owner[owned]] = owned
        return slot

    @classmethod
    def draw(
        cls,
        records: int,
        slots: int,
        k: int,
        epochs: int,
        classes: int,
        row: int,
        seed: int | None = None,
    ) -> SlotPlan:
        """A uniform injection, per record a uniform k-subset of the epochs, and a uniform label
        of ``classes`` per slot (``seed=None``: from the OS's secure source)."""
        if slots < records:
            raise ValueError(f"slots must be >= the record count {records}, got slots={slots}")
        if not 1 <= k <= epochs:
            raise ValueError(f"k must satisfy 1 <= k <= epochs={epochs}, got k={k}")
        rng = np.random.default_rng(secrets.randbits(128) if seed is None else seed)
        owner = np.full(slots, -1, dtype=np.int64)
        owner[rng.permutation(slots)[:records]] = np.arange(records)
        ranks = rng.random((epochs, records)).argsort(0).argsort(0)
        filler = rng.integers(0, classes, size=slots, dtype=np.int64)
        return cls(owner, ranks < k, filler, row)

    def with_started(self, epoch: int) -> SlotPlan:
        return SlotPlan(self.owner, self.sampled, self.filler, self.row, (*self.started, epoch))

    def save(self, run_dir: Path) -> None:
        buffer = io.BytesIO()
        np.savez(
            buffer,
            owner=self.owner,
            sampled=self.sampled,
            filler=self.filler,
            row=np.int64(self.row),
            started=np.asarray(self.started, dtype=np.int64),
        )
        atomic_write_bytes(run_dir / PLAN_FILE, buffer.getvalue())

    @classmethod
    def load(cls, run_dir: Path) -> SlotPlan | None:
        path = run_dir / PLAN_FILE
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            return cls(
                data["owner"],
                data["sampled"],
                data["filler"],
                int(data["row"]),
                tuple(int(e) for e in data["started"]),
            )


def padded_chunks(
    plan: SlotPlan,
    epoch: int,
    residual_of: Callable[[np.ndarray], Tensor],
    shape: tuple[int, int, int],
    chunk: int,
) -> Iterator[Tensor]:
    """The tensors to sanitize for epoch ``epoch`` (1-based), in slot order and chunks of
    ``chunk`` slots: the residual of the owning record where it is sampled this epoch, zero
    elsewhere (the sanitizer turns a zero row into pure noise N(0, sigma^2 C^2 I)).
    ``residual_of(records)`` gives the residuals (B, *shape) of the records' epoch views."""
    live = plan.sampled[epoch - 1]
    for start in range(0, plan.slots, chunk):
        owners = plan.owner[start : start + chunk]
        rows = np.flatnonzero(owners >= 0)
        rows = rows[live[owners[rows]]]
        out = torch.zeros((len(owners), *shape))
        if len(rows):
            out[torch.from_numpy(rows)] = residual_of(owners[rows]).float()
        yield out


def slot_labels(plan: SlotPlan, labels: np.ndarray) -> np.ndarray:
    """The label of every slot, the same in every epoch: its record's released label, or the
    plan's uniform filler label in an unowned slot."""
    out = plan.filler.copy()
    owned = plan.owner >= 0
    out[owned] = labels[plan.owner[owned]]
    return out
