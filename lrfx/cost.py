"""The one cost model: multiply-accumulates and parameters of every layer lrfx reasons about.

Every MAC or parameter count in lrfx comes from here: the analysis passes, the allocators, the
reports and the tests. MACs are multiply-accumulates of conv, linear and matmul-like ops at the
traced input shape (batch included); BN, bias, activations and pooling are not counted, which is
how the seed papers count. Parameter counts of a layer include its bias.

A factored layer is priced the same way as a dense one: a decomposition scheme
(:mod:`lrfx.schemes`) describes its factored form as a short list of :class:`Piece` layers
(``shared/algorithms.md`` section 0), and :func:`pieces_cost` adds up their dense costs. The
modules lrfx builds are made from the very same pieces, so a predicted cost cannot drift from
what runs.

Example:
    >>> g = ConvGeometry(in_channels=64, out_channels=64, kernel=(3, 3), in_spatial=(56, 56),
    ...                  out_spatial=(56, 56))
    >>> dense_cost(g).macs
    115605504
    >>> factored_cost(g, "channel", 16).macs
    32112640
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ConvGeometry",
    "Cost",
    "LinearGeometry",
    "Piece",
    "bmm_macs",
    "dense_cost",
    "einsum_macs",
    "matmul_macs",
    "mha_macs",
    "piece_geometry",
    "pieces_cost",
    "sdpa_macs",
    "window_attention_macs",
]


def _prod(xs: Sequence[int]) -> int:
    return math.prod(int(x) for x in xs)


@dataclass(frozen=True)
class Cost:
    """MACs and parameters of one layer (dense or factored)."""

    macs: int
    params: int

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.macs + other.macs, self.params + other.params)


@dataclass(frozen=True)
class LinearGeometry:
    """A ``y = x W^T + b`` layer: ``W`` is ``(out_features, in_features)``.

    Attributes:
        in_features: n, the input width.
        out_features: m, the output width.
        rows: How many input rows the layer sees (product of all leading dims, batch included).
        bias: Whether the layer has a bias.
    """

    in_features: int
    out_features: int
    rows: int = 1
    bias: bool = True

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_features, self.in_features)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input row, batched: ``(1, in_features)``."""
        return (1, self.in_features)

    @property
    def kind(self) -> str:
        return "linear"


