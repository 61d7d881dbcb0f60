"""Decomposition: identity, energy, DCT orthonormality, power iteration against exact SVD."""

from __future__ import annotations

import pytest
import torch

from asymflow.delta.builders import build_private
from asymflow.delta.decompose import block_dct_low, dct_matrix, decompose, top_singular
from asymflow.delta.private import PrivateModel
from asymflow.models.lowrank import build_private_model
from tests.delta.conftest import tiny_config


def low_rank_ir(b: int = 6, c: int = 16, h: int = 16, w: int = 16, rank: int = 4) -> torch.Tensor:
    """IR-like batch: a smooth rank-`rank` part with a clear spectral gap plus small noise."""
    gen = torch.Generator().manual_seed(0)
    maps = torch.randn(b, rank, h, w, generator=gen)
    for _ in range(3):
        maps = torch.nn.functional.avg_pool2d(maps, 5, 1, 2, count_include_pad=False)
    scales = torch.tensor([8.0, 4.0, 2.0, 1.0][:rank])[:, None]
    mix = torch.randn(rank, c, generator=gen) * scales
    return torch.einsum("bkhw,kc->bchw", maps, mix) + 0.01 * torch.randn(b, c, h, w, generator=gen)


@pytest.mark.parametrize("exact", [True, False])
def test_main_plus_residual_is_the_input(exact):
    x = low_rank_ir()
    d = decompose(x, r=4, t=8, t_low=4, exact=exact)
    torch.testing.assert_close(d.main + d.residual, x, rtol=0, atol=1e-5)
    assert d.features.shape == (6, 4, 8, 8)
    assert ((d.energy_fraction >= 0) & (d.energy_fraction <= 1)).all()


def test_full_rank_full_band_keeps_all_energy():
    x = torch.randn(3, 4, 8, 8)
    d = decompose(x, r=4, t=8, t_low=8, exact=True)
    torch.testing.assert_close(d.residual, torch.zeros_like(x), rtol=0, atol=1e-4)
    torch.testing.assert_close(d.energy_fraction, torch.ones(3), rtol=0, atol=1e-5)


def test_smooth_low_rank_ir_keeps_most_energy_private():
    d = decompose(low_rank_ir(), r=4, t=8, t_low=4)
    assert d.energy_fraction.min() > 0.9


def test_main_and_residual_are_orthogonal():
    x = torch.randn(2, 8, 16, 16, dtype=torch.float64)
    d = decompose(x, r=3, t=8, t_low=4, exact=True)
    inner = (d.main * d.residual).flatten(1).sum(1)
    torch.testing.assert_close(inner, torch.zeros(2, dtype=torch.float64), atol=1e-9, rtol=0)


def test_dct_matrix_is_orthonormal():
    for t in (4, 7, 16):
        d = dct_matrix(t)
        torch.testing.assert_close(d @ d.T, torch.eye(t, dtype=torch.float64))


def test_block_dct_low_is_a_projection():
    maps = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    _, low = block_dct_low(maps, 8, 4)
    _, low2 = block_dct_low(low, 8, 4)
    torch.testing.assert_close(low2, low)


def test_fast_path_main_and_residual_are_orthogonal():
    x = low_rank_ir().double()
    d = decompose(x, r=4, t=8, t_low=4)
    inner = (d.main * d.residual).flatten(1).sum(1)
    torch.testing.assert_close(inner, torch.zeros(6, dtype=torch.float64), atol=1e-9, rtol=0)


def test_block_dct_low_matches_the_transform_of_each_block():
    maps = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    coef, low = block_dct_low(maps, 8, 3)
    d = dct_matrix(8)[:3]
    for i in range(2):
        for j in range(3):
            block = maps[1, 2, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8]
            c = d @ block @ d.T
            torch.testing.assert_close(coef[1, 2, 3 * i : 3 * i + 3, 3 * j : 3 * j + 3], c)
            torch.testing.assert_close(low[1, 2, 8 * i : 8 * i + 8, 8 * j : 8 * j + 8], d.T @ c @ d)


def test_fast_path_keeps_the_energy_of_the_exact_svd():
    # A flat spectrum, without a gap after r: the subspace iteration (3 steps) keeps the
    # exact SVD's energy within 2.5e-4 here (power iteration with deflation, 30 steps per
    # vector, lost 5.4e-3).
    gen = torch.Generator().manual_seed(1)
    scales = torch.linspace(3.0, 1.0, 32)[None, :, None, None]
    x = torch.randn(16, 32, 16, 16, generator=gen) * scales
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1) + 0.3 * x
    fast = decompose(x, r=8, t=8, t_low=4).energy_fraction
    exact = decompose(x.double(), r=8, t=8, t_low=4, exact=True).energy_fraction
    assert (fast >= exact.float() - 1e-3).all()


def test_power_iteration_matches_exact_svd():
    m = low_rank_ir(c=16).reshape(6, 16, -1)
    s_fast, u_fast, _ = top_singular(m, 4, iters=60)
    s_ex, u_ex, _ = top_singular(m, 4, exact=True)
    torch.testing.assert_close(s_fast, s_ex, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(u_fast.abs(), u_ex.abs(), rtol=0, atol=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"r": 0}, "r must"), ({"t": 5}, "multiples of t"), ({"t_low": 9}, "t_low")],
)
def test_bad_parameters_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        decompose(torch.randn(1, 4, 8, 8), **{"r": 2, "t": 8, "t_low": 4, **kwargs})


def test_fast_path_result_does_not_depend_on_the_batch():
    x = low_rank_ir(b=6)
    alone = decompose(x[2:3], r=4, t=8, t_low=4)
    together = decompose(x, r=4, t=8, t_low=4)
    torch.testing.assert_close(alone.residual[0], together.residual[2], rtol=0, atol=1e-5)


def test_overwrite_gives_the_same_split_in_the_inputs_memory():
    x = low_rank_ir()
    expected = decompose(x.clone())
    got = decompose(x, overwrite=True)
    assert got.residual.data_ptr() == x.data_ptr()  # no second IR-sized tensor
    torch.testing.assert_close(got.residual, expected.residual, rtol=0, atol=0)
    torch.testing.assert_close(got.features, expected.features, rtol=0, atol=0)


def test_overwrite_refuses_an_input_that_needs_grad():
    with pytest.raises(ValueError, match="overwrite=True"):
        decompose(low_rank_ir().requires_grad_(), overwrite=True)


@pytest.mark.parametrize("backbone", ["stem", "identity"])
def test_private_model_decompose_leaves_the_images_alone(backbone):
    """PrivateModel.decompose overwrites M_bb's output, never the caller's images (an
    identity M_bb returns the images' own memory)."""
    if backbone == "stem":
        model = build_private(tiny_config(), 3, 10)
        x = torch.randn(4, 3, 16, 16)
    else:
        main = build_private_model(2, 10, widths=(8,), ranks=(2,))
        model = PrivateModel(torch.nn.Identity(), main, r=2, t=8, t_low=4)
        x = low_rank_ir()
    before = x.clone()
    split = model.decompose(x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    torch.testing.assert_close(split.main + split.residual, model.ir(x), rtol=0, atol=1e-5)
