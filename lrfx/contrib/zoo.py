"""Small reference networks of the low-rank literature, for accuracy work on small images.

* :func:`resnet20` — the CIFAR-style ResNet-20 of He et al. (3 stages of 3 basic blocks,
  16/32/64 channels, option-A identity shortcuts), 0.27 M weights and 40.55 M MACs at 32x32
  with 3 input channels.
* :func:`vgg_small` — a CIFAR-style VGG (conv-BN-ReLU blocks, max-pools, one linear classifier).

Example:
    >>> import torch, lrfx
    >>> lrfx.count_macs(resnet20(), torch.randn(1, 3, 32, 32))
    40551040
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "ResNetCifar", "resnet20", "resnet56", "vgg_small"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (option A: strided, zero-padded) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.pad = c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class ResNetCifar(nn.Module):
    """CIFAR-style ResNet with ``6n + 2`` layers."""

    def __init__(self, n: int, in_channels: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        c = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(c, width, stride))
                c = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet20(in_channels: int = 3, num_classes: int = 10) -> ResNetCifar:
    """CIFAR ResNet-20 (0.27 M weights)."""
    return ResNetCifar(3, in_channels, num_classes)


def resnet56(in_channels: int = 3, num_classes: int = 10) -> ResNetCifar:
    """CIFAR ResNet-56 (0.85 M weights)."""
    return ResNetCifar(9, in_channels, num_classes)


def vgg_small(
    in_channels: int = 3,
    num_classes: int = 10,
    config: Sequence[int | str] = (64, 64, "M", 128, 128, "M", 256, 256, "M"),
) -> nn.Sequential:
    """A CIFAR-style VGG: 3x3 conv-BN-ReLU stacks, 2x2 max-pools, global pool, one linear."""
    layers: list[nn.Module] = []
    c = in_channels
    for v in config:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                       nn.ReLU(inplace=True)]
            c = v
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return nn.Sequential(*layers)
