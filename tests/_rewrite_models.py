"""Small models and helpers shared by the rewrite tests (test_rewrite*.py, test_io.py, ...).

Also importable by the CLI tests as a model spec (``_rewrite_models:small_cnn``): pytest puts this
directory on ``sys.path`` (rootdir-relative ``prepend`` import mode, no ``__init__.py`` here).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lrfx.modules import Factored

CONV_CLS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``||got - ref|| / ||ref||`` in float64 (``ref`` must not be zero)."""
    ref64 = ref.detach().double()
    den = float(ref64.norm())
    assert den > 0.0, "reference output is zero: the comparison would be meaningless"
    return float((got.detach().double() - ref64).norm()) / den


def flop_macs(fn: Callable[..., Any], *args: Any) -> int:
    """MACs of ``fn(*args)`` as ``FlopCounterMode`` counts them (total flops / 2)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return int(counter.get_total_flops()) // 2


class Wrap(nn.Module):
    """A model that is one layer: ``forward(x) = self.layer(x)``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class SmallCNN(nn.Module):
    """conv(3->8, 3x3) + BN + ReLU, conv(8->16, 3x3 stride 2, no bias), pool, fc(16->10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def small_cnn() -> SmallCNN:
    """Factory for the CLI tests (``_rewrite_models:small_cnn``); fixed weights."""
    torch.manual_seed(1234)
    return SmallCNN().eval()


class Gate(nn.Module):
    """Data-dependent control flow around Linear layers: not symbolically traceable."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e30:  # always true, but depends on the data
            return self.a(x)
        return self.b(x)


class GatedNet(nn.Module):
    """A traceable top level around the untraceable :class:`Gate` (which becomes a leaf)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre = nn.Linear(4, 8)
        self.gate = Gate()
        self.post = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.post(torch.relu(self.gate(self.pre(x))))


def effective_weight(f: Factored) -> torch.Tensor:
    """The dense weight a factored layer computes (float64), from its factor modules."""
    ws = [child.weight.detach().double() for child in f]
    if f.scheme == "svd":
        first, second = ws
        return second @ first
    if f.scheme == "channel":
        first, second = ws
        g = f[0].groups
        n, r = second.shape[0], second.shape[1]
        cg_k = first[0].numel()
        a = first.reshape(g, r, cg_k)
        b = second.reshape(g, n // g, r)
        return (b @ a).reshape(n, *first.shape[1:])
    if f.scheme == "spatial":
        vertical, horizontal = ws  # (r, C, kh, 1), (N, r, 1, kw)
        return torch.einsum("rci,nrj->ncij", vertical[..., 0], horizontal[:, :, 0, :])
    if f.scheme == "tucker2":
        first, core, last = ws  # (r_in, C, 1, 1), (r_out, r_in, kh, kw), (N, r_out, 1, 1)
        return torch.einsum("nb,bahw,ac->nchw", last[:, :, 0, 0], core, first[:, :, 0, 0])
    raise AssertionError(f"no effective weight for scheme {f.scheme!r}")


def calibrate_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Set BN running statistics from one batch so a randomly initialized net is not degenerate.

    Freshly initialized torchvision nets in eval mode shrink activations towards zero (running
    var 1 against tiny pre-activations), which would make output-parity checks vacuous.
    """
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics exactly
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


@st.composite
def conv_geometries(draw: st.DrawFn, dims: int, grouped: bool, spatial_kernel: bool = False
                    ) -> dict[str, object]:
    """A random Conv{dims}d geometry and an input size that torch accepts for it."""
    groups = draw(st.integers(1, 3)) if grouped else 1
    # groups == in_channels would be depthwise (not factorable): at least 2 channels per group
    cg = draw(st.integers(2 if groups > 1 else 1, 4))
    ng = draw(st.integers(1, 4))
    kmax = 2 if dims == 3 else 4
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(dims))
    if spatial_kernel and max(kernel) == 1:
        kernel = (2, *kernel[1:])
    stride = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dims))
    pad_kind = draw(st.sampled_from(["int", "same", "valid"] if max(stride) == 1 else ["int"]))
    padding: object = pad_kind
    if pad_kind == "int":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(dims))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "circular", "replicate"]))
    # room for the kernel and for reflect padding (pad < size) everywhere
    size = tuple(
        d * (k - 1) + 3 + draw(st.integers(0, 2 if dims == 3 else 4))
        for k, d in zip(kernel, dilation, strict=True)
    )
    return {
        "in_channels": groups * cg,
        "out_channels": groups * ng,
        "kernel_size": kernel,
        "stride": stride,
        "padding": padding,
        "dilation": dilation,
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": padding_mode,
        "size": size,
        "batch": draw(st.integers(1, 2)),
        "seed": draw(st.integers(0, 2**16)),
    }


def make_conv(dims: int, geo: dict[str, object]) -> tuple[nn.Module, torch.Tensor]:
    """The conv and an input for it, seeded by the geometry."""
    kw = {k: v for k, v in geo.items() if k not in ("size", "batch", "seed")}
    torch.manual_seed(int(geo["seed"]))  # type: ignore[call-overload]
    conv = CONV_CLS[dims](**kw)
    x = torch.randn(int(geo["batch"]), int(geo["in_channels"]), *geo["size"])  # type: ignore
    return conv, x


def full_rank(conv: nn.Module, scheme: str) -> int | tuple[int, int]:
    """Independent of lrfx.cost: the smallest dimension of the scheme's unfolding(s)."""
    n, cg, *k = conv.weight.shape
    g = conv.groups
    kk = math.prod(k)
    if scheme == "channel":
        return min(n // g, cg * kk)
    if scheme == "spatial":
        return min(cg * k[0], n * k[1])
    assert scheme == "tucker2"
    return (min(cg, n * kk), min(n, cg * kk))
