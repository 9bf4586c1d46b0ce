"""The LC algorithm (lrfx.methods.lc): the C step picks the rank its formula says on a known
spectrum, the budgeted form meets its budget exactly like the post-training lc allocator, the
multipliers and mu follow the update rules, the penalty and its gradient are the augmented
Lagrangian's, a run on digits lowers the loss and finalize() is the nested model, state resumes
exactly, the best nested model is kept, and ProductDecay decays the product."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lrfx
from lrfx.contrib.data import load_digits_tensors
from lrfx.methods import LC, ProductDecay

X = torch.zeros(1, 1, 8, 8)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def _digits(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits_tensors()
    return x[:n], y[:n]


def _known(m: int = 40, n: int = 30) -> tuple[nn.Module, torch.Tensor]:
    """A Linear layer whose weight has singular values 2^-i/2 (i = 0..29)."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = 2.0 ** (-torch.arange(n, dtype=torch.float64) / 2)
    layer = nn.Linear(n, m, bias=False)
    with torch.no_grad():
        layer.weight.copy_((u * s) @ v.T)
    return nn.Sequential(layer), s


@pytest.mark.parametrize("alpha,mu", [(1e-4, 1.0), (1e-3, 1.0), (1e-3, 30.0), (1e-5, 0.5)])
def test_c_step_on_a_known_spectrum_picks_the_formula_rank(alpha: float, mu: float) -> None:
    net, s = _known()
    lc = LC(net, torch.zeros(1, 30), alpha=alpha, mu0=mu)
    sq = s.square()
    # alpha * C(r) + mu/2 * sum_{i>r} s_i^2 / ||M||^2 over r = 1..break-even (C: r (m + n)
    # MACs), or dense (error 0, cost m n)
    objective = {r: alpha * r * 70 + mu / 2 * float(sq[r:].sum() / sq.sum())
                 for r in range(1, 30) if r * 70 < 1200}
    objective[None] = alpha * 1200  # type: ignore[index]
    best = min(objective.items(), key=lambda kv: (kv[1], -1 if kv[0] is None else kv[0]))[0]
    assert lc.ranks == {"0": best}
    theta = lc.theta["0"].double()
    if best is not None:
        assert torch.linalg.matrix_rank(theta, rtol=1e-6) == best
    # ranks only grow as mu grows
    grown = LC(net, torch.zeros(1, 30), alpha=alpha, mu0=mu * 100).ranks["0"]
    assert grown is None or (best is not None and grown >= best)


def test_budgeted_form_meets_the_budget_like_the_post_training_allocator() -> None:
    net = _net()
    lc = LC(net, X, macs=0.4)
    total = lrfx.count_macs(net, X)
    assert lc.history[0]["macs"] <= 0.4 * total
    # the initial C step (lambda = 0) is the post-training lc allocation on the plain spectra
    plan, _ = lrfx.allocate(lrfx.analyze(net, X), macs=0.4, scheme="channel")
    expected = {n: (e.rank if e.lowrank else None) for n, e in plan.items()}
    assert {n: r for n, r in lc.ranks.items()} == {n: expected.get(n) for n in lc.ranks}


def test_multiplier_update_and_mu_schedule() -> None:
    net = _net()
    lc = LC(net, X, macs=0.5, mu0=1e-2, growth=2.0)
    assert all(float(v.abs().sum()) == 0 for v in lc.multipliers.values())
    with torch.no_grad():  # an L step moved the weights
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = {t.name: net.get_submodule(t.name).weight.detach().clone() for t in lc.targets}
    lc.c_step(net)
    assert lc.step == 1 and lc.mu == pytest.approx(2e-2)
    for name, w in weights.items():
        torch.testing.assert_close(lc.multipliers[name], -1e-2 * (w - lc.theta[name]))
    lam = {n: v.clone() for n, v in lc.multipliers.items()}
    lc.c_step(net)  # Theta = Pi(W - lambda/mu) at mu = 2e-2
    assert lc.mu == pytest.approx(4e-2)
    for name, w in weights.items():
        torch.testing.assert_close(lc.multipliers[name],
                                   lam[name] - 2e-2 * (w - lc.theta[name]))


def test_penalty_and_its_gradient_are_the_augmented_lagrangian() -> None:
    net = _net()
    lc = LC(net, X, macs=0.5, mu0=0.3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    lc.c_step(net)
    penalty = lc.penalty(net)
    expected = sum(
        (net.get_submodule(t.name).weight - lc.theta[t.name]
         - lc.multipliers[t.name] / lc.mu).square().sum() for t in lc.targets)
    torch.testing.assert_close(penalty, 0.5 * lc.mu * expected)
    penalty.backward()
    for t in lc.targets:
        w = net.get_submodule(t.name).weight
        torch.testing.assert_close(
            w.grad, lc.mu * (w.detach() - lc.theta[t.name] - lc.multipliers[t.name] / lc.mu))


def _train(net: nn.Module, lc: LC, epochs: int, lr: float = 0.1) -> list[float]:
    x, y = _digits()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    losses = []
    for epoch in range(epochs):
        for i in range(0, 512, 64):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[i:i + 64]), y[i:i + 64])
            (loss + lc.penalty(net)).backward()
            opt.step()
            losses.append(loss.item())
        lc.end_epoch(net, epoch)
    return losses


