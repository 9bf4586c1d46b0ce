"""The scheme registry: every scheme owns its layout, cost, errors, factors and projection.

Structural (the built modules are the layout), numerical (vectorized costs equal scalar costs;
projections are the best rank-r approximation, differentiable, on the weight's dtype), and the
promise that adding a scheme is one registry entry: a three-layer linear scheme registered here
flows through allocation, rewrite, save/load and plan JSON without touching anything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lrfx
from lrfx import decompositions as dec
from lrfx.cost import ConvGeometry, Geometry, LinearGeometry, Piece, pieces_cost
from lrfx.decompositions import Spectrum
from lrfx.modules import Factored, build_factored
from lrfx.schemes import (
    Rank,
    Scheme,
    applicable_schemes,
    get_scheme,
    register_scheme,
    scheme_names,
    unregister_scheme,
)

G2 = ConvGeometry(6, 8, (3, 3), (9, 9), (5, 5), (2, 2), (1, 1), (1, 1), batch=2)
GEOMETRIES: dict[str, Geometry] = {
    "svd": LinearGeometry(12, 7, rows=10),
    "channel": ConvGeometry(8, 12, (3, 3), (7, 7), (7, 7), (1, 1), (1, 1), (1, 1), groups=2),
    "spatial": G2,
    "tucker2": G2,
    "cp": G2,
}
RANKS: dict[str, Rank] = {"svd": 3, "channel": 2, "spatial": 4, "tucker2": (3, 5), "cp": 4}


def _input(g: Geometry) -> torch.Tensor:
    if isinstance(g, LinearGeometry):
        return torch.randn(g.rows, g.in_features)
    return torch.randn(g.batch, g.in_channels, *g.in_spatial)


def _flop_macs(m: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as c:
        m(x)
    return int(c.get_total_flops()) // 2


def test_registry_lists_the_builtins_in_order() -> None:
    assert scheme_names()[:5] == ("svd", "channel", "spatial", "tucker2", "cp")
    assert not get_scheme("cp").allocatable and "plan-only" in get_scheme("cp").note
    with pytest.raises(lrfx.SchemeError, match="unknown scheme 'qr'"):
        get_scheme("qr")
    with pytest.raises(ValueError):  # a SchemeError is a ValueError too
        get_scheme("qr")


@pytest.mark.parametrize("name", ["svd", "channel", "spatial", "tucker2", "cp"])
def test_built_modules_are_the_layout_and_cost_what_they_compute(name: str) -> None:
    s, g, rank = get_scheme(name), GEOMETRIES[name], RANKS[name]
    pieces = s.layout(g, s.ranks(rank))
    f = build_factored(pieces, scheme=name, rank=rank)  # uninitialized: shapes only
    assert isinstance(f, Factored) and len(f) == len(pieces)
    for m, p in zip(f, pieces, strict=True):
        if p.linear:
            assert isinstance(m, nn.Linear)
            assert (m.in_features, m.out_features) == (p.in_channels, p.out_channels)
        else:
            assert (m.in_channels, m.out_channels, m.groups) == (
                p.in_channels, p.out_channels, p.groups)
            assert tuple(m.kernel_size) == p.kernel
        assert (m.bias is not None) == p.bias
    x = _input(g)
    cost = s.cost(g, rank)
    assert cost == pieces_cost(g, pieces)
    assert cost.macs == _flop_macs(f, x)
    assert cost.params == sum(p.numel() for p in f.parameters())


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(c=st.integers(1, 9), n=st.integers(1, 9), kh=st.integers(1, 4), kw=st.integers(1, 4),
       h=st.integers(4, 12), w=st.integers(4, 12), b=st.integers(1, 3),
       name=st.sampled_from(["channel", "spatial", "tucker2", "cp"]), seed=st.integers(0, 99))
def test_vectorized_costs_equal_scalar_costs(c: int, n: int, kh: int, kw: int, h: int, w: int,
                                             b: int, name: str, seed: int) -> None:
    g = ConvGeometry(c, n, (kh, kw), (h, w), (h - kh + 1, w - kw + 1), batch=b)
    s = get_scheme(name)
    if not s.applies(g):
        return
    rng = np.random.default_rng(seed)
    ranks = rng.integers(1, 20, size=(8, s.n_ranks))
    calls = [g, dataclasses.replace(g, in_spatial=(h + 2, w + 1),
                                    out_spatial=(h - kh + 3, w - kw + 2))]
    macs, params = s.cost_arrays(calls, ranks)
    for i, r in enumerate(ranks):
        rank = tuple(int(x) for x in r)
        assert macs[i] == sum(s.cost(cg, rank).macs for cg in calls)
        assert params[i] == s.cost(g, rank).params


def _best_rank_r(m: torch.Tensor, r: int) -> torch.Tensor:
    u, sv, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[..., :r] * sv[..., None, :r]) @ vh[..., :r, :]


@pytest.mark.parametrize(("name", "shape", "groups", "rank"), [
    ("svd", (9, 14), 1, 4),
    ("channel", (8, 3, 3, 3), 2, 2),
    ("channel", (6, 4, 5), 1, 3),        # Conv1d
    ("channel", (6, 2, 3, 3, 3), 1, 4),  # Conv3d
    ("spatial", (5, 4, 3, 2), 1, 3),
])
def test_projection_is_the_best_rank_r_approximation(name: str, shape: tuple[int, ...],
                                                     groups: int, rank: int) -> None:
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.float64)
    s = get_scheme(name)
    p = s.project(w, rank, groups=groups)
    assert p.shape == w.shape and p.dtype == w.dtype
    u = dec.get_unfolding(s.unfoldings[0])
    expected = u.fold(_best_rank_r(u.matrix(w, groups), rank), w.shape, groups)
    torch.testing.assert_close(p, expected)
    # projecting twice changes nothing; full rank reproduces the weight
    torch.testing.assert_close(s.project(p, rank, groups=groups), p)
    full = min(u.matrix(w, groups).shape[-2:])
    torch.testing.assert_close(s.project(w, full, groups=groups), w)


def test_projection_is_differentiable_with_the_svd_gradient() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    s = get_scheme("svd")
    assert torch.autograd.gradcheck(lambda t: s.project(t, 2), (w,))
    conv = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    for name in ("channel", "spatial"):
        out = get_scheme(name).project(conv, 2)
        (g,) = torch.autograd.grad(out.square().sum(), conv)
        assert g.shape == conv.shape and bool(torch.isfinite(g).all())


def test_tucker2_projection_is_the_hosvd_truncation() -> None:
    torch.manual_seed(0)
    w = torch.randn(6, 5, 3, 3, dtype=torch.float64, requires_grad=True)
    p = get_scheme("tucker2").project(w, (2, 3))
    u0 = torch.linalg.svd(w.detach().reshape(6, -1))[0][:, :3]  # r_out = 3
    u1 = torch.linalg.svd(w.detach().permute(1, 0, 2, 3).reshape(5, -1))[0][:, :2]  # r_in = 2
    expected = torch.einsum("ab,bcij->acij", u0 @ u0.T, w.detach())
    expected = torch.einsum("cd,adij->acij", u1 @ u1.T, expected)
    torch.testing.assert_close(p.detach(), expected)
    (g,) = torch.autograd.grad(p.sum(), w)
    assert bool(torch.isfinite(g).all())


def test_cp_projection_passes_the_gradient_straight_through() -> None:
    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, requires_grad=True)
    p = get_scheme("cp").project(w, 12)
    (g,) = torch.autograd.grad(p.sum(), w)
    torch.testing.assert_close(g, torch.ones_like(w))
    assert float((p - w).detach().norm() / w.detach().norm()) < 0.5  # a fit, not the weight


@pytest.mark.parametrize("name", ["rows", "channel", "spatial", "mode1"])
def test_fold_inverts_unfold(name: str) -> None:
    shapes = {"rows": [(5, 7)], "channel": [(8, 3, 3, 3), (6, 4, 5)],
              "spatial": [(5, 4, 3, 2)], "mode1": [(5, 4, 3, 2), (6, 4, 5)]}[name]
    u = dec.get_unfolding(name)
    for shape in shapes:
        w = torch.randn(shape)
        groups = 2 if name == "channel" and len(shape) == 4 else 1
        torch.testing.assert_close(u.fold(u.matrix(w, groups), w.shape, groups), w)


def test_factors_from_stored_vectors_equal_factors_from_a_fresh_svd() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3, dtype=torch.float64)
    g = ConvGeometry(8, 16, (3, 3), (6, 6), (6, 6), (1, 1), (1, 1), (1, 1), bias=False)
    for name, unit in (("channel", "channel"), ("spatial", "spatial")):
        s = get_scheme(name)
        sp = dec.spectrum_of(w, unit, precision="float64")
        with_basis = s.factors(w, g, 5, spectra={unit: sp})
        fresh = s.factors(w, g, 5, spectra={unit: sp.without_basis()})
        rebuilt = [build_factored(s.layout(g, 5), scheme=name, rank=5, weights=ws,
                                  dtype=torch.float64) for ws in (with_basis, fresh)]
        x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
        torch.testing.assert_close(rebuilt[0](x), rebuilt[1](x))


def test_plan_only_and_unknown_schemes_are_refused_by_allocation() -> None:
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3))
    x = torch.randn(1, 4, 10, 10)
    with pytest.raises(lrfx.LrfxError, match=r"'cp' cannot be allocated: cp is plan-only"):
        lrfx.compress(model, x, macs=0.6, scheme="cp")
    with pytest.raises(lrfx.LrfxError, match=r"unknown scheme 'bogus'; choose one of auto"):
        lrfx.compress(model, x, macs=0.6, scheme="bogus")
    # but a hand-written cp plan is built
    gm = lrfx.apply(model, {"2": lrfx.LayerPlan("cp", 6)}, x)
    assert gm.get_submodule("2").scheme == "cp"


# --- adding a scheme: one registry entry -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ThreeLinear(Scheme):
    """A toy scheme: ``Linear(n -> r)``, ``Linear(r -> r)``, ``Linear(r -> m)`` (SVD with the
    singular values in a middle layer)."""

    name: str = "svd3"
    unfoldings: tuple[str, ...] = ("rows",)

    def why_not(self, g: Geometry) -> str | None:
        return None if isinstance(g, LinearGeometry) else "linear layers only"

    def max_rank(self, g: Geometry) -> tuple[int, ...]:
        self.check(g)
        assert isinstance(g, LinearGeometry)
        return (min(g.in_features, g.out_features),)

    def layout(self, g: Geometry, rank: Rank) -> tuple[Piece, ...]:
        assert isinstance(g, LinearGeometry)
        (r,) = self.ranks(rank)
        return (Piece(g.in_features, r), Piece(r, r), Piece(r, g.out_features, bias=g.bias))

    def factors(self, weight: torch.Tensor, g: Geometry, rank: Rank, *,
                spectra: Mapping[str, Spectrum] | None = None,
                whiten: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        (r,) = self.ranks(rank)
        u, s, vh = dec.truncated_svd(weight.detach().double()[None], r)
        return [vh[0], torch.diag(s[0]), u[0]]

    def project(self, weight: torch.Tensor, rank: Rank, *, groups: int = 1) -> torch.Tensor:
        (r,) = self.ranks(rank)
        return dec.project_matrix(weight, r)


@pytest.fixture
def svd3() -> Iterator[Scheme]:
    s = register_scheme(ThreeLinear())
    try:
        yield s
    finally:
        unregister_scheme("svd3")


def test_a_new_scheme_flows_through_everything(svd3: Scheme, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6))
    x = torch.randn(5, 12)
    g = LinearGeometry(12, 10, rows=5)
    assert applicable_schemes(g) == ("svd", "svd3")
    a = lrfx.analyze(model, x)
    assert a["0"].schemes == ("svd", "svd3")
    # plans, JSON, resolution
    plan = lrfx.RankPlan({"0": lrfx.LayerPlan("svd3", 10), "2": ("svd3", 3)})
    assert lrfx.RankPlan.from_json(plan.to_json()) == plan
    resolved = plan.resolve(a)
    assert resolved["0"].macs == 5 * (12 * 10 + 10 * 10 + 10 * 10)
    # rewrite: three layers, exact at full rank, cost from the cost model
    gm = lrfx.apply(model, plan, x)
    assert [type(m) for m in gm.get_submodule("0")] == [nn.Linear] * 3
    torch.testing.assert_close(gm.get_submodule("0")(x), model[0](x))
    assert lrfx.count_macs(gm, x) == gm.meta["lrfx"].plan.macs
    # save / load, no decomposition on load
    lrfx.save(gm, tmp_path)
    back = lrfx.load(tmp_path, model, x)
    with torch.no_grad():
        assert torch.equal(back(x), gm(x))
    # allocation chooses among both schemes of a linear layer
    plan2, _ = lrfx.allocate(a, params=0.7)
    assert {lp.scheme for lp in plan2.factored.values()} <= {"svd", "svd3"}
    assert plan2.params <= 0.7 * a.total_params
    with pytest.raises(lrfx.LrfxError, match="already registered"):
        register_scheme(ThreeLinear())


def test_builtins_cannot_be_unregistered() -> None:
    with pytest.raises(lrfx.LrfxError, match="built-in"):
        unregister_scheme("svd")
