"""The one cost model: multiply-accumulates and parameters of dense and factored layers.

Every MAC or parameter count in lrfx comes from here: the analysis passes, the allocators, the
reports and the tests. MACs are multiply-accumulates of conv, linear and matmul-like ops at the
traced input shape (batch included); BN, bias, activations and pooling are not counted, which is
how the seed papers count. Parameter counts of a layer include its bias.

The formulas for the factored layers are those of ``shared/algorithms.md`` section 0.

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

__all__ = [
    "SCHEMES",
    "ConvGeometry",
    "Cost",
    "LinearGeometry",
    "applicable_schemes",
    "bmm_macs",
    "break_even_rank",
    "dense_cost",
    "einsum_macs",
    "factored_cost",
    "matmul_macs",
    "max_rank",
    "mha_macs",
    "sdpa_macs",
    "window_attention_macs",
]

#: Decomposition schemes lrfx knows, by name.
SCHEMES: tuple[str, ...] = ("svd", "channel", "spatial", "tucker2", "cp")


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


@dataclass(frozen=True)
class ConvGeometry:
    """An N-d convolution (or transposed convolution) at a given input size.

    Attributes:
        in_channels: C.
        out_channels: N.
        kernel: Kernel size per spatial dim, ``(kh, kw)`` for Conv2d.
        in_spatial: Input spatial size, ``(H, W)`` for Conv2d.
        out_spatial: Output spatial size, ``(H', W')`` for Conv2d.
        stride, padding, dilation: As in ``nn.Conv2d`` (padding as ints per dim).
        groups: Number of groups.
        batch: Batch size of the traced input.
        bias: Whether the layer has a bias.
        transposed: A ``ConvTranspose`` layer (counted, never factored).
    """

    in_channels: int
    out_channels: int
    kernel: tuple[int, ...]
    in_spatial: tuple[int, ...]
    out_spatial: tuple[int, ...]
    stride: tuple[int, ...] = field(default=())
    padding: tuple[int, ...] = field(default=())
    dilation: tuple[int, ...] = field(default=())
    groups: int = 1
    batch: int = 1
    bias: bool = True
    transposed: bool = False

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.transposed:
            return (self.in_channels, self.out_channels // self.groups, *self.kernel)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel)

    @property
    def depthwise(self) -> bool:
        return self.groups > 1 and self.groups == self.in_channels

    @property
    def positions(self) -> int:
        """Output positions over the whole batch: ``batch * H' * W'``."""
        return self.batch * _prod(self.out_spatial)


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


def applicable_schemes(g: Geometry) -> tuple[str, ...]:
    """The decomposition schemes that apply to a layer of this geometry (may be empty)."""
    if isinstance(g, LinearGeometry):
        return ("svd",)
    if g.transposed or g.depthwise:
        return ()
    if g.groups > 1:
        return ("channel",)  # factored per group (block diagonal)
    if len(g.kernel) == 2:
        spatial_kernel = g.kernel[0] > 1 or g.kernel[1] > 1
        return ("channel", "spatial", "tucker2", "cp") if spatial_kernel else ("channel", "tucker2")
    return ("channel",)


def max_rank(g: Geometry, scheme: str) -> tuple[int, ...]:
    """Largest meaningful rank(s) of a scheme on this layer (one int per rank of the scheme).

    At these ranks the factorization reproduces the layer exactly (cp excepted: its bound is the
    generic upper bound on tensor rank).
    """
    _check_scheme(g, scheme)
    if isinstance(g, LinearGeometry):
        return (min(g.in_features, g.out_features),)
    n, c, k = g.out_channels, g.in_channels, _prod(g.kernel)
    if scheme == "channel":
        return (min(n // g.groups, (c // g.groups) * k),)
    kh, kw = g.kernel
    if scheme == "spatial":
        return (min(c * kh, n * kw),)
    if scheme == "tucker2":
        return (min(c, n * k), min(n, c * k))
    # cp: tensor rank of an (n, c, kh, kw) tensor is at most the product of all dims but the largest
    dims = sorted((n, c, kh, kw))
    return (dims[0] * dims[1] * dims[2],)


def factored_cost(g: Geometry, scheme: str, rank: int | Sequence[int]) -> Cost:
    """MACs and parameters of a layer factored with ``scheme`` at ``rank``.

    Args:
        g: The layer's geometry.
        scheme: One of :data:`SCHEMES` that applies to the layer.
        rank: An int, or for ``tucker2`` a pair ``(r_in, r_out)`` (an int means both).

    Returns:
        The cost of the factored subgraph, bias included.
    """
    _check_scheme(g, scheme)
    ranks = (rank,) if isinstance(rank, int) else tuple(int(r) for r in rank)
    if isinstance(g, LinearGeometry):
        (r,) = ranks
        params = r * (g.in_features + g.out_features) + (g.out_features if g.bias else 0)
        return Cost(g.rows * r * (g.in_features + g.out_features), params)
    bias = g.out_channels if g.bias else 0
    n, c, k, pos = g.out_channels, g.in_channels, _prod(g.kernel), g.positions
    if scheme == "channel":
        (r,) = ranks
        gr = g.groups
        per = r * ((c // gr) * k + n // gr)
        return Cost(gr * per * pos, gr * per + bias)
    kh, kw = g.kernel
    h_out = g.out_spatial[0]
    w_in = g.in_spatial[1]
    if scheme == "spatial":
        (r,) = ranks
        macs = g.batch * (r * c * kh * h_out * w_in) + pos * n * r * kw
        return Cost(macs, r * (c * kh + n * kw) + bias)
    if scheme == "tucker2":
        r_in, r_out = (ranks[0], ranks[0]) if len(ranks) == 1 else ranks
        macs = g.batch * c * r_in * _prod(g.in_spatial) + pos * (r_in * r_out * k + r_out * n)
        return Cost(macs, c * r_in + r_in * r_out * k + r_out * n + bias)
    # cp: 1x1 (C->R) at input size, depthwise (kh,1) to (H', W_in), depthwise (1,kw), 1x1 (R->N)
    (r,) = ranks
    macs = g.batch * (c * r * _prod(g.in_spatial) + r * kh * h_out * w_in) + pos * r * (kw + n)
    return Cost(macs, r * (c + kh + kw + n) + bias)


def break_even_rank(g: Geometry, scheme: str) -> int:
    """Smallest rank at which the factored layer costs at least as many MACs as the dense one.

    A plan keeps a layer dense at this rank or above. For ``tucker2`` the rank is the common
    value ``r_in = r_out`` scaled by the layer's ``(C, N)`` aspect; it is reported as ``r_out``.
    """
    dense = dense_cost(g).macs
    hi = max(max_rank(g, scheme))
    lo = 1
    if _cost_at(g, scheme, hi) < dense:
        return hi + 1
    while lo < hi:
        mid = (lo + hi) // 2
        if _cost_at(g, scheme, mid) >= dense:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _cost_at(g: Geometry, scheme: str, r: int) -> int:
    if scheme == "tucker2":
        assert isinstance(g, ConvGeometry)
        r_in = max(1, round(r * g.in_channels / g.out_channels))
        return factored_cost(g, scheme, (min(r_in, max_rank(g, scheme)[0]), r)).macs
    return factored_cost(g, scheme, r).macs


def _check_scheme(g: Geometry, scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    if scheme not in applicable_schemes(g):
        kind = "linear" if isinstance(g, LinearGeometry) else f"conv{len(g.kernel)}d"
        raise ValueError(f"scheme {scheme!r} does not apply to this {kind} layer")


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

