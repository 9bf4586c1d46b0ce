"""A sample of the torchvision zoo: a full-rank plan for every factorable layer is exact.

Random weights (nothing is downloaded), small inputs; BN statistics are set from one batch so the
networks' outputs are not vanishingly small (which would make parity vacuous).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from _rewrite_models import calibrate_bn, rel_err
from torch import nn
from torchvision import models as tvm

import lrfx
from lrfx.modules import Factored, LowRankMultiheadAttention


def _vit() -> nn.Module:
    vit = tvm.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    nn.init.normal_(vit.heads.head.weight, std=0.1)  # torchvision zero-initializes the head
    return vit


def _swin() -> nn.Module:
    return tvm.SwinTransformer(
        patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4],
        num_classes=10,
    )


ZOO: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "resnet18": (tvm.resnet18, 64),
    "mobilenet_v3_small": (tvm.mobilenet_v3_small, 64),
    "squeezenet1_0": (tvm.squeezenet1_0, 64),
    "shufflenet_v2_x0_5": (tvm.shufflenet_v2_x0_5, 64),
    "efficientnet_b0": (tvm.efficientnet_b0, 64),
    "regnet_x_400mf": (tvm.regnet_x_400mf, 64),
    "vit_tiny": (_vit, 32),
    "swin_tiny": (_swin, 32),
}


def full_rank_plan(a: lrfx.Analysis) -> dict[str, lrfx.LayerPlan]:
    """svd for Linear, channel for convs, each at its maximal rank, for every factorable layer."""
    plan = {}
    for rec in a.factorable:
        scheme = "svd" if rec.kind == "linear" else "channel"
        assert scheme in rec.schemes, rec.name
        rank = rec.max_rank(scheme)
        assert isinstance(rank, int)
        plan[rec.name] = lrfx.LayerPlan(scheme, rank)
    return plan


@pytest.mark.parametrize("name", list(ZOO))
def test_full_rank_plan_reproduces_the_zoo_model(name: str) -> None:
    torch.manual_seed(0)
    factory, size = ZOO[name]
    model = calibrate_bn(factory(), torch.randn(4, 3, size, size))
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = model(x)
    assert float(ref.std()) > 1e-3  # the parity check below is not vacuous

    a = lrfx.analyze(model, x, spectra=False)
    plan = full_rank_plan(a)
    assert len(plan) >= 7
    gm = lrfx.apply(model, plan, x)
    assert not gm.training
    factored = [n for n, m in gm.named_modules() if isinstance(m, Factored)]
    assert sorted(factored) == sorted(plan)  # attention projections too, inside their module
    with torch.no_grad():
        got = gm(x)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-4
    ex = gm.meta["lrfx"].extra
    assert ex["macs_after"] == ex["plan"].macs
    # at full rank r*(m+n) >= m*n: a full-rank factorization never saves MACs
    assert ex["macs_after"] > ex["macs_before"]


def test_swin_window_attention_projections_are_reported_not_factorable() -> None:
    torch.manual_seed(0)
    model = _swin().eval()
    x = torch.randn(1, 3, 32, 32)
    a = lrfx.analyze(model, x, spectra=False)
    attn = [r for r in a if r.name.endswith((".attn.qkv", ".attn.proj"))]
    assert [r.name for r in attn] == [
        "features.1.0.attn.qkv", "features.1.0.attn.proj",
        "features.3.0.attn.qkv", "features.3.0.attn.proj",
    ]
    for rec in attn:
        assert not rec.factorable
        assert rec.kind == "linear"
        assert "shifted_window_attention" in rec.note
    with pytest.raises(lrfx.UnsupportedLayerError, match="shifted_window_attention"):
        lrfx.apply(model, {"features.1.0.attn.qkv": lrfx.LayerPlan("svd", 8)}, x)
    # the MLP layers next to them are ordinary Linear layers and are factorable
    assert a["features.1.0.mlp.0"].factorable


def test_vit_attention_is_replaced_by_the_low_rank_module() -> None:
    torch.manual_seed(0)
    model = _vit().eval()
    x = torch.randn(1, 3, 32, 32)
    gm = lrfx.apply(model, full_rank_plan(lrfx.analyze(model, x, spectra=False)), x)
    mods = dict(gm.named_modules())
    attn = [n for n, m in mods.items() if isinstance(m, LowRankMultiheadAttention)]
    assert attn == [f"encoder.layers.encoder_layer_{i}.self_attention" for i in range(2)]
    assert isinstance(mods["conv_proj"], Factored) and mods["conv_proj"].scheme == "channel"
