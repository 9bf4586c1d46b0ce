"""Loss-aware allocation: per-layer weights of the errors, measured on calibration data.

A model whose output is ``A(x) + 0.01 B(x)`` makes the numbers known: an error in ``B`` moves the
output 10^4 times less than the same relative error in ``A``. The weights must say so, and the
weighted plan must move rank from ``B`` to ``A`` the way they say.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import lrfx
from lrfx.errors import LrfxError
from lrfx.passes.allocation import ALLOCATORS, build_options, make_budget
from lrfx.passes.analysis import (
    SensitivityOptions,
    SlopeOptions,
    layer_sensitivity,
    measure_slopes,
)
from lrfx.pipeline import PassContext
from lrfx.plan import LayerPlan, RankPlan


class _TwoBranches(nn.Module):
    def __init__(self, scale: float = 0.01) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(24, 24)
        self.b = nn.Linear(24, 24)
        with torch.no_grad():
            self.b.weight.copy_(self.a.weight)  # the same spectra: only the output effect differs
            self.b.bias.copy_(self.a.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.scale * self.b(x)


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    mix = torch.randn(24, 24, generator=g) @ torch.diag(torch.logspace(0, -1, 24))
    return [torch.randn(64, 24, generator=g) @ mix.T for _ in range(3)]


def _analyzed(model: nn.Module) -> tuple[torch.fx.GraphModule, lrfx.Analysis]:
    gm = lrfx.trace(model)
    return gm, lrfx.run_analysis(gm, (_batches()[0][:1],), spectra=True)


@pytest.mark.parametrize("kind", ["output", "fisher"])
def test_gradient_weights_see_the_scaled_branch(kind: str) -> None:
    gm, _ = _analyzed(_TwoBranches())
    w = layer_sensitivity(gm, PassContext(options=[SensitivityOptions(_batches(), kind=kind)]))
    assert set(w) == {"a", "b"}
    assert w["a"] + w["b"] == pytest.approx(2.0)  # mean 1
    # E||g_b||^2 = 1e-4 E||g_a||^2, and the two outputs have the same norm
    assert w["b"] / w["a"] == pytest.approx(1e-4, rel=0.05)
    # the pass leaves the model's flags alone
    assert all(p.requires_grad for p in gm.parameters())


def test_measured_slopes_see_the_scaled_branch() -> None:
    gm, before = _analyzed(_TwoBranches())
    plan = RankPlan({"a": LayerPlan("svd", 4), "b": LayerPlan("svd", 4)}).resolve(before)
    errors = {n: float(before[n].spectra["rows"].tails()[4]) for n in ("a", "b")}
    assert errors["a"] == pytest.approx(errors["b"])
    w = measure_slopes(gm, PassContext(options=[SlopeOptions(_batches(), plan, errors)]))
    # slopes 1e-4 apart; the weights are their square roots
    assert w["b"] / w["a"] == pytest.approx(1e-2, rel=0.05)


def test_the_weighted_plan_moves_rank_the_way_the_weights_say() -> None:
    _, before = _analyzed(_TwoBranches())
    budget = make_budget(0.4, None, before.total_macs, before.total_params)
    options = build_options(before.layers, metric="macs")
    fixed = budget.total - sum(int(o.cost[0]) for o in options)

    def ranks(wa: float, wb: float) -> dict[str, int]:
        weighted = [o.weighted({"a": wa, "b": wb}[o.name]) for o in options]
        choice, _ = ALLOCATORS["lc"](weighted, budget, fixed)
        return {n: int(c.rank or 0) for n, c in choice.items()}

    even = ranks(1.0, 1.0)
    assert abs(even["a"] - even["b"]) <= 1  # the same layers (the budget's granularity)
    favour_a = ranks(10.0, 0.1)
    assert favour_a["a"] > max(even.values()) and favour_a["b"] < min(even.values())
    favour_b = ranks(0.1, 10.0)
    assert favour_b["b"] > max(even.values()) and favour_b["a"] < min(even.values())
    # the weighted copy leaves the options' own errors alone
    w = options[0].weighted(3.0)
    np.testing.assert_allclose(w.error, 3.0 * options[0].error)
    assert options[0].weight is None


@pytest.mark.parametrize("allocator", ["lc", "global_sigma"])
def test_compress_with_sensitivity_favours_the_branch_that_matters(allocator: str) -> None:
    model = _TwoBranches().eval()
    batches = _batches()
    x = batches[0][:1]
    plain = lrfx.compress(model, x, macs=0.6, calibration=batches, allocator=allocator)
    aware = lrfx.compress(model, x, macs=0.6, calibration=batches, allocator=allocator,
                          sensitivity="measured")
    rank = {}
    for tag, gm in (("plain", plain), ("aware", aware)):
        plan = lrfx.facts_of(gm).plan
        rank[tag] = {n: (lp.rank if lp.scheme != "dense" else 24) for n, lp in
                     ((n, plan.layers.get(n, LayerPlan("dense"))) for n in ("a", "b"))}
    assert rank["aware"]["a"] > rank["plain"]["a"]
    assert rank["aware"]["b"] < rank["plain"]["b"]
    plan = lrfx.facts_of(aware).plan
    assert set(plan.settings["sensitivity_weights"]) >= {"a", "b"}
    assert plan.settings["config"]["sensitivity"] == "measured"
    # and the output is closer to the original's
    test = _batches()[2]
    with torch.no_grad():
        ref = model(test)
        err = {t: float((g(test) - ref).norm() / ref.norm()) for t, g in (("plain", plain),
                                                                         ("aware", aware))}
    assert err["aware"] < err["plain"]


def test_bad_sensitivity_settings_are_refused() -> None:
    with pytest.raises(LrfxError, match="unknown sensitivity 'loss'"):
        lrfx.CompressConfig(macs=0.5, sensitivity="loss")
    with pytest.raises(LrfxError, match="allocator 'energy' ranks layers on their own"):
        lrfx.CompressConfig(macs=0.5, sensitivity="fisher", allocator="energy")


def test_fisher_needs_logits() -> None:
    model = nn.Sequential(nn.Linear(24, 8), nn.ReLU(), nn.Linear(8, 1))
    gm, _ = _analyzed(model)
    with pytest.raises(LrfxError, match="use sensitivity='output'"):
        layer_sensitivity(gm, PassContext(options=[SensitivityOptions(_batches(),
                                                                      kind="fisher")]))


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32))
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a + h)


def test_measured_slopes_reach_attention_projections() -> None:
    """Truncating an nn.MultiheadAttention projection is measured on a copy of the attention
    module (its packed / functional weights have no module of their own): every projection
    gets a measured weight, none is crushed to the 1e-6 floor of an unmeasured 0 slope."""
    torch.manual_seed(0)
    model = _Attention().eval()
    batches = [torch.randn(8, 10, 16) for _ in range(2)]
    gm = lrfx.compress(model, batches[0][:1], macs=0.5, calibration=batches,
                       sensitivity="measured")
    weights = gm.meta["lrfx"].extra["plan"].settings["sensitivity_weights"]
    for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert weights[f"attn.{part}"] > 1e-3, (part, weights)  # measured, not floored
    assert weights["attn.out_proj"] > 0.05 and weights["attn.v_proj"] > 0.05  # linear paths
    rows = {r["layer"]: r for r in gm.meta["lrfx"].extra["report"].layers}
    assert rows["attn.out_proj"]["rank"] > 1
