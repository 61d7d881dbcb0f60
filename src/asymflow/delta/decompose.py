"""Per-sample low-rank, low-frequency decomposition of an intermediate representation (IR).

X (c x h x w) is reshaped to M = c x (hw); its top-r singular triplets (s_i, u_i, v_i) are found
per sample, each principal map v_i is low-passed by a block DCT (t x t blocks, low t' x t' band
kept), and

    main = sum_{i<=r} s_i u_i lowpass(v_i)^T,      residual = X - main

(Niu et al. 2024, Sec. 3.2; DESIGN.md sec. 3). The private model sees the compact features
s_i * DCT_low(v_i): r channels of (h t'/t) x (w t'/t).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor


@dataclass(frozen=True)
class Decomposition:
    """Result of :func:`decompose` for a batch."""

    features: Tensor  # (B, r, h t'/t, w t'/t): private model input
    main: Tensor  # (B, c, h, w): the part of X that stays private
    residual: Tensor  # (B, c, h, w): X - main, the part that may be sanitized and released

    @property
    def energy_fraction(self) -> Tensor:
        """||main||^2 / ||X||^2 per sample (main and residual are orthogonal)."""
        main = self.main.flatten(1).pow(2).sum(1)
        total = main + self.residual.flatten(1).pow(2).sum(1)
        return main / total.clamp_min(1e-30)


@lru_cache(maxsize=16)
def dct_matrix(t: int) -> Tensor:
    """Orthonormal DCT-II matrix D (t x t): D[k, n] = a_k cos(pi (2n+1) k / (2t))."""
    n = torch.arange(t, dtype=torch.float64)
    k = n[:, None]
    d = torch.cos(math.pi * (2 * n[None, :] + 1) * k / (2 * t)) * math.sqrt(2 / t)
    d[0] /= math.sqrt(2)
    return d


def _check_sizes(h: int, w: int, t: int, t_low: int) -> None:
    if t < 1 or not 1 <= t_low <= t:
        raise ValueError(f"block sizes must satisfy 1 <= t_low <= t, got t={t}, t_low={t_low}")
    if h % t or w % t:
        raise ValueError(f"IR height and width must be multiples of t={t}, got {h}x{w}")


def block_dct_low(maps: Tensor, t: int, t_low: int) -> tuple[Tensor, Tensor]:
    """Low band of the block DCT of ``maps`` (..., h, w).

    Returns (coefficients tiled to (..., h t_low/t, w t_low/t), the low-passed maps (..., h, w)).
    The low-pass is the orthogonal projection D_l^T D_l applied on both sides of every block.
    """
    *lead, h, w = maps.shape
    _check_sizes(h, w, t, t_low)
    d = dct_matrix(t).to(maps)[:t_low]  # (t_low, t)
    blocks = maps.reshape(*lead, h // t, t, w // t, t)
    coef = torch.einsum("ka,...iajb,lb->...ikjl", d, blocks, d)  # (..., h/t, t_low, w/t, t_low)
    low = torch.einsum("ka,...ikjl,lb->...iajb", d, coef, d).reshape(*lead, h, w)
    return coef.reshape(*lead, h // t * t_low, w // t * t_low), low


def top_singular(m: Tensor, r: int, *, iters: int = 30, exact: bool = False) -> tuple[Tensor, ...]:
    """Top-r singular triplets of every matrix in the batch m (B, c, n): (s, u, v).

    The fast path runs power iteration with deflation on the c x c Gram matrices G = M M^T,
    batched over samples (only r components are needed); each start vector is the column of
    the (deflated) G with the largest diagonal entry, so a sample's result does not depend on
    the batch it is in. The iteration runs without autograd: gradients flow through
    s_i v_i = M^T u_i with the subspace u held fixed, which keeps the backward pass as cheap as
    the forward one (differentiating through every power step costs ~3x the whole model).
    ``exact`` uses torch.linalg.svd, differentiable throughout.
    Signs are fixed so that the largest-magnitude entry of each u is positive.
    """
    b, c, n = m.shape
    if not 1 <= r <= min(c, n):
        raise ValueError(f"r must satisfy 1 <= r <= min(c, h*w) = {min(c, n)}, got r={r}")
    if exact:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, v = u[..., :r], s[..., :r], vh[..., :r, :].transpose(1, 2)
    else:
        with torch.no_grad():  # the subspace is found without autograd (see docstring)
            gram = m @ m.transpose(1, 2)  # (B, c, c)
            us = []
            for _ in range(r):
                pivot = torch.diagonal(gram, dim1=1, dim2=2).argmax(1)
                vec = torch.gather(gram, 2, pivot[:, None, None].expand(b, c, 1))
                vec = vec + 1e-12 * torch.ones_like(vec)  # never exactly zero
                for _ in range(iters):
                    vec = gram @ vec
                    vec = vec / vec.norm(dim=1, keepdim=True).clamp_min(1e-30)
                lam = (vec.transpose(1, 2) @ gram @ vec).squeeze(-1).squeeze(-1).clamp_min(0)
                us.append(vec.squeeze(-1))
                gram = gram - lam[:, None, None] * (vec @ vec.transpose(1, 2))
        u = torch.stack(us, -1)  # (B, c, r), no gradient
        sv = m.transpose(1, 2) @ u  # (B, n, r) = s_i v_i, differentiable in m
        s = sv.norm(dim=1)
        v = sv / s[:, None, :].clamp_min(1e-30)
    flip = torch.sign(torch.gather(u, 1, u.abs().argmax(1, keepdim=True)))
    flip = torch.where(flip == 0, torch.ones_like(flip), flip)
    return s, u * flip, v * flip


def decompose(
    x: Tensor, *, r: int = 8, t: int = 16, t_low: int = 8, exact: bool = False, iters: int = 30
) -> Decomposition:
    """Split the IR batch ``x`` (B, c, h, w) into the private main part and the residual."""
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, c, h, w), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    _check_sizes(h, w, t, t_low)
    m = x.reshape(b, c, h * w)
    s, u, v = top_singular(m, r, exact=exact, iters=iters)
    maps = v.transpose(1, 2).reshape(b, r, h, w)
    coef, low = block_dct_low(maps, t, t_low)
    main = torch.einsum("bcr,br,brn->bcn", u, s, low.reshape(b, r, h * w)).reshape(b, c, h, w)
    return Decomposition(features=coef * s[:, :, None, None], main=main, residual=x - main)
