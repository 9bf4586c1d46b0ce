"""The cost model: hand-computed MACs/params, and agreement with FlopCounterMode / 2."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import sdpa_flop

import lrfx
from lrfx.cost import (
    ConvGeometry,
    Cost,
    LinearGeometry,
    applicable_schemes,
    bmm_macs,
    break_even_rank,
    dense_cost,
    einsum_macs,
    factored_cost,
    matmul_macs,
    max_rank,
    mha_macs,
    sdpa_macs,
    window_attention_macs,
)

FlopMacs = Callable[..., int]


def geometry_of(conv: nn.Module, x: torch.Tensor) -> ConvGeometry:
    """A ConvGeometry built from a real conv module and its real output (not via lrfx)."""
    assert isinstance(conv, nn.modules.conv._ConvNd)
    y = conv(x)
    return ConvGeometry(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel=tuple(conv.kernel_size),
        in_spatial=tuple(x.shape[2:]),
        out_spatial=tuple(y.shape[2:]),
        stride=tuple(conv.stride),
        padding=tuple(conv.padding),  # type: ignore[arg-type]
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        batch=x.shape[0],
        bias=conv.bias is not None,
        transposed=conv.transposed,
    )


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# --- dense conv and linear: hand-computed --------------------------------------------------------


def test_resnet_block_conv() -> None:
    g = ConvGeometry(64, 64, (3, 3), (56, 56), (56, 56))
    assert dense_cost(g).macs == 56 * 56 * 64 * 64 * 9 == 115605504
    # (the module docstring of lrfx/cost.py says 9633792 here; r*(C*k + N)*H'*W' is 32112640)
    assert factored_cost(g, "channel", 16).macs == 16 * (64 * 9 + 64) * 56 * 56 == 32112640


def test_grouped_dilated_strided_conv2d(flop_macs: FlopMacs) -> None:
    conv = nn.Conv2d(8, 12, 3, groups=4, dilation=2, stride=2, padding=1)
    x = torch.randn(1, 8, 11, 11)
    g = geometry_of(conv, x)
    # out = floor((11 + 2 - 2*2 - 1) / 2) + 1 = 5
    assert g.out_spatial == (5, 5)
    assert g.weight_shape == (12, 2, 3, 3)
    cost = dense_cost(g)
    assert cost.macs == 5 * 5 * 12 * (8 // 4) * 9 == 5400
    assert cost.params == 12 * 2 * 9 + 12 == 228 == n_params(conv)
    assert cost.macs == flop_macs(conv, x)


def test_conv1d_strided_batch(flop_macs: FlopMacs) -> None:
    conv = nn.Conv1d(4, 6, 5, stride=2)
    x = torch.randn(3, 4, 20)
    g = geometry_of(conv, x)
    assert g.out_spatial == (8,)  # (20 - 5) // 2 + 1
    cost = dense_cost(g)
    assert cost.macs == 3 * 8 * 6 * 4 * 5 == 2880
    assert cost.params == 6 * 4 * 5 + 6 == 126
    assert cost.macs == flop_macs(conv, x)


def test_conv3d_anisotropic_kernel(flop_macs: FlopMacs) -> None:
    conv = nn.Conv3d(2, 4, (3, 1, 2))
    x = torch.randn(1, 2, 5, 6, 7)
    g = geometry_of(conv, x)
    assert g.out_spatial == (3, 6, 6)
    cost = dense_cost(g)
    assert cost.macs == 3 * 6 * 6 * 4 * 2 * 6 == 5184
    assert cost.params == 4 * 2 * 6 + 4 == 52
    assert cost.macs == flop_macs(conv, x)


def test_depthwise_conv(flop_macs: FlopMacs) -> None:
    conv = nn.Conv2d(8, 8, 3, groups=8, bias=False)
    x = torch.randn(1, 8, 6, 6)
    g = geometry_of(conv, x)
    assert g.depthwise
    assert dense_cost(g) == Cost(4 * 4 * 8 * 1 * 9, 8 * 9)
    assert dense_cost(g).macs == flop_macs(conv, x)
    assert applicable_schemes(g) == ()


def test_conv_transpose(flop_macs: FlopMacs) -> None:
    conv = nn.ConvTranspose2d(4, 6, 3, stride=2)
    x = torch.randn(1, 4, 5, 5)
    g = geometry_of(conv, x)
    assert g.weight_shape == (4, 6, 3, 3)
    cost = dense_cost(g)
    # every input element is scattered to N * kh * kw outputs
    assert cost.macs == 5 * 5 * 4 * 6 * 9 == 5400
    assert cost.params == 4 * 6 * 9 + 6 == n_params(conv)
    assert cost.macs == flop_macs(conv, x)
    assert applicable_schemes(g) == ()


@pytest.mark.parametrize("bias", [True, False])
def test_linear_with_leading_dims(bias: bool, flop_macs: FlopMacs) -> None:
    lin = nn.Linear(6, 5, bias=bias)
    x = torch.randn(2, 4, 4, 6)
    g = LinearGeometry(6, 5, rows=2 * 4 * 4, bias=bias)
    assert g.weight_shape == (5, 6)
    cost = dense_cost(g)
    assert cost.macs == 32 * 6 * 5 == 960
    assert cost.params == 30 + (5 if bias else 0) == n_params(lin)
    assert cost.macs == flop_macs(lin, x)


def test_cost_addition() -> None:
    assert Cost(3, 4) + Cost(10, 20) == Cost(13, 24)


# --- factored costs against algorithms.md section 0 ----------------------------------------------

# C=16, N=32, 3x3, stride 2, padding 1, input 10x12, batch 2 -> output 5x6
G = ConvGeometry(16, 32, (3, 3), (10, 12), (5, 6), (2, 2), (1, 1), (1, 1), batch=2)


def test_factored_channel_formula() -> None:
    cost = factored_cost(G, "channel", 4)
    params = 4 * (16 * 9 + 32)  # r * (C*kh*kw + N)
    assert cost.params == params + 32 == 736
    assert cost.macs == params * 5 * 6 * 2 == 42240


def test_factored_spatial_formula() -> None:
    cost = factored_cost(G, "spatial", 4)
    # r*C*kh*H'*W_in + N*r*kw*H'*W', per image
    assert cost.macs == 2 * (4 * 16 * 3 * 5 * 12 + 32 * 4 * 3 * 5 * 6) == 46080
    assert cost.params == 4 * (16 * 3 + 32 * 3) + 32 == 608


def test_factored_tucker2_formula() -> None:
    cost = factored_cost(G, "tucker2", (3, 5))
    # C*r_in*H*W + r_in*r_out*kh*kw*H'*W' + r_out*N*H'*W', per image
    assert cost.macs == 2 * (16 * 3 * 10 * 12 + 3 * 5 * 9 * 5 * 6 + 5 * 32 * 5 * 6) == 29220
    assert cost.params == 16 * 3 + 3 * 5 * 9 + 5 * 32 + 32 == 375
    # an int means r_in = r_out
    assert factored_cost(G, "tucker2", 4) == factored_cost(G, "tucker2", (4, 4))


def test_factored_cp_formula() -> None:
    cost = factored_cost(G, "cp", 4)
    # 1x1 C->R at input size, depthwise (kh,1) to (H', W_in), depthwise (1,kw), 1x1 R->N
    per_image = 16 * 4 * 10 * 12 + 4 * 3 * 5 * 12 + 4 * 3 * 5 * 6 + 4 * 32 * 5 * 6
    assert cost.macs == 2 * per_image == 25200
    assert cost.params == 4 * (16 + 3 + 3 + 32) + 32 == 248


def test_factored_svd_formula() -> None:
    g = LinearGeometry(20, 12, rows=6)
    cost = factored_cost(g, "svd", 5)
    assert cost.macs == 6 * 5 * (20 + 12) == 960
    assert cost.params == 5 * (20 + 12) + 12 == 172
    assert factored_cost(LinearGeometry(20, 12, rows=6, bias=False), "svd", 5).params == 160


def test_factored_channel_grouped_is_block_diagonal() -> None:
    g = ConvGeometry(8, 12, (3, 3), (5, 5), (5, 5), groups=4)
    cost = factored_cost(g, "channel", 2)
    per_group = 2 * (2 * 9 + 3)  # r * (C/g*k + N/g)
    assert cost.params == 4 * per_group + 12 == 180
    assert cost.macs == 4 * per_group * 25 == 4200


# --- factored costs against FlopCounterMode of the explicitly built factored modules -------------


def test_factored_channel_grouped_equals_flop_counter(flop_macs: FlopMacs) -> None:
    dense = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)
    x = torch.randn(2, 8, 9, 9)
    g = geometry_of(dense, x)
    r = 2
    # per group: conv (C/g -> r) then 1x1 (r -> N/g); as grouped convs
    fact = nn.Sequential(
        nn.Conv2d(8, 4 * r, 3, stride=2, padding=1, groups=4, bias=False),
        nn.Conv2d(4 * r, 12, 1, groups=4),
    )
    assert fact(x).shape == dense(x).shape
    cost = factored_cost(g, "channel", r)
    assert cost.macs == flop_macs(fact, x)
    assert cost.params == n_params(fact)


@dataclass(frozen=True)
class Case:
    c: int
    n: int
    k: tuple[int, int]
    s: tuple[int, int]
    p: tuple[int, int]
    d: tuple[int, int]
    hw: tuple[int, int]
    b: int


CASES = [
    Case(6, 10, (3, 3), (1, 1), (1, 1), (1, 1), (8, 8), 1),
    Case(4, 7, (3, 5), (2, 2), (1, 2), (1, 1), (9, 11), 2),
    Case(5, 6, (3, 3), (2, 1), (2, 1), (2, 1), (10, 7), 1),
    Case(3, 8, (5, 1), (1, 3), (0, 0), (1, 1), (9, 10), 1),
    Case(7, 4, (2, 3), (3, 2), (1, 0), (1, 2), (12, 13), 2),
]


def build_factored(case: Case, scheme: str, rank: int | tuple[int, int]) -> nn.Sequential:
    """The factored module sequence of algorithms.md section 0, built by hand."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = case.k, case.s, case.p, case.d
    c, n = case.c, case.n
    if scheme == "channel":
        assert isinstance(rank, int)
        return nn.Sequential(
            nn.Conv2d(c, rank, case.k, case.s, case.p, case.d, bias=False),
            nn.Conv2d(rank, n, 1),
        )
    if scheme == "spatial":
        assert isinstance(rank, int)
        return nn.Sequential(
            nn.Conv2d(c, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False),
            nn.Conv2d(rank, n, (1, kw), (1, sw), (0, pw), (1, dw)),
        )
    if scheme == "tucker2":
        assert isinstance(rank, tuple)
        r_in, r_out = rank
        return nn.Sequential(
            nn.Conv2d(c, r_in, 1, bias=False),
            nn.Conv2d(r_in, r_out, case.k, case.s, case.p, case.d, bias=False),
            nn.Conv2d(r_out, n, 1),
        )
    assert scheme == "cp" and isinstance(rank, int)
    return nn.Sequential(
        nn.Conv2d(c, rank, 1, bias=False),
        nn.Conv2d(rank, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=rank, bias=False),
        nn.Conv2d(rank, rank, (1, kw), (1, sw), (0, pw), (1, dw), groups=rank, bias=False),
        nn.Conv2d(rank, n, 1),
    )


