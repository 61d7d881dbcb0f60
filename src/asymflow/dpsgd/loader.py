"""DataLoaders driven by our batch samplers, including their empty batches.

Poisson and BIS batches can be empty (batch size ~ Binomial(N, q) or Binomial(N, k/T)). Such a
step must still run and add its noise: skipping it would change the privacy event (the
accountant counts it) and would reveal that the batch was empty. torch's default collate fails on
an empty list, so :class:`EmptySafeCollate` returns zero-length tensors of the right trailing
shapes, as Opacus's ``DPDataLoader`` does for its own Poisson batches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate

from asymflow.accounting.events import Gaussian
from asymflow.sampling import BalancedIterationSampler, PoissonSampler, ShuffleSampler

__all__ = ["EmptySafeCollate", "make_sampler", "private_loader"]


class EmptySafeCollate:
    """``default_collate``, except that an empty batch becomes zero-length tensors shaped like
    ``example`` (one sample of the dataset: a tensor or a tuple of tensors/ints)."""

    def __init__(self, example: Any) -> None:
        items = example if isinstance(example, tuple | list) else (example,)
        self._single = not isinstance(example, tuple | list)
        self._empty: list[Tensor] = []
        for item in items:
            t = torch.as_tensor(item)
            self._empty.append(torch.empty((0, *t.shape), dtype=t.dtype))

    def __call__(self, batch: Sequence[Any]) -> Any:
        if len(batch) == 0:
            empty = [t.clone() for t in self._empty]
            return empty[0] if self._single else tuple(empty)
        return default_collate(list(batch))


def private_loader(
    dataset: Dataset[Any], sampler: Sampler[list[int]], *, num_workers: int = 0
) -> DataLoader[Any]:
    """``DataLoader(dataset, batch_sampler=sampler)`` with :class:`EmptySafeCollate`."""
    example = dataset[0]
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=EmptySafeCollate(example),
        num_workers=num_workers,
    )


def make_sampler(
    kind: str,
    num_samples: int,
    *,
    steps: int,
    k: int = 1,
    q: float | None = None,
    seed: int,
) -> PoissonSampler | BalancedIterationSampler:
    """One epoch's sampler: ``balanced`` BIS(k, steps), or ``poisson`` with rate q (default
    k/steps, the same expected batch size kN/T). ``shuffle`` is refused (no certified bound)."""
    if kind == "balanced":
        return BalancedIterationSampler(num_samples, k, steps, seed=seed)
    if kind == "poisson":
        rate = k / steps if q is None else q
        return PoissonSampler(num_samples, rate, steps, seed=seed)
    if kind == "shuffle":
        # Builds the sampler only to raise its explanation (Chua et al., ICML 2024).
        batch = max(1, num_samples // steps)
        ShuffleSampler(num_samples, batch, seed=seed).privacy_event(Gaussian(1.0))
    raise ValueError(f"sampler must be 'balanced' or 'poisson', got sampler={kind!r}")
