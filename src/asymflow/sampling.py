"""Batch samplers for private training, with the privacy event each one realizes.

Every sampler is a ``torch.utils.data.Sampler[list[int]]`` for ``DataLoader(batch_sampler=...)``
and yields one list of dataset indices per step. Randomness comes from a ``torch.Generator``
seeded from ``(seed, epoch)``, so the same seed reproduces the same batches and every pass
draws fresh, independent batches. Each pass advances the epoch; :meth:`set_epoch` jumps to a
given one. Keep the seed secret: the privacy guarantees assume the adversary does not know
the sampling randomness. (torch's CPU generator, an MT19937, keeps 32 bits of its seed, so
there are 2**32 distinct streams.)

Poisson and balanced samplers can yield empty batches. A training step must still run on an
empty batch (the noise is added regardless); skipping it changes the privacy event. With a
``DataLoader`` use a ``collate_fn`` that accepts an empty list.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from asymflow.accounting.events import BalancedSampled, Event, PoissonSampled, SelfComposed

__all__ = ["BalancedIterationSampler", "PoissonSampler", "ShuffleSampler"]

_MASK64 = (1 << 64) - 1
_GOLDEN64 = 0x9E3779B97F4A7C15
_CHUNK_ELEMENTS = 1 << 25
"""Upper bound on the entries of the per-chunk (records x steps) boolean mask (32 MiB)."""


def _splitmix64(x: int) -> int:
    """SplitMix64 finalizer (Steele, Lea, Flood, OOPSLA 2014): a bijective 64-bit mixer."""
    x = (x + _GOLDEN64) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _derive_seed(seed: int, epoch: int) -> int:
    """A generator seed for pass ``epoch``: ``mix(mix(seed) + epoch)``, distinct per epoch."""
    return _splitmix64((_splitmix64(seed & _MASK64) + epoch) & _MASK64)


def _as_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]``; bools and non-integers are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, not a bool, got {name}={value!r}")
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r}") from None
    if out < low or (high is not None and out > high):
        upper = f" <= {high}" if high is not None else ""
        raise ValueError(f"{name} must satisfy {low} <= {name}{upper}, got {name}={out}")
    return out


def _as_seed(seed: object) -> int:
    if isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, not a bool, got seed={seed!r}")
    try:
        return operator.index(seed)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"seed must be an integer, got {seed!r}") from None


def _as_probability(name: str, value: object) -> float:
    """``value`` as a float in ``(0, 1]``; bools, NaN and non-numbers are refused."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a number, not a bool, got {name}={value!r}")
    if not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if math.isnan(out) or not 0 < out <= 1:
        raise ValueError(f"{name} must satisfy 0 < {name} <= 1, got {name}={value!r}")
    return out


def _check_noise(noise: object) -> None:
    if not isinstance(noise, Event):
        raise TypeError(f"noise must be an Event, got {type(noise).__name__}")