RANKS: dict[str, int | tuple[int, int]] = {"channel": 3, "spatial": 4, "tucker2": (2, 3), "cp": 5}


@pytest.mark.parametrize("scheme", ["channel", "spatial", "tucker2", "cp"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c.k}s{c.s}p{c.p}d{c.d}")
def test_factored_conv_cost_equals_flop_counter(
    case: Case, scheme: str, flop_macs: FlopMacs
) -> None:
    dense = nn.Conv2d(case.c, case.n, case.k, case.s, case.p, case.d)
    x = torch.randn(case.b, case.c, *case.hw)
    g = geometry_of(dense, x)
    assert dense_cost(g).macs == flop_macs(dense, x)
    rank = RANKS[scheme]
    fact = build_factored(case, scheme, rank)
    assert fact(x).shape == dense(x).shape  # the construction is the layer's factored form
    cost = factored_cost(g, scheme, rank)
    assert cost.macs == flop_macs(fact, x)
    assert cost.params == n_params(fact)


@pytest.mark.parametrize("bias", [True, False])
def test_factored_svd_equals_flop_counter(bias: bool, flop_macs: FlopMacs) -> None:
    x = torch.randn(3, 5, 20)
    fact = nn.Sequential(nn.Linear(20, 6, bias=False), nn.Linear(6, 12, bias=bias))
    g = LinearGeometry(20, 12, rows=15, bias=bias)
    cost = factored_cost(g, "svd", 6)
    assert cost.macs == flop_macs(fact, x) == 15 * 6 * 32
    assert cost.params == n_params(fact)


@st.composite
def factor_cases(draw: st.DrawFn) -> Case:
    k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    d = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    hw = tuple(
        max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]) + draw(st.integers(0, 5)) for i in range(2)
    )
    return Case(draw(st.integers(1, 5)), draw(st.integers(1, 5)), k, s, p, d, hw, 1)  # type: ignore[arg-type]


