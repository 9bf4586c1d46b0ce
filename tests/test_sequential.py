"""Sequential calibration (algorithms.md §5): each layer is fitted to the inputs the compressed
layers before it give it, towards the original model's output of that layer.

The checks: the closed form is optimal for the data it saw (a gradient descent from it finds
nothing better) and equals the one-shot whitened truncation when nothing before it changed; the
statistics come from the compressed prefix (the walk's errors are the finished model's errors,
measured with hooks); a last-piece refit lowers a spatial layer's error; layers the walk cannot
run keep their factors and say why; module mode and bad settings are refused clearly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrfx
from lrfx.decompositions import fit_low_rank, inverse_sqrt, least_squares
from lrfx.errors import LrfxError
from lrfx.modules import Factored
from lrfx.passes.rewrite import RefitOptions, estimate_memory, refit_factors
from lrfx.pipeline import PassContext
from lrfx.plan import LayerPlan, RankPlan


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 8), nn.Tanh(),
                         nn.Linear(8, 6)).double().eval()


def _data(n: int = 400, d: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, -1.5, d, dtype=torch.float64))
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix.T


def _analyzed(model: nn.Module, x: torch.Tensor) -> tuple[torch.fx.GraphModule, lrfx.Analysis]:
    gm = lrfx.trace(model)
    return gm, lrfx.run_analysis(gm, (x[:1],), spectra=True)


def _refit(gm: torch.fx.GraphModule, before: lrfx.Analysis, plan: dict[str, LayerPlan],
           batches: list[torch.Tensor], **kw: object) -> lrfx.passes.rewrite.Refit:
    resolved = RankPlan(plan).resolve(before)
    return refit_factors(gm, PassContext(options=[RefitOptions(resolved, batches, **kw)]))


# --- the closed form -----------------------------------------------------------------------------


def test_fit_low_rank_is_the_whitened_truncation_when_inputs_are_unchanged() -> None:
    """x~ = x: min ||W x - L x|| over rank r is the SVD-LLM truncation, error = whitened tail."""
    x = _data().T  # (d, n)
    w = torch.randn(9, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    c = x @ x.T / x.shape[1]
    left, right = fit_low_rank(w[None], c[None], c[None], 4)
    err = float(((w - (left @ right)[0]) @ x).norm() ** 2)
    lam, q = torch.linalg.eigh(c)
    s = q * lam.sqrt()  # a square root of c (no damping)
    tail = torch.linalg.svdvals(w @ s)[4:].pow(2).sum() * x.shape[1]
    assert err == pytest.approx(float(tail), rel=1e-4)
    assert err >= float(tail) * (1 - 1e-9)  # the tail is the optimum
    # the robust square root of inverse_sqrt whitens: S^+ C S^+^T = I
    q2, inv = inverse_sqrt(c, damping=0.0)
    white = (inv[:, None] * q2.T) @ c @ (q2 * inv)
    torch.testing.assert_close(white, torch.eye(12, dtype=torch.float64), atol=1e-8, rtol=0)


def test_fit_low_rank_corrects_for_changed_inputs_and_is_optimal() -> None:
    x = _data().T
    g = torch.Generator().manual_seed(3)
    xt = x + 0.2 * torch.randn(x.shape, generator=g, dtype=torch.float64)  # the compressed input
    w = torch.randn(9, 12, dtype=torch.float64, generator=g)
    n = x.shape[1]
    left, right = fit_low_rank(w[None], (x @ xt.T / n)[None], (xt @ xt.T / n)[None], 4)

    def objective(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (w @ x - a @ b @ xt).pow(2).sum()

    best = float(objective(left[0], right[0]))
    # a gradient descent on both factors from the closed form finds nothing better
    a = left[0].clone().requires_grad_(True)
    b = right[0].clone().requires_grad_(True)
    opt = torch.optim.Adam([a, b], lr=1e-3)
    for _ in range(300):
        opt.zero_grad()
        loss = objective(a, b)
        loss.backward()
        opt.step()
    assert float(objective(a, b).detach()) >= best * (1 - 1e-6)
    # and it beats the truncation that ignores the changed inputs
    c = x @ x.T / n
    l0, r0 = fit_low_rank(w[None], c[None], c[None], 4)
    assert best < 0.9 * float(objective(l0[0], r0[0]))


def test_least_squares_handles_rank_deficient_inputs() -> None:
    g = torch.Generator().manual_seed(4)
    z = torch.randn(6, 300, generator=g, dtype=torch.float64)
    z[2] = 0.0  # a dead channel: the Gram is singular, Cholesky would fail
    a_true = torch.randn(5, 6, generator=g, dtype=torch.float64)
    a_true[:, 2] = 0.0
    y = a_true @ z
    a = least_squares((y @ z.T / 300)[None], (z @ z.T / 300)[None])[0]
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, a_true, atol=1e-4, rtol=1e-4)


# --- the walk ---------------------------------------------------------------------------------


def test_first_layer_fit_equals_the_one_shot_fit_and_later_layers_see_the_prefix() -> None:
    model = _mlp()
    x = _data()
    batches = [x[:150], x[150:]]
    gm, before = _analyzed(model, x)
    refit = _refit(gm, before, {"0": LayerPlan("svd", 3), "2": LayerPlan("svd", 3)}, batches)
    assert refit.methods == {"0": "joint", "2": "joint"}
    # layer 0 sees the original inputs: its fit is the centered closed form on them
    xc = x - x.mean(0)
    c = xc.T @ xc / len(x)
    left, right = fit_low_rank(model[0].weight.detach()[None], c[None], c[None], 3)
    got = refit.weights["0"][1] @ refit.weights["0"][0]
    torch.testing.assert_close(got, (left @ right)[0], atol=1e-8, rtol=1e-6)
    # layer 2 was fitted to what compressed layer 0 gives it: its fit is optimal on those
    w0, b0 = refit.weights["0"], refit.biases["0"]
    torch.set_grad_enabled(False)
    h = torch.relu(model[0](x))
    ht = torch.relu(x @ (w0[1] @ w0[0]).T + b0)
    y = model[2](h)
    w2, b2 = refit.weights["2"], refit.biases["2"]
    fitted = ht @ (w2[1] @ w2[0]).T + b2
    err = float((y - fitted).pow(2).sum() / y.pow(2).sum())
    assert refit.errors["2"] == pytest.approx(err, rel=1e-6)
    # ... better than the same rank fitted to the original inputs (the one-shot way)
    hc = h - h.mean(0)
    c2 = hc.T @ hc / len(h)
    l2, r2 = fit_low_rank(model[2].weight.detach()[None], c2[None], c2[None], 3)
    m2 = (l2 @ r2)[0]
    b_one = model[2].bias + (model[2].weight - m2) @ h.mean(0)
    one_shot = float((y - (ht @ m2.T + b_one)).pow(2).sum() / y.pow(2).sum())
    torch.set_grad_enabled(True)
    assert err < one_shot


class _Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.conv3 = nn.Conv2d(24, 24, 3, stride=2, padding=1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x))) + x.repeat(1, 2, 1, 1)[:, :24]
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def _cnn() -> nn.Module:
    """Random weights, BN statistics of the data (as a trained model has)."""
    torch.manual_seed(0)
    m = _Cnn()
    lrfx.recalibrate_bn(m, [_images(64, 100)])
    return m.eval()


def _images(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.avg_pool2d(torch.randn(n, 3, 14, 14, generator=g), 3, stride=1)


def _layer_outputs(model: nn.Module, names: list[str], batches: list[torch.Tensor]
                   ) -> dict[str, list[torch.Tensor]]:
    """Each named module's output per batch (hooks; the output of a factored layer is its last
    piece's)."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    for n in names:
        m = model.get_submodule(n)
        target = m[-1] if isinstance(m, Factored) else m
        handles.append(target.register_forward_hook(
            lambda _m, _a, y, n=n: out[n].append(y.detach())))
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return out


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_walk_errors_are_the_compressed_models_errors(scheme: str) -> None:
    """The statistics come from the compressed prefix: what the walk measured for each layer is
    its output error in the finished, BN-recalibrated model (hooks on both models)."""
    model = _cnn()
    batches = [_images(32, 1), _images(32, 2)]
    gm = lrfx.compress(model, batches[0][:1], macs=0.5, calibration=batches, scheme=scheme,
                       sequential=True, exclude=["fc"])
    report = lrfx.facts_of(gm).report
    assert report.sequential and lrfx.facts_of(gm).plan.settings["sequential"] is True
    names = [r["layer"] for r in report]
    assert names, "nothing factored"
    ref = _layer_outputs(model, names, batches)
    got = _layer_outputs(gm, names, batches)
    for row in report:
        n = row["layer"]
        num = sum(float((a - b).double().pow(2).sum()) for a, b in zip(ref[n], got[n],
                                                                         strict=True))
        den = sum(float(a.double().pow(2).sum()) for a in ref[n])
        assert row["output_error"] == pytest.approx(num / den, rel=1e-3, abs=1e-6), n
        assert row["fit"] == ("joint" if scheme == "channel" else "last")


