"""The exact noisy-sign sampler against the closed form P(1[x + s Z >= 0] = 1) = Phi(x / s).

Reference: the standard normal CDF (scipy.stats.norm.cdf), an independent implementation of the
Gaussian mechanism's bit law; each element is tested with a two-sided binomial test.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import special, stats

from asymflow.delta.noisy_sign import KeyStream, noisy_sign_bits

TRIALS = 4000


def _ones(x: np.ndarray, scale: np.ndarray, seed: int) -> np.ndarray:
    """How often each element's bit is 1 over TRIALS independent draws (rows repeated)."""
    rows, n = x.shape
    tiled = np.tile(x, (TRIALS, 1))
    bits = noisy_sign_bits(tiled, np.tile(scale, TRIALS), KeyStream(seed))
    return np.unpackbits(bits, axis=1)[:, :n].reshape(TRIALS, rows, n).sum(axis=0)


@pytest.mark.parametrize("scale", [0.5, 1.0, 7.0])
def test_each_element_has_the_gaussian_bit_law(scale: float) -> None:
    """a = x / s from 0 and tiny values (all fair bits) through the erf branch to |a| = 4."""
    grid = np.array([0.0, 1e-6, -1e-6, 0.01, -0.05, 0.3, -0.7, 1.0, -1.5, 2.5, 4.0], np.float32)
    x = (grid * scale).astype(np.float32)[None, :]
    ones = _ones(x, np.array([scale]), seed=3)[0]
    expected = stats.norm.cdf(x[0].astype(np.float64) / scale)
    for count, p, a in zip(ones, expected, grid, strict=True):
        pvalue = stats.binomtest(int(count), TRIALS, float(p)).pvalue
        assert pvalue > 1e-4, f"a={a}: {count}/{TRIALS} ones, Phi(a)={p:.4f}"


def test_rows_use_their_own_scale() -> None:
    x = np.full((2, 16), 0.5, np.float32)
    ones = _ones(x, np.array([0.25, 50.0]), seed=4).sum(axis=1) / (16 * TRIALS)
    assert ones[0] == pytest.approx(stats.norm.cdf(2.0), abs=0.01)
    assert ones[1] == pytest.approx(stats.norm.cdf(0.01), abs=0.01)


def test_bits_do_not_depend_on_how_rows_are_split() -> None:
    x = np.random.default_rng(0).normal(size=(10, 37)).astype(np.float32)
    scale = np.linspace(0.5, 2.0, 10)
    whole = noisy_sign_bits(x, scale, KeyStream(11))
    stream = KeyStream(11)
    parts = [noisy_sign_bits(x[a:b], scale[a:b], stream) for a, b in [(0, 3), (3, 4), (4, 10)]]
    np.testing.assert_array_equal(whole, np.concatenate(parts))


def test_pad_bits_are_zero_and_width_is_ceil_n_over_8() -> None:
    x = np.zeros((64, 13), np.float32)  # all fair bits: the pad must still be masked
    bits = noisy_sign_bits(x, np.ones(64), KeyStream(5))
    assert bits.shape == (64, 2)
    assert not np.any(bits[:, 1] & 0b111)


def test_seeds_give_reproducible_and_distinct_streams() -> None:
    x = np.zeros((4, 256), np.float32)
    one = noisy_sign_bits(x, np.ones(4), KeyStream(1))
    np.testing.assert_array_equal(one, noisy_sign_bits(x, np.ones(4), KeyStream(1)))
    assert not np.array_equal(one, noisy_sign_bits(x, np.ones(4), KeyStream(2)))
    assert not np.array_equal(
        noisy_sign_bits(x, np.ones(4), KeyStream()), noisy_sign_bits(x, np.ones(4), KeyStream())
    )