@settings(max_examples=20, deadline=None)
@given(case=factor_cases(), scheme=st.sampled_from(["channel", "spatial", "tucker2", "cp"]),
       r=st.integers(1, 4))
def test_factored_cost_property(case: Case, scheme: str, r: int, flop_macs: FlopMacs) -> None:
    if scheme in ("spatial", "cp") and case.k == (1, 1):
        scheme = "channel"  # spatial schemes need a spatial kernel
    dense = nn.Conv2d(case.c, case.n, case.k, case.s, case.p, case.d)
    x = torch.randn(1, case.c, *case.hw)
    g = geometry_of(dense, x)
    rank: int | tuple[int, int] = (r, r + 1) if scheme == "tucker2" else r
    fact = build_factored(case, scheme, rank)
    cost = factored_cost(g, scheme, rank)
    assert cost.macs == flop_macs(fact, x)
    assert cost.params == n_params(fact)


# --- property: dense conv cost == FlopCounterMode / 2 == lrfx.count_macs -------------------------

_CONV_CLS = {
    (1, False): nn.Conv1d,
    (2, False): nn.Conv2d,
    (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d,
    (2, True): nn.ConvTranspose2d,
    (3, True): nn.ConvTranspose3d,
}


@st.composite
def conv_layers(draw: st.DrawFn) -> tuple[nn.Module, tuple[int, ...]]:
    dims = draw(st.integers(1, 3))
    transposed = draw(st.booleans())
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 3))
    n = groups * draw(st.integers(1, 3))
    k = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    s = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    d = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    p = tuple(draw(st.integers(0, (d[i] * (k[i] - 1)) // 2)) for i in range(dims))
    limit = 4 if dims == 3 else 9
    size = tuple(
        max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]) + draw(st.integers(0, limit))
        for i in range(dims)
    )
    batch = draw(st.integers(1, 2))
    bias = draw(st.booleans())
    cls = _CONV_CLS[(dims, transposed)]
    conv = cls(c, n, k, stride=s, padding=p, dilation=d, groups=groups, bias=bias)
    return conv, (batch, c, *size)


@settings(max_examples=30, deadline=None)
@given(layer=conv_layers())
def test_dense_conv_cost_equals_flop_counter(
    layer: tuple[nn.Module, tuple[int, ...]], flop_macs: FlopMacs
) -> None:
    conv, shape = layer
    x = torch.randn(shape)
    g = geometry_of(conv, x)
    expected = flop_macs(conv, x)
    assert dense_cost(g).macs == expected
    assert dense_cost(g).params == n_params(conv)
    # (a bare ConvTranspose cannot be the traced root: see test_tracing)
    a = lrfx.analyze(nn.Sequential(conv), x, spectra=False)
    assert a.total_macs == expected
    (rec,) = a.layers
    assert rec.macs == expected
    assert rec.params == n_params(conv)
    assert rec.weight_shape == tuple(conv.weight.shape)


# --- applicable schemes, max rank, break-even ----------------------------------------------------


def test_applicable_schemes() -> None:
    assert applicable_schemes(LinearGeometry(4, 5)) == ("svd",)
    assert applicable_schemes(G) == ("channel", "spatial", "tucker2", "cp")
    one = ConvGeometry(16, 32, (1, 1), (5, 5), (5, 5))
    assert applicable_schemes(one) == ("channel", "tucker2")
    grouped = ConvGeometry(8, 12, (3, 3), (5, 5), (3, 3), groups=4)
    assert applicable_schemes(grouped) == ("channel",)
    conv1d = ConvGeometry(4, 6, (5,), (20,), (16,))
    assert applicable_schemes(conv1d) == ("channel",)


def test_max_rank() -> None:
    assert max_rank(LinearGeometry(20, 12), "svd") == (12,)
    assert max_rank(LinearGeometry(7, 30), "svd") == (7,)
    # C=16, N=32, 3x3
    assert max_rank(G, "channel") == (min(32, 16 * 9),)
    assert max_rank(G, "spatial") == (min(16 * 3, 32 * 3),)
    assert max_rank(G, "tucker2") == (min(16, 32 * 9), min(32, 16 * 9))
    assert max_rank(G, "cp") == (3 * 3 * 16,)  # product of all dims but the largest
    wide = ConvGeometry(4, 6, (2, 5), (9, 9), (8, 5))
    assert max_rank(wide, "spatial") == (min(4 * 2, 6 * 5),)  # C*kh rows, N*kw columns
    assert max_rank(wide, "tucker2") == (min(4, 6 * 10), min(6, 4 * 10))
    assert max_rank(wide, "cp") == (2 * 4 * 5,)
    few_out = ConvGeometry(64, 4, (3, 3), (5, 5), (5, 5))
    assert max_rank(few_out, "channel") == (4,)
    assert max_rank(few_out, "tucker2") == (min(64, 4 * 9), min(4, 64 * 9))
    grouped = ConvGeometry(8, 12, (3, 3), (5, 5), (3, 3), groups=4)
    assert max_rank(grouped, "channel") == (min(12 // 4, (8 // 4) * 9),)


def test_max_rank_rejects_inapplicable_schemes() -> None:
    with pytest.raises(ValueError, match="spatial"):
        max_rank(LinearGeometry(4, 5), "spatial")
    with pytest.raises(ValueError, match="unknown scheme"):
        max_rank(G, "qr")
    dw = ConvGeometry(8, 8, (3, 3), (5, 5), (3, 3), groups=8)
    with pytest.raises(ValueError):
        factored_cost(dw, "channel", 1)
    with pytest.raises(ValueError):
        factored_cost(ConvGeometry(4, 4, (1, 1), (3, 3), (3, 3)), "spatial", 1)


@pytest.mark.parametrize(
    ("g", "scheme", "expected"),
    [
        # channel: r*(C*k + N) >= N*C*k  <=>  r >= 64*576/640 = 57.6
        (ConvGeometry(64, 64, (3, 3), (56, 56), (56, 56)), "channel", 58),
        # spatial, stride 1, same padding: r*(C*kh + N*kw) >= N*C*kh*kw  <=>  r >= 96
        (ConvGeometry(64, 64, (3, 3), (56, 56), (56, 56), (1, 1), (1, 1)), "spatial", 96),
        # svd: r*(m+n) >= m*n
        (LinearGeometry(512, 512), "svd", 256),
        (LinearGeometry(512, 1000), "svd", math.ceil(512 * 1000 / 1512)),
    ],
)
def test_break_even_rank_hand_values(g: ConvGeometry | LinearGeometry, scheme: str,
                                     expected: int) -> None:
    assert break_even_rank(g, scheme) == expected


@pytest.mark.parametrize(
    "g",
    [
        ConvGeometry(64, 64, (3, 3), (56, 56), (56, 56)),
        ConvGeometry(16, 32, (3, 3), (10, 12), (5, 6), batch=2),
        ConvGeometry(32, 32, (1, 1), (7, 7), (7, 7)),
        ConvGeometry(3, 64, (7, 7), (32, 32), (16, 16)),
        LinearGeometry(100, 30, rows=7),
    ],
)
def test_break_even_rank_is_the_first_rank_not_cheaper(g: ConvGeometry | LinearGeometry) -> None:
    dense = dense_cost(g).macs
    for scheme in applicable_schemes(g):
        if scheme == "tucker2":
            continue
        be = break_even_rank(g, scheme)
        (hi,) = max_rank(g, scheme)
        assert 1 <= be <= hi + 1
        if be <= hi:
            assert factored_cost(g, scheme, be).macs >= dense, scheme
        if be > 1:
            assert factored_cost(g, scheme, be - 1).macs < dense, scheme


def test_break_even_rank_tucker2_square() -> None:
    g = ConvGeometry(32, 32, (3, 3), (14, 14), (14, 14))
    dense = dense_cost(g).macs
    be = break_even_rank(g, "tucker2")
    # with C == N the scaled r_in equals r_out
    assert factored_cost(g, "tucker2", (be, be)).macs >= dense
    assert factored_cost(g, "tucker2", (be - 1, be - 1)).macs < dense


# --- matmul-like ops -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((5,), (5,), 5),
        ((5,), (5, 7), 35),
        ((3, 5), (5,), 15),
        ((3, 5), (5, 7), 105),
        ((6, 3, 5), (5, 7), 6 * 3 * 5 * 7),
        ((2, 1, 3, 5), (4, 5, 7), 2 * 4 * 3 * 5 * 7),
        ((), (5,), 0),
    ],
)
def test_matmul_macs(a: tuple[int, ...], b: tuple[int, ...], expected: int,
                     flop_macs: FlopMacs) -> None:
    assert matmul_macs(a, b) == expected
    if len(a) >= 2 and len(b) >= 2:  # the counter does not count dot/mv
        assert flop_macs(torch.matmul, torch.randn(a), torch.randn(b)) == expected


@pytest.mark.parametrize(
    ("fn", "a", "b", "expected"),
    [
        (torch.mm, (3, 5), (5, 7), 3 * 5 * 7),
        (torch.bmm, (4, 3, 5), (4, 5, 7), 4 * 3 * 5 * 7),
    ],
    ids=["mm", "bmm"],
)
def test_bmm_macs(fn: Callable[..., torch.Tensor], a: tuple[int, ...], b: tuple[int, ...],
                  expected: int, flop_macs: FlopMacs) -> None:
    assert flop_macs(fn, torch.randn(a), torch.randn(b)) == expected
    assert bmm_macs(a, b) == expected


@pytest.mark.parametrize(
    ("eq", "shapes", "expected"),
    [
        ("ij,jk->ik", [(3, 5), (5, 7)], 105),
        ("ij,jk", [(3, 5), (5, 7)], 105),  # implicit output
        ("bij,bjk->bik", [(2, 3, 5), (2, 5, 7)], 2 * 3 * 5 * 7),
        ("bij,bjk->bik", [(1, 3, 5), (4, 5, 7)], 4 * 3 * 5 * 7),  # broadcast batch
        ("bhqd,bhkd->bhqk", [(2, 4, 6, 8), (2, 4, 9, 8)], 2 * 4 * 6 * 9 * 8),
        ("...ij,...jk->...ik", [(2, 3, 4, 5), (2, 3, 5, 6)], 2 * 3 * 4 * 5 * 6),
        ("b i j , b j k -> b i k", [(2, 3, 5), (2, 5, 7)], 210),  # spaces
        ("i,i->", [(5,), (5,)], 5),
        ("ij,jk,kl->il", [(3, 5), (5, 7), (7, 2)], 3 * 5 * 7 + 3 * 7 * 2),  # left to right
    ],
)
def test_einsum_macs(eq: str, shapes: list[tuple[int, ...]], expected: int,
                     flop_macs: FlopMacs) -> None:
    assert einsum_macs(eq, shapes) == expected
    ops = [torch.randn(s) for s in shapes]
    assert flop_macs(torch.einsum, eq, *ops) == expected


def test_einsum_macs_ellipsis_broadcast_from_the_left(flop_macs: FlopMacs) -> None:
    shapes = [(3, 4, 5), (2, 3, 5, 6)]  # batch (3,) broadcasts against (2, 3)
    ops = [torch.randn(s) for s in shapes]
    assert flop_macs(torch.einsum, "...ij,...jk->...ik", *ops) == 2 * 3 * 4 * 5 * 6
    assert einsum_macs("...ij,...jk->...ik", shapes) == 2 * 3 * 4 * 5 * 6


@pytest.mark.parametrize(("eq", "shape"), [("ii->i", (4, 4)), ("ij->ji", (3, 5)), ("ij->", (3, 5))])
def test_einsum_single_operand_is_free(eq: str, shape: tuple[int, ...]) -> None:
    assert einsum_macs(eq, [shape]) == 0


def test_einsum_operand_count_mismatch() -> None:
    with pytest.raises(ValueError, match="2 operands"):
        einsum_macs("ij,jk->ik", [(3, 5)])


@pytest.mark.parametrize(
    ("q", "k", "v"),
    [
        ((2, 4, 6, 8), (2, 4, 9, 8), (2, 4, 9, 5)),
        ((3, 6, 8), (3, 6, 8), (3, 6, 8)),
        ((1, 2, 1, 16), (1, 2, 7, 16), (1, 2, 7, 16)),
    ],
)
def test_sdpa_macs(q: tuple[int, ...], k: tuple[int, ...], v: tuple[int, ...]) -> None:
    hand = math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])
    assert sdpa_macs(q, k, v) == hand
    if len(q) == 4:
        assert sdpa_macs(q, k, v) == sdpa_flop(q, k, v) // 2
    assert sdpa_macs((2, 4, 6, 8), (2, 4, 9, 8), (2, 4, 9, 5)) == 2 * 4 * 6 * 9 * (8 + 5)


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_macs(batch_first: bool) -> None:
    b, length, s, e, kdim, vdim = 2, 4, 6, 12, 5, 7
    if batch_first:
        q, k, v = (b, length, e), (b, s, kdim), (b, s, vdim)
    else:
        q, k, v = (length, b, e), (s, b, kdim), (s, b, vdim)
    inp, attn, out = mha_macs(q, k, v, e, kdim, vdim, batch_first)
    assert inp == b * (length * e * e + s * kdim * e + s * vdim * e) == 2880
    assert attn == 2 * b * length * s * e == 1152
    assert out == b * length * e * e == 1152
    # unbatched (L, E)
    assert mha_macs((4, 12), (6, 12), (6, 12), 12, 12, 12, batch_first) == (
        4 * 144 + 2 * 6 * 144,
        2 * 4 * 6 * 12,
        4 * 144,
    )


def test_window_attention_macs() -> None:
    # 7x7 map padded to 8x8 for 4x4 windows: 64 tokens, 16 per window
    qkv, attn, proj = window_attention_macs((1, 7, 7, 8), (4, 4), 24, 8)
    assert qkv == 64 * 8 * 24
    assert attn == 2 * 64 * 16 * 8
    assert proj == 64 * 8 * 8
