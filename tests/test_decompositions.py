"""Numerics of lrfx.decompositions and the factored modules built from them (no FX here).

Checks: unfoldings and their singular values against a hand-written reshape + torch.linalg;
every factorization reproduces its weight at full rank, reproduces an exactly rank-r weight at
rank r, and at lower ranks leaves exactly the Eckart-Young error; factor_linear / factor_conv
reproduce the dense layer's output over random geometries (hypothesis).
"""

from __future__ import annotations

import pytest
import torch
from _rewrite_models import (
    CONV_CLS,
    conv_geometries,
    effective_weight,
    full_rank,
    make_conv,
    rel_err,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lrfx import LrfxError, UnsupportedLayerError
from lrfx import decompositions as dec
from lrfx.modules import ConvSpec, Factored, factor_conv, factor_linear

PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _channel_matrix(w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    n = w.shape[0]
    return w.reshape(groups, n // groups, -1)


def _spatial_matrix(w: torch.Tensor) -> torch.Tensor:
    n, c, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def _eckart_young(mats: torch.Tensor, rank: int) -> float:
    """sqrt(sum_{i>r} s_i^2) over a batch of matrices, computed independently of lrfx."""
    s = torch.linalg.svdvals(mats.double())
    return float(s[..., rank:].square().sum().sqrt())


def _low_rank(m: int, n: int, r: int, seed: int) -> torch.Tensor:
    g = _gen(seed)
    return torch.randn(m, r, generator=g, dtype=torch.float64) @ torch.randn(
        r, n, generator=g, dtype=torch.float64
    )


# --- unfoldings and singular values ---------------------------------------------------------------


def test_unfold_shapes_match_the_documented_layouts() -> None:
    w = torch.randn(8, 4, 3, 5)
    assert dec.unfold(w, "channel").shape == (1, 8, 4 * 3 * 5)
    assert dec.unfold(w, "spatial").shape == (1, 4 * 3, 8 * 5)
    assert dec.unfold(w, "mode1").shape == (1, 4, 8 * 3 * 5)
    assert dec.unfold(torch.randn(6, 9), "rows").shape == (1, 6, 9)
    assert dec.unfold(torch.randn(6, 2, 3, 3), "channel", groups=3).shape == (3, 2, 18)
    # the values, not just the shapes
    assert torch.equal(dec.unfold(w, "spatial")[0], _spatial_matrix(w))
    assert torch.equal(dec.unfold(w, "mode1")[0], w.permute(1, 0, 2, 3).reshape(4, -1))


def test_unfold_rejects_what_it_cannot_unfold() -> None:
    with pytest.raises(LrfxError, match="rows"):
        dec.unfold(torch.randn(4, 4, 3, 3), "rows")
    with pytest.raises(LrfxError, match="groups=1"):
        dec.unfold(torch.randn(4, 2, 3, 3), "spatial", groups=2)
    with pytest.raises(LrfxError, match="Conv2d"):
        dec.unfold(torch.randn(4, 2, 3), "spatial")
    with pytest.raises(LrfxError, match="unknown unfolding"):
        dec.unfold(torch.randn(4, 2, 3, 3), "diagonal")
    with pytest.raises(LrfxError, match="conv weight"):
        dec.unfold(torch.randn(4, 2), "channel")


@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (9, 11), (1, 7)])
def test_svdvals_matches_torch_on_tall_wide_and_square(shape: tuple[int, int]) -> None:
    m = torch.randn(3, *shape, generator=_gen(1), dtype=torch.float64)
    got = dec.svdvals(m)
    ref = torch.linalg.svdvals(m)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_singular_values_are_float64_descending_per_group() -> None:
    w = torch.randn(6, 2, 3, 3, generator=_gen(2))
    s = dec.singular_values(w, "channel", groups=3)
    assert s.dtype == torch.float64 and s.device.type == "cpu"
    assert s.shape == (3, 2)
    assert bool((s[:, :-1] >= s[:, 1:]).all())
    ref = torch.linalg.svdvals(_channel_matrix(w.double(), 3))
    torch.testing.assert_close(s, ref, rtol=1e-12, atol=1e-12)


def test_truncation_error_is_the_eckart_young_value() -> None:
    w = torch.randn(8, 4, 3, 3, generator=_gen(3))
    for r in (1, 3, 8):
        assert dec.truncation_error(w, "channel", r) == pytest.approx(
            _eckart_young(_channel_matrix(w), r), rel=1e-10, abs=1e-12
        )
        assert dec.truncation_error(w, "spatial", r) == pytest.approx(
            _eckart_young(_spatial_matrix(w), r), rel=1e-10, abs=1e-12
        )
    assert dec.truncation_error(w, "channel", 8) == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("shape", [(50, 6), (6, 50), (10, 12)])
def test_truncated_svd_is_orthonormal_and_optimal(shape: tuple[int, int]) -> None:
    m = torch.randn(2, *shape, generator=_gen(4), dtype=torch.float64)
    k = min(shape)
    u, s, vh = dec.truncated_svd(m, k)
    torch.testing.assert_close(u @ torch.diag_embed(s) @ vh, m, rtol=1e-10, atol=1e-10)
    eye = torch.eye(k, dtype=torch.float64).expand(2, k, k)
    torch.testing.assert_close(u.transpose(-2, -1) @ u, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(vh @ vh.transpose(-2, -1), eye, rtol=0, atol=1e-10)
    r = max(1, k // 2)
    u, s, vh = dec.truncated_svd(m, r)
    assert u.shape == (2, shape[0], r) and s.shape == (2, r) and vh.shape == (2, r, shape[1])
    err = float((u @ torch.diag_embed(s) @ vh - m).norm())
    assert err == pytest.approx(_eckart_young(m, r), rel=1e-9)


# --- factorizations of weights --------------------------------------------------------------------


def test_linear_factors_full_rank_exact_and_balanced() -> None:
    w = torch.randn(7, 12, generator=_gen(5))
    first, second = dec.linear_factors(w, 7)
    assert first.shape == (7, 12) and second.shape == (7, 7)
    assert first.dtype == torch.float64
    torch.testing.assert_close(second @ first, w.double(), rtol=1e-10, atol=1e-10)
    # singular values are split evenly: both factors carry sqrt(s)
    s = torch.linalg.svdvals(w.double())
    torch.testing.assert_close(torch.linalg.svdvals(first), s.sqrt(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(torch.linalg.svdvals(second), s.sqrt(), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_linear_factors_truncation_error(rank: int) -> None:
    w = torch.randn(9, 6, generator=_gen(6))
    first, second = dec.linear_factors(w, rank)
    err = float((second @ first - w.double()).norm())
    assert err == pytest.approx(_eckart_young(w, rank), rel=1e-9)


@pytest.mark.parametrize("groups", [1, 2, 3])
@pytest.mark.parametrize("rank", [1, 2])
def test_channel_factors_truncation_error_per_group(groups: int, rank: int) -> None:
    w = torch.randn(6, 2, 3, 3, generator=_gen(7))
    first, second = dec.channel_factors(w, rank, groups)
    assert first.shape == (groups * rank, 2, 3, 3)
    assert second.shape == (6, rank, 1, 1)
    f = Factored(
        nn.Conv2d(2 * groups, groups * rank, 3, groups=groups, bias=False),
        nn.Conv2d(groups * rank, 6, 1, groups=groups, bias=False),
        scheme="channel",
        rank=rank,
    ).double()
    with torch.no_grad():
        f[0].weight.copy_(first)
        f[1].weight.copy_(second)
    err = float((effective_weight(f) - w.double()).norm())
    assert err == pytest.approx(_eckart_young(_channel_matrix(w, groups), rank), rel=1e-9,
                                abs=1e-12)


@pytest.mark.parametrize("rank", [1, 4, 9])
def test_spatial_factors_truncation_error(rank: int) -> None:
    w = torch.randn(4, 3, 3, 5, generator=_gen(8), dtype=torch.float64)
    vertical, horizontal = dec.spatial_factors(w, rank)
    assert vertical.shape == (rank, 3, 3, 1)
    assert horizontal.shape == (4, rank, 1, 5)
    eff = torch.einsum("rci,nrj->ncij", vertical[..., 0], horizontal[:, :, 0, :])
    err = float((eff - w).norm())
    assert err == pytest.approx(_eckart_young(_spatial_matrix(w), rank), rel=1e-9, abs=1e-12)
    if rank == 9:  # min(C*kh, N*kw) = 9: full rank
        assert err < 1e-10


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_exactly_rank_r_conv_weight_is_reproduced(scheme: str) -> None:
    n, c, kh, kw, r = 6, 4, 3, 3, 2
    if scheme == "channel":
        w = _low_rank(n, c * kh * kw, r, seed=9).reshape(n, c, kh, kw)
        first, second = dec.channel_factors(w, r)
        eff = (second.reshape(n, r) @ first.reshape(r, -1)).reshape(w.shape)
    else:
        w = _low_rank(c * kh, n * kw, r, seed=9).reshape(c, kh, n, kw).permute(2, 0, 1, 3)
        vertical, horizontal = dec.spatial_factors(w, r)
        eff = torch.einsum("rci,nrj->ncij", vertical[..., 0], horizontal[:, :, 0, :])
    assert float((eff - w).norm()) / float(w.norm()) < 1e-12
    # and rank r - 1 is not enough
    assert dec.truncation_error(w, scheme, r - 1) > 1e-3 * float(w.norm())


def test_tucker2_full_rank_is_exact_with_orthonormal_factors() -> None:
    w = torch.randn(5, 4, 3, 3, generator=_gen(10))
    first, core, last = dec.tucker2_factors(w, (4, 5))
    assert first.shape == (4, 4, 1, 1) and core.shape == (5, 4, 3, 3) and last.shape == (5, 5, 1, 1)
    u_in, u_out = first[:, :, 0, 0], last[:, :, 0, 0]
    torch.testing.assert_close(u_in @ u_in.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(u_out.T @ u_out, torch.eye(5, dtype=torch.float64), rtol=0,
                               atol=1e-9)
    eff = torch.einsum("nb,bahw,ac->nchw", u_out, core, u_in)
    assert float((eff - w.double()).norm()) / float(w.norm()) < 1e-10


def test_tucker2_reproduces_a_weight_of_exact_multilinear_rank() -> None:
    g = _gen(11)
    n, c, r_in, r_out = 8, 6, 2, 3
    core = torch.randn(r_out, r_in, 3, 3, generator=g, dtype=torch.float64)
    u_out = torch.linalg.qr(torch.randn(n, r_out, generator=g, dtype=torch.float64))[0]
    u_in = torch.linalg.qr(torch.randn(c, r_in, generator=g, dtype=torch.float64))[0]
    w = torch.einsum("nb,bahw,ca->nchw", u_out, core, u_in)
    first, core2, last = dec.tucker2_factors(w, (r_in, r_out))
    eff = torch.einsum("nb,bahw,ac->nchw", last[:, :, 0, 0], core2, first[:, :, 0, 0])
    assert float((eff - w).norm()) / float(w.norm()) < 1e-10


def test_tucker2_hooi_matches_tensorly_partial_tucker() -> None:
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker

    w = torch.randn(12, 10, 3, 3, generator=_gen(12), dtype=torch.float64)
    ranks = (4, 5)
    first, core, last = dec.tucker2_factors(w, ranks)
    ours = torch.einsum("nb,bahw,ac->nchw", last[:, :, 0, 0], core, first[:, :, 0, 0])
    with tl.backend_context("pytorch"):
        (core_t, (u_out, u_in)), _ = partial_tucker(w, rank=[5, 4], modes=[0, 1], tol=1e-12,
                                                    n_iter_max=500)
    ref = torch.einsum("nb,bahw,ca->nchw", u_out, core_t, u_in)
    err_ours = float((ours - w).norm() / w.norm())
    err_ref = float((ref - w).norm() / w.norm())
    assert err_ours <= err_ref + 1e-6  # the same optimum (HOOI from the HOSVD)
    hosvd_first, hosvd_core, hosvd_last = dec.tucker2_factors(w, ranks, n_iter_max=0)
    hosvd = torch.einsum("nb,bahw,ac->nchw", hosvd_last[:, :, 0, 0], hosvd_core,
                         hosvd_first[:, :, 0, 0])
    assert err_ours <= float((hosvd - w).norm() / w.norm()) + 1e-12  # never worse than the start


def test_check_finite_names_the_layer() -> None:
    dec.check_finite(torch.randn(3, 3), "fine")  # no error
    for bad in (float("nan"), float("inf"), float("-inf")):
        w = torch.randn(3, 3)
        w[1, 1] = bad
        with pytest.raises(LrfxError, match=r"'blocks\.0\.fc'.*NaN/Inf"):
            dec.check_finite(w, "blocks.0.fc")


# --- factored modules, built directly -------------------------------------------------------------


@PROPERTY
@given(
    n=st.integers(1, 9),
    m=st.integers(1, 9),
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_factor_linear_full_rank_reproduces_the_layer(
    n: int, m: int, lead: list[int], bias: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    lin = nn.Linear(n, m, bias=bias)
    f = factor_linear(lin.weight, lin.bias, min(n, m), name="lin")
    assert isinstance(f, Factored) and f.scheme == "svd" and f.rank == min(n, m)
    assert f[0].bias is None and (f[1].bias is not None) == bias
    x = torch.randn(*lead, n)
    assert rel_err(f(x), lin(x)) < 1e-5


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_factor_conv_channel_full_rank_reproduces_the_layer(dims: int) -> None:
    @PROPERTY
    @given(geo=conv_geometries(dims, grouped=True))
    def check(geo: dict[str, object]) -> None:
        conv, x = make_conv(dims, geo)
        f = factor_conv(ConvSpec.of(conv), "channel", full_rank(conv, "channel"), name="c")
        assert [type(m) for m in f] == [CONV_CLS[dims], CONV_CLS[dims]]
        assert f[0].groups == f[1].groups == conv.groups
        assert f[0].padding_mode == conv.padding_mode
        assert rel_err(f(x), conv(x)) < 1e-5

    check()


@pytest.mark.parametrize("scheme", ["spatial", "tucker2"])
def test_factor_conv2d_full_rank_reproduces_the_layer(scheme: str) -> None:
    @PROPERTY
    @given(geo=conv_geometries(2, grouped=False, spatial_kernel=scheme == "spatial"))
    def check(geo: dict[str, object]) -> None:
        conv, x = make_conv(2, geo)
        f = factor_conv(ConvSpec.of(conv), scheme, full_rank(conv, scheme), name="c")
        assert len(f) == (2 if scheme == "spatial" else 3)
        assert rel_err(f(x), conv(x)) < 1e-5
        assert rel_err(effective_weight(f).float(), conv.weight) < 1e-5

    check()


def test_factor_conv_rejects_schemes_that_do_not_fit() -> None:
    conv1d = nn.Conv1d(4, 4, 3)
    with pytest.raises(UnsupportedLayerError, match="ungrouped Conv2d"):
        factor_conv(ConvSpec.of(conv1d), "spatial", 2, name="c1")
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(UnsupportedLayerError, match="ungrouped Conv2d"):
        factor_conv(ConvSpec.of(grouped), "tucker2", (2, 2), name="g")
    with pytest.raises(UnsupportedLayerError, match="'svd'"):
        factor_conv(ConvSpec.of(nn.Conv2d(4, 4, 3)), "svd", 2, name="c2")
    bad = nn.Conv2d(2, 2, 3)
    with torch.no_grad():
        bad.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(LrfxError, match="'stem'"):
        factor_conv(ConvSpec.of(bad), "channel", 1, name="stem")


def test_factors_follow_dtype_and_requires_grad_and_are_independent_tensors() -> None:
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    conv.bias.requires_grad_(False)
    f = factor_conv(ConvSpec.of(conv), "channel", 5, name="c")
    assert all(p.dtype == torch.float64 for p in f.parameters())
    assert f[0].weight.requires_grad and f[1].weight.requires_grad
    assert not f[1].bias.requires_grad
    assert f[0].weight.is_contiguous() and f[1].weight.is_contiguous()
    # the bias is a copy, not the dense layer's Parameter
    assert f[1].bias is not conv.bias
    assert f[1].bias.data_ptr() != conv.bias.data_ptr()
    torch.testing.assert_close(f[1].bias, conv.bias)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert rel_err(f(x), conv(x)) < 1e-12