def test_sequential_lowers_the_output_error_of_the_model() -> None:
    model = _cnn()
    batches = [_images(32, 1), _images(32, 2)]
    test = _images(64, 9)
    ref = model(test)
    errs = {}
    for seq in (False, True):
        gm = lrfx.compress(model, test[:1], macs=0.4, calibration=batches, sequential=seq,
                           scheme="channel")
        errs[seq] = float((gm(test) - ref).detach().norm() / ref.detach().norm())
    assert errs[True] < 0.8 * errs[False], errs


def test_last_piece_refit_beats_the_one_shot_spatial_factors() -> None:
    """Spatial: the horizontal factor and bias refit by least squares to the original output."""
    model = _cnn()
    batches = [_images(32, 1), _images(32, 2)]
    gm, before = _analyzed(model, batches[0])
    lrfx.passes.analysis.collect_input_stats(gm, PassContext(options={"calibration": batches}))
    lrfx.passes.analysis.compute_spectra(gm, PassContext())
    before = lrfx.Analysis.from_graph(gm)
    r = before["conv3"].max_rank("spatial")
    rank = max(1, (r[0] if isinstance(r, tuple) else r) // 4)
    refit = _refit(gm, before, {"conv3": LayerPlan("spatial", rank)}, batches)
    assert refit.methods["conv3"] == "last"
    # the same layer with the spectra's factors as they are
    plain = lrfx.apply(model, RankPlan({"conv3": LayerPlan("spatial", rank)}), batches[0][:1])
    ref = _layer_outputs(model, ["conv3"], batches)["conv3"]
    one = _layer_outputs(plain, ["conv3"], batches)["conv3"]
    one_err = sum(float((a - b).pow(2).sum()) for a, b in zip(ref, one, strict=True)) / sum(
        float(a.pow(2).sum()) for a in ref)
    assert refit.errors["conv3"] < one_err


class _WithFunctional(nn.Module):
    """A functional linear (not walked) before a module the walk fits."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 12, dtype=torch.float64) / 4)
        self.head = nn.Linear(16, 10).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(F.linear(x, self.w)))


def test_layers_the_walk_cannot_run_keep_their_factors_and_still_shape_the_prefix() -> None:
    torch.manual_seed(0)
    model = _WithFunctional().eval()
    x = _data()
    batches = [x[:200], x[200:]]
    gm = lrfx.compress(model, x[:1], macs=0.5, calibration=batches, sequential=True)
    report = lrfx.facts_of(gm).report
    rows = {r["layer"]: r for r in report}
    assert set(rows) == {"w", "head"}, rows
    assert rows["w"]["fit"].startswith("spectra (") and rows["w"]["output_error"] is None
    assert rows["head"]["fit"] == "joint"
    # the walk fitted head to the low-rank functional layer's outputs: its error is the
    # finished model's
    with torch.no_grad():
        ref, got = model(x), gm(x)
    err = float((ref - got).pow(2).sum() / ref.pow(2).sum())
    assert rows["head"]["output_error"] == pytest.approx(err, rel=1e-6)


class _WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(a)


def test_attention_projections_shape_the_prefix() -> None:
    """The walk cannot refit inside nn.MultiheadAttention, but the prefix the layers after it
    are fitted to has the attention's low-rank projections: the measured error of the last
    layer is the finished model's."""
    torch.manual_seed(0)
    model = _WithAttention().eval()
    x = torch.randn(64, 6, 32) @ torch.diag(torch.logspace(0, -1.5, 32))
    gm = lrfx.compress(model, x[:1], macs=0.5, calibration=[x[:32], x[32:]], sequential=True)
    rows = {r["layer"]: r for r in lrfx.facts_of(gm).report}
    assert rows["head"]["fit"] == "joint" and rows["attn.out_proj"]["fit"].startswith("spectra")
    with torch.no_grad():
        ref, got = model(x), gm(x)
    err = float((ref - got).pow(2).sum() / ref.pow(2).sum())
    assert rows["head"]["output_error"] == pytest.approx(err, rel=1e-5)


# --- settings and refusals --------------------------------------------------------------------


def test_sequential_false_keeps_the_one_shot_factors_and_says_so() -> None:
    model = _cnn()
    batches = [_images(16, 1)]
    gm = lrfx.compress(model, batches[0][:1], macs=0.5, calibration=batches, sequential=False)
    facts = lrfx.facts_of(gm)
    assert not facts.report.sequential
    assert facts.plan.settings["sequential"] is False
    assert facts.plan.settings["sequential_reason"] == "sequential=False"
    assert all("output_error" not in r for r in facts.report)
    assert facts.plan.settings["config"]["sequential"] is False


def test_sequential_is_refused_in_module_mode_and_skipped_automatically() -> None:
    model = _cnn()
    batches = [_images(8, 1)]
    with pytest.raises(LrfxError, match="module mode"):
        lrfx.compress(model, batches[0][:1], macs=0.5, calibration=batches, mode="module",
                      sequential=True)
    out = lrfx.compress(model, batches[0][:1], macs=0.5, calibration=batches, mode="module")
    facts = lrfx.facts_of(out)
    assert facts.plan.settings["sequential"] is False
    assert "module mode" in facts.plan.settings["sequential_reason"]
    assert type(out) is type(model)


def test_bad_sequential_value_is_refused() -> None:
    with pytest.raises(LrfxError, match="sequential must be"):
        lrfx.CompressConfig(macs=0.5, sequential="yes")  # type: ignore[arg-type]


def test_memory_estimate_scales_with_the_samples() -> None:
    model = _cnn()
    gm, _ = _analyzed(model, _images(2, 0))
    one = estimate_memory(gm, 1)
    # at least the two copies of the widest activation (24 x 14 x 14 floats), per sample
    assert one >= 2 * 24 * 14 * 14 * 4
    assert estimate_memory(gm, 64) == 64 * one


def test_the_users_model_is_not_modified() -> None:
    model = _cnn()
    state = copy.deepcopy(model.state_dict())
    batches = [_images(16, 1)]
    lrfx.compress(model, batches[0][:1], macs=0.5, calibration=batches, sequential=True)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
