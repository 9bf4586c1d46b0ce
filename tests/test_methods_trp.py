"""TRP (lrfx.methods.trp): the projection is the Eckart-Young truncation at the energy rank, the
nuclear-norm term is the analytic subgradient, finalize() reproduces the projected model, a run
on real data (digits) lowers the loss and reports its ranks and MACs, state resumes exactly, and
a step under DistributedDataParallel (2 CPU processes) equals one process on the whole batch."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrfx
from lrfx.contrib.data import load_digits_tensors
from lrfx.methods import TRP


def _net(bn: bool = True) -> nn.Module:
    norm = (lambda c: nn.BatchNorm2d(c)) if bn else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), norm(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), norm(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), norm(32), nn.ReLU(),
        nn.Conv2d(32, 16, 1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


X = torch.zeros(1, 1, 8, 8)


def _digits(n: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = load_digits_tensors()
    return x[:n], y[:n]


def _best(mat: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(mat.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_paper_targets_skip_first_conv_1x1_and_linear() -> None:
    trp = TRP(_net(), X)
    assert [t.name for t in trp.targets] == ["3", "6"]
    assert trp.skipped == {
        "0": "first convolution (kept dense, as in the paper)",
        "9": "1x1 convolution (kept dense, as in the paper)",
        "13": "linear (the paper factors convolutions only)",
    }
    everything = TRP(_net(), X, layers="all", exclude=["13"])
    assert [(t.name, t.scheme) for t in everything.targets] == [
        ("0", "channel"), ("3", "channel"), ("6", "channel"), ("9", "channel")]
    assert [t.scheme for t in TRP(_net(), X, scheme="spatial").targets] == ["spatial", "spatial"]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_projection_is_the_best_approximation_at_the_energy_rank(scheme: str) -> None:
    net = _net()
    before = {n: net.get_submodule(n).weight.detach().clone() for n in ("3", "6")}
    trp = TRP(net, X, energy=0.8, scheme=scheme)
    ranks = trp.project(net)
    for name, w0 in before.items():
        t = next(t for t in trp.targets if t.name == name)
        mat = t.matrices(w0)[0]
        s = torch.linalg.svdvals(mat.double())
        energy = s.square().cumsum(0) / s.square().sum()
        k = ranks[name]
        # the smallest rank whose energy reaches 0.8
        assert energy[k - 1] >= 0.8 and (k == 1 or energy[k - 2] < 0.8)
        w = net.get_submodule(name).weight.detach()
        torch.testing.assert_close(t.matrices(w)[0].double(), _best(mat, k), atol=1e-5,
                                   rtol=1e-5)
        assert torch.linalg.matrix_rank(t.matrices(w)[0].double(), rtol=1e-5) == k


def test_value_rule_keeps_values_above_the_threshold() -> None:
    net = _net()
    w = net.get_submodule("3").weight.detach().clone()
    s = torch.linalg.svdvals(w.reshape(32, -1))
    threshold = float(s[5] + s[6]) / 2  # between the 6th and 7th values
    trp = TRP(net, X, value=threshold, layers=["3"])
    assert trp.project(net) == {"3": 6}


def test_nuclear_term_is_the_analytic_subgradient() -> None:
    # a full-rank weight, all values kept: U V^T is the gradient of the nuclear norm
    net = _net()
    trp = TRP(net, X, energy=1.0, lambda_nuc=0.01, layers=["3"])
    w = net.get_submodule("3").weight
    reference = w.detach().clone().requires_grad_(True)
    torch.linalg.matrix_norm(reference.reshape(32, -1), ord="nuc").backward()
    assert reference.grad is not None
    w.grad = torch.zeros_like(w)
    trp.after_backward(net)
    torch.testing.assert_close(w.grad, 0.01 * reference.grad, atol=1e-6, rtol=1e-4)
    # after a projection to rank k: U_k V_k^T, a subgradient (<G, W> = ||W||_*, ||G||_2 = 1)
    trp = TRP(net, X, energy=0.8, lambda_nuc=0.01, layers=["3"])
    k = trp.project(net)["3"]
    mat = w.detach().reshape(32, -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    expected = (u[:, :k] @ vh[:k]).reshape(w.shape)
    for cached in (True, False):  # from the projection's factors, and recomputed
        if not cached:
            trp._cache.clear()
        w.grad = torch.zeros_like(w)
        trp.after_backward(net)
        g = w.grad.double().reshape(32, -1) / 0.01
        torch.testing.assert_close(g.reshape(w.shape), expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close((g * mat).sum(), s.sum(), atol=1e-4, rtol=1e-5)
        assert float(torch.linalg.matrix_norm(g, ord=2)) == pytest.approx(1.0, abs=1e-5)


def test_projection_runs_every_m_steps() -> None:
    net = _net()
    trp = TRP(net, X, every=3, lambda_nuc=0.0)
    w = net.get_submodule("3").weight
    seen = []
    for _ in range(6):
        with torch.no_grad():
            w.add_(0.01 * torch.randn_like(w))  # a full-rank change, like an optimizer step
        trp.after_step(net)
        seen.append(int(torch.linalg.matrix_rank(w.detach().reshape(32, -1))))
    full = min(w.shape[0], w[0].numel())
    assert trp.step == 6
    assert seen[0] == seen[1] == seen[3] == seen[4] == full
    assert seen[2] < full and seen[5] < full


def _train(net: nn.Module, trp: TRP, steps: int, lr: float = 0.1, start: int = 0
           ) -> tuple[list[float], torch.optim.Optimizer]:
    x, y = _digits()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    losses = []
    for i in range(start, start + steps):
        xb, yb = x[(i * 32) % 512:(i * 32) % 512 + 32], y[(i * 32) % 512:(i * 32) % 512 + 32]
        opt.zero_grad()
        loss = F.cross_entropy(net(xb), yb)
        loss.backward()
        trp.after_backward(net)
        opt.step()
        trp.after_step(net)
        losses.append(loss.item())
    return losses, opt


def test_fifty_steps_on_digits_lower_the_loss_and_finalize_reports_ranks_and_macs(
        flop_macs: object) -> None:
    net = _net()
    trp = TRP(net, X, every=2)
    losses, _ = _train(net, trp, 50)
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:10]) / 10
    net.eval()
    plan = trp.plan(net)
    small = trp.finalize(net)
    facts = lrfx.facts_of(small)
    assert facts.plan is not None and facts.report is not None
    assert {n: e.rank for n, e in facts.plan.items() if e.lowrank} == {
        n: r for n, r in trp.ranks.items() if plan[n].lowrank}
    assert facts.plan.macs == lrfx.count_macs(small, X) == flop_macs(small, X)  # type: ignore
    assert facts.plan.macs < lrfx.count_macs(net, X)
    # the last step projected: the factored model computes what the trained model computes
    x, _ = _digits(64)
    torch.testing.assert_close(small(x), net(x), atol=1e-4, rtol=1e-4)
    assert not small.training


def test_finalize_projects_weights_that_moved_and_leaves_the_model_alone() -> None:
    net = _net().eval()
    trp = TRP(net, X, every=100, lambda_nuc=0.0)
    before = copy.deepcopy(net.state_dict())
    small = trp.finalize(net)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    projected = copy.deepcopy(net)
    TRP(projected, X, every=100).project(projected)
    x, _ = _digits(32)
    torch.testing.assert_close(small(x), projected(x), atol=1e-4, rtol=1e-4)


def test_state_dict_round_trip_resumes_identically(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = _net()
    trp = TRP(net, X, every=3)
    _, opt = _train(net, trp, 7)
    torch.save({"model": net.state_dict(), "opt": opt.state_dict(), "trp": trp.state_dict()},
               tmp_path / "ckpt.pt")
    # continue the original for 5 steps, and a rebuilt one from the checkpoint
    x, y = _digits()
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = _net()
    resumed.load_state_dict(ckpt["model"])
    trp_resumed = TRP(resumed, X, every=3)
    trp_resumed.load_state_dict(ckpt["trp"])
    opt_resumed = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt_resumed.load_state_dict(ckpt["opt"])
    for model, method, optimizer in ((net, trp, opt), (resumed, trp_resumed, opt_resumed)):
        for i in range(7, 12):
            xb, yb = x[i * 32:i * 32 + 32], y[i * 32:i * 32 + 32]
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            method.after_backward(model)
            optimizer.step()
            method.after_step(model)
    assert trp_resumed.step == trp.step == 12 and trp_resumed.ranks == trp.ranks
    for (k, a), b in zip(net.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
    with pytest.raises(lrfx.LrfxError, match="energy"):
        TRP(_net(), X, energy=0.5).load_state_dict(trp.state_dict())


def test_bad_input_is_refused_with_the_argument_named() -> None:
    for kwargs, match in (({"energy": 0.0}, "energy"), ({"energy": 1.5}, "energy"),
                          ({"every": 0}, "every"), ({"lambda_nuc": -1.0}, "lambda_nuc"),
                          ({"value": -0.1}, "value"), ({"scheme": "tucker2"}, "scheme"),
                          ({"exclude": ["conv9"]}, "conv9"),
                          ({"layers": ["13"], "exclude": ["13"]}, "no layer")):
        with pytest.raises(lrfx.LrfxError, match=match):
            TRP(_net(), X, **kwargs)  # type: ignore[arg-type]
    trp = TRP(_net(), X)
    other = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(lrfx.LrfxError, match="another model"):
        trp.project(other)


def test_fit_drives_trp_as_a_callback() -> None:
    net = _net()
    trp = TRP(net, X, every=4)
    x, y = _digits(256)
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    result = lrfx.fit(net, data, epochs=2, optimizer=torch.optim.SGD(net.parameters(), lr=0.05),
                      callbacks=[trp])
    assert trp.step == result.steps == 16
    assert set(trp.ranks) == {"3", "6"}


def test_budgeted_projection_meets_the_budget_with_one_energy_for_every_layer() -> None:
    net = _net()
    expected_plan, _ = lrfx.allocate(lrfx.analyze(net, X), macs=0.5, allocator="energy",
                                     scheme="channel", exclude=["0", "9", "13"])
    trp = TRP(net, X, macs=0.5)
    ranks = trp.project(net)
    assert ranks == {n: e.rank for n, e in expected_plan.items() if e.lowrank}
    small = trp.finalize(net.eval())
    assert lrfx.count_macs(small, X) <= 0.5 * lrfx.count_macs(net, X)
    x, _ = _digits(16)
    torch.testing.assert_close(small(x), net(x), atol=1e-4, rtol=1e-4)
    with pytest.raises(lrfx.LrfxError, match="one rank rule"):
        TRP(_net(), X, energy=0.9, macs=0.5)
    with pytest.raises(lrfx.BudgetInfeasibleError):
        TRP(_net(), X, macs=0.01).project()
