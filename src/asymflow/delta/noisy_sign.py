"""Exact sampler of the bit 1[x + s Z >= 0], Z ~ N(0, 1), without drawing Z.

The sanitizer releases one bit per element, b = 1[x + sigma C Z >= 0]: the Gaussian mechanism
followed by post-processing (DESIGN.md sec. 3). With a = x / (sigma C), b has the law of

    b = 1[a >= 0]   if |Z| < |a|   (probability q = P(|Z| < |a|) = erf(|a| / sqrt 2)),
    b = a fair bit  otherwise      (given |Z| >= |a|, sign(a + Z) = sign(Z) is symmetric),

so it is drawn as: V ~ U[0, 1); the sign of a if V < q, else a fresh fair bit. Its law is the
Gaussian mechanism's bit, element for element, so the (epsilon, delta) accounting is unchanged.
Since erf is concave on [0, inf), q <= sqrt(2/pi) |a|: with V = (v + W) / 256, v a random byte
and W ~ U[0, 1), v >= 256 sqrt(2/pi) |a| already decides "fair bit", and only the other elements
(a fraction of about sqrt(2/pi)|a| + 1/256) compute erf, in float64, against W's 53 bits.
Cost: 9 random bits and a few comparisons per element instead of a Gaussian draw.

Randomness comes from AES-256 in counter mode (OpenSSL, via ``cryptography``), keyed from the
OS's secure source or, for tests, from a seed. Almost every released bit is a fair bit, i.e. a
keystream bit: a generator whose state can be recovered from its output (Mersenne Twister,
PCG64) would let the public side predict the fair bits and read the signs. A row's bytes (v
and its fair bits) sit at a fixed offset of one stream, and W's are drawn in row-major order
from a second, so the bits do not depend on how the rows are split into calls.

Not constant-time: about sqrt(2/pi) sum|a| + n/256 elements of a row evaluate erf, so the
running time reveals that aggregate to whoever can time the call (the Gaussian draw it
replaces took the same time for any data). Clipping bounds it: ||a||_2 <= 1/sigma, so
sum|a| <= sqrt(n)/sigma, a spread of a few hundred erf calls (a few microseconds) per CIFAR
sample at sigma ~ 1. The public side sees only when payloads arrive, after the decomposition
and M_main.
"""

from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import special

_COIN_BOUND = math.sqrt(2 / math.pi) * (1 + 1e-5)
"""sqrt(2/pi) (q <= sqrt(2/pi)|a|), raised by 1e-5 so that float32 rounding (a few ulps,
~1e-7 relative) cannot make the shortcut's bound smaller than q."""
_BLOCK_ELEMENTS = 1 << 19
"""Elements per block of rows (2 MiB of float32: the block's arrays stay in cache)."""


class KeyStream:
    """Independent AES-256-CTR keystreams under one key, one per purpose (counter blocks
    starting at 0, 2^64 and 2^65): the bytes v, the fair bits, and the candidates' uniforms."""

    V, FAIR, UNIFORM = 0, 1, 2

    def __init__(self, seed: int | None = None) -> None:
        if seed is None:
            key = secrets.token_bytes(32)
        else:
            key = hashlib.sha256(b"asymflow noisy sign " + str(int(seed)).encode()).digest()
        self._streams = [
            Cipher(algorithms.AES(key), modes.CTR((j << 64).to_bytes(16, "big"))).encryptor()
            for j in range(3)
        ]
        self._zeros = b""

    def draw(self, stream: int, count: int) -> np.ndarray:
        """The next ``count`` bytes of ``stream`` as uint8."""
        if len(self._zeros) < count:
            self._zeros = bytes(count)
        data = memoryview(self._zeros)[:count]
        return np.frombuffer(self._streams[stream].update(data), dtype=np.uint8)

    def uniforms(self, count: int) -> np.ndarray:
        """``count`` float64 uniforms on [0, 1) with 53 random bits each."""
        words = self.draw(self.UNIFORM, 8 * count).view(np.uint64)
        return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _shortcut_factor(scale: np.ndarray) -> np.ndarray:
    """s / (256 sqrt(2/pi)) per row in float32; 0 (no shortcut: every nonzero element takes
    the exact path) where float32 cannot hold it to a few ulps, i.e. where it would be
    subnormal (rounding by up to 50%) or overflow (and 0 * inf = nan)."""
    with np.errstate(over="ignore"):
        factor = (scale / (256 * _COIN_BOUND)).astype(np.float32)
    usable = (factor >= np.finfo(np.float32).tiny) & np.isfinite(factor)
    return np.where(usable, factor, np.float32(0))


def noisy_sign_bits(x: np.ndarray, scale: np.ndarray, stream: KeyStream) -> np.ndarray:
    """Packed bits 1[x + scale Z >= 0] (8 per byte, trailing pad bits 0) of x (rows, n) float32,
    with one noise scale > 0 per row (rows,) and independent Z per element."""
    rows, n = x.shape
    width = -(-n // 8)
    pad = (0xFF << (8 * width - n)) & 0xFF  # the valid bits of each row's last byte
    out = np.empty((rows, width), dtype=np.uint8)
    block = max(1, _BLOCK_ELEMENTS // max(1, n))
    limit = np.empty((min(block, rows), n), dtype=np.float32)
    size = np.empty_like(limit)
    chosen = np.empty(limit.shape, dtype=bool)
    for i in range(0, rows, block):
        part, s = x[i : i + block], np.asarray(scale[i : i + block], dtype=np.float64)
        m = len(part)
        v = stream.draw(stream.V, m * n).reshape(m, n)
        fair = stream.draw(stream.FAIR, m * width).reshape(m, width).copy()
        fair[:, -1] &= pad
        lim, big, pick = limit[:m], size[:m], chosen[:m]
        # v >= 256 sqrt(2/pi)|a|  <=>  |x| <= v s / (256 sqrt(2/pi)): a fair bit for sure
        with np.errstate(over="ignore"):  # lim = inf beyond float32: then |x| <= lim holds
            np.multiply(v, _shortcut_factor(s)[:, None], out=lim)
        np.greater(np.abs(part, out=big), lim, out=pick)
        idx = np.flatnonzero(pick)
        s_idx = s[idx // n]
        a = part.reshape(-1)[idx].astype(np.float64) / s_idx
        uniform = (v.reshape(-1)[idx] + stream.uniforms(len(idx))) / 256.0
        pick.fill(False)
        pick.reshape(-1)[idx] = uniform < special.erf(np.abs(a) / math.sqrt(2))
        use_sign = np.packbits(pick, axis=1)
        sign = np.packbits(np.greater_equal(part, 0, out=pick), axis=1)
        out[i : i + m] = (use_sign & sign) | (~use_sign & fair)
    return out
