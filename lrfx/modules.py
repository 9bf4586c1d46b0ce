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

The layout of each scheme (which layers, in which order, with which arguments) is owned by its
registry entry (:mod:`lrfx.schemes`); :func:`build_factored` turns a layout into modules, with
given factor weights or uninitialized ones (to be filled from a checkpoint).

``nn.MultiheadAttention`` is replaced by :class:`LowRankMultiheadAttention`, whose ``q_proj``,
``k_proj``, ``v_proj`` and ``out_proj`` are ``nn.Linear`` or :class:`Factored`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrfx.cost import ConvGeometry, Geometry, LinearGeometry, Piece
from lrfx.decompositions import check_finite
from lrfx.errors import LrfxError, SchemeError, UnsupportedLayerError
from lrfx.schemes import Rank, get_scheme

__all__ = [
    "ConvSpec",
    "Factored",
    "Gate",
    "LowRankMultiheadAttention",
    "build_factored",
    "factor_conv",
    "factor_linear",
    "geometry_of_spec",
]

_CONV_CLS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Factored(nn.Sequential):
    """A low-rank factored layer: its children run in order.

    It also looks like the layer it replaced, for code that reads a layer's attributes (model
    code often does: ``layer.weight.dtype``, ``conv.stride[0]``): the dense layer's
    hyperparameters (``in_features``/``out_features``, or ``in_channels``, ``kernel_size``,
    ``stride``... of a conv) are attributes, ``bias`` is the last child's bias, and ``weight`` is
    the dense weight the factors compute (differentiable while gradients are on; otherwise cached
    until a factor changes). Assigning ``weight`` or ``bias`` is refused: the factors are the
    parameters.

    Attributes:
        scheme: The decomposition scheme (``svd``, ``channel``, ``spatial``, ``tucker2``, ``cp``).
        rank: The rank(s).
    """

    def __init__(self, *layers: nn.Module, scheme: str, rank: int | tuple[int, ...],
                 like: Mapping[str, Any] | None = None) -> None:
        super().__init__(*layers)
        self.scheme = scheme
        self.rank = rank
        for key, value in (like or {}).items():
            object.__setattr__(self, key, value)
        self._like = dict(like or {})
        self._dense: tuple[tuple[Any, ...], torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"scheme={self.scheme!r}, rank={self.rank}"

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("weight", "bias"):
            raise LrfxError(f"a factored layer's {name} cannot be assigned: its parameters are "
                            f"the factors' ({name} of {self.scheme!r} factors); leave the layer "
                            "dense in the plan to keep it assignable (tied weights, say)")
        super().__setattr__(name, value)

    @property
    def bias(self) -> torch.Tensor | None:
        last = self[-1]
        b = getattr(last, "bias", None)
        return b if isinstance(b, torch.Tensor) else None

    @property
    def weight(self) -> torch.Tensor:
        weights: list[torch.Tensor] = [m.weight for m in self]  # type: ignore[misc]
        scheme = get_scheme(self.scheme)
        groups = int(getattr(self[0], "groups", 1))
        if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
            return scheme.compose(weights, groups)
        try:
            key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        except Exception:  # tensors without storage (fake or meta): nothing to cache
            return scheme.compose(weights, groups)
        if self._dense is None or self._dense[0] != key:
            with torch.no_grad():
                object.__setattr__(self, "_dense", (key, scheme.compose(weights, groups)))
        assert self._dense is not None
        return self._dense[1]


class Gate(nn.Module):
    """A learnable scale per channel: ``y = x * weight`` along dimension ``dim``.

    Between the two factors of a factored layer it scales each rank component — a *rank gate*:
    slimmed like a BatchNorm scale (:class:`lrfx.Slimming`), a gate driven to zero is a rank
    component that can go. The channel analysis treats it like a norm of its channels, the
    pruning pass slices it, and :func:`lrfx.fold_gates` multiplies it into the factor before it.

    Args:
        channels: How many channels (rank components) it scales.
        dim: The channel dimension: 1 for conv activations ``(N, C, ...)``, -1 for linear ones
            ``(..., C)``.
        init: The initial scale (1: the gated layer computes what it computed before).

    Example:
        >>> g = Gate(3, dim=-1)
        >>> g(torch.ones(2, 3)).tolist()
        [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self, channels: int, dim: int = 1, init: float = 1.0) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise LrfxError(f"Gate: channels must be a positive int, got {channels!r}")
        self.weight = nn.Parameter(torch.full((channels,), float(init)))
        self.dim = int(dim)
        self.num_features = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [1] * x.dim()
        shape[self.dim] = -1
        return x * self.weight.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}"


def _like(g: Geometry) -> dict[str, Any]:
    """The public attributes of the dense layer a geometry describes."""
    if isinstance(g, LinearGeometry):
        return {"in_features": g.in_features, "out_features": g.out_features}
    stride = tuple(g.stride) if g.stride else (1,) * g.dims
    dilation = tuple(g.dilation) if g.dilation else (1,) * g.dims
    padding = g.padding if isinstance(g.padding, str) or g.padding else (0,) * g.dims
    return {"in_channels": g.in_channels, "out_channels": g.out_channels,
            "kernel_size": tuple(g.kernel), "stride": stride, "padding": padding,
            "dilation": dilation, "groups": g.groups, "padding_mode": g.padding_mode,
            "transposed": False, "output_padding": (0,) * g.dims}


def _piece_module(p: Piece) -> nn.Module:
    if p.linear:
        return nn.Linear(p.in_channels, p.out_channels, bias=p.bias, device="meta")
    return _CONV_CLS[len(p.kernel)](
        p.in_channels, p.out_channels, p.kernel, stride=p.stride, padding=p.padding,
        dilation=p.dilation, groups=p.groups, bias=p.bias, padding_mode=p.padding_mode,
        device="meta",
    )


def build_factored(
    pieces: Sequence[Piece],
    *,
    scheme: str,
    rank: Rank,
    weights: Sequence[torch.Tensor] | None = None,
    bias: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    requires_grad: bool = True,
    like: Geometry | None = None,
) -> Factored:
    """Build the modules of a factored layer from its layout.

    Args:
        pieces: The layout (``get_scheme(s).layout(geometry, rank)``).
        scheme, rank: Recorded on the :class:`Factored` container.
        weights: One weight per piece (any dtype/device; cast to ``dtype``/``device``), or
            ``None`` for uninitialized weights to be loaded from a checkpoint.
        bias: The dense layer's bias, copied onto the last piece (which must declare one).
        dtype, device, requires_grad: Of the new parameters.
        like: The dense layer's geometry: its hyperparameters become attributes of the result.
    """
    if weights is not None and len(weights) != len(pieces):
        raise ValueError(f"{len(pieces)} pieces but {len(weights)} weights")
    layers = []
    for i, p in enumerate(pieces):
        m = _piece_module(p)
        shape = tuple(m.get_parameter("weight").shape)
        if weights is None:
            w = torch.empty(shape, dtype=dtype, device=device)
        else:
            if tuple(weights[i].shape) != shape:
                raise ValueError(f"piece {i}: weight of shape {tuple(weights[i].shape)}, the "
                                 f"layout needs {shape}")
            # always a fresh, contiguous tensor: factors must not be views into a workspace
            w = weights[i].detach().to(dtype=dtype, device=device).clone(
                memory_format=torch.contiguous_format)
        m.weight = nn.Parameter(w, requires_grad=requires_grad)
        if p.bias:
            if bias is not None:
                b = bias.detach().to(device=device).clone()
                m.bias = nn.Parameter(b, requires_grad=bias.requires_grad)
            elif weights is None:
                m.bias = nn.Parameter(torch.empty(p.out_channels, dtype=dtype, device=device),
                                      requires_grad=requires_grad)
            else:
                raise ValueError("the layout's last piece carries the layer's bias: pass bias=")
        layers.append(m)
    return Factored(*layers, scheme=scheme, rank=rank,
                    like=None if like is None else _like(like))


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


def geometry_of_spec(spec: ConvSpec) -> ConvGeometry:
    """A (size-less) geometry of a conv spec: enough to check schemes and build layouts."""
    n, cg, *k = spec.weight.shape
    padding = spec.padding if isinstance(spec.padding, str) else tuple(spec.padding)
    return ConvGeometry(cg * spec.groups, n, tuple(k), (), (), tuple(spec.stride), padding,
                        tuple(spec.dilation), spec.groups, bias=spec.bias is not None,
                        padding_mode=spec.padding_mode)


def _factor(g: Geometry, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str,
            rank: Rank, name: str, whiten: torch.Tensor | None) -> Factored:
    try:
        s = get_scheme(scheme)
        s.check(g)
        ranks = s.ranks(rank)
    except SchemeError as exc:
        raise UnsupportedLayerError(name, str(exc)) from None
    check_finite(weight, name)
    unit = s.unfoldings[0] if s.unfoldings else ""
    ws = s.factors(weight, g, ranks, whiten=None if whiten is None else {unit: whiten})
    plan_rank: Rank = ranks if s.n_ranks > 1 else ranks[0]
    return build_factored(s.layout(g, ranks), scheme=scheme, rank=plan_rank, weights=ws,
                          bias=bias, dtype=weight.dtype, device=weight.device,
                          requires_grad=weight.requires_grad, like=g)


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
    m, n = weight.shape
    return _factor(LinearGeometry(n, m, bias=bias is not None), weight, bias, "svd", rank, name,
                   whiten)


def factor_conv(
    spec: ConvSpec,
    scheme: str,
    rank: int | tuple[int, ...],
    name: str = "conv",
    whiten: torch.Tensor | None = None,
) -> Factored:
    """Factor a convolution with ``scheme`` at ``rank`` (see :mod:`lrfx.schemes` for layouts).

    ``whiten``: for ``channel`` / ``spatial``, the Cholesky factor of the input patches' Gram
    matrix (see :mod:`lrfx.passes.analysis.activations`); ignored by tucker2 and cp.

    Example:
        >>> conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        >>> f = factor_conv(ConvSpec.of(conv), "spatial", 48)
        >>> x = torch.randn(1, 16, 9, 9)
        >>> bool(torch.allclose(f(x), conv(x), atol=1e-5))
        True
    """
    return _factor(geometry_of_spec(spec), spec.weight, spec.bias, scheme, rank, name, whiten)


def _copy_bias(layer: nn.Module, bias: torch.Tensor | None) -> None:
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)


class LowRankMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate (possibly factored) q/k/v/out projections.

    Same call signature and results as the module it replaces (``batch_first``, masks,
    ``need_weights``, ``average_attn_weights``, ``is_causal``, ``add_bias_kv``,
    ``add_zero_attn``).
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
        bias_k: torch.Tensor | None = None,
        bias_v: torch.Tensor | None = None,
        add_zero_attn: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.add_zero_attn = add_zero_attn
        # ``(1, 1, E)`` key and value appended to every sequence (``add_bias_kv``)
        self.bias_k = None if bias_k is None else nn.Parameter(
            bias_k.detach().clone(), requires_grad=bias_k.requires_grad)
        self.bias_v = None if bias_v is None else nn.Parameter(
            bias_v.detach().clone(), requires_grad=bias_v.requires_grad)
        self.q_proj = q_proj
        self.k_proj = k_proj
        self.v_proj = v_proj
        self.out_proj = out_proj

    @classmethod
    def replacing(
        cls, mha: nn.MultiheadAttention, factored: Mapping[str, nn.Module], name: str = "mha"
    ) -> LowRankMultiheadAttention:
        """Build the replacement of ``mha``; ``factored`` maps ``q_proj``... to new modules."""
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
                   dropout=mha.dropout, batch_first=mha.batch_first, bias_k=mha.bias_k,
                   bias_v=mha.bias_v, add_zero_attn=mha.add_zero_attn)

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
        pk, pv = self.k_proj(key), self.v_proj(value)
        if self.bias_k is not None and self.bias_v is not None:
            pk = torch.cat([pk, self.bias_k.expand(1, batch, self.embed_dim)])
            pv = torch.cat([pv, self.bias_v.expand(1, batch, self.embed_dim)])
        keys = pk.shape[0]
        q = self.q_proj(query).reshape(length, batch * h, hd).transpose(0, 1)
        k = pk.reshape(keys, batch * h, hd).transpose(0, 1)
        v = pv.reshape(keys, batch * h, hd).transpose(0, 1)
        q = q.reshape(batch, h, length, hd)
        k = k.reshape(batch, h, keys, hd)
        v = v.reshape(batch, h, keys, hd)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(batch, h, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(batch, h, 1, hd)], dim=2)
        mask = _merge_masks(attn_mask, key_padding_mask, batch, h, length, s, q.dtype)
        if mask is not None and k.shape[2] > s:  # the appended keys are never masked
            mask = F.pad(mask, (0, k.shape[2] - s))
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
