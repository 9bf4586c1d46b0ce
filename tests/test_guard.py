"""The guard against silent wrongness: output shapes checked on every rewrite, full-rank
verification on request — both name the layer, and no model is returned."""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

import pytest
import torch
from torch import nn

import lrfx

factorize_module = importlib.import_module("lrfx.passes.rewrite.factorize")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.conv(x)).flatten(1))


def test_a_rewrite_that_changes_a_layers_output_shape_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = factorize_module._Builder.build

    def wrong_stride(self: Any, layer: Any, weight: Any, bias: Any, lp: Any, **kw: Any) -> Any:
        if layer.name == "conv":  # a rewrite bug: the factored conv loses the padding
            layer = dataclasses.replace(layer, geometry=dataclasses.replace(
                layer.geometry, padding=(0, 0)))
        return original(self, layer, weight, bias, lp, **kw)

    monkeypatch.setattr(factorize_module._Builder, "build", wrong_stride)
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    # the pooling hides the shape change from the model's output: only the guard sees it
    with pytest.raises(lrfx.LrfxError, match=r"layer 'conv'.*\(2, 8, 6, 6\)"):
        lrfx.apply(model, {"conv": lrfx.LayerPlan("channel", 8)}, x)


def test_verify_names_the_layer_whose_full_rank_rewrite_is_wrong(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model, x = Net().eval(), torch.randn(2, 3, 8, 8)
    plan = {"conv": lrfx.LayerPlan("channel", 4), "fc": lrfx.LayerPlan("svd", 2)}
    lrfx.apply(model, plan, x, verify=True)  # a correct rewrite passes

    scheme = lrfx.schemes.get_scheme("svd")
    original = type(scheme).factors

    def off_by_two(self: Any, *args: Any, **kwargs: Any) -> Any:
        first, *rest = original(self, *args, **kwargs)
        return (first * 2, *rest)

    monkeypatch.setattr(type(scheme), "factors", off_by_two)
    with pytest.raises(lrfx.LrfxError, match=r"verify: layer 'fc'"):
        lrfx.apply(model, plan, x, verify=True)
    monkeypatch.undo()
    lrfx.compress(model, x, macs=0.5, verify=True)  # a correct compression passes