def test_a_run_on_digits_lowers_the_loss_and_finalize_is_the_nested_model(
        flop_macs: object) -> None:
    net = _net()
    x, y = _digits(128)
    lc = LC(net, X, macs=0.35, mu0=1e-2, growth=1.5, epochs_per_step=2,
            monitor=[(x[:64], y[:64]), (x[64:], y[64:])])
    losses = _train(net, lc, 6)  # 48 steps, 3 C steps
    assert sum(losses[-8:]) / 8 < 0.5 * sum(losses[:8]) / 8
    assert lc.step == 3 and len(lc.history) == 4
    assert all(h["macs"] <= 0.35 * lrfx.count_macs(net, X) for h in lc.history)
    net.eval()
    for which in ("last", "best"):
        small = lrfx.methods.lc.LC.finalize(lc, net, which=which)
        ranks, theta = lc._pick(which)
        facts = lrfx.facts_of(small)
        assert facts.plan is not None
        assert {n: (e.rank if e.lowrank else None) for n, e in facts.plan.items()} == ranks
        assert facts.plan.macs == lrfx.count_macs(small, X) == flop_macs(small, X)  # type: ignore
        overrides = {f"{n}.weight": v for n, v in theta.items()}
        torch.testing.assert_close(small(x), functional_call(net, overrides, (x,)), atol=1e-4,
                                   rtol=1e-4)
    assert lc.best is not None
    assert lc.best["monitor_loss"] == min(h["monitor_loss"] for h in lc.history)


def test_state_dict_round_trip_resumes_identically() -> None:
    torch.manual_seed(1)
    net = _net()
    lc = LC(net, X, macs=0.5, mu0=1e-2, growth=1.5)
    _train(net, lc, 2)
    state = copy.deepcopy(lc.state_dict())
    resumed_net = copy.deepcopy(net)
    resumed = LC(resumed_net, X, macs=0.5, mu0=1e-2, growth=1.5)
    resumed.load_state_dict(state)
    torch.manual_seed(5)
    _train(net, lc, 2)
    torch.manual_seed(5)
    _train(resumed_net, resumed, 2)
    assert resumed.step == lc.step == 4 and resumed.ranks == lc.ranks
    for (k, a), b in zip(net.state_dict().items(), resumed_net.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(a, b, msg=k)
    for n in lc.multipliers:
        torch.testing.assert_close(lc.multipliers[n], resumed.multipliers[n])
    with pytest.raises(lrfx.LrfxError, match="macs"):
        LC(_net(), X, macs=0.3).load_state_dict(state)


def test_product_decay_is_the_decay_of_the_composed_weight() -> None:
    gm = lrfx.apply(_net(), {"3": ("channel", 4), "11": ("svd", 3)}, X)
    decay = ProductDecay(0.01)
    value = decay.penalty(gm)
    assert value is not None
    expected = 0.5 * 0.01 * (gm.get_submodule("3").weight.square().sum()
                             + gm.get_submodule("11").weight.square().sum())
    torch.testing.assert_close(value, expected)
    value.backward()
    u, v = gm.get_submodule("11")[0].weight, gm.get_submodule("11")[1].weight
    # d/dU of 1/2 ||V U||^2 = V^T V U
    torch.testing.assert_close(u.grad, 0.01 * v.detach().T @ v.detach() @ u.detach())
    assert ProductDecay().penalty(_net()) is None


def test_bad_input_is_refused_with_the_argument_named() -> None:
    for kwargs, match in (({}, "budget"), ({"macs": 0.5, "alpha": 1e-9}, "not both"),
                          ({"alpha": -1.0}, "alpha"), ({"macs": 0.5, "mu0": 0}, "mu0"),
                          ({"macs": 0.5, "growth": 0.5}, "growth"),
                          ({"macs": 0.5, "epochs_per_step": 0}, "epochs_per_step"),
                          ({"alpha": 1e-9, "cost": "flops"}, "cost"),
                          ({"macs": 1.5}, "fraction"),
                          ({"macs": 0.5, "exclude": ["conv7"]}, "conv7")):
        with pytest.raises(lrfx.LrfxError, match=match):
            LC(_net(), X, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(lrfx.BudgetInfeasibleError):
        LC(_net(), X, macs=0.01)
    with pytest.raises(lrfx.LrfxError, match="which"):
        LC(_net(), X, macs=0.5).plan("first")


def test_fit_drives_lc_as_a_callback() -> None:
    net = _net()
    lc = LC(net, X, macs=0.5, epochs_per_step=2)
    x, y = _digits(128)
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 128, 32)]
    lrfx.fit(net, data, epochs=4, optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
             callbacks=[lc])
    assert lc.epochs == 4 and lc.step == 2
