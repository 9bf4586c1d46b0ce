"""Data-aware (whitened, SVD-LLM) factorization, algorithms.md §5.

With ``S S^T = X X^T`` the truncation of ``W S`` minimizes the output error ``||(W - W') X||_F``,
and each dropped singular value is exactly the output error it causes.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _rewrite_models import Wrap, effective_weight
from torch import nn

import lrfx
from lrfx.decompositions import channel_factors, linear_factors, spatial_factors, unfold
from lrfx.passes.analysis.activations import (
    DAMPING,
    collect_input_stats,
    whitened_spectra,
    whitening_factor,
)
from lrfx.passes.rewrite import factorize
from lrfx.pipeline import PassContext


def _anisotropic(d: int, n: int, seed: int = 0) -> torch.Tensor:
    """``(d, n)`` samples whose covariance spans 4 orders of magnitude, in a random basis."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -2, d, dtype=torch.float64)
    return q @ (scales[:, None] * torch.randn(d, n, generator=g, dtype=torch.float64))


def _out_err(w: torch.Tensor, w2: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - w2) @ x).norm())


# --- Linear ---------------------------------------------------------------------------------------


def test_linear_output_error_is_the_whitened_tail() -> None:
    m, n = 16, 24
    x = _anisotropic(n, 2000)
    w = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.cholesky(x @ x.T)  # exact whitening, no damping
    sv = torch.linalg.svdvals(w @ s)
    for r in (1, 3, 6, 10):
        first, second = linear_factors(w, r, whiten=s)
        assert first.shape == (r, n) and second.shape == (m, r)
        err_w = _out_err(w, second @ first, x)
        tail = float(sv[r:].square().sum().sqrt())
        assert err_w == pytest.approx(tail, rel=1e-7)
        pf, ps = linear_factors(w, r)
        err_p = _out_err(w, ps @ pf, x)
        assert err_w < 0.9 * err_p, (r, err_w, err_p)
        # plain SVD is still the better *weight* approximation
        assert (w - ps @ pf).norm() <= (w - second @ first).norm() + 1e-9


def test_linear_full_rank_whitened_reproduces_the_weight() -> None:
    x = _anisotropic(12, 500)
    w = torch.randn(8, 12, dtype=torch.float64)
    s = torch.linalg.cholesky(x @ x.T)
    first, second = linear_factors(w, 8, whiten=s)
    torch.testing.assert_close(second @ first, w, rtol=1e-8, atol=1e-8)
    # float32 weight, batched (1, n, n) factor: same result, float64 out
    first, second = linear_factors(w.float(), 8, whiten=s.unsqueeze(0).float())
    assert first.dtype == torch.float64
    torch.testing.assert_close(second @ first, w, rtol=1e-4, atol=1e-4)


def test_linear_damped_whitening_error_is_the_tail_up_to_the_damping() -> None:
    """With ``S S^T = G + d I`` (G = XX^T / count): tail^2 = err^2 / count + d ||W - W'||^2."""
    m, n, count = 10, 20, 3000
    x = _anisotropic(n, count, seed=3)
    w = torch.randn(m, n, dtype=torch.float64)
    gram = x @ x.T
    s = whitening_factor(gram.unsqueeze(0), count)[0]
    d = DAMPING * float(torch.diagonal(gram).mean()) / count
    torch.testing.assert_close(s @ s.T, gram / count + d * torch.eye(n, dtype=torch.float64))
    sv = torch.linalg.svdvals(w @ s)
    for r in (2, 5, 9):
        first, second = linear_factors(w, r, whiten=s)
        delta = w - second @ first
        err2 = _out_err(w, second @ first, x) ** 2
        tail2 = float(sv[r:].square().sum())
        assert tail2 == pytest.approx(err2 / count + d * float(delta.square().sum()), rel=1e-8)
        assert err2 / count <= tail2


