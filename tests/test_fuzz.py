"""Fuzz: random layer geometries x every scheme that applies, end to end through lrfx.

For each geometry hypothesis draws (a fixed seed in CI, ``derandomize``):

* **full rank** — every applicable scheme but cp (whose full rank is no exact bound) at its
  maximum rank reproduces the layer: relative error below 1e-4;
* **half rank** — every applicable scheme at half its maximum rank: the MACs lrfx predicts for the
  plan equal the MACs it counts on the rewritten graph, and both equal ``FlopCounterMode`` / 2 on
  the rewritten model;
* the dense layer's MACs equal ``FlopCounterMode`` / 2 (transposed convolutions, which lrfx counts
  but never factors, included; a plan naming one is refused with the layer's name).

Conv geometries: Conv1d/2d/3d, asymmetric kernels, stride, integer / ``'same'`` / ``'valid'``
padding, every ``padding_mode``, dilation, groups; ConvTranspose1d/2d/3d with output padding.
Linear layers on 2-4-D inputs. ``nn.MultiheadAttention`` with ``batch_first``, ``kdim``/``vdim``,
``add_bias_kv``, ``add_zero_attn``, masks and ``need_weights``.

How many: ``LRFX_FUZZ_EXAMPLES`` geometries per test (default 250, about 1,300 checked cases in
all and a minute on one core); the counts are printed at the end of the run. Raise it for a
longer hunt: ``LRFX_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
from _rewrite_models import Wrap, conv_geometries, flop_macs, make_conv, rel_err
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lrfx

EXAMPLES = int(os.environ.get("LRFX_FUZZ_EXAMPLES", "250"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
FULL_RANK_TOL = 1e-4

#: What ran, printed by conftest's terminal summary: ``{"conv full rank": n, ...}``.
COUNTS: Counter[str] = Counter()


def _half(rank: int | tuple[int, ...]) -> int | tuple[int, ...]:
    if isinstance(rank, tuple):
        return tuple(max(1, r // 2) for r in rank)
    return max(1, rank // 2)


def _check_layer(model: nn.Module, x: torch.Tensor, kind: str) -> None:
    """Full-rank parity and half-rank MACs for every scheme lrfx offers on ``model.layer``."""
    with torch.no_grad():
        ref = model(x)
    rec = lrfx.analyze(model, x, spectra=False)["layer"]
    assert rec.macs == flop_macs(model, x), "dense MACs differ from FlopCounterMode / 2"
    COUNTS[f"{kind} dense MACs"] += 1
    assert rec.schemes, f"no scheme offered for {rec}"
    for scheme in rec.schemes:
        top = rec.max_rank(scheme)
        if scheme != "cp":
            gm = lrfx.apply(model, {"layer": lrfx.LayerPlan(scheme, top)}, x)
            with torch.no_grad():
                err = rel_err(gm(x), ref)
            assert err < FULL_RANK_TOL, f"{scheme} at full rank {top}: relative error {err:.2e}"
            COUNTS[f"{kind} full rank"] += 1
        gm = lrfx.apply(model, {"layer": lrfx.LayerPlan(scheme, _half(top))}, x)
        planned = lrfx.facts_of(gm).plan.macs
        counted = lrfx.count_macs(gm, x)
        torch_count = flop_macs(gm, x)
        assert planned == counted == torch_count, (
            f"{scheme} at rank {_half(top)}: plan {planned}, graph {counted}, torch {torch_count}")
        COUNTS[f"{kind} half-rank MACs"] += 1


@given(dims=st.sampled_from([1, 2, 3]), data=st.data())
@FUZZ
def test_conv_geometries_every_scheme(dims: int, data: st.DataObject) -> None:
    geo = data.draw(conv_geometries(dims, grouped=True))
    conv, x = make_conv(dims, geo)
    model = Wrap(conv).eval()
    if conv.groups == 1 or conv.in_channels // conv.groups > 1:
        _check_layer(model, x, "conv")
    # every non-depthwise conv can be factored channel-wise; 2-d ungrouped ones more ways
    schemes = lrfx.analyze(model, x, spectra=False)["layer"].schemes
    assert "channel" in schemes
    if dims == 2 and conv.groups == 1 and min(conv.kernel_size) > 1:
        assert {"spatial", "tucker2", "cp"} <= set(schemes)


@st.composite
def transposed_geometries(draw: st.DrawFn) -> tuple[nn.Module, torch.Tensor]:
    dims = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.integers(1, 3))
    kmax = 2 if dims == 3 else 4
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(dims))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    # at most half the dilated kernel: the output is never empty
    padding = tuple(draw(st.integers(0, d * (k - 1) // 2)) for k, d in zip(kernel, dilation,
                                                                           strict=True))
    out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation,
                                                                       strict=True))
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    torch.manual_seed(draw(st.integers(0, 2**16)))
    conv = cls(groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3)), kernel,
               stride=stride, padding=padding, output_padding=out_pad, groups=groups,
               dilation=dilation, bias=draw(st.booleans()))
    size = tuple(draw(st.integers(2, 4 if dims == 3 else 6)) for _ in range(dims))
    return conv, torch.randn(draw(st.integers(1, 2)), conv.in_channels, *size)


@given(case=transposed_geometries())
@FUZZ
def test_transposed_convs_are_counted_and_never_factored(
    case: tuple[nn.Module, torch.Tensor],
) -> None:
    conv, x = case
    model = Wrap(conv).eval()
    rec = lrfx.analyze(model, x, spectra=False)["layer"]
    assert rec.macs == flop_macs(model, x)
    assert not rec.schemes
    with pytest.raises(lrfx.UnsupportedLayerError, match="layer"):
        lrfx.apply(model, {"layer": lrfx.LayerPlan("channel", 1)}, x)
    COUNTS["transposed conv dense MACs + refusal"] += 1


@given(n=st.integers(1, 12), m=st.integers(1, 12), bias=st.booleans(),
       lead=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=st.integers(0, 2**16))
@FUZZ
def test_linear_on_2_to_4_d_inputs(n: int, m: int, bias: bool, lead: list[int], seed: int) -> None:
    torch.manual_seed(seed)
    model = Wrap(nn.Linear(n, m, bias=bias)).eval()
    _check_layer(model, torch.randn(*lead, n), "linear")


@given(heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(1, 4),
       kdim=st.sampled_from([None, 3, 6]), vdim=st.sampled_from([None, 5]),
       batch_first=st.booleans(), bias=st.booleans(), add_bias_kv=st.booleans(),
       add_zero_attn=st.booleans(), masks=st.booleans(), need_weights=st.booleans(),
       length=st.integers(1, 4), keys=st.integers(1, 5), batch=st.integers(1, 3),
       seed=st.integers(0, 2**16))
@settings(FUZZ, max_examples=max(1, EXAMPLES // 4))
def test_multihead_attention_variants(
    heads: int, head_dim: int, kdim: int | None, vdim: int | None, batch_first: bool,
    bias: bool, add_bias_kv: bool, add_zero_attn: bool, masks: bool, need_weights: bool,
    length: int, keys: int, batch: int, seed: int,
) -> None:
    torch.manual_seed(seed)
    e = heads * head_dim
    if vdim is not None and kdim is None:
        kdim = e  # torch takes separate projections as soon as either differs
    mha = nn.MultiheadAttention(e, heads, bias=bias, add_bias_kv=add_bias_kv,
                                add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim,
                                batch_first=batch_first).eval()

    def seq(n: int, d: int) -> torch.Tensor:
        return torch.randn(batch, n, d) if batch_first else torch.randn(n, batch, d)

    args = (seq(length, e), seq(keys, kdim or e), seq(keys, vdim or e))
    kwargs: dict[str, object] = {"need_weights": need_weights}
    if masks:
        kwargs["attn_mask"] = torch.randn(length, keys)
        kwargs["key_padding_mask"] = torch.randn(batch, keys)
    analysis = lrfx.analyze(mha, (args, kwargs), spectra=False)
    if need_weights:  # torch's counter misses the CPU fused-attention kernel otherwise
        assert analysis.total_macs == flop_macs(lambda: mha(*args, **kwargs)), \
            "MACs differ from FlopCounterMode / 2"
        COUNTS["attention MACs"] += 1
    plan = {r.name: lrfx.LayerPlan("svd", r.max_rank("svd")) for r in analysis.factorable}
    assert len(plan) == 4, "q, k, v and out projections are all factorable"
    gm = lrfx.apply(mha, plan, (args, kwargs))
    with torch.no_grad():
        ref, got = mha(*args, **kwargs), gm(*args, **kwargs)
    assert rel_err(got[0], ref[0]) < FULL_RANK_TOL
    if need_weights:
        assert (got[1] - ref[1]).abs().max() < 1e-5
    COUNTS["attention full rank"] += 1


def test_fuzz_ran_enough_cases() -> None:
    """The fuzz tests above ran (this file's order) and checked at least 1,000 cases at the
    default setting."""
    total = sum(COUNTS.values())
    if EXAMPLES >= 250:
        assert total >= 1000, dict(COUNTS)
