"""A model with data-dependent control flow: the submodule becomes a leaf, its layers are found."""

import torch
from torch import nn

import lrfx


class Router(nn.Module):
    """Picks a branch from the data: symbolic tracing cannot follow this."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Linear(64, 64)
        self.large = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.norm() > 10:
            return self.large(x)
        return self.small(x)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(32, 64)
        self.router = Router()
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.router(self.embed(x))))


analysis = lrfx.analyze(Net(), torch.randn(8, 32) * 10)
for leaf in analysis.leaves:
    print(f"leaf: {leaf.name} ({leaf.reason})")
for layer in analysis:
    where = f" inside {layer.inside_leaf}" if layer.inside_leaf else ""
    print(f"{layer.name:16s} {layer.kind:8s} {layer.macs:>8,} MACs{where}")
