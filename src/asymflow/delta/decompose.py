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
    """Result of :func:`decompose` for a batch: main = basis @ low, residual = X - main."""

    features: Tensor  # (B, r, h t'/t, w t'/t): private model input
    residual: Tensor  # (B, c, h, w): X - main, the part that may be sanitized and released
    basis: Tensor  # (B, c, r): the left singular vectors u_i
    low: Tensor  # (B, r, h*w): the low-passed principal maps s_i lowpass(v_i)

    @property
    def main(self) -> Tensor:
        """(B, c, h, w): sum_i s_i u_i lowpass(v_i)^T, the part of X that stays private."""
        return torch.bmm(self.basis, self.low).reshape(self.residual.shape)

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


@lru_cache(maxsize=32)
def _band_matrix(size: int, t: int, t_low: int, dtype: torch.dtype) -> Tensor:
    """kron(I_{size/t}, D[:t_low]): the low DCT band of every t-block of a length-``size``
    axis, (size t_low/t) x size, rows in the tiled order block * t_low + frequency."""
    d = dct_matrix(t)[:t_low]
    return torch.block_diag(*[d] * (size // t)).to(dtype)


def block_dct_low(maps: Tensor, t: int, t_low: int) -> tuple[Tensor, Tensor]:
    """Low band of the block DCT of ``maps`` (..., h, w).

    Returns (coefficients tiled to (..., h t_low/t, w t_low/t), the low-passed maps (..., h, w)).
    With A_h = kron(I, D_l) (D_l the first t_low rows of the DCT matrix), the coefficients of
    all blocks at once are A_h X A_w^T, and the low-pass, the orthogonal projection D_l^T D_l
    on both sides of every block, is A_h^T (A_h X A_w^T) A_w.
    """
    *_, h, w = maps.shape
    _check_sizes(h, w, t, t_low)
    a_h = _band_matrix(h, t, t_low, maps.dtype).to(maps.device)
    a_w = a_h if w == h else _band_matrix(w, t, t_low, maps.dtype).to(maps.device)
    coef = torch.matmul(a_h, torch.matmul(maps, a_w.T))  # (..., h t_low/t, w t_low/t)
    low = torch.matmul(a_h.T, torch.matmul(coef, a_w))
    return coef, low


def block_dct_coefficients(maps: Tensor, t: int, t_low: int) -> Tensor:
    """The first output of :func:`block_dct_low` alone (no low-passed maps)."""
    *_, h, w = maps.shape
    _check_sizes(h, w, t, t_low)
    a_h = _band_matrix(h, t, t_low, maps.dtype).to(maps.device)
    a_w = a_h if w == h else _band_matrix(w, t, t_low, maps.dtype).to(maps.device)
    return torch.matmul(a_h, torch.matmul(maps, a_w.T))


def principal_basis(m: Tensor, r: int, *, iters: int = 3) -> Tensor:
    """The top-r left singular vectors u_i of every matrix in the batch m (B, c, n): (B, c, r),
    without autograd, sorted by singular value, signs fixed so that the largest-magnitude
    entry of each u_i is positive.

    Block subspace iteration with Rayleigh-Ritz (Halko, Martinsson & Tropp 2011, Alg. 4.4 and
    5.3) on the c x c Gram matrices G = M M^T, batched over samples: k = min(c, 2r) vectors
    start at the columns of G with the largest diagonal entries (so a sample's result does
    not depend on the batch it is in), ``iters`` times Q <- orth(G Q), then the top r
    eigenvectors of Q^T G Q. Each iteration shrinks the error of the i-th direction by
    (lambda_{k+1} / lambda_i), i.e. (sigma_{k+1} / sigma_i)^2; the iterations are c x c x k
    products, so the cost is the one c x c x n product that forms G.
    """
    b, c, n = m.shape
    if not 1 <= r <= min(c, n):
        raise ValueError(f"r must satisfy 1 <= r <= min(c, h*w) = {min(c, n)}, got r={r}")
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got iters={iters}")
    with torch.no_grad():
        m = m.detach()
        gram = torch.bmm(m, m.transpose(1, 2))  # (B, c, c)
        k = min(c, 2 * r)
        start = torch.diagonal(gram, dim1=1, dim2=2).topk(k, dim=1).indices
        q, _ = torch.linalg.qr(torch.gather(gram, 2, start[:, None, :].expand(b, c, k)))
        for _ in range(iters):
            q, _ = torch.linalg.qr(torch.bmm(gram, q))
        ritz = torch.bmm(q.transpose(1, 2), torch.bmm(gram, q))  # (B, k, k)
        _, vectors = torch.linalg.eigh(ritz)  # ascending eigenvalues
        u = torch.bmm(q, vectors[..., -r:].flip(-1))
        flip = torch.sign(torch.gather(u, 1, u.abs().argmax(1, keepdim=True)))
        return u * torch.where(flip == 0, torch.ones_like(flip), flip)


def top_singular(m: Tensor, r: int, *, iters: int = 3, exact: bool = False) -> tuple[Tensor, ...]:
    """Top-r singular triplets of every matrix in the batch m (B, c, n): (s, u, v).

    The fast path finds the subspace with :func:`principal_basis` (no autograd); gradients
    flow through s_i v_i = M^T u_i with u held fixed, which keeps the backward pass as cheap
    as the forward one (differentiating through the iteration costs ~3x the whole model).
    ``exact`` uses torch.linalg.svd, differentiable throughout.
    Signs are fixed so that the largest-magnitude entry of each u is positive.
    """
    _, c, n = m.shape
    if not 1 <= r <= min(c, n):
        raise ValueError(f"r must satisfy 1 <= r <= min(c, h*w) = {min(c, n)}, got r={r}")
    if exact:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, v = u[..., :r], s[..., :r], vh[..., :r, :].transpose(1, 2)
        flip = torch.sign(torch.gather(u, 1, u.abs().argmax(1, keepdim=True)))
        flip = torch.where(flip == 0, torch.ones_like(flip), flip)
        return s, u * flip, v * flip
    u = principal_basis(m, r, iters=iters)
    sv = m.transpose(1, 2) @ u  # (B, n, r) = s_i v_i, differentiable in m
    s = sv.norm(dim=1)
    return s, u, sv / s[:, None, :].clamp_min(1e-30)


def decompose(
    x: Tensor,
    *,
    r: int = 8,
    t: int = 16,
    t_low: int = 8,
    exact: bool = False,
    iters: int = 3,
    overwrite: bool = False,
) -> Decomposition:
    """Split the IR batch ``x`` (B, c, h, w) into the private main part and the residual.

    With the basis U = (u_1..u_r) and the projections P = U^T M = (s_i v_i^T) (r x hw), the
    features are the block-DCT low band of P's maps, main = U lowpass(P) and
    residual = M - U lowpass(P), formed in one fused product. With ``overwrite`` the residual
    is written into x's memory (x is consumed; it must not need autograd): no second IR-sized
    tensor is allocated and first touched, which on the CIFAR IR at batch 256 is most of the
    product's time.
    """
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, c, h, w), got {tuple(x.shape)}")
    b, c, h, w = x.shape
    _check_sizes(h, w, t, t_low)
    m = x.reshape(b, c, h * w)
    if exact:
        s, u, v = top_singular(m, r, exact=True)
        projected = (v * s[:, None, :]).transpose(1, 2)
    else:
        u = principal_basis(m, r, iters=iters)
        projected = torch.bmm(u.transpose(1, 2), m)  # (B, r, hw) = s_i v_i^T
    coef, low = block_dct_low(projected.reshape(b, r, h, w), t, t_low)
    low = low.reshape(b, r, h * w)
    if overwrite:
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError("overwrite=True needs an x that does not require grad")
        residual = m.baddbmm_(u, low, alpha=-1.0).view(b, c, h, w)
    else:
        residual = torch.baddbmm(m, u, low, alpha=-1.0).reshape(b, c, h, w)
    return Decomposition(features=coef, residual=residual, basis=u, low=low)