def test_linear_stats_and_whitened_spectra_through_the_passes() -> None:
    """collect_input_stats accumulates XX^T over batches; whitened_spectra is svd(W S)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16)).double()
    x = _anisotropic(24, 600, seed=5).T.contiguous()  # (600, 24) rows
    batches = [x[:200], x[200:450], x[450:]]
    gm = lrfx.trace(model)
    before = lrfx.run_analysis(gm, (x[:1],), spectra=True)
    stats = collect_input_stats(gm, PassContext(options={"calibration": batches}))
    st = stats["0"]
    assert st.count == 600
    torch.testing.assert_close(st.grams["rows"][0], x.T @ x)
    spectra, factors = whitened_spectra(gm, before.layers, stats)
    s = factors["0"]["rows"]
    expect = torch.linalg.svdvals(model[0].weight.detach().double() @ s[0])
    torch.testing.assert_close(spectra["0"]["rows"].values[0], expect)
    # the statistics pass leaves the module's state alone
    assert not model[0]._forward_pre_hooks
    assert not gm.get_submodule("0")._forward_pre_hooks


# --- Conv, channel scheme -------------------------------------------------------------------------


def _conv_data(c: int, seed: int, batch: int = 8, size: int = 10) -> torch.Tensor:
    """Images with channels mixed by a badly conditioned matrix and spatially smoothed."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(c, c, generator=g) @ torch.diag(torch.logspace(0, -2, c))
    z = torch.randn(batch, c, size + 2, size + 2, generator=g)
    z = nn.functional.avg_pool2d(z, 3, stride=1)
    return torch.einsum("dc,bchw->bdhw", mix, z)


def test_conv_channel_factors_whitened_by_im2col_statistics() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 12, 3, padding=1, bias=False).double()
    x = _conv_data(6, 1).double()
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 54)
    gram = patches.T @ patches
    s = torch.linalg.cholesky(gram).unsqueeze(0)
    w = conv.weight.detach()
    sv = torch.linalg.svdvals(unfold(w, "channel")[0] @ s[0])
    for r in (2, 4, 8):
        first, second = channel_factors(w, r, whiten=s)
        wf = (second.reshape(12, r) @ first.reshape(r, -1)).reshape_as(w)
        err_w = float((nn.functional.conv2d(x, wf - w, padding=1)).norm())
        assert err_w == pytest.approx(float(sv[r:].square().sum().sqrt()), rel=1e-6)
        pf, ps = channel_factors(w, r)
        wp = (ps.reshape(12, r) @ pf.reshape(r, -1)).reshape_as(w)
        err_p = float((nn.functional.conv2d(x, wp - w, padding=1)).norm())
        assert err_w < err_p
    first, second = channel_factors(w, 12, whiten=s)
    torch.testing.assert_close((second.reshape(12, 12) @ first.reshape(12, -1)).reshape_as(w), w)


def test_conv_spatial_full_rank_whitened_reproduces_the_weight() -> None:
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64)
    v = _anisotropic(12, 400).T
    s = torch.linalg.cholesky(v.T @ v)
    vertical, horizontal = spatial_factors(w, 12, whiten=s)
    rebuilt = torch.einsum("rci,nrj->ncij", vertical[..., 0], horizontal[:, :, 0, :])
    torch.testing.assert_close(rebuilt, w)


class _TwoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


def _rewrite(model: nn.Module, inputs: torch.Tensor, plan: lrfx.RankPlan,
             batches: list[torch.Tensor] | None) -> tuple[torch.fx.GraphModule, object]:
    gm = lrfx.trace(copy.deepcopy(model))
    before = lrfx.run_analysis(gm, (inputs,), spectra=True)
    spectra = whitening = None
    if batches is not None:
        stats = collect_input_stats(gm, PassContext(options={"calibration": batches}))
        spectra, whitening = whitened_spectra(gm, before.layers, stats)
    factorize(gm, PassContext(options={"plan": plan.resolve(before), "whitening": whitening or {}}))
    return gm, (stats if batches is not None else None, spectra)