def test_uniforms_have_53_bits_in_the_unit_interval() -> None:
    u = KeyStream(9).uniforms(100_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    assert np.any(u * 2.0**53 % 2 == 1)  # the lowest of the 53 bits is used


@pytest.mark.parametrize("a", [0.3, -0.5, 0.8])
def test_pooled_law_is_tight_where_the_shortcut_decides(a: float) -> None:
    """4,096,000 draws at one a (sd of the mean 0.00025): a shortcut bound 5% below
    sqrt(2/pi) turns the bytes v next to 256 q into fair bits and shifts P(1) at a = 0.3
    by 0.003, which this test sees."""
    x = np.full((2000, 2048), a, np.float32)
    bits = np.unpackbits(noisy_sign_bits(x, np.ones(2000), KeyStream(6)), axis=1)
    pvalue = stats.binomtest(int(bits.sum()), bits.size, float(stats.norm.cdf(a))).pvalue
    assert pvalue > 1e-4


class _RowStream(KeyStream):
    """A fake stream for exact checks: every element of row r gets the byte v = r, the fair
    bits are NOT sign(x) and every uniform is w. So an output bit equals sign(x) exactly
    where the sampler chose the sign."""

    def __init__(self, x: np.ndarray, w: float) -> None:
        rows, n = x.shape
        self._parts = {
            self.V: np.repeat(np.arange(rows, dtype=np.uint8), n),
            self.FAIR: np.packbits(x < 0, axis=1).reshape(-1),
        }
        self._w = w

    def draw(self, stream: int, count: int) -> np.ndarray:
        out, self._parts[stream] = self._parts[stream][:count], self._parts[stream][count:]
        return out

    def uniforms(self, count: int) -> np.ndarray:
        return np.full(count, self._w)


@pytest.mark.parametrize("scale", [1e-42, 1e-39, 1e-30, 0.37, 1.0, 1e30, 1e40, 1e41])
def test_the_shortcut_never_takes_a_coin_where_the_exact_rule_takes_the_sign(scale):
    """Exact, not statistical: V = (v + w) / 256 < erf(|a| / sqrt 2) decides the sign for
    every byte v, at x on both sides (a few float32 ulps) of the two boundaries of each v,
    a = sqrt 2 erfinv(v / 256) and a = v / (256 sqrt(2/pi)), and at scales whose shortcut
    factor is subnormal or overflows in float32 (those must fall back to the exact rule). A
    shortcut bound too small by 0.1%, or off by one byte, fails here."""
    v = np.arange(256)
    ulps = (1 + np.arange(-4, 5) * 2.0**-23)[None, :]
    boundaries = [math.sqrt(2) * special.erfinv(v / 256), v / (256 * math.sqrt(2 / math.pi))]
    with np.errstate(over="ignore"):  # beyond float32: the largest finite x instead
        columns = [(b[:, None] * scale * ulps).astype(np.float32) for b in boundaries]
    x = np.nan_to_num(np.concatenate([*columns, *(-c for c in columns)], axis=1))
    for w in (0.0, 0.5, 1 - 2.0**-53):
        bits = noisy_sign_bits(x, np.full(256, scale), _RowStream(x, w))
        took_sign = np.unpackbits(bits, axis=1)[:, : x.shape[1]].astype(bool) == (x >= 0)
        a = x.astype(np.float64) / scale
        exact = (v[:, None] + w) / 256 < special.erf(np.abs(a) / math.sqrt(2))
        np.testing.assert_array_equal(took_sign, exact)


def test_keystreams_are_aes_ctr_from_three_disjoint_counters():
    """Known answer: stream j is AES-256 of the counter blocks j * 2^64 + i under the seed's
    key, read on across calls of odd sizes. Streams sharing a counter would let the fair
    bits reveal other elements' bytes v."""
    key = hashlib.sha256(b"asymflow noisy sign 5").digest()
    aes = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    stream = KeyStream(5)
    for j in (KeyStream.V, KeyStream.FAIR, KeyStream.UNIFORM):
        got = bytes(stream.draw(j, 37)) + bytes(stream.draw(j, 40))
        counters = b"".join(((j << 64) + i).to_bytes(16, "big") for i in range(5))
        assert got == aes.update(counters)[:77]
