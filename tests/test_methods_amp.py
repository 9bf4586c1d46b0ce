"""The training-time methods under automatic mixed precision (CPU autocast in bfloat16, with a
GradScaler): every step runs, the weights stay finite and float32, the methods' own numerics
(SVDs, projections) stay in float32, and TRP's subgradient lands on the unscaled gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrfx
from lrfx.methods.penalties import Penalty

X = torch.zeros(1, 1, 8, 8)


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def _scaler() -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)


@pytest.mark.parametrize("name", ["trp", "lc", "dnet"])
def test_methods_run_under_autocast_with_a_grad_scaler(name: str) -> None:
    net = _net()
    method = {"trp": lambda: lrfx.TRP(net, X, macs=0.6, lambda_nuc=1e-2),
              "lc": lambda: lrfx.LC(net, X, macs=0.5, mu0=1e-2),
              "dnet": lambda: lrfx.DecomposableNet(net, X, rank_min=2)}[name]()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    scaler = _scaler()
    x, y = torch.randn(6, 16, 1, 8, 8), torch.randint(0, 10, (6, 16))
    for i in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if name == "dnet":
                full, low = method.backward(net, x[i], y[i])
                assert torch.isfinite(full) and torch.isfinite(low)
            else:
                out = net(x[i])
                loss = F.cross_entropy(out.float(), y[i])
                if name == "lc":
                    loss = loss + method.penalty(net)
        if name != "dnet":
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            if name == "trp":
                method.after_backward(net)
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        if name == "trp":
            method.after_step(net)
        if name == "lc" and i % 2 == 1:
            method.c_step(net)
    for p in net.parameters():
        assert p.dtype == torch.float32 and bool(torch.isfinite(p).all())
    small = (method.finalize(net.eval(), macs=0.5, calibration=[x[0]]) if name == "dnet"
             else method.finalize(net.eval()))
    assert lrfx.count_macs(small, X) <= 0.6 * lrfx.count_macs(net, X)


def test_trp_adds_its_subgradient_to_unscaled_gradients() -> None:
    net = _net()
    trp = lrfx.TRP(net, X, energy=0.8, lambda_nuc=0.1, layers=["3"])
    trp.project(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    scaler = _scaler()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(net(x).float(), y)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    w = net[3].weight
    assert w.grad is not None
    before = w.grad.clone()
    trp.after_backward(net)
    k = trp.ranks["3"]
    u, _, vh = torch.linalg.svd(w.detach().reshape(16, -1), full_matrices=False)
    torch.testing.assert_close(w.grad - before, 0.1 * (u[:, :k] @ vh[:k]).reshape(w.shape),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("form", ["subgradient", "prox"])
def test_slimming_runs_under_autocast_with_a_grad_scaler(form: str) -> None:
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    slim = lrfx.Slimming(net, X, penalty="tl1", s=0.05, form=form, optimizer=opt)
    scaler = _scaler()
    x, y = torch.randn(6, 16, 1, 8, 8), torch.randint(0, 10, (6, 16))
    for i in range(6):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x[i]).float(), y[i])
        scaler.scale(loss).backward()
        scaler.unscale_(opt)  # the subgradient goes on unscaled gradients
        before = net[1].weight.grad.clone()
        slim.after_backward(net)
        if form == "subgradient":
            want = before + Penalty("tl1", s=0.05).subgradient(net[1].weight.detach())
            torch.testing.assert_close(net[1].weight.grad, want)
        scaler.step(opt)
        scaler.update()
        slim.after_step(net)
    for p in net.parameters():
        assert p.dtype == torch.float32 and bool(torch.isfinite(p).all())
    small = slim.finalize(net.eval(), macs=0.6)
    assert lrfx.count_macs(small, X) <= 0.6 * lrfx.count_macs(net, X)