def test_whitened_rewrite_has_lower_output_error_at_the_same_plan() -> None:
    """Only conv2 is factored, so the model output is conv2's output: the whitened factors must
    do better on the calibration data, and their error is the whitened spectrum's tail."""
    torch.manual_seed(0)
    model = _TwoConv().eval()
    batches = [_conv_data(4, s, batch=4) for s in range(3)]
    rank = 4
    plan = lrfx.RankPlan({"conv2": ("channel", rank)})
    plain, _ = _rewrite(model, batches[0][:1], plan, None)
    white, (stats, spectra) = _rewrite(model, batches[0][:1], plan, batches)
    assert type(white.get_submodule("conv2")).__name__ == "Factored"

    def err2(gm: torch.fx.GraphModule) -> float:
        with torch.no_grad():
            return sum(float((gm(x).double() - model(x).double()).square().sum()) for x in batches)

    e_plain, e_white = err2(plain), err2(white)
    assert e_white < 0.8 * e_plain, (e_white, e_plain)
    # the tail of the whitened spectrum predicts the error (damping adds d * ||dW||^2 >= 0)
    st = stats["conv2"]
    assert st.count == sum(x.shape[0] * 100 for x in batches)  # 10x10 output positions
    sv = spectra["conv2"]["channel"].values[0]
    tail2 = float(sv[rank:].square().sum())
    assert e_white / st.count <= tail2 * (1 + 1e-4)
    assert e_white / st.count >= 0.98 * tail2
    # the effective weight of the whitened factors is not the plain truncation
    w_white = effective_weight(white.get_submodule("conv2"))
    w_plain = effective_weight(plain.get_submodule("conv2"))
    assert not torch.allclose(w_white, w_plain, atol=1e-4)


def test_compress_whitened_beats_plain_at_the_same_plan() -> None:
    """One conv: lrfx.compress with calibration vs lrfx.apply of the same plan (plain SVD)."""
    torch.manual_seed(0)
    model = Wrap(nn.Conv2d(8, 16, 3, padding=1)).eval()
    batches = [_conv_data(8, s, batch=4) for s in range(3)]
    gm = lrfx.compress(model, batches[0][:1], macs=0.4, scheme="channel", calibration=batches)
    report = gm.meta["lrfx"].extra["report"]
    assert report.whitened and [row["scheme"] for row in report.layers] == ["channel"]
    plan = gm.meta["lrfx"].extra["plan"]
    plain = lrfx.apply(model, lrfx.RankPlan(dict(plan.factored)), batches[0][:1])
    with torch.no_grad():
        e_white = sum(float((gm(x) - model(x)).norm() ** 2) for x in batches)
        e_plain = sum(float((plain(x) - model(x)).norm() ** 2) for x in batches)
    assert e_white < e_plain
    # the predicted (relative) error is that of the output, not of the weight
    with torch.no_grad():
        rel = e_white / sum(float((model(x) - model.layer.bias[:, None, None]).norm() ** 2)
                            for x in batches)
    assert report.layers[0]["error"] == pytest.approx(rel, rel=0.05)


def test_unfoldings_wider_than_max_dim_keep_plain_spectra() -> None:
    """A conv whose im2col rows are wider than ``max_dim`` gets no Gram (it would not fit in
    memory on real networks: 65,536 columns for CREPE's second conv); narrower layers do."""
    from lrfx.passes.analysis.activations import CalibrationOptions

    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1))
    gm = lrfx.trace(model)
    x = torch.randn(2, 4, 6, 6)
    lrfx.run_analysis(gm, (x,), spectra=False)
    opts = CalibrationOptions(calibration=[x, x], max_dim=40)  # 4*3*3 = 36 fits, 8*3*3 does not
    stats = collect_input_stats(gm, PassContext(options=[opts]))
    assert "channel" in stats["0"].grams and stats["0"].count == 2 * 2 * 36
    assert "channel" not in stats["1"].grams and "spatial" in stats["1"].grams  # 8*3 = 24
    assert stats["1"].count > 0  # spatial rows count when the channel Gram is skipped


