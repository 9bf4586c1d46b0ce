"""Shared fixtures: a seeded RNG for every test and a few small models."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def _fast_cpu() -> Iterator[None]:
    # Speed only, no test's outcome depends on these. The models here are small, so intra-op
    # threads buy little, and on a busy 2-core runner OpenMP barriers made a 64x64 ShuffleNet
    # forward take 1.5 s instead of 10 ms. Randomly initialized nets in eval mode also produce
    # denormal activations, which make CPU convolutions much slower; flush them to zero.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_flush_denormal(False)
    torch.set_num_threads(threads)


def flop_macs(fn: Callable[..., object], *args: object) -> int:
    """MACs of ``fn(*args)`` as ``FlopCounterMode`` counts them (total flops / 2)."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops()) // 2


@pytest.fixture(name="flop_macs", scope="session")
def _flop_macs() -> Callable[..., int]:
    return flop_macs


class Gate(nn.Module):
    """Data-dependent control flow around ordinary Linear layers: not symbolically traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.abs().sum() >= 0:  # always true, but depends on the data
            return self.a(x)
        return self.b(x)


class GatedNet(nn.Module):
    """A traceable top level around the untraceable :class:`Gate`."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 8)
        self.gate = Gate()
        self.post = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(torch.relu(self.gate(self.pre(x))))


class SmallCNN(nn.Module):
    """conv(3->8, 3x3, pad 1) + BN + ReLU, conv(8->16, 3x3, stride 2, no bias), pool, fc(16->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


class SharedNet(nn.Module):
    """One Linear called twice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.fc(x)))


@pytest.fixture
def gated_net() -> GatedNet:
    return GatedNet()


@pytest.fixture
def small_cnn() -> SmallCNN:
    return SmallCNN()


@pytest.fixture
def shared_net() -> SharedNet:
    return SharedNet()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print what the fuzz and bad-input catalog tests checked (counts of cases)."""
    import sys

    for module, title in (("test_fuzz", "fuzz"), ("test_catalog", "bad-input catalog")):
        counts = getattr(sys.modules.get(module), "COUNTS", None)
        if counts:
            parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            terminalreporter.write_line(f"{title}: {sum(counts.values())} cases ({parts})")
