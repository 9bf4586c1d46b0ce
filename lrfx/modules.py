"""Factored layers as ordinary ``torch.nn`` modules.

A factored layer is a :class:`Factored` container (an ``nn.Sequential``) of plain ``nn.Linear`` /
``nn.ConvNd`` layers, registered where the dense layer was. Its children are numbered, so the
``state_dict`` keys of a factored layer ``L`` are stable and documented:

=========  =====================================================================
scheme     children of ``L``
=========  =====================================================================
svd        ``L.0`` Linear(n -> r, no bias), ``L.1`` Linear(r -> m, bias)
channel    ``L.0`` Conv(C -> g*r, original kernel/stride/padding/dilation, groups g),
           ``L.1`` Conv 1x1 (g*r -> N, groups g, bias)
spatial    ``L.0`` Conv (kh, 1) (C -> r, stride/padding/dilation of the height),
           ``L.1`` Conv (1, kw) (r -> N, stride/padding/dilation of the width, bias)
tucker2    ``L.0`` Conv 1x1 (C -> r_in), ``L.1`` Conv k (r_in -> r_out, original geometry),
           ``L.2`` Conv 1x1 (r_out -> N, bias)
cp         ``L.0`` Conv 1x1 (C -> R), ``L.1`` depthwise (kh, 1), ``L.2`` depthwise (1, kw),
           ``L.3`` Conv 1x1 (R -> N, bias)
=========  =====================================================================

``nn.MultiheadAttention`` is replaced by :class:`LowRankMultiheadAttention`, whose ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` are ``nn.Linear`` or :class:`Factored`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrfx import decompositions as dec
from lrfx.errors import UnsupportedLayerError

__all__ = [
    "ConvSpec",
    "Factored",
    "LowRankMultiheadAttention",
    "factor_conv",
    "factor_linear",
]

_CONV_CLS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Factored(nn.Sequential):
    """A low-rank factored layer: its children run in order.

    Attributes:
        scheme: The decomposition scheme (``svd``, ``channel``, ``spatial``, ``tucker2``, ``cp``).
        rank: The rank(s).
    """

    def __init__(self, *layers: nn.Module, scheme: str, rank: int | tuple[int, ...]) -> None:
        super().__init__(*layers)
        self.scheme = scheme
        self.rank = rank

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, rank={self.rank}"


@dataclass(frozen=True)
class ConvSpec:
    """Everything that defines a convolution besides its input."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"

    @classmethod
    def of(cls, m: nn.Module) -> ConvSpec:
        assert isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
        return cls(m.weight, m.bias, tuple(m.stride), m.padding, tuple(m.dilation), m.groups,
                   m.padding_mode)

    @property
    def dims(self) -> int:
        return self.weight.dim() - 2


def _param(t: torch.Tensor, like: torch.Tensor) -> nn.Parameter:
    # always a fresh, contiguous tensor: factors must not be views into the SVD's workspace
    data = t.to(dtype=like.dtype, device=like.device).clone(memory_format=torch.contiguous_format)
    return nn.Parameter(data, requires_grad=like.requires_grad)


def _copy_bias(layer: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)


def factor_linear(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rank: int,
    name: str = "linear",
    whiten: torch.Tensor | None = None,
) -> Factored:
    """``Linear(n -> m)`` as ``Linear(n -> r)`` then ``Linear(r -> m, bias)``.

    ``whiten`` (Cholesky factor of the inputs' Gram matrix) makes the truncation minimize the
    output error on the calibration data instead of the weight error.

    Example:
        >>> lin = nn.Linear(64, 32)
        >>> f = factor_linear(lin.weight, lin.bias, 32)
        >>> x = torch.randn(4, 64)
        >>> bool(torch.allclose(f(x), lin(x), atol=1e-5))
        True
    """
    dec.check_finite(weight, name)
    m, n = weight.shape
    first, second = dec.linear_factors(weight, rank, whiten)
    a = nn.Linear(n, rank, bias=False, device="meta")
    b = nn.Linear(rank, m, bias=bias is not None, device="meta")
    a.weight = _param(first, weight)
    b.weight = _param(second, weight)
    _copy_bias(b, bias)
    return Factored(a, b, scheme="svd", rank=rank)


def _conv(dims: int, c: int, n: int, kernel: tuple[int, ...], *, stride: Any = 1,
          padding: Any = 0, dilation: Any = 1, groups: int = 1, padding_mode: str = "zeros"
          ) -> nn.Module:
    return _CONV_CLS[dims](c, n, kernel, stride=stride, padding=padding, dilation=dilation,
                           groups=groups, bias=False, padding_mode=padding_mode, device="meta")