@pytest.mark.parametrize("block", [37, 1 << 14])
def test_conv_grams_in_float32_blocks_match_the_float64_gram(block: int,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    import lrfx.passes.analysis.activations as act
    import lrfx.passes.analysis.grams as grams

    monkeypatch.setattr(act, "BLOCK_ROWS", block)  # many blocks and pieces, or one
    monkeypatch.setattr(grams, "BLOCK", block)
    monkeypatch.setattr(act, "CHUNK_BYTES", block)  # one sample per call, or the batch
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(5, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 4)).eval()
    batches = [torch.randn(7, 5, 11, 11) for _ in range(3)]
    gm = lrfx.trace(net, batches[0])
    from lrfx.api import _feed
    from lrfx.passes.analysis import CalibrationOptions, annotate_costs, propagate_shapes

    ctx = PassContext(example_inputs=_feed(gm, batches[0]),
                      options=[CalibrationOptions(calibration=batches)])
    propagate_shapes(gm, ctx)
    annotate_costs(gm, ctx)
    stats = collect_input_stats(gm, ctx)
    x = torch.cat(batches).double()
    rows = nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 45)
    torch.testing.assert_close(stats["0"].grams["channel"][0], rows.T @ rows, rtol=1e-5,
                               atol=1e-4)
    vert = nn.functional.unfold(nn.functional.pad(x, (1, 1, 1, 1)), (3, 1), stride=(2, 1))
    vert = vert.transpose(1, 2).reshape(-1, 15)
    torch.testing.assert_close(stats["0"].grams["spatial"][0], vert.T @ vert, rtol=1e-5,
                               atol=1e-4)
    assert stats["0"].count == rows.shape[0]
    with torch.no_grad():
        h = net[2](net[1](net[0](x.float()))).double()
    torch.testing.assert_close(stats["3"].grams["rows"][0], h.T @ h, rtol=1e-5, atol=1e-4)


def test_tucker2_whitened_error_is_an_output_error_bound() -> None:
    """Whitened Tucker-2: the allocator's error is a relative *output* error (like the other
    schemes') that bounds the layer's measured output error, and the data-aware factors beat
    the plain HOOI ones on that data at the same ranks."""
    torch.manual_seed(0)
    model = Wrap(nn.Conv2d(8, 24, 3, padding=1)).eval()
    scale = torch.tensor([5.0, 3, 1, 0.5, 0.2, 0.1, 0.05, 0.02]).view(1, 8, 1, 1)
    batches = [torch.randn(8, 8, 10, 10) * scale for _ in range(3)]
    gm = lrfx.compress(model, batches[0][:1], macs=0.45, scheme="tucker2", calibration=batches,
                       sequential=False)
    report = gm.meta["lrfx"].extra["report"]
    plan = gm.meta["lrfx"].extra["plan"]
    assert report.whitened and [row["scheme"] for row in report.layers] == ["tucker2"]
    plain = lrfx.apply(model, lrfx.RankPlan(dict(plan.factored)), batches[0][:1])
    bias = model.layer.bias[:, None, None]
    with torch.no_grad():
        ref = sum(float((model(x) - bias).norm() ** 2) for x in batches)
        e_white = sum(float((gm(x) - model(x)).norm() ** 2) for x in batches) / ref
        e_plain = sum(float((plain(x) - model(x)).norm() ** 2) for x in batches) / ref
    predicted = report.layers[0]["error"]
    assert e_white <= predicted * (1 + 1e-3)  # an upper bound ...
    assert e_white >= 0.8 * predicted  # ... and a tight one
    assert e_white < 0.5 * e_plain, (e_white, e_plain)
    # plain allocation keeps the weight-relative HOSVD bound
    plain_spectra = lrfx.compress(model, batches[0][:1], macs=0.45, scheme="tucker2")
    assert not plain_spectra.meta["lrfx"].extra["report"].whitened


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 48)
        self.attn = nn.MultiheadAttention(48, 4, batch_first=True)
        self.out = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(a + h)