class _SeededBatchSampler(Sampler[list[int]]):
    """Shared seeding: pass ``e`` uses a generator seeded with ``_derive_seed(seed, e)``."""

    def __init__(self, num_samples: int, seed: int) -> None:
        super().__init__()
        self.num_samples = _as_int("num_samples", num_samples, 1)
        self.seed = _as_seed(seed)
        self._epoch = 0

    @property
    def epoch(self) -> int:
        """The epoch the next iteration will draw."""
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration draw pass ``epoch`` (deterministic given the seed)."""
        self._epoch = _as_int("epoch", epoch, 0)

    def _next_generator(self) -> torch.Generator:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(_derive_seed(self.seed, self._epoch))
        self._epoch += 1
        return generator

    def __iter__(self) -> Iterator[list[int]]:
        return self._batches(self._next_generator())

    def _batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        raise NotImplementedError

    def privacy_event(self, noise: Event) -> Event:
        """The privacy event of one full iteration of this sampler around ``noise``."""
        raise NotImplementedError


class PoissonSampler(_SeededBatchSampler):
    """Poisson subsampling: at each of ``steps`` steps, every index joins independently with
    probability ``q`` (batch size ~ Binomial(N, q), possibly 0).

    Privacy: ``SelfComposed(PoissonSampled(q, noise), steps)``, the subsampled mechanism of
    Abadi et al. (CCS 2016) and Mironov, Talwar, Zhang (2019). Inclusion uses float64
    uniforms, so each probability is within 2**-53 of ``q``.
    """

    def __init__(self, num_samples: int, q: float, steps: int, *, seed: int) -> None:
        super().__init__(num_samples, seed)
        self.q = _as_probability("q", q)
        self.steps = _as_int("steps", steps, 1)

    @property
    def expected_batch_size(self) -> float:
        """E[batch size] = q N."""
        return self.q * self.num_samples

    def __len__(self) -> int:
        return self.steps

    def _batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        for _ in range(self.steps):
            u = torch.rand(self.num_samples, generator=generator, dtype=torch.float64)
            yield torch.nonzero(u < self.q).flatten().tolist()

    def privacy_event(self, noise: Event) -> Event:
        """``SelfComposed(PoissonSampled(q, noise), steps)``."""
        _check_noise(noise)
        return SelfComposed(PoissonSampled(self.q, noise), self.steps)


class BalancedIterationSampler(_SeededBatchSampler):
    """Balanced Iteration Subsampling BIS(k, T): in each pass of ``steps`` = T steps, every
    record joins a uniformly random k-subset of the steps, independently of other records
    (Dong, Chen, Ozgur, ICML 2025; "random allocation" in Feldman & Shenfeld 2025).

    Every record is used exactly ``k`` times per pass; the batch at one step has size
    Binomial(N, k/T), mean kN/T. One iteration yields ``passes * steps`` batches.
    Privacy: ``SelfComposed(BalancedSampled(k, steps, noise), passes)``.

    Subsets are drawn by Floyd's algorithm vectorized over chunks of records (see
    :meth:`_draw_steps`), in memory O(32 MiB + N k) and time O(N min(k, T-k)).
    """

    def __init__(self, num_samples: int, k: int, steps: int, *, seed: int, passes: int = 1) -> None:
        super().__init__(num_samples, seed)
        self.steps = _as_int("steps", steps, 1)
        self.k = _as_int("k", k, 1)
        if self.k > self.steps:
            raise ValueError(f"k must satisfy 1 <= k <= steps, got k={self.k}, steps={self.steps}")
        self.passes = _as_int("passes", passes, 1)

    @property
    def expected_batch_size(self) -> float:
        """E[batch size] = k N / T."""
        return self.k * self.num_samples / self.steps

    def __len__(self) -> int:
        return self.passes * self.steps

    def _draw_steps(self, generator: torch.Generator) -> torch.Tensor:
        """Steps of one pass as an (N, k) tensor: row i is record i's uniformly random
        k-subset of ``range(steps)``, independent across records.

        Floyd's algorithm (Bentley & Floyd, CACM 30(9), 1987), vectorized over a chunk of
        records with a (chunk, T) membership mask: for j = T-m .. T-1 draw d ~ U{0..j} and
        take d, or j if d is already taken. This gives a uniform m-subset with m = min(k, T-k);
        for k > T/2 the complement is kept. Cost O(N min(k, T-k)) draws, memory O(chunk T).
        """
        n, k, t = self.num_samples, self.k, self.steps
        m = min(k, t - k)
        out = torch.empty((n, k), dtype=torch.int64)
        rows = max(1, _CHUNK_ELEMENTS // t)
        for start in range(0, n, rows):
            c = min(rows, n - start)
            taken = torch.zeros((c, t), dtype=torch.bool)
            flat = taken.view(-1)
            row_base = torch.arange(c, dtype=torch.int64) * t
            drawn = torch.empty((c, m), dtype=torch.int64)
            for col, j in enumerate(range(t - m, t)):
                u = torch.rand(c, generator=generator, dtype=torch.float64)
                # floor(u (j+1)) with float64 u is uniform on {0..j} up to (j+1) 2**-53.
                draw = (u * (j + 1)).floor_().to(torch.int64).clamp_(max=j)
                draw = torch.where(flat[row_base + draw], j, draw)
                flat.index_fill_(0, row_base + draw, True)
                drawn[:, col] = draw
            if m == k:
                out[start : start + c] = drawn
                continue
            # k > T/2: keep the complement of the m = T - k drawn steps. nonzero returns 16
            # bytes per hit, so extract in slices of at most _CHUNK_ELEMENTS / 16 mask entries.
            taken.logical_not_()
            sub = max(1, _CHUNK_ELEMENTS // (16 * t))
            for s0 in range(0, c, sub):
                kept = taken[s0 : s0 + sub].nonzero()[:, 1]
                out[start + s0 : start + s0 + kept.numel() // k] = kept.view(-1, k)
        return out

    def _batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        n, k, t = self.num_samples, self.k, self.steps
        records = torch.arange(n, dtype=torch.int64).repeat_interleave(k)
        for _ in range(self.passes):
            step_of = self._draw_steps(generator).flatten()
            # Stable sort by step keeps each batch in increasing index order.
            order = torch.sort(step_of, stable=True).indices
            members = records[order]
            sizes = torch.bincount(step_of, minlength=t).tolist()
            start = 0
            for size in sizes:
                yield members[start : start + size].tolist()
                start += size

    def privacy_event(self, noise: Event) -> Event:
        """``SelfComposed(BalancedSampled(k, steps, noise), passes)``."""
        _check_noise(noise)
        return SelfComposed(BalancedSampled(self.k, self.steps, noise), self.passes)


class ShuffleSampler(_SeededBatchSampler):
    """Shuffling: each epoch a uniformly random permutation of the indices, cut into
    consecutive batches of ``batch_size`` (the last one smaller unless ``drop_last``).

    No certified privacy bound is known for this sampler; see :meth:`privacy_event`.
    """

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int, drop_last: bool = False
    ) -> None:
        super().__init__(num_samples, seed)
        self.batch_size = _as_int("batch_size", batch_size, 1)
        if not isinstance(drop_last, bool):
            raise TypeError(f"drop_last must be a bool, got {drop_last!r}")
        if drop_last and self.batch_size > self.num_samples:
            raise ValueError(
                "batch_size must satisfy 1 <= batch_size <= num_samples when drop_last=True, "
                f"got batch_size={self.batch_size}, num_samples={self.num_samples}"
            )
        self.drop_last = drop_last

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def _batches(self, generator: torch.Generator) -> Iterator[list[int]]:
        perm = torch.randperm(self.num_samples, generator=generator)
        for i in range(len(self)):
            yield perm[i * self.batch_size : (i + 1) * self.batch_size].tolist()

    def privacy_event(self, noise: Event) -> Event:
        """Always raises: shuffled fixed-size batches have no certified DP-SGD bound."""
        _check_noise(noise)
        raise ValueError(
            "ShuffleSampler has no privacy event: no certified epsilon is known for shuffled "
            "fixed-size batches, and Poisson accounting is not a valid bound for them "
            "(Chua et al., 'How Private are DP-SGD Implementations?', ICML 2024). "
            "Use BalancedIterationSampler(num_samples, k=1, steps=num_samples // batch_size) "
            "for a certified epoch-style sampler instead."
        )
