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

__all__ = [
    "UNFOLDINGS",
    "channel_factors",
    "check_finite",
    "cp_factors",
    "linear_factors",
    "singular_values",
    "spatial_factors",
    "svdvals",
    "truncated_svd",
    "truncation_error",
    "tucker2_factors",
    "unfold",
]

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


# --- factorizations -------------------------------------------------------------------------------
#
# Every function below takes a weight in any dtype/device, computes in float64 on the CPU and
# returns float64 CPU tensors; callers cast back to the original weight's dtype and device.


def _f64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(device="cpu", dtype=torch.float64)


def check_finite(weight: torch.Tensor, layer: str) -> None:
    """Refuse to factor a weight holding NaN or Inf (the SVD would silently produce garbage)."""
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise LrfxError(
            f"layer {layer!r}: weight holds {bad} NaN/Inf value(s); fix or retrain the layer "
            "before factoring it, or leave it dense in the plan"
        )


def truncated_svd(
    mats: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD ``U S Vh`` of a batch ``(g, m, n)`` of float64 matrices.

    Strongly rectangular matrices go through a QR first (same factors, much faster on CPU).
    """
    m, n = mats.shape[-2:]
    if m >= 2 * n:
        q, r = torch.linalg.qr(mats)
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        u = q @ u
    elif n >= 2 * m:
        q, r = torch.linalg.qr(mats.transpose(-2, -1))
        u, s, vh = torch.linalg.svd(r.transpose(-2, -1), full_matrices=False)
        vh = vh @ q.transpose(-2, -1)
    else:
        u, s, vh = torch.linalg.svd(mats, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def _balanced(
    mats: torch.Tensor, rank: int, whiten: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left, right)`` with ``mats ~= left @ right``, the singular values split evenly.

    With ``whiten`` (lower-triangular ``S``, ``S S^T = X X^T``) the truncation minimizes the
    output error ``||(M - left @ right) X||`` instead (SVD-LLM): SVD of ``M S``, then
    ``right = sqrt(s) V^T S^-1``.
    """
    if whiten is None:
        u, s, vh = truncated_svd(mats, rank)
        root = s.sqrt()
        return u * root.unsqueeze(-2), root.unsqueeze(-1) * vh
    sw = _f64(whiten)
    u, s, vh = truncated_svd(mats @ sw, rank)
    root = s.sqrt()
    right = torch.linalg.solve_triangular(sw, root.unsqueeze(-1) * vh, upper=False, left=False)
    return u * root.unsqueeze(-2), right


def linear_factors(
    weight: torch.Tensor, rank: int, whiten: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD of a linear weight ``(m, n)``: returns ``(first (r, n), second (m, r))``.

    ``whiten``: the ``(n, n)`` (or ``(1, n, n)``) Cholesky factor of the inputs' Gram matrix.
    """
    sw = None if whiten is None else whiten.reshape(1, *whiten.shape[-2:])
    left, right = _balanced(_f64(weight).unsqueeze(0), rank, sw)
    return right[0], left[0]


def channel_factors(
    weight: torch.Tensor, rank: int, groups: int = 1, whiten: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scheme 1 per group: ``(first (g*r, C/g, *k), second (N, r, 1...))``.

    ``first`` is a grouped conv with the original geometry, ``second`` a grouped 1x1 conv.
    ``whiten``: per group, the Cholesky factor of the im2col patches' Gram, ``(g, d, d)``.
    """
    w = _f64(weight)
    n, cg, *k = w.shape
    # (g, N/g, r), (g, r, C/g*k)
    left, right = _balanced(unfold(w, "channel", groups), rank, whiten)
    first = right.reshape(groups * rank, cg, *k)
    second = left.reshape(n, rank, *([1] * len(k)))
    return first, second


def spatial_factors(
    weight: torch.Tensor, rank: int, whiten: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scheme 2: ``(vertical (r, C, kh, 1), horizontal (N, r, 1, kw))``.

    ``whiten``: Cholesky factor ``(C*kh, C*kh)`` of the vertical patches' Gram; the input side
    is the rows of this unfolding, so the SVD is of ``S^T M`` and the left factor gets
    ``S^-T``.
    """
    w = _f64(weight)
    n, c, kh, kw = w.shape
    m = unfold(w, "spatial")
    if whiten is None:
        left, right = _balanced(m, rank)  # (1, C*kh, r), (1, r, N*kw)
    else:
        sw = _f64(whiten).reshape(1, c * kh, c * kh)
        u, s, vh = truncated_svd(sw.transpose(-2, -1) @ m, rank)
        root = s.sqrt()
        left = torch.linalg.solve_triangular(sw.transpose(-2, -1), u * root.unsqueeze(-2),
                                             upper=True)
        right = root.unsqueeze(-1) * vh
    vertical = left[0].reshape(c, kh, rank).permute(2, 0, 1).unsqueeze(-1)
    horizontal = right[0].reshape(rank, n, kw).permute(1, 0, 2).unsqueeze(2)
    return vertical.contiguous(), horizontal.contiguous()


def tucker2_factors(
    weight: torch.Tensor, ranks: tuple[int, int], n_iter_max: int = 100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 on modes 0 and 1 (tensorly ``partial_tucker``, HOSVD init then HOOI).

    Returns ``(first (r_in, C, 1, 1), core (r_out, r_in, kh, kw), last (N, r_out, 1, 1))``.
    """
    import tensorly as tl
    from tensorly.decomposition import partial_tucker

    r_in, r_out = ranks
    w = _f64(weight)
    with tl.backend_context("pytorch"):
        out = partial_tucker(w, rank=[r_out, r_in], modes=[0, 1], init="svd",
                             n_iter_max=n_iter_max, tol=1e-10)
    # tensorly >= 0.9 returns ((core, factors), errors); older releases return (core, factors)
    core, factors = out[0] if isinstance(out[0], (tuple, list)) else out
    u_out, u_in = (torch.as_tensor(f, dtype=torch.float64) for f in factors)
    core = torch.as_tensor(core, dtype=torch.float64)
    first = u_in.T.reshape(r_in, w.shape[1], 1, 1)
    last = u_out.reshape(w.shape[0], r_out, 1, 1)
    return first.contiguous(), core.contiguous(), last.contiguous()


def cp_factors(
    weight: torch.Tensor, rank: int, n_iter_max: int = 500, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CP decomposition of a conv kernel (Lebedev et al. 2015) via tensorly ``parafac``.

    Returns ``(first (R, C, 1, 1), vertical (R, 1, kh, 1), horizontal (R, 1, 1, kw),
    last (N, R, 1, 1))`` for 1x1 -> depthwise kx1 -> depthwise 1xk -> 1x1.
    """
    import tensorly as tl
    from tensorly.decomposition import parafac

    w = _f64(weight)
    n, c, kh, kw = w.shape
    with tl.backend_context("pytorch"):
        cp = parafac(w, rank=rank, init="random", n_iter_max=n_iter_max, tol=1e-12,
                     random_state=seed, normalize_factors=False)
    weights, (a_n, a_c, a_h, a_w) = cp
    a_n = torch.as_tensor(a_n, dtype=torch.float64) * torch.as_tensor(weights, dtype=torch.float64)
    first = torch.as_tensor(a_c, dtype=torch.float64).T.reshape(rank, c, 1, 1)
    vertical = torch.as_tensor(a_h, dtype=torch.float64).T.reshape(rank, 1, kh, 1)
    horizontal = torch.as_tensor(a_w, dtype=torch.float64).T.reshape(rank, 1, 1, kw)
    return first.contiguous(), vertical.contiguous(), horizontal.contiguous(), a_n.reshape(
        n, rank, 1, 1
    ).contiguous()


def truncation_error(
    weight: torch.Tensor, unfolding: str, rank: int, groups: int = 1
) -> float:
    """Eckart-Young error ``sqrt(sum_{i>r} s_i^2)`` of the best rank-``r`` approximation."""
    s = singular_values(weight, unfolding, groups)
    return float(s[:, rank:].square().sum().sqrt())
