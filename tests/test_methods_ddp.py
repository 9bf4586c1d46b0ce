"""Training-time methods under DistributedDataParallel: two CPU processes (gloo, spawned here)
each take half of a batch; after a few steps their weights equal one process's on the whole
batch (DDP averages the gradients before ``after_backward``; every process projects the same
weights the same way)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import lrfx

X = torch.zeros(1, 1, 8, 8)
STEPS = 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def _method(name: str, model: nn.Module) -> Any:
    if name == "trp":
        return lrfx.TRP(model, X, every=2, lambda_nuc=1e-2)
    if name == "lc":  # a C step after every step (an "epoch" here), strong coupling
        return lrfx.LC(model, X, macs=0.5, mu0=0.5, growth=2.0)
    if name == "dnet":
        return lrfx.DecomposableNet(model, X, rank_min=2, seed=7)
    raise ValueError(name)


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(STEPS, 16, 1, 8, 8, generator=g), torch.randint(0, 10, (STEPS, 16),
                                                                        generator=g)


def _run(model: nn.Module, train: nn.Module, method: Any, shard: slice) -> None:
    xs, ys = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for i in range(STEPS):
        opt.zero_grad()
        if hasattr(method, "backward"):  # Decomposable-Net: both passes
            method.backward(train, xs[i][shard], ys[i][shard])
        else:
            loss = F.cross_entropy(train(xs[i][shard]), ys[i][shard])
            loss = loss + (method.penalty(train) if hasattr(method, "penalty") else 0.0)
            loss.backward()
        if hasattr(method, "after_backward"):
            method.after_backward(train)
        opt.step()
        if hasattr(method, "after_step"):
            method.after_step(train)
        if hasattr(method, "end_epoch"):
            method.end_epoch(train, i)


def _worker(rank: int, world: int, store: str, name: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        model = _net()
        ddp = nn.parallel.DistributedDataParallel(model)
        method = _method(name, ddp)
        half = 16 // world
        _run(model, ddp, method, slice(rank * half, (rank + 1) * half))
        if rank == 0:
            torch.save(model.state_dict(), out)
        # both processes leave together: a process tearing gloo down while its peer still
        # talks to it can abort the peer ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["trp", "lc", "dnet"])
def test_two_processes_equal_one_process_on_the_whole_batch(name: str, tmp_path: Path) -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path / "ddp.pt"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), name, str(out)), nprocs=2, join=True)
    model = _net()
    _run(model, model, _method(name, model), slice(0, 16))
    ddp_state = torch.load(out, weights_only=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp_state[k], v, atol=1e-5, rtol=1e-4, msg=k)
    # and the run moved the weights (a test that cannot fail otherwise)
    assert not torch.equal(ddp_state["2.weight"], _net().state_dict()["2.weight"])
