"""Small reference networks of the low-rank literature, for accuracy work on small images.

* :func:`resnet20` — the CIFAR-style ResNet-20 of He et al. (3 stages of 3 basic blocks,
  16/32/64 channels, option-A identity shortcuts), 0.27 M weights and 40.55 M MACs at 32x32
  with 3 input channels.
* :func:`vgg_small` — a CIFAR-style VGG (conv-BN-ReLU blocks, max-pools, one linear classifier).
* :func:`vit_tiny` — a small vision transformer (4x4 patches, 6 pre-norm blocks of width 64).

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

__all__ = ["Attention", "BasicBlock", "EncoderBlock", "MHAttention", "ResNetCifar", "ViT",
           "fused_to_mha", "resnet20", "resnet56", "vgg_small", "vit_tiny"]


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


class Attention(nn.Module):
    """Multi-head self-attention with one fused ``qkv`` Linear and an output ``proj`` Linear
    (the layout of most vision transformers), on ``F.scaled_dot_product_attention``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"Attention: dim={dim} is not a multiple of heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(
            2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class MHAttention(nn.Module):
    """The same self-attention on ``nn.MultiheadAttention`` (``mha.in_proj_weight`` holds what
    :class:`Attention`'s ``qkv.weight`` holds, ``mha.out_proj`` its ``proj``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mha(x, x, x, need_weights=False)[0]


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))`` (GELU);
    ``attention="mha"`` uses :class:`MHAttention` instead of :class:`Attention`."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, attention: str = "fused") -> None:
        super().__init__()
        if attention not in ("fused", "mha"):
            raise ValueError(f"EncoderBlock: attention must be 'fused' or 'mha', got "
                             f"{attention!r}")
        self.norm1 = nn.LayerNorm(dim)
        self.attn: nn.Module = Attention(dim, heads) if attention == "fused" else \
            MHAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """A small vision transformer: non-overlapping patches embedded by a strided conv, a class
    token, learned position embeddings, pre-norm encoder blocks, a linear head on the class
    token. :meth:`embed` returns the final (normalized) class-token embedding."""

    def __init__(self, image_size: int = 28, patch_size: int = 4, in_channels: int = 1,
                 dim: int = 64, depth: int = 6, heads: int = 4, mlp_dim: int = 128,
                 num_classes: int = 10, attention: str = "fused") -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"ViT: image_size={image_size} is not a multiple of "
                             f"patch_size={patch_size}")
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(dim, heads, mlp_dim, attention)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        return self.norm(self.blocks(x))[:, 0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def vit_tiny(in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
             attention: str = "fused") -> ViT:
    """A 6-block ViT of width 64 on 4x4 patches (0.21 M weights; 28x28 inputs by default)."""
    return ViT(image_size, 4, in_channels, 64, 6, 4, 128, num_classes, attention)


def fused_to_mha(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A fused-attention :class:`ViT` state dict for the same model with ``attention="mha"``."""
    out = {}
    for k, v in state.items():
        k = k.replace(".attn.qkv.weight", ".attn.mha.in_proj_weight")
        k = k.replace(".attn.qkv.bias", ".attn.mha.in_proj_bias")
        k = k.replace(".attn.proj.", ".attn.mha.out_proj.")
        out[k] = v
    return out