def factor_conv(
    spec: ConvSpec,
    scheme: str,
    rank: int | tuple[int, ...],
    name: str = "conv",
    whiten: torch.Tensor | None = None,
) -> Factored:
    """Factor a convolution with ``scheme`` at ``rank`` (see the module docstring for layouts).

    ``whiten``: for ``channel`` / ``spatial``, the Cholesky factor of the input patches' Gram
    matrix (see :mod:`lrfx.passes.analysis.activations`); ignored by tucker2 and cp.

    Example:
        >>> conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        >>> f = factor_conv(ConvSpec.of(conv), "spatial", 48)
        >>> x = torch.randn(1, 16, 9, 9)
        >>> bool(torch.allclose(f(x), conv(x), atol=1e-5))
        True
    """
    w, dims = spec.weight, spec.dims
    dec.check_finite(w, name)
    n, cg = w.shape[:2]
    k = tuple(w.shape[2:])
    c = cg * spec.groups
    pm = spec.padding_mode
    if scheme == "channel":
        assert isinstance(rank, int)
        g = spec.groups
        first, second = dec.channel_factors(w, rank, g, whiten)
        a = _conv(dims, c, g * rank, k, stride=spec.stride, padding=spec.padding,
                  dilation=spec.dilation, groups=g, padding_mode=pm)
        b = _conv(dims, g * rank, n, (1,) * dims, groups=g)
        layers = [a, b]
        weights = [first, second]
    elif scheme in ("spatial", "cp", "tucker2") and (dims != 2 or spec.groups != 1):
        raise UnsupportedLayerError(name, f"scheme {scheme!r} needs an ungrouped Conv2d")
    elif scheme == "spatial":
        assert isinstance(rank, int)
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        pad_h, pad_w = _split_padding(spec.padding)
        vertical, horizontal = dec.spatial_factors(w, rank, whiten)
        a = _conv(2, c, rank, (k[0], 1), stride=(sh, 1), padding=pad_h, dilation=(dh, 1),
                  padding_mode=pm)
        b = _conv(2, rank, n, (1, k[1]), stride=(1, sw), padding=pad_w, dilation=(1, dw),
                  padding_mode=pm)
        layers, weights = [a, b], [vertical, horizontal]
    elif scheme == "tucker2":
        r_in, r_out = rank if isinstance(rank, tuple) else (rank, rank)
        first, core, last = dec.tucker2_factors(w, (r_in, r_out))
        layers = [
            _conv(2, c, r_in, (1, 1)),
            _conv(2, r_in, r_out, k, stride=spec.stride, padding=spec.padding,
                  dilation=spec.dilation, padding_mode=pm),
            _conv(2, r_out, n, (1, 1)),
        ]
        weights = [first, core, last]
    elif scheme == "cp":
        assert isinstance(rank, int)
        (sh, sw), (dh, dw) = spec.stride, spec.dilation
        pad_h, pad_w = _split_padding(spec.padding)
        first, vertical, horizontal, last = dec.cp_factors(w, rank)
        layers = [
            _conv(2, c, rank, (1, 1)),
            _conv(2, rank, rank, (k[0], 1), stride=(sh, 1), padding=pad_h, dilation=(dh, 1),
                  groups=rank, padding_mode=pm),
            _conv(2, rank, rank, (1, k[1]), stride=(1, sw), padding=pad_w, dilation=(1, dw),
                  groups=rank, padding_mode=pm),
            _conv(2, rank, n, (1, 1)),
        ]
        weights = [first, vertical, horizontal, last]
    else:
        raise UnsupportedLayerError(name, f"scheme {scheme!r} does not apply to a convolution")
    for layer, weight in zip(layers, weights, strict=True):
        layer.weight = _param(weight, w)
    if spec.bias is not None:
        last_layer = layers[-1]
        last_layer.bias = nn.Parameter(spec.bias.detach().clone(),
                                       requires_grad=spec.bias.requires_grad)
    return Factored(*layers, scheme=scheme, rank=rank)


def _split_padding(padding: tuple[int, ...] | str) -> tuple[Any, Any]:
    """Height and width padding of the two 1-D convs of a split 2-D conv."""
    if isinstance(padding, str):
        return padding, padding  # "same"/"valid" apply per dim, so they split exactly
    ph, pw = padding
    return (ph, 0), (0, pw)


class LowRankMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate (possibly factored) q/k/v/out projections.

    Same call signature and results as the module it replaces (``batch_first``, masks,
    ``need_weights``, ``average_attn_weights``, ``is_causal``); ``add_bias_kv`` and
    ``add_zero_attn`` are not supported (such modules are left dense).
    """

    # read by nn.TransformerEncoderLayer's fused-path checks: no packed projection here, so
    # torch takes the ordinary path, which calls this module
    in_proj_bias = None
    in_proj_weight = None
    _qkv_same_embed_dim = False

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        q_proj: nn.Module,
        k_proj: nn.Module,
        v_proj: nn.Module,
        out_proj: nn.Module,
        *,
        dropout: float = 0.0,
        batch_first: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.out_proj = out_proj

    @classmethod
    def replacing(
        cls, mha: nn.MultiheadAttention, factored: Mapping[str, nn.Module], name: str = "mha"
    ) -> LowRankMultiheadAttention:
        """Build the replacement of ``mha``; ``factored`` maps ``q_proj``... to new modules."""
        if mha.bias_k is not None or mha.add_zero_attn:
            raise UnsupportedLayerError(name, "add_bias_kv / add_zero_attn attention is not "
                                        "supported by the low-rank rewrite; leave it dense")
        e = mha.embed_dim
        projs: dict[str, nn.Module] = {}
        for part, dim in (("q_proj", e), ("k_proj", mha.kdim), ("v_proj", mha.vdim)):
            if part in factored:
                projs[part] = factored[part]
                continue
            weight, bias = mha_projection(mha, part)
            lin = nn.Linear(dim, e, bias=bias is not None, device="meta")
            lin.weight = nn.Parameter(weight.detach().clone())
            _copy_bias(lin, bias)
            projs[part] = lin
        if "out_proj" in factored:
            out: nn.Module = factored["out_proj"]
        else:
            out = nn.Linear(e, e, bias=mha.out_proj.bias is not None, device="meta")
            out.weight = nn.Parameter(mha.out_proj.weight.detach().clone())
            _copy_bias(out, mha.out_proj.bias)
        return cls(e, mha.num_heads, projs["q_proj"], projs["k_proj"], projs["v_proj"], out,
                   dropout=mha.dropout, batch_first=mha.batch_first)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        length, batch, _ = query.shape
        s = key.shape[0]
        h, hd = self.num_heads, self.head_dim
        q = self.q_proj(query).reshape(length, batch * h, hd).transpose(0, 1)
        k = self.k_proj(key).reshape(s, batch * h, hd).transpose(0, 1)
        v = self.v_proj(value).reshape(s, batch * h, hd).transpose(0, 1)
        q = q.reshape(batch, h, length, hd)
        k = k.reshape(batch, h, s, hd)
        v = v.reshape(batch, h, s, hd)
        mask = _merge_masks(attn_mask, key_padding_mask, batch, h, length, s, q.dtype)
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            mask = None
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * (1.0 / math.sqrt(hd))) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            weights = scores.softmax(dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                 is_causal=causal)
            weights = None
        out = out.permute(2, 0, 1, 3).reshape(length, batch, self.embed_dim)
        out = self.out_proj(out)
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        if not batched:
            out = out.squeeze(1)
        if weights is not None:
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        return out, weights


def mha_projection(
    mha: nn.MultiheadAttention, part: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight and bias of one of ``q_proj``/``k_proj``/``v_proj``/``out_proj``."""
    if part == "out_proj":
        return mha.out_proj.weight, mha.out_proj.bias
    i = ("q_proj", "k_proj", "v_proj").index(part)
    e = mha.embed_dim
    if mha._qkv_same_embed_dim:
        assert mha.in_proj_weight is not None
        weight = mha.in_proj_weight[i * e : (i + 1) * e]
    else:
        weight = getattr(mha, f"{part}_weight")
    bias = None if mha.in_proj_bias is None else mha.in_proj_bias[i * e : (i + 1) * e]
    return weight, bias


def _merge_masks(
    attn_mask: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
    batch: int,
    heads: int,
    length: int,
    s: int,
    dtype: torch.dtype,
) -> torch.Tensor | None:
    """One additive float mask ``(batch, heads, L, S)`` from MHA's two optional masks."""
    mask: torch.Tensor | None = None
    if attn_mask is not None:
        m = _additive(attn_mask, dtype)
        mask = m.reshape(batch, heads, length, s) if m.dim() == 3 else m
    if key_padding_mask is not None:
        kp = _additive(key_padding_mask, dtype).reshape(batch, 1, 1, s)
        mask = kp if mask is None else mask + kp
    return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf")
        )
    return mask.to(dtype)