def test_attention_projections_are_whitened() -> None:
    """nn.MultiheadAttention's q/k/v (packed) and out projections get input statistics (the
    call is replayed with hooks), whitened spectra and factors: the predicted error of a
    projection is its measured output error, and the whitened model beats plain SVD."""
    torch.manual_seed(0)
    model = _Attention().eval()
    mix = torch.randn(12, 12) @ torch.diag(torch.logspace(0, -2, 12))
    batches = [torch.randn(8, 10, 12) @ mix for _ in range(4)]
    gm = lrfx.compress(model, batches[0][:1], macs=0.5, calibration=batches, sequential=False)
    report, plan = gm.meta["lrfx"].extra["report"], gm.meta["lrfx"].extra["plan"]
    rows = {row["layer"]: row for row in report.layers}
    assert report.whitened and {"attn.q_proj", "attn.v_proj", "attn.out_proj"} <= set(rows)
    x = torch.cat(batches)
    with torch.no_grad():
        h = model.inp(x)
        w, b = model.attn.in_proj_weight[96:], model.attn.in_proj_bias[96:]
        y = h @ w.T
        y_r = gm.get_submodule("attn").v_proj(h) - b
        measured = float((y - y_r).square().sum() / y.square().sum())
    assert measured == pytest.approx(rows["attn.v_proj"]["error"], rel=0.05)
    plain = lrfx.apply(model, lrfx.RankPlan(dict(plan.factored)), batches[0][:1])
    with torch.no_grad():
        e_white = float((gm(x) - model(x)).square().sum())
        e_plain = float((plain(x) - model(x)).square().sum())
    assert e_white < 0.1 * e_plain


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cw = nn.Parameter(torch.randn(16, 3, 3, 3))
        self.w = nn.Parameter(torch.randn(24, 16) / 4)
        self.b = nn.Parameter(torch.zeros(24))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.conv2d(x, self.cw, padding=1, stride=2).mean((2, 3))
        return nn.functional.linear(h, self.w, self.b)


def test_functional_layers_get_statistics_and_whitened_factors() -> None:
    """``F.conv2d`` / ``F.linear`` layers have no module to hook: the calibration run reads
    their inputs from the graph interpreter, so they are whitened like modules."""
    torch.manual_seed(0)
    model = _Functional().eval()
    scale = torch.tensor([3.0, 0.1, 0.01]).view(1, 3, 1, 1)
    batches = [torch.randn(4, 3, 8, 8) * scale for _ in range(3)]
    from lrfx.api import _feed
    from lrfx.passes.analysis import CalibrationOptions, annotate_costs, propagate_shapes

    gm = lrfx.trace(model, batches[0])
    ctx = PassContext(example_inputs=_feed(gm, batches[0]),
                      options=[CalibrationOptions(calibration=batches)])
    propagate_shapes(gm, ctx)
    annotate_costs(gm, ctx)
    stats = collect_input_stats(gm, ctx)
    x = torch.cat(batches).double()
    rows = nn.functional.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 27)
    torch.testing.assert_close(stats["cw"].grams["channel"][0], rows.T @ rows, rtol=1e-5,
                               atol=1e-4)
    with torch.no_grad():
        h = nn.functional.conv2d(x.float(), model.cw, padding=1, stride=2).mean((2, 3)).double()
    torch.testing.assert_close(stats["w"].grams["rows"][0], h.T @ h, rtol=1e-5, atol=1e-4)
    # and compress uses them: the conv's predicted error is an output error, and small
    out = lrfx.compress(model, batches[0][:1], macs=0.6, calibration=batches, sequential=False)
    plain = lrfx.compress(model, batches[0][:1], macs=0.6)
    with torch.no_grad():
        xs = torch.cat(batches)
        e_white = float((out(xs) - model(xs)).square().sum())
        e_plain = float((plain(xs) - model(xs)).square().sum())
    assert e_white < 0.1 * e_plain
