"""Gram matrices of convolution patches without im2col.

The Gram of a conv's im2col patches, ``sum p p^T`` over every output position of every sample,
is what whitened factorization needs (``d x d``, ``d = C/g * kh * kw``). Building the patches
copies the input ``kh * kw`` times and multiplies ``(kh * kw)^2`` blocks of ``C x C``. But the
block of taps ``t`` and ``t'`` only depends on their *offset* ``t' - t``: it is the correlation of
the input with itself shifted by that offset, summed over the window of positions tap ``t``
reads.

:func:`patch_gram` gets every such correlation at once from one conv weight-gradient call
(``sum_u A[c, u] B[c', u + offset]`` for all offsets in a ``(2k-1)^2`` window is exactly the
weight gradient of a conv with that kernel, which oneDNN computes at convolution speed), then
turns it into every block exactly by inclusion-exclusion over the few border rows and columns a
tap's window leaves out (zero-padding rows and columns need none). Strided and dilated convs
reduce to stride 1 on the ``stride[0] * stride[1]`` phase sub-images of the input (tap ``t``
reads phase ``d*t mod s`` at offset ``d*t div s``).

Precision: float32 products (accumulated by oneDNN) over chunks of at most :data:`BLOCK`
positions, summed in float64.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["BLOCK", "MAX_TAPS", "PAIR_BYTES", "im2col_gram", "patch_gram", "patch_sums"]

#: Positions (samples x rows x columns) per float32 product; the chunks are summed in float64.
BLOCK = 1 << 15

#: Kernels with more taps than this (long 1-D kernels: 64, 512...) go through im2col: the
#: offsets' border bookkeeping grows with the square of the taps, the im2col Gram does not.
MAX_TAPS = 49

#: Bytes of float64 blocks assembled at once (the pairs of taps go through in slices).
PAIR_BYTES = 1 << 24

_Phase = tuple[int, int]


def _out_size(n: int, k: int, s: int, d: int) -> int:
    return (n - d * (k - 1) - 1) // s + 1


def _taps(kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
          ) -> list[tuple[_Phase, tuple[int, int]]]:
    """Per tap (row-major, as im2col orders them): (phase, offset in the phase sub-image)."""
    out = []
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            oy, ox = dilation[0] * i, dilation[1] * j
            out.append(((oy % stride[0], ox % stride[1]), (oy // stride[0], ox // stride[1])))
    return out


def _zero_lines(pad: tuple[int, ...], s: int, n: int, size: int) -> set[tuple[int, int]]:
    """(phase, index) of the rows (or columns) of the phase grids that are zero padding."""
    return {(r, i) for r in range(s) for i in range(n)
            if s * i + r < pad[0] or s * i + r >= size - pad[1]}


def _corr(a: torch.Tensor, b: torch.Tensor, groups: int, dys: tuple[int, int],
          dxs: tuple[int, int]) -> torch.Tensor:
    """``out[c, c', dy - dys[0], dx - dxs[0]] = sum_{n, u} a[n, c, u] b[n, c', u + (dy, dx)]``
    for ``dy`` in ``dys[0]..dys[1]``, ``dx`` likewise (``b`` zero outside its grid), per group
    (``c'`` local): a conv weight gradient. Float32 chunks of at most :data:`BLOCK` positions,
    summed in float64."""
    b = F.pad(b, (-dxs[0], dxs[1], -dys[0], dys[1]))
    weight = a.new_empty((a.shape[1], b.shape[1] // groups, dys[1] - dys[0] + 1,
                          dxs[1] - dxs[0] + 1))
    per = max(1, BLOCK // max(1, a.shape[2] * a.shape[3]))
    out = None
    for start in range(0, a.shape[0], per):
        part = torch.ops.aten.convolution_backward(
            a[start:start + per], b[start:start + per], weight, None, [1, 1], [0, 0], [1, 1],
            False, [0, 0], groups, [False, True, False])[1].to(torch.float64)
        out = part if out is None else out.add_(part)
    assert out is not None
    return out


class _Phases:
    """The input's stride phases (``x[:, :, r0::s0, r1::s1]`` of the input zero-extended to
    whole multiples of the stride), each made contiguous once."""

    def __init__(self, x: torch.Tensor, stride: tuple[int, int], dtype: torch.dtype) -> None:
        _, _, h, w = x.shape
        s0, s1 = stride
        self.hs, self.ws = -(-h // s0), -(-w // s1)
        if (self.hs * s0, self.ws * s1) != (h, w):
            x = F.pad(x, (0, self.ws * s1 - w, 0, self.hs * s0 - h))
        self.x, self.stride, self.dtype = x, stride, dtype
        self.cache: dict[_Phase, torch.Tensor] = {}

    def __call__(self, r: _Phase) -> torch.Tensor:
        if r not in self.cache:
            sub = self.x[:, :, r[0]::self.stride[0], r[1]::self.stride[1]]
            self.cache[r] = sub.to(self.dtype, memory_format=torch.contiguous_format)
        return self.cache[r]


def _line_products(a: torch.Tensor, b: torch.Tensor, at: int, shifts: list[tuple[int, int]],
                   groups: int) -> dict[tuple[int, int], torch.Tensor]:
    """Per shift ``(dy, dx)``: ``sum_{n, x} a[n, c, at, x] b[n, c', at + dy, x + dx]`` (``b``
    zero outside its grid) as ``(C, C/g)`` float64, every shift in one product."""
    h, w = a.shape[2:]
    qx = max(abs(dx) for _, dx in shifts)
    padded: dict[int, torch.Tensor] = {}
    slices, kept = [], []
    for dy, dx in shifts:
        if not 0 <= at + dy < h:
            continue  # that row of b is outside the grid: the product is 0
        if dy not in padded:
            padded[dy] = F.pad(b[:, :, at + dy], (qx, qx))
        slices.append(padded[dy][:, :, qx + dx:qx + dx + w])
        kept.append((dy, dx))
    if not kept:
        return {}
    n, c = a.shape[:2]
    line = a[:, :, at].reshape(n, groups, c // groups, w)
    stacked = torch.stack(slices).reshape(len(kept), n, groups, c // groups, w)
    prod = torch.einsum("ngcx,sngdx->sgcd", line, stacked).flatten(1, 2).to(torch.float64)
    return dict(zip(kept, prod, strict=True))


def _point_products(a: torch.Tensor, b: torch.Tensor, r: int, col: int,
                    shifts: list[tuple[int, int]], groups: int
                    ) -> dict[tuple[int, int], torch.Tensor]:
    """:func:`_line_products` of one position ``(r, col)``."""
    h, w = a.shape[2:]
    kept = [(dy, dx) for dy, dx in shifts if 0 <= r + dy < h and 0 <= col + dx < w]
    if not kept:
        return {}
    n, c = a.shape[:2]
    at = a[:, :, r, col].reshape(n, groups, c // groups)
    bs = torch.stack([b[:, :, r + dy, col + dx] for dy, dx in kept]).reshape(
        len(kept), n, groups, c // groups)
    prod = torch.einsum("ngc,sngd->sgcd", at, bs).flatten(1, 2).to(torch.float64)
    return dict(zip(kept, prod, strict=True))


def im2col_gram(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    y: torch.Tensor | None = None,
    vertical: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """:func:`patch_gram` from materialized im2col rows, a few samples (about :data:`BLOCK`
    rows) at a time: float32 products summed in float64. The path for kernels of more than
    :data:`MAX_TAPS` taps, and the reference the shift-structured path is measured against."""
    dtype = torch.float64 if torch.float64 in (x.dtype, x.dtype if y is None else y.dtype) \
        else torch.float32

    def rows(t: torch.Tensor, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int],
             g: int) -> torch.Tensor:
        cols = F.unfold(t.to(dtype), k, dilation=d, stride=s)  # (B, C*kh*kw, L)
        r = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return r.reshape(r.shape[0], g, -1).transpose(0, 1)  # (g, B*L, C/g*kh*kw)

    def gram(k: tuple[int, int], s: tuple[int, int], d: tuple[int, int], g: int) -> torch.Tensor:
        _, c, h, w = x.shape
        positions = max(0, _out_size(h, k[0], s[0], d[0])) * max(0, _out_size(w, k[1], s[1], d[1]))
        out = torch.zeros(g, c // g * k[0] * k[1], c // g * k[0] * k[1], dtype=torch.float64,
                          device=x.device)
        if positions == 0:
            return out
        per = max(1, BLOCK // positions)
        for start in range(0, x.shape[0], per):
            a = rows(x[start:start + per], k, s, d, g)
            b = a if y is None else rows(y[start:start + per], k, s, d, g)
            out.add_((a.transpose(1, 2) @ b).to(torch.float64))
        return out

    full = gram(kernel, stride, dilation, groups)
    if not vertical:
        return full
    return full, gram((kernel[0], 1), (stride[0], 1), (dilation[0], 1), 1)


class _Parts:
    """Border products, each stored once, by key."""

    def __init__(self) -> None:
        self.items: list[torch.Tensor] = []
        self.index: dict[tuple[Any, ...], int] = {}

    def add(self, key: tuple[Any, ...], value: torch.Tensor) -> int:
        if key not in self.index:
            self.index[key] = len(self.items)
            self.items.append(value)
        return self.index[key]


def _write_pairs(plan: list[tuple[Any, ...]], signs: torch.Tensor, vsigns: torch.Tensor,
                 core: torch.Tensor, stacked: torch.Tensor | None, origin: tuple[int, int],
                 blocks: torch.Tensor, vblocks: torch.Tensor | None, kw: int, sym: bool) -> None:
    """Write the blocks of some tap pairs: the core correlation at each pair's offset plus its
    signed border parts (and, into ``vblocks``, the vertical Gram's blocks, rows only)."""
    dev = core.device
    n_pairs = len(plan)
    groups, cg = blocks.shape[0], blocks.shape[1]
    ii = torch.tensor([p[0] for p in plan], device=dev)
    jj = torch.tensor([p[1] for p in plan], device=dev)
    dyi = torch.tensor([p[2] - origin[0] for p in plan], device=dev)
    dxi = torch.tensor([p[3] - origin[1] for p in plan], device=dev)
    base = core[:, :, dyi, dxi].permute(2, 0, 1)  # (P, C, C/g)
    vals = base if stacked is None else base + torch.einsum("pm,mcd->pcd", signs, stacked)
    gv = vals.reshape(n_pairs, groups, cg, cg)
    blocks[:, :, ii, :, jj] = gv
    if sym:
        off = ii != jj
        blocks[:, :, jj[off], :, ii[off]] = gv[off].transpose(-1, -2)
    if vblocks is None:
        return
    vert_pairs = (ii % kw == 0) & (jj % kw == 0)
    if bool(vert_pairs.any()):
        vv = base[vert_pairs] if stacked is None else base[vert_pairs] + torch.einsum(
            "pm,mcd->pcd", vsigns[vert_pairs], stacked)
        ia, ib = ii[vert_pairs] // kw, jj[vert_pairs] // kw
        vblocks[0, :, ia, :, ib] = vv
        if sym:
            off = ia != ib
            vblocks[0, :, ib[off], :, ia[off]] = vv[off].transpose(-1, -2)


def patch_gram(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
    y: torch.Tensor | None = None,
    pad: tuple[int, int, int, int] = (0, 0, 0, 0),
    vertical: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``sum P_x^T P_y`` of the im2col patches of two padded inputs, per group, in float64.

    Args:
        x: A padded conv input ``(B, C, H, W)`` (padding already applied, as ``F.unfold`` with
            no padding sees it).
        kernel, stride, dilation, groups: The conv's.
        y: A second input of the same shape (the cross Gram ``sum P_x^T P_y``); ``None`` for
            the Gram of ``x``.
        pad: ``(top, bottom, left, right)``: how many rows / columns on each side of ``x`` (and
            ``y``) are zero padding: they need no border correction (an optimization only, the
            result does not depend on it).
        vertical: Also return the Gram of the vertical ``kh x 1`` patches over every column
            (stride ``(stride[0], 1)``), the spatial unfolding's input side, which comes almost
            free (``groups == 1`` and ``stride[1] == 1`` only).

    Returns:
        ``(groups, C/g * kh * kw, C/g * kh * kw)`` float64, rows and columns in im2col order
        (channel major, then kernel row, then column); equal to ``P_x^T P_y`` of
        ``F.unfold(x, kernel, dilation=dilation, stride=stride)``'s patches per group. With
        ``vertical``, also ``(1, C * kh, C * kh)``.
    """
    if x.dim() != 4 or (y is not None and y.shape != x.shape):
        raise ValueError(f"patch_gram needs (B, C, H, W) inputs of one shape, got "
                         f"{tuple(x.shape)}" + ("" if y is None else f" and {tuple(y.shape)}"))
    if vertical and (groups != 1 or stride[1] != 1):
        raise ValueError("patch_gram(vertical=True) needs groups == 1 and stride[1] == 1")
    sym = y is None
    dtype = torch.float64 if torch.float64 in (x.dtype, x.dtype if y is None else y.dtype) \
        else torch.float32
    b, c, h, w = x.shape
    ho, wo = (_out_size(h, kernel[0], stride[0], dilation[0]),
              _out_size(w, kernel[1], stride[1], dilation[1]))
    cg, kk = c // groups, kernel[0] * kernel[1]
    if kk > MAX_TAPS:
        return im2col_gram(x, kernel, stride, dilation, groups, y, vertical)
    out = torch.zeros(groups, cg * kk, cg * kk, dtype=torch.float64, device=x.device)
    vert = torch.zeros(1, c * kernel[0], c * kernel[0], dtype=torch.float64, device=x.device)
    if ho <= 0 or wo <= 0 or b == 0:
        return (out, vert) if vertical else out
    taps = _taps(kernel, stride, dilation)
    xs = _Phases(x, stride, dtype)
    ys = xs if y is None else _Phases(y, stride, dtype)
    zero_rows = _zero_lines(pad[:2], stride[0], xs.hs, h)
    zero_cols = _zero_lines(pad[2:], stride[1], xs.ws, w)

    # tap pairs by their phases; one correlation (all offsets) per phase pair
    by_phase: dict[tuple[_Phase, _Phase], list[tuple[int, int]]] = defaultdict(list)
    for i, (ra, _) in enumerate(taps):
        for j, (rb, _) in enumerate(taps):
            if not sym or j >= i:
                by_phase[(ra, rb)].append((i, j))
    blocks = out.view(groups, cg, kk, cg, kk)
    vblocks = vert.view(1, c, kernel[0], c, kernel[0])
    for (ra, rb), pairs in by_phase.items():
        offsets = [(taps[j][1][0] - taps[i][1][0], taps[j][1][1] - taps[i][1][1])
                   for i, j in pairs]
        dys = (min(o[0] for o in offsets), max(o[0] for o in offsets))
        dxs = (min(o[1] for o in offsets), max(o[1] for o in offsets))
        a, bb = xs(ra), ys(rb)
        core = _corr(a, bb, groups, dys, dxs)  # every position, every offset the pairs use
        # the rows / columns of a's grid some pair's window leaves out (zero padding needs none)
        ex_rows = [r for r in range(xs.hs) if (ra[0], r) not in zero_rows and any(
            not taps[i][1][0] <= r < taps[i][1][0] + ho for i, _ in pairs)]
        ex_cols = [col for col in range(xs.ws) if (ra[1], col) not in zero_cols and any(
            not taps[i][1][1] <= col < taps[i][1][1] + wo for i, _ in pairs)]
        # which border products the pairs need: the rows a pair's window leaves out, the
        # columns it leaves out, and where both cross (counted twice): each line's in one product
        plan = []
        need: dict[tuple[str, int, int], set[tuple[int, int]]] = defaultdict(set)
        for i, j in pairs:
            (q0, q1), (p0, p1) = taps[i][1], taps[j][1]
            dy, dx = p0 - q0, p1 - q1
            out_r = [r for r in ex_rows if not q0 <= r < q0 + ho]
            out_c = [col for col in ex_cols if not q1 <= col < q1 + wo]
            plan.append((i, j, dy, dx, out_r, out_c))
            for r in out_r:
                need[("row", r, -1)].add((dy, dx))
            for col in out_c:
                need[("col", col, -1)].add((dx, dy))
                for r in out_r:
                    need[("point", r, col)].add((dy, dx))
        at, bt = a.transpose(2, 3), bb.transpose(2, 3)
        got: dict[tuple[str, int, int], dict[tuple[int, int], torch.Tensor]] = {}
        for (kind, p, p2), shifts in need.items():
            order = sorted(shifts)
            got[(kind, p, p2)] = (
                _line_products(a, bb, p, order, groups) if kind == "row" else
                _line_products(at, bt, p, order, groups) if kind == "col" else
                _point_products(a, bb, p, p2, order, groups))
        parts = _Parts()
        n_pairs = len(plan)
        entries: list[tuple[int, int, float, bool]] = []  # (pair, part, sign, rows only)
        for n, (_, _, dy, dx, out_r, out_c) in enumerate(plan):
            for r in out_r:
                if (v := got[("row", r, -1)].get((dy, dx))) is not None:
                    entries.append((n, parts.add(("row", r, dy, dx), v), -1.0, True))
            for col in out_c:
                if (v := got[("col", col, -1)].get((dx, dy))) is not None:
                    entries.append((n, parts.add(("col", col, dy, dx), v), -1.0, False))
                for r in out_r:
                    if (v := got[("point", r, col)].get((dy, dx))) is not None:
                        entries.append((n, parts.add(("point", r, col, dy, dx), v), 1.0,
                                        False))
        signs = torch.zeros(n_pairs, max(1, len(parts.items)), dtype=torch.float64,
                            device=x.device)
        vsigns = torch.zeros_like(signs)
        for n, k, sign, rows_only in entries:
            signs[n, k] += sign
            if rows_only:
                vsigns[n, k] += sign
        stacked = torch.stack(parts.items) if parts.items else None
        # pairs a few at a time: a (pairs, C, C/g) float64 stack of every pair's block would
        # be as big as the Gram itself (hundreds of MB for 512-channel 3x3 convs)
        step = max(1, PAIR_BYTES // (8 * c * cg))
        for lo in range(0, n_pairs, step):
            _write_pairs(plan[lo:lo + step], signs[lo:lo + step], vsigns[lo:lo + step],
                         core, stacked, (dys[0], dxs[0]), blocks, vblocks if vertical else None,
                         kernel[1], sym)
    return (out, vert) if vertical else out


def patch_sums(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int] = (1, 1),
    dilation: tuple[int, int] = (1, 1),
    groups: int = 1,
) -> torch.Tensor:
    """``sum P`` of the im2col patches (per group, float64): ``(groups, C/g * kh * kw)``."""
    _, c, h, w = x.shape
    ho, wo = (_out_size(h, kernel[0], stride[0], dilation[0]),
              _out_size(w, kernel[1], stride[1], dilation[1]))
    cg = c // groups
    per_channel = x.to(torch.float64).sum(0)  # (C, H, W)
    out = torch.zeros(groups, cg, kernel[0], kernel[1], dtype=torch.float64, device=x.device)
    if ho <= 0 or wo <= 0:
        return out.flatten(1)
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            y0, x0 = dilation[0] * i, dilation[1] * j
            win = per_channel[:, y0:y0 + stride[0] * (ho - 1) + 1:stride[0],
                              x0:x0 + stride[1] * (wo - 1) + 1:stride[1]]
            out[:, :, i, j] = win.sum((1, 2)).view(groups, cg)
    return out.flatten(1)
