"""Numerics of the decompositions: matrix unfoldings of weights and their singular values.

No FX here: plain tensors in, plain tensors out. Plain SVD uses ``torch.linalg``; tensorly is
called only from this module, inside a backend context.

Unfoldings of a conv weight ``W`` of shape ``(N, C/groups, *k)`` (``shared/algorithms.md`` §0):

* ``rows``: a linear weight ``(m, n)`` as it is;
* ``channel``: per group, ``W_g.reshape(N/g, C/g * prod(k))`` (scheme 1; also Tucker-2 mode 0);
* ``spatial``: ``W.permute(1, 2, 0, 3).reshape(C * kh, N * kw)`` (scheme 2, Conv2d only);
* ``mode1``: ``W.permute(1, 0, 2, 3).reshape(C, N * kh * kw)`` (Tucker-2 mode 1, ``r_in``).
"""

from __future__ import annotations

import torch

from lrfx.errors import LrfxError

__all__ = ["UNFOLDINGS", "singular_values", "svdvals", "unfold"]

UNFOLDINGS = ("rows", "channel", "spatial", "mode1")


def unfold(weight: torch.Tensor, unfolding: str, groups: int = 1) -> torch.Tensor:
    """The ``(groups, rows, cols)`` matrices whose singular values rank a scheme.

    Example:
        >>> unfold(torch.zeros(8, 4, 3, 3), "spatial").shape
        torch.Size([1, 12, 24])
    """
    w = weight.detach()
    if unfolding == "rows":
        if w.dim() != 2:
            raise LrfxError(f"unfolding 'rows' needs a 2-D weight, got shape {tuple(w.shape)}")
        return w.unsqueeze(0)
    if w.dim() < 3:
        raise LrfxError(f"unfolding {unfolding!r} needs a conv weight, got shape {tuple(w.shape)}")
    n = w.shape[0]
    if unfolding == "channel":
        return w.reshape(groups, n // groups, -1)
    if groups != 1:
        raise LrfxError(f"unfolding {unfolding!r} is defined for groups=1 only, got {groups}")
    if w.dim() != 4:
        raise LrfxError(f"unfolding {unfolding!r} needs a Conv2d weight, got {tuple(w.shape)}")
    _, c, kh, kw = w.shape
    if unfolding == "spatial":
        return w.permute(1, 2, 0, 3).reshape(1, c * kh, n * kw)
    if unfolding == "mode1":
        return w.permute(1, 0, 2, 3).reshape(1, c, -1)
    raise LrfxError(f"unknown unfolding {unfolding!r}; expected one of {', '.join(UNFOLDINGS)}")


def singular_values(weight: torch.Tensor, unfolding: str, groups: int = 1) -> torch.Tensor:
    """Singular values of an unfolding, ``(groups, k)`` float64 on the CPU, descending.

    Computed in float64 whatever the weight's dtype, so that energy fractions near 1 are exact.
    """
    mats = unfold(weight, unfolding, groups).to(device="cpu", dtype=torch.float64)
    return svdvals(mats)


def svdvals(mats: torch.Tensor) -> torch.Tensor:
    """Singular values of a (batch of) matrices, fast for very wide or tall ones.

    LAPACK's divide-and-conquer SVD is slow on strongly rectangular matrices (a 512 x 4608
    conv unfolding takes seconds); a QR first reduces them to a small square triangle with the
    same singular values, at the same accuracy, several times faster.
    """
    m, n = mats.shape[-2:]
    if max(m, n) >= 2 * min(m, n):
        tall = mats if m >= n else mats.transpose(-2, -1)
        mats = torch.linalg.qr(tall, mode="r")[1]
    return torch.linalg.svdvals(mats)
