"""Network slimming (penalties on BN scales and rank gates) and rank gates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lrfx
from lrfx.errors import LrfxError
from lrfx.methods.penalties import Penalty
from lrfx.modules import Factored, Gate
from lrfx.plan import LayerPlan, RankPlan


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64, 10))


def _data(n: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return x, y


X, Y = _data()
EX = X[:2]


def _bn_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight.detach().clone() for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def test_finds_the_scales_of_prunable_groups() -> None:
    slim = lrfx.Slimming(_net(), EX)
    assert slim.scales == ["1", "4"] and slim.skipped == {}
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))  # its channels reach the output
    with pytest.raises(LrfxError, match=r"no BatchNorm or gate.*skipped"):
        lrfx.Slimming(net, EX)


def test_subgradient_form_adds_the_penalty_gradient() -> None:
    for kind in ("l1", "lp", "tl1"):
        a, b = _net(), _net()
        slim = lrfx.Slimming(b, EX, penalty=kind, s=1e-2)
        for net in (a, b):
            nn.functional.cross_entropy(net(X[:32]), Y[:32]).backward()
        slim.after_backward()
        pen = Penalty(kind, s=1e-2)
        for name in ("1", "4"):
            ga, gb = a.get_submodule(name).weight.grad, b.get_submodule(name).weight.grad
            want = ga + pen.subgradient(a.get_submodule(name).weight.detach())
            torch.testing.assert_close(gb, want)
            assert not torch.equal(ga, gb)


def test_prox_form_takes_each_scales_learning_rate_from_the_optimizer() -> None:
    net = _net()
    bn1, bn4 = net.get_submodule("1"), net.get_submodule("4")
    rest = [p for n, p in net.named_parameters() if not n.startswith(("1.", "4."))]
    opt = torch.optim.SGD([{"params": rest, "lr": 0.1},
                           {"params": list(bn1.parameters()), "lr": 0.5},
                           {"params": list(bn4.parameters()), "lr": 0.05}])
    slim = lrfx.Slimming(net, EX, penalty="tl1", s=0.5, form="prox", optimizer=opt)
    nn.functional.cross_entropy(net(X[:32]), Y[:32]).backward()
    slim.after_backward()  # no-op in prox form
    opt.step()
    before = [bn1.weight.detach().clone(), bn4.weight.detach().clone()]
    slim.after_step()
    pen = Penalty("tl1", s=0.5)
    torch.testing.assert_close(bn1.weight.detach(), pen.prox(before[0], 0.5))
    torch.testing.assert_close(bn4.weight.detach(), pen.prox(before[1], 0.05))
    assert bool((bn1.weight < before[0] - 0.1).all()) and slim.step == 1  # shrunk by the prox
    with pytest.raises(LrfxError, match=r"optimizer= .* or lr="):
        lrfx.Slimming(_net(), EX, form="prox")
    alien = torch.optim.SGD(_net().parameters(), lr=0.1)
    slim = lrfx.Slimming(net, EX, form="prox", optimizer=alien)
    with pytest.raises(LrfxError, match="not in the optimizer"):
        slim.after_step()


@pytest.mark.parametrize("kwargs, match", [
    ({"penalty": "l2"}, "kind"),
    ({"form": "both"}, "form"),
    ({"scales": "everything"}, "scales"),
    ({"s": -1.0}, "s"),
    ({"lr": -0.1, "form": "prox"}, "lr"),
])
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(LrfxError, match=match):
        lrfx.Slimming(_net(), EX, **kwargs)


def _train(net: nn.Module, slim: lrfx.Slimming, epochs: int = 8, lr: float = 0.05
           ) -> torch.optim.Optimizer:
    opt = slim.optimizer or torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    for _ in range(epochs):
        for i in range(0, len(X), 32):
            loss = nn.functional.cross_entropy(net(X[i:i + 32]), Y[i:i + 32])
            opt.zero_grad()
            loss.backward()
            slim.after_backward()
            opt.step()
            slim.after_step()
    return opt


def test_training_drives_scales_to_zero_and_finalize_prunes_them() -> None:
    net = _net()
    dense = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    slim = lrfx.Slimming(net, EX, penalty="tl1", s=0.2, form="prox", optimizer=opt, init=0.5)
    assert all(torch.all(w == 0.5) for w in _bn_weights(net))
    _train(net, slim)
    zeros = sum(int((w == 0).sum()) for w in _bn_weights(net))
    assert zeros > 0 and slim.sparsity(tol=0.0) == pytest.approx(zeros / 28)
    state = copy.deepcopy(net.state_dict())
    small = slim.finalize(percent=zeros / 28)
    for k, v in net.state_dict().items():  # the trained model is not modified
        assert torch.equal(v, state[k])
    kept = [m.weight for m in small.modules() if isinstance(m, nn.BatchNorm2d)]
    assert sum(len(w) for w in kept) == 28 - zeros and all(bool((w != 0).all()) for w in kept)
    assert lrfx.count_macs(small, EX) == small.meta["lrfx"].plan.macs < lrfx.count_macs(dense, EX)
    assert small.meta["lrfx"].plan.settings["penalty"]["kind"] == "tl1"


def test_works_as_a_fit_callback_and_checkpoints() -> None:
    net = _net()
    slim = lrfx.Slimming(net, EX, penalty="l1", s=1e-3)
    batches = [(X[i:i + 64], Y[i:i + 64]) for i in range(0, len(X), 64)]
    lrfx.fit(net, batches, epochs=1, lr=1e-2, callbacks=[slim], progress=False)
    assert slim.step == len(batches)
    state = slim.state_dict()
    again = lrfx.Slimming(net, EX, penalty="l1", s=1e-3)
    again.load_state_dict(state)
    assert again.step == slim.step
    with pytest.raises(LrfxError, match="penalty"):
        lrfx.Slimming(net, EX, penalty="tl1", s=1e-3).load_state_dict(state)


# --- rank gates -----------------------------------------------------------------------------------


def _factored() -> tuple[nn.Module, torch.fx.GraphModule]:
    net = _net().eval()
    plan = RankPlan({"3": LayerPlan("channel", 8), "8": LayerPlan("svd", 6)})
    return net, lrfx.apply(net, plan, EX)


def test_gates_leave_the_model_unchanged_and_are_slimmed() -> None:
    _, gm = _factored()
    gated = lrfx.add_rank_gates(gm)
    assert isinstance(gated.get_submodule("3_gate"), Gate) and not hasattr(gm, "3_gate")
    with torch.no_grad():
        torch.testing.assert_close(gated(X), gm(X))
    groups = lrfx.channel_groups(gated, EX)
    assert {(m.role, m.target) for m in groups["3.0"].members} == {
        ("out", "3.0"), ("norm", "3_gate"), ("in", "3.1")}
    slim = lrfx.Slimming(gated, EX, scales="gates")
    assert slim.scales == ["3_gate", "8_gate"]
    assert lrfx.Slimming(gated, EX).scales == ["1", "3_gate", "4", "8_gate"]
    with pytest.raises(LrfxError, match="no factored layer"):
        lrfx.add_rank_gates(torch.fx.symbolic_trace(_net()))


def test_zero_gates_are_removed_exactly_and_lower_the_rank() -> None:
    _, gm = _factored()
    gated = lrfx.add_rank_gates(gm)
    with torch.no_grad():
        gated.get_submodule("3_gate").weight.copy_(torch.tensor([1, 0, 2, 0, 0, .5, 1, 0.]))
        gated.get_submodule("8_gate").weight.copy_(torch.tensor([0, 3, 0, 1, 1, 1.]))
    slim = lrfx.Slimming(gated, EX, scales="gates")
    small = slim.finalize(percent=6 / 14)
    assert isinstance(small.get_submodule("3"), Factored) and small.get_submodule("3").rank == 4
    assert small.get_submodule("8").rank == 4
    assert not any(isinstance(m, Gate) for m in small.modules())  # folded
    with torch.no_grad():
        torch.testing.assert_close(small(X), gated(X), rtol=1e-5, atol=1e-5)
    assert small.meta["lrfx"].plan.settings["ranks"]["3"] == 4
    assert lrfx.count_macs(small, EX) == small.meta["lrfx"].plan.macs


def test_fold_gates_keeps_the_output() -> None:
    _, gm = _factored()
    gated = lrfx.add_rank_gates(gm, init=0.5)
    with torch.no_grad():
        for m in gated.modules():
            if isinstance(m, Gate):
                m.weight.uniform_(-1, 1)
        folded = lrfx.fold_gates(gated)
        torch.testing.assert_close(folded(X), gated(X))
    assert not any(isinstance(m, Gate) for m in folded.modules())
    assert any(isinstance(m, Gate) for m in gated.modules())  # the input is not modified


def test_gates_lower_both_tucker2_ranks_and_the_cp_rank() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
                        nn.Conv2d(24, 8, 3, padding=1)).eval()
    x = torch.randn(2, 3, 8, 8)
    gm = lrfx.apply(net, RankPlan({"3": LayerPlan("tucker2", (8, 10)),
                                   "6": LayerPlan("cp", 6)}), x)
    gated = lrfx.add_rank_gates(gm)
    names = [n for n, m in gated.named_modules() if isinstance(m, Gate)]
    assert names == ["3_gate", "3_gate1", "6_gate2"]  # cp: one gate, after its depthwise pair
    with torch.no_grad():
        for n in names:
            gated.get_submodule(n).weight[::3] = 0
    small = lrfx.Slimming(gated, x, scales="gates").finalize(gated, percent=9 / 24)
    assert small.get_submodule("3").rank == (5, 6) and small.get_submodule("6").rank == 4
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated(x), rtol=1e-5, atol=1e-5)