@dataclass(frozen=True)
class ConvGeometry:
    """An N-d convolution (or transposed convolution) at a given input size.

    Attributes:
        in_channels: C.
        out_channels: N.
        kernel: Kernel size per spatial dim, ``(kh, kw)`` for Conv2d.
        in_spatial: Input spatial size, ``(H, W)`` for Conv2d.
        out_spatial: Output spatial size, ``(H', W')`` for Conv2d.
        stride, padding, dilation: As in ``nn.Conv2d`` (padding as ints per dim, or ``"same"`` /
            ``"valid"``). Empty when unknown; the cost does not depend on them.
        groups: Number of groups.
        batch: Batch size of the traced input.
        bias: Whether the layer has a bias.
        transposed: A ``ConvTranspose`` layer (counted, never factored).
        padding_mode: As in ``nn.Conv2d`` (``zeros``, ``reflect``, ``replicate``, ``circular``).
    """

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    stride: tuple[int, ...] = field(default=())
    padding: tuple[int, ...] | str = field(default=())
    dilation: tuple[int, ...] = field(default=())
    groups: int = 1
    batch: int = 1
    bias: bool = True
    transposed: bool = False
    padding_mode: str = "zeros"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.transposed:
            return (self.in_channels, self.out_channels // self.groups, *self.kernel)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, batched: ``(1, C, *in_spatial)``."""
        return (1, self.in_channels, *self.in_spatial)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def dims(self) -> int:
        return len(self.kernel)

    @property
    def positions(self) -> int:
        """Output positions over the whole batch: ``batch * H' * W'``."""
        return self.batch * _prod(self.out_spatial)

    @property
    def kind(self) -> str:
        base = "conv_transpose" if self.transposed else "conv"
        return f"{base}{len(self.kernel)}d"


Geometry = LinearGeometry | ConvGeometry


def dense_cost(g: Geometry) -> Cost:
    """MACs and parameters (weight + bias) of the dense layer."""
    if isinstance(g, LinearGeometry):
        params = g.in_features * g.out_features + (g.out_features if g.bias else 0)
        return Cost(g.rows * g.in_features * g.out_features, params)
    k = _prod(g.kernel)
    weight = _prod(g.weight_shape)
    params = weight + (g.out_channels if g.bias else 0)
    if g.transposed:
        # every input element is scattered to (N / groups) * k outputs
        macs = g.batch * _prod(g.in_spatial) * g.in_channels * (g.out_channels // g.groups) * k
    else:
        macs = g.positions * g.out_channels * (g.in_channels // g.groups) * k
    return Cost(macs, params)


# --- factored layers as pieces --------------------------------------------------------------------

#: Where a piece's output lives: at the layer's input size, its output size, or (for the vertical
#: half of a split 2-D conv) the output height at the input width.
Resolution = Literal["in", "out", "mid"]


@dataclass(frozen=True)
class Piece:
    """One ordinary layer of a factored subgraph (see :mod:`lrfx.schemes`).

    A conv piece carries everything needed to build it; ``at`` says at which spatial size its
    output lives, which is all the cost model needs besides channels and kernel.

    Attributes:
        in_channels, out_channels: Channels (features, for a linear piece).
        kernel: Kernel size (``()`` for a linear piece).
        stride, padding, dilation, padding_mode: Convolution arguments (defaults: none).
        groups: Groups of the conv.
        at: ``in``, ``out`` or ``mid`` (see :data:`Resolution`).
        bias: Whether this piece carries the layer's bias (only ever the last one).
    """

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...] = ()
    stride: Any = 1
    padding: Any = 0
    dilation: Any = 1
    groups: int = 1
    padding_mode: str = "zeros"
    at: Resolution = "out"
    bias: bool = False

    @property
    def linear(self) -> bool:
        return not self.kernel


def piece_geometry(g: Geometry, p: Piece) -> Geometry:
    """The geometry of one piece of a factored ``g`` (for :func:`dense_cost`)."""
    if isinstance(g, LinearGeometry):
        return LinearGeometry(p.in_channels, p.out_channels, rows=g.rows, bias=p.bias)
    if p.at == "in":
        out = g.in_spatial
    elif p.at == "out":
        out = g.out_spatial
    else:  # vertical half of a split 2-D conv: output height, input width
        out = (g.out_spatial[0], *g.in_spatial[1:])
    # the input size of a piece does not enter its (non-transposed) cost
    return ConvGeometry(p.in_channels, p.out_channels, p.kernel, out, out, groups=p.groups,
                        batch=g.batch, bias=p.bias)


def pieces_cost(g: Geometry, pieces: Sequence[Piece]) -> Cost:
    """MACs and parameters of a factored layer: the sum of its pieces' dense costs."""
    total = Cost(0, 0)
    for p in pieces:
        total = total + dense_cost(piece_geometry(g, p))
    return total


# --- matmul-like ops -----------------------------------------------------------------------------


def matmul_macs(a: Sequence[int], b: Sequence[int]) -> int:
    """MACs of ``torch.matmul(a, b)`` for operand shapes ``a`` and ``b`` (broadcasting rules)."""
    a, b = tuple(a), tuple(b)
    if len(a) == 0 or len(b) == 0:
        return 0
    if len(a) == 1 and len(b) == 1:
        return a[0]
    if len(a) == 1:
        a = (1, a[0])
    if len(b) == 1:
        b = (b[0], 1)
    n, k = a[-2], a[-1]
    m = b[-1]
    batch = _broadcast(a[:-2], b[:-2])
    return _prod(batch) * n * k * m


def bmm_macs(a: Sequence[int], b: Sequence[int]) -> int:
    """MACs of ``torch.bmm`` / ``baddbmm`` / ``mm`` / ``addmm`` for operand shapes ``a``, ``b``.

    ``(..., n, k) @ (..., k, m)`` costs ``prod(...) * n * k * m``.
    """
    return _prod(a) * b[-1]


def einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """MACs of ``torch.einsum(equation, *operands)``, contracting left to right in pairs.

    A pairwise contraction costs the product of the sizes of every index of either operand; a
    single operand (a pure reduction or permutation) costs nothing.
    """
    eq = equation.replace(" ", "")
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum {equation!r} names {len(terms)} operands, got {len(shapes)}")
    # every "..." stands for the same broadcast dims, right-aligned across operands
    n_ell = max(
        (len(shape) - (len(term) - 3) for term, shape in zip(terms, shapes, strict=True)
         if "..." in term),
        default=0,
    )
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    ellipsis_letters = "".join(spare[:n_ell])
    expanded: list[str] = []
    for term, shape in zip(terms, shapes, strict=True):
        if "..." in term:
            mine = len(shape) - (len(term) - 3)
            term = term.replace("...", ellipsis_letters[n_ell - mine :] if mine else "")
        expanded.append(term)
    if "->" not in eq:
        counts: dict[str, int] = {}
        for t in expanded:
            for ch in t:
                counts[ch] = counts.get(ch, 0) + 1
        out = "".join(sorted(ch for ch, n in counts.items() if n == 1))
    elif "..." in out:
        out = out.replace("...", ellipsis_letters)
    sizes: dict[str, int] = {}
    for t, shape in zip(expanded, shapes, strict=True):
        for ch, d in zip(t, shape, strict=True):
            sizes[ch] = max(sizes.get(ch, 1), int(d))
    if len(expanded) < 2:
        return 0
    macs = 0
    current = expanded[0]
    for i in range(1, len(expanded)):
        nxt = expanded[i]
        letters = set(current) | set(nxt)
        macs += _prod([sizes[ch] for ch in letters])
        later = set(out).union(*[set(t) for t in expanded[i + 1 :]])
        current = "".join(ch for ch in sorted(letters) if ch in later)
    return macs


def sdpa_macs(
    q: Sequence[int], k: Sequence[int], v: Sequence[int]
) -> int:
    """MACs of ``scaled_dot_product_attention``: ``Q K^T`` plus ``softmax(.) V``."""
    length, e = q[-2], q[-1]
    s, ev = k[-2], v[-1]
    return _prod(q[:-2]) * length * s * (e + ev)


def mha_macs(
    query: Sequence[int],
    key: Sequence[int],
    value: Sequence[int],
    embed_dim: int,
    kdim: int,
    vdim: int,
    batch_first: bool,
) -> tuple[int, int, int]:
    """MACs of ``nn.MultiheadAttention``: (input projections, attention products, out projection).

    Shapes are those of the call's ``query``, ``key``, ``value`` (batched or not).
    """
    if len(query) == 2:  # unbatched (L, E)
        batch, length, s = 1, query[0], key[0]
    elif batch_first:
        batch, length, s = query[0], query[1], key[1]
    else:
        length, batch, s = query[0], query[1], key[0]
    inp = batch * (length * embed_dim * embed_dim + s * kdim * embed_dim + s * vdim * embed_dim)
    attn = batch * 2 * length * s * embed_dim
    out = batch * length * embed_dim * embed_dim
    return inp, attn, out


def window_attention_macs(
    x: Sequence[int], window: Sequence[int], qkv_out: int, proj_out: int
) -> tuple[int, int, int]:
    """MACs of torchvision's ``shifted_window_attention``: (qkv, attention products, proj).

    ``x`` is the ``(B, H, W, C)`` input; the feature map is padded to a multiple of the window.
    """
    b, h, w, c = x
    wh, ww = window
    hp = -(-h // wh) * wh
    wp = -(-w // ww) * ww
    tokens = b * hp * wp
    qkv = tokens * c * qkv_out
    attn = 2 * tokens * wh * ww * c
    proj = tokens * c * proj_out
    return qkv, attn, proj


def _broadcast(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    a = (1,) * (n - len(a)) + tuple(a)
    b = (1,) * (n - len(b)) + tuple(b)
    return tuple(max(x, y) for x, y in zip(a, b, strict=True))


# The per-scheme questions (does a scheme apply, its maximum rank, its factored cost, its
# break-even rank) are answered by the scheme registry; these names stay importable from here.
_FROM_SCHEMES = ("SCHEMES", "applicable_schemes", "break_even_rank", "factored_cost", "max_rank")


def __getattr__(name: str) -> Any:
    if name in _FROM_SCHEMES:
        from lrfx import schemes

        return getattr(schemes, name)
    raise AttributeError(f"module 'lrfx.cost' has no attribute {name!r}")
