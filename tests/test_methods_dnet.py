"""Decomposable-Net (lrfx.methods.dnet): the global criterion, the combined gradient of one step
(full + rescaled low-rank, through the truncation), separate BatchNorm statistics, a run on
digits that lowers both losses, deployment at any size from one model, exact resumption, and
the truncation's gradient (lrfx.decompositions.project_matrix)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lrfx
from lrfx.contrib.data import load_digits_tensors
from lrfx.decompositions import project_matrix
from lrfx.methods import DecomposableNet
from lrfx.passes.allocation import global_sigma_ranks

X = torch.zeros(1, 1, 8, 8)


def _net(bn: bool = True) -> nn.Module:
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _digits(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits_tensors()
    return x[:n], y[:n]


# --- the truncation and its gradient -------------------------------------------------------------


def _svd_truncation(m: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (2, 6, 6), (3, 4, 9)])
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_truncation_gradient_is_exact(shape: tuple[int, ...], rank: int) -> None:
    m = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: project_matrix(t, rank), (m,))
    g = torch.randn(*_svd_truncation(m, rank).shape, dtype=torch.float64)
    ours, = torch.autograd.grad((project_matrix(m, rank) * g).sum(), m)
    theirs, = torch.autograd.grad((_svd_truncation(m, rank) * g).sum(), m)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(project_matrix(m, rank), _svd_truncation(m, rank))


def _with_values(values: list[float]) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    n = len(values)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (q * torch.tensor(values, dtype=torch.float64)) @ w.T


def test_truncation_gradient_is_stable_with_repeated_kept_values_and_clipped_near_ties() -> None:
    m = _with_values([3.0, 3.0, 3.0, 1.0, 0.5, 0.1]).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: project_matrix(t, 3), (m,))
    # a near tie across the cut: the exact gradient grows like 1 / (1 - p^2); the clip bounds it
    tie = _with_values([2.0, 1.0, 0.9999999, 0.5]).requires_grad_(True)
    g = torch.ones(4, 4, dtype=torch.float64)
    exact, = torch.autograd.grad((project_matrix(tie, 2) * g).sum(), tie)
    clipped, = torch.autograd.grad((project_matrix(tie, 2, clip=0.99) * g).sum(), tie)
    assert float(exact.abs().max()) > 1e4
    assert float(clipped.abs().max()) < 200


# --- the criterion --------------------------------------------------------------------------------


def test_global_criterion_pools_values_with_a_minimum_rank() -> None:
    values = {"a": np.array([10.0, 8.0, 6.0, 0.5]), "b": np.array([9.0, 1.0, 0.2]),
              "c": np.array([7.0, 5.0])}
    # 9 values; rho 1/3 keeps the top 3 (10, 9, 8)
    assert global_sigma_ranks(values, 3 / 9, rank_min=1) == {"a": 2, "b": 1, "c": 1}
    assert global_sigma_ranks(values, 6 / 9, rank_min=1) == {"a": 3, "b": 1, "c": 2}
    assert global_sigma_ranks(values, 3 / 9, rank_min=3) == {"a": 3, "b": 3, "c": 2}
    assert global_sigma_ranks(values, 1.0, rank_min=1) == {"a": 4, "b": 3, "c": 2}
    with pytest.raises(lrfx.LrfxError, match="rho"):
        global_sigma_ranks(values, 1.5)


# --- one step -------------------------------------------------------------------------------------


def test_one_step_combines_full_and_rescaled_low_rank_gradients() -> None:
    net = _net()
    x, y = _digits(32)
    reference = copy.deepcopy(net)
    dnet = DecomposableNet(net, X, rank_min=2, seed=3)
    stats_before = {k: v.clone() for k, v in dnet.bn_stats.items()}
    full_loss, low_loss = dnet.backward(net, x, y)
    rho, ranks = dnet.last["rho"], dnet.last["ranks"]
    assert 0.01 <= rho <= 0.25 and set(ranks) == {"0", "3", "6", "11"}
    assert ranks == DecomposableNet(reference, X, rank_min=2).ranks_at(rho)

    # by hand: the full-rank gradient, the low-rank one through the truncation, rescaled
    params = dict(reference.named_parameters())
    full = torch.autograd.grad(F.cross_entropy(reference(x), y), list(params.values()))
    truncated = {}
    for name, r in ranks.items():
        w = params[f"{name}.weight"]
        mats = w.reshape(1, w.shape[0], -1)
        truncated[f"{name}.weight"] = project_matrix(mats, r, clip=0.99).reshape(w.shape)
    buffers = {k: v.clone() for k, v in stats_before.items()}
    low_out = functional_call(reference, {**truncated, **buffers}, (x,))
    low = torch.autograd.grad(F.cross_entropy(low_out, y), list(params.values()))
    torch.testing.assert_close(full_loss, F.cross_entropy(reference(x), y).detach())
    torch.testing.assert_close(low_loss, F.cross_entropy(low_out, y).detach())
    for (name, p), gf, gl in zip(net.named_parameters(), full, low, strict=True):
        if name.rsplit(".", 1)[0] in ranks and name.endswith("weight"):
            gl = gl * gf.norm() / gl.norm()
        torch.testing.assert_close(p.grad, 0.5 * gf + 0.5 * gl, atol=1e-5, rtol=1e-4, msg=name)
    # BatchNorm: the model's statistics saw the full pass, the method's the low-rank pass
    torch.testing.assert_close(dnet.bn_stats["1.running_mean"], buffers["1.running_mean"])
    assert not torch.equal(dnet.bn_stats["1.running_mean"], net[1].running_mean)
    assert int(dnet.bn_stats["1.num_batches_tracked"]) == int(net[1].num_batches_tracked) == 1


def _train(net: nn.Module, dnet: DecomposableNet, steps: int) -> list[tuple[float, float]]:
    x, y = _digits()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    out = []
    for i in range(steps):
        j = (i * 64) % 512
        opt.zero_grad()
        a, b = dnet.backward(net, x[j:j + 64], y[j:j + 64])
        opt.step()
        out.append((a.item(), b.item()))
    return out


def test_a_run_on_digits_lowers_both_losses_and_deploys_at_any_size(flop_macs: object) -> None:
    net = _net()
    dnet = DecomposableNet(net, X, rank_min=2)
    losses = _train(net, dnet, 50)
    # the low-rank network is drawn at 1-25 % of the singular values: it learns more slowly
    for k, factor in ((0, 0.4), (1, 0.8)):
        first, last = (np.mean([v[k] for v in part]) for part in (losses[:8], losses[-8:]))
        assert last < factor * first
    x, _ = _digits(256)
    calibration = [x[i:i + 64] for i in range(0, 256, 64)]
    budgets = [0.25, 0.35, 0.5, 0.7, 0.9]
    models = dnet.sizes(net, macs=budgets, calibration=calibration)
    total = lrfx.count_macs(net, X)
    previous = 0
    for b in budgets:
        small = models[("macs", b)]
        macs = lrfx.count_macs(small, X)
        assert macs <= b * total and macs > previous
        assert macs == flop_macs(small, X)  # type: ignore[operator]
        previous = macs
    # one size by rho: the factored model computes the truncated weights, BN recomputed
    net_nobn = _net(bn=False)
    d2 = DecomposableNet(net_nobn, X, rank_min=2)
    _train(net_nobn, d2, 10)
    ranks = d2.ranks_at(0.2)
    small = d2.finalize(net_nobn, rho=0.2)
    overrides = {}
    for name, r in ranks.items():
        w = net_nobn.get_submodule(name).weight.detach()
        overrides[f"{name}.weight"] = project_matrix(w.reshape(1, w.shape[0], -1), r).reshape(
            w.shape)
    plan = lrfx.facts_of(small).plan
    assert plan is not None
    lowrank = {n for n, e in plan.items() if e.lowrank}
    overrides = {k: v for k, v in overrides.items() if k.rsplit(".", 1)[0] in lowrank}
    assert lowrank
    torch.testing.assert_close(small(x), functional_call(net_nobn, overrides, (x,)), atol=1e-4,
                               rtol=1e-4)


def test_state_dict_round_trip_resumes_identically() -> None:
    net = _net()
    dnet = DecomposableNet(net, X, rank_min=2)
    _train(net, dnet, 3)
    state = copy.deepcopy(dnet.state_dict())
    twin = copy.deepcopy(net)
    resumed = DecomposableNet(twin, X, rank_min=2)
    resumed.load_state_dict(state)
    a = _train(net, dnet, 3)
    b = _train(twin, resumed, 3)
    assert a == b and dnet.last["rho"] == resumed.last["rho"]
    with pytest.raises(lrfx.LrfxError, match="rank_min"):
        DecomposableNet(_net(), X).load_state_dict(state)


def test_fit_drives_the_method_through_its_backward() -> None:
    net = _net()
    dnet = DecomposableNet(net, X, rank_min=2)
    x, y = _digits(128)
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    result = lrfx.fit(net, data, epochs=2, optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
                      callbacks=[dnet])
    assert dnet.step == result.steps == 8
    assert result.history[-1] == pytest.approx(dnet.last["loss_full"])
    with pytest.raises(lrfx.LrfxError, match="at most one"):
        lrfx.fit(net, data, callbacks=[dnet, DecomposableNet(net, X, rank_min=2)])


def test_bad_input_is_refused_with_the_argument_named() -> None:
    for kwargs, match in (({"rho": (0.3, 0.1)}, "rho"), ({"rho": 0.2}, "rho"),
                          ({"rank_min": 0}, "rank_min"), ({"full_weight": 2.0}, "full_weight"),
                          ({"clip": 1.5}, "clip"), ({"exclude": ["conv4"]}, "conv4")):
        with pytest.raises(lrfx.LrfxError, match=match):
            DecomposableNet(_net(), X, **kwargs)  # type: ignore[arg-type]
    dnet = DecomposableNet(_net(), X)
    with pytest.raises(lrfx.LrfxError, match="macs=, params= or rho="):
        dnet.finalize()
    with pytest.raises(lrfx.LrfxError, match="macs=, params= or rho="):
        dnet.finalize(macs=0.5, rho=0.1)
