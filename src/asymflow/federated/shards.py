"""How a data set's training split is divided among the N clients of a simulation.

- ``iid``: a seeded uniform permutation cut into N shards whose sizes differ by at most one.
- ``dirichlet``: label skew. For every class c, proportions p_c ~ Dir(alpha 1_N) are drawn and
  the class's (shuffled) indices are cut at the cumulative proportions, so client i holds about
  p_{c,i} of class c (Hsu, Qi, Brown 2019, "Measuring the Effects of Non-Identical Data
  Distribution for Federated Visual Classification", arXiv 1909.06335, Sec. 3). Small alpha
  gives few classes per client; alpha -> infinity approaches the IID split. A client may
  receive no data; it then returns a zero update.

The split is a deterministic function of (labels, N, split, alpha, seed), so every client
process computes the same shards without talking to the others. The split is public; only the
clients' data are protected (client-level DP).
"""

from __future__ import annotations

import functools

import numpy as np

from asymflow.data import ImageData, load_data
from asymflow.data.dataset import ImageSplit

__all__ = ["client_split", "split_indices"]


def split_indices(
    labels: np.ndarray, num_clients: int, *, split: str = "iid", alpha: float = 0.5, seed: int = 0
) -> list[np.ndarray]:
    """Disjoint index arrays (sorted) covering ``range(len(labels))``, one per client."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got num_clients={num_clients!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    n = len(labels)
    if split == "iid":
        perm = rng.permutation(n)
        return [np.sort(part) for part in np.array_split(perm, num_clients)]
    if split != "dirichlet":
        raise ValueError(f"split must be 'iid' or 'dirichlet', got split={split!r}")
    if not (isinstance(alpha, int | float) and np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0, got alpha={alpha!r}")
    shards: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = np.round(np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for i, part in enumerate(np.split(members, cuts)):
            shards[i].append(part)
    return [
        np.sort(np.concatenate(parts)) if parts else np.empty(0, dtype=np.int64) for parts in shards
    ]


@functools.lru_cache(maxsize=4)
def _data(spec: str) -> ImageData:
    return load_data(spec, progress=False)


def client_split(
    spec: str,
    client: int,
    num_clients: int,
    *,
    split: str = "iid",
    alpha: float = 0.5,
    seed: int = 0,
) -> tuple[ImageData, ImageSplit]:
    """(the whole data set, client ``client``'s training shard) of ``spec``.

    The data set is cached per process (a Ray actor trains many rounds), and so are the
    train-split statistics used for normalization by :class:`TensorImageDataset`.
    """
    if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < num_clients:
        raise ValueError(
            f"client must satisfy 0 <= client < num_clients={num_clients}, got client={client!r}"
        )
    data = _data(spec)
    idx = split_indices(data.train.labels, num_clients, split=split, alpha=alpha, seed=seed)[client]
    shard = ImageSplit(data.train.images[idx], data.train.labels[idx], data.train.classes)
    return data, shard
