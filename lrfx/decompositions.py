"""Numerics of the decompositions: unfoldings, spectra, factors and projections.

No FX here: plain tensors in, plain tensors out. Plain SVD uses ``torch.linalg``; tensorly is
called only from this module, inside a backend context.

**Unfoldings** (:data:`UNFOLDINGS`) turn a weight into the ``(groups, rows, cols)`` matrices whose
singular values rank a scheme, and fold them back (``shared/algorithms.md`` section 0). For a conv
weight ``W`` of shape ``(N, C/groups, *k)``:

* ``rows``: a linear weight ``(m, n)`` as it is (input on the columns);
* ``channel``: per group, ``W_g.reshape(N/g, C/g * prod(k))`` (scheme 1; Tucker-2 mode 0);
* ``spatial``: ``W.permute(1, 2, 0, 3).reshape(C * kh, N * kw)`` (scheme 2; input on the rows);
* ``mode1``: ``W.permute(1, 0, ...).reshape(C, N * prod(k))`` (Tucker-2 mode 1; input on the rows).

**Spectra** (:class:`Spectrum`) come from the eigendecomposition of the Gram matrix of each
unfolding's smaller side (``A A^T`` or ``A^T A``), batched over matrices of one shape. With
``vectors=True`` the eigenvectors are kept as the spectrum's *basis*, so the rewrite builds
factors with one matrix product (:func:`factor_pair`) instead of a second SVD. A data-aware
(whitened) spectrum is that of ``A = M S`` (``S^T M`` when the input is on the rows), where
``S S^T`` is the Gram of the layer's inputs (SVD-LLM): then each dropped singular value is the
output error it causes.

**Precision.** Gram eigendecomposition squares the condition number. In float64 the spectra are
exact to ~1e-8 of the largest singular value; large unfoldings may be decomposed in float32 for
speed (``precision="auto"``), which keeps energy fractions and truncation tails exact to ~1e-6
while singular values below ~3e-4 of the largest become approximate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lrfx.errors import LrfxError

__all__ = [
    "EigenBasis",
    "Spectrum",
    "UNFOLDINGS",
    "Unfolding",
    "WeightStamp",
    "channel_factors",
    "check_finite",
    "cp_factors",
    "decompose",
    "decompose_many",
    "factor_pair",
    "fit_low_rank",
    "inverse_sqrt",
    "is_finite",
    "least_squares",
    "linear_factors",
    "project_matrix",
    "singular_values",
    "spatial_factors",
    "spectrum_of",
    "svdvals",
    "truncated_svd",
    "truncation_error",
    "tucker2_factors",
    "tucker2_project",
    "unfold",
    "whitening_factor",
]

Side = Literal["left", "right"]
InputSide = Literal["cols", "rows"]


# --- unfoldings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unfolding:
    """A way to see a weight as a batch of matrices, and back.

    Attributes:
        name: ``rows``, ``channel``, ``spatial`` or ``mode1``.
        input_side: Which side of the matrix faces the layer's input (``cols``: ``y = M x``;
            ``rows``: the rows index input channels), i.e. where whitening applies.
        to_matrix: ``(weight, groups) -> (groups, rows, cols)``.
        from_matrix: ``(mats, weight_shape, groups) -> weight``.
        needs: A short description of the weights it applies to (for errors).
    """

    name: str
    input_side: InputSide
    to_matrix: Callable[[torch.Tensor, int], torch.Tensor]
    from_matrix: Callable[[torch.Tensor, tuple[int, ...], int], torch.Tensor]
    needs: str = ""

    def matrix(self, weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
        return self.to_matrix(weight, groups)

    def fold(self, mats: torch.Tensor, shape: Sequence[int], groups: int = 1) -> torch.Tensor:
        return self.from_matrix(mats, tuple(shape), groups)


def _rows(w: torch.Tensor, groups: int) -> torch.Tensor:
    if w.dim() != 2:
        raise LrfxError(f"unfolding 'rows' needs a 2-D weight, got shape {tuple(w.shape)}")
    return w.unsqueeze(0)


def _conv_check(w: torch.Tensor, name: str) -> None:
    if w.dim() < 3:
        raise LrfxError(f"unfolding {name!r} needs a conv weight, got shape {tuple(w.shape)}")


def _channel(w: torch.Tensor, groups: int) -> torch.Tensor:
    _conv_check(w, "channel")
    return w.reshape(groups, w.shape[0] // groups, -1)


def _ungrouped_2d(w: torch.Tensor, groups: int, name: str) -> None:
    _conv_check(w, name)
    if groups != 1:
        raise LrfxError(f"unfolding {name!r} is defined for groups=1 only, got {groups}")


def _spatial(w: torch.Tensor, groups: int) -> torch.Tensor:
    _ungrouped_2d(w, groups, "spatial")
    if w.dim() != 4:
        raise LrfxError(f"unfolding 'spatial' needs a Conv2d weight, got {tuple(w.shape)}")
    n, c, kh, kw = w.shape
    return w.permute(1, 2, 0, 3).reshape(1, c * kh, n * kw)


def _mode1(w: torch.Tensor, groups: int) -> torch.Tensor:
    _ungrouped_2d(w, groups, "mode1")
    perm = (1, 0, *range(2, w.dim()))
    return w.permute(*perm).reshape(1, w.shape[1], -1)


def _fold_spatial(m: torch.Tensor, shape: tuple[int, ...], groups: int) -> torch.Tensor:
    n, c, kh, kw = shape
    return m.reshape(c, kh, n, kw).permute(2, 0, 1, 3)


def _fold_mode1(m: torch.Tensor, shape: tuple[int, ...], groups: int) -> torch.Tensor:
    n, c, *k = shape
    perm = (1, 0, *range(2, len(shape)))
    return m.reshape(c, n, *k).permute(*perm)


#: The unfoldings lrfx knows, by name.
UNFOLDINGS: dict[str, Unfolding] = {
    u.name: u
    for u in (
        Unfolding("rows", "cols", _rows, lambda m, s, g: m.reshape(s), "a 2-D (linear) weight"),
        Unfolding("channel", "cols", _channel, lambda m, s, g: m.reshape(s), "a conv weight"),
        Unfolding("spatial", "rows", _spatial, _fold_spatial, "an ungrouped Conv2d weight"),
        Unfolding("mode1", "rows", _mode1, _fold_mode1, "an ungrouped conv weight"),
    )
}


def get_unfolding(name: str) -> Unfolding:
    try:
        return UNFOLDINGS[name]
    except KeyError:
        raise LrfxError(f"unknown unfolding {name!r}; expected one of "
                        f"{', '.join(UNFOLDINGS)}") from None


def unfold(weight: torch.Tensor, unfolding: str, groups: int = 1) -> torch.Tensor:
    """The ``(groups, rows, cols)`` matrices whose singular values rank a scheme.

    Example:
        >>> unfold(torch.zeros(8, 4, 3, 3), "spatial").shape
        torch.Size([1, 12, 24])
    """
    return get_unfolding(unfolding).matrix(weight.detach(), groups)


# --- spectra --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightStamp:
    """Identifies the state of a weight tensor: its storage and its in-place version counter.

    Optimizer steps and other in-place updates bump ``tensor._version``; writes through
    ``tensor.data`` do not (call :func:`lrfx.mark_weights_changed` after those).
    """

    ptr: int
    version: int
    shape: tuple[int, ...]
    epoch: int = 0

    @classmethod
    def of(cls, t: torch.Tensor, epoch: int = 0) -> WeightStamp:
        """The stamp of ``t`` now; ``epoch`` is the graph's ``weights_version``."""
        return cls(int(t.data_ptr()), int(t._version), tuple(t.shape), epoch)


@dataclass(frozen=True, eq=False)
class EigenBasis:
    """Eigenvectors of a (batch of) Gram matrices, in ascending eigenvalue order as ``eigh``
    returns them (they are not copied to reorder them; :meth:`top` reads the largest).

    Attributes:
        dense: ``(groups, d, d)`` eigenvectors, ascending.
        size: ``d``.
    """

    dense: torch.Tensor
    size: int

    def part(self, start: int, stop: int) -> EigenBasis:
        """The basis of matrices ``start:stop`` of the batch."""
        return EigenBasis(self.dense[start:stop], self.size)

    def top(self, r: int) -> torch.Tensor:
        """The eigenvectors of the ``r`` largest eigenvalues, ``(groups, d, r)``, largest first."""
        r = min(r, self.size)
        return self.dense[..., self.size - r :].flip(-1)


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Singular values (and optionally singular vectors) of one unfolding of a weight.

    Attributes:
        values: ``(groups, k)`` float64 tensor, each row sorted descending (one row per group;
            ungrouped layers have one row).
        basis: The singular vectors of the spectral matrix ``A`` on its ``side`` (``left``:
            eigenvectors of ``A A^T``; ``right``: of ``A^T A``) as an :class:`EigenBasis`;
            ``None`` if only values were computed. :meth:`top_vectors` reads them.
        side: Which singular vectors ``basis`` holds.
        whiten: The input Gram's Cholesky factor ``S`` (``(groups, d_in, d_in)``) when the
            spectrum is data-aware; ``None`` for the plain weight spectrum.
        input_side: Where ``S`` applies: ``cols`` (``A = M S``) or ``rows`` (``A = S^T M``).
        stamp: The weight's :class:`WeightStamp` when it was computed (``None``: unknown).
    """

    values: torch.Tensor
    basis: EigenBasis | None = None
    side: Side = "left"
    whiten: torch.Tensor | None = None
    input_side: InputSide = "cols"
    stamp: WeightStamp | None = None

    @property
    def groups(self) -> int:
        return int(self.values.shape[0])

    @property
    def max_rank(self) -> int:
        return int(self.values.shape[1])

    @property
    def whitened(self) -> bool:
        return self.whiten is not None

    def top_vectors(self, r: int) -> torch.Tensor:
        """The top ``r`` singular vectors on :attr:`side`, ``(groups, d, r)``, largest first."""
        if self.basis is None:
            raise LrfxError("this spectrum holds singular values only (computed without "
                            "vectors=True)")
        return self.basis.top(r)

    def energy(self) -> torch.Tensor:
        """Cumulative energy ``sum_{i<=k} s_i^2 / sum_i s_i^2`` per group, shape ``(groups, k)``."""
        sq = self.values.square()
        total = sq.sum(dim=1, keepdim=True).clamp_min(torch.finfo(sq.dtype).tiny)
        return sq.cumsum(dim=1) / total

    def rank_at_energy(self, e: float) -> int:
        """Smallest ``k`` whose energy reaches ``e`` (the largest over groups).

        Example:
            >>> Spectrum(torch.tensor([[3.0, 1.0, 0.0]])).rank_at_energy(0.9)
            1
        """
        if not 0.0 < e <= 1.0:
            raise ValueError(f"energy threshold must be in (0, 1], got {e}")
        en = self.energy()
        # tolerance: at e = 1 the cumulative sum may fall short by rounding
        ranks = (en < e - 1e-12).sum(dim=1) + 1
        return int(ranks.clamp(max=self.max_rank).max())

    def rank_at_value(self, threshold: float) -> int:
        """Number of singular values ``>= threshold`` (the largest over groups), at least 1."""
        return max(1, int((self.values >= threshold).sum(dim=1).max()))

    def tails(self) -> np.ndarray:
        """Relative squared error of keeping ``r`` values per group, for ``r = 0..k``.

        ``tails()[r] = sum_{i>r} s_i^2 / sum_i s_i^2``, summed over groups (rank ``r`` keeps the
        first ``r`` values of every group); float64, ``tails()[0] == 1`` (0 for a zero weight).
        """
        sq = self.values.square().sum(dim=0).to(torch.float64).numpy()
        total = float(sq.sum())
        if total <= 0.0:
            return np.zeros(len(sq) + 1)
        kept = np.concatenate([[0.0], np.cumsum(sq)])
        return np.clip(1.0 - kept / total, 0.0, 1.0)

    def without_basis(self) -> Spectrum:
        """The same values, without the (large) singular vectors."""
        return Spectrum(self.values, None, self.side, None, self.input_side, self.stamp)

    def transposed(self) -> Spectrum:
        """The spectrum of the transposed matrices (the basis changes side)."""
        side: Side = "right" if self.side == "left" else "left"
        inp: InputSide = "rows" if self.input_side == "cols" else "cols"
        return Spectrum(self.values, self.basis, side, self.whiten, inp, self.stamp)


#: Gram sides at most this large are decomposed in float64 by ``precision="auto"``.
AUTO_FLOAT64_MAX = 128


def _gram_dtype(d: int, precision: str, like: torch.dtype = torch.float32) -> torch.dtype:
    if precision == "float64":
        return torch.float64
    if precision == "float32":
        return torch.float32
    if precision == "auto":
        small = d <= AUTO_FLOAT64_MAX
        return torch.float64 if small or like == torch.float64 else torch.float32
    raise LrfxError(f"precision must be 'auto', 'float64' or 'float32', got {precision!r}")


def _gram_into(a: torch.Tensor, side: Side, out: torch.Tensor) -> None:
    """``out = a a^T`` (``side="left"``) or ``a^T a`` for a batch ``(g, m, n)``.

    Large Grams are formed by blocks of rows and only the upper block triangle is multiplied (the
    lower one is its transpose): a third to almost half of the multiply-adds of one product,
    since torch exposes no symmetric rank-k update.
    """
    rows = a if side == "left" else a.transpose(-2, -1)
    d = rows.shape[-2]
    k = 1 if d < 512 else (4 if d < 2048 else 8)
    if k == 1:
        torch.matmul(rows, rows.transpose(-2, -1), out=out)
        return
    edges = [round(i * d / k) for i in range(k + 1)]
    blocks = [rows[..., edges[i] : edges[i + 1], :] for i in range(k)]
    for i in range(k):
        for j in range(i, k):
            blk = blocks[i] @ blocks[j].transpose(-2, -1)
            out[..., edges[i] : edges[i + 1], edges[j] : edges[j + 1]] = blk
            if i != j:
                out[..., edges[j] : edges[j + 1], edges[i] : edges[i + 1]] = blk.transpose(-2, -1)


def decompose_many(
    mats: Sequence[torch.Tensor], *, vectors: bool = False, precision: str = "float64"
) -> list[tuple[torch.Tensor, EigenBasis | None, Side]]:
    """:func:`decompose` of several batches of matrices of one shape ``(g, m, n)``.

    The Grams are formed one matrix at a time (no copy of the matrices into one stack) and
    eigendecomposed in one batched call.
    """
    if not mats:
        return []
    m, n = mats[0].shape[-2:]
    g = mats[0].shape[0] if mats[0].dim() == 3 else 1
    d = min(m, n)
    side: Side = "left" if m <= n else "right"
    dtype = _gram_dtype(d, precision, mats[0].dtype)
    grams = torch.empty(len(mats), g, d, d, dtype=dtype)
    for i, x in enumerate(mats):
        _gram_into(x.detach().to(device="cpu", dtype=dtype).reshape(g, m, n), side, grams[i])
    if vectors:
        evals, evecs = torch.linalg.eigh(grams)
    else:
        evals, evecs = torch.linalg.eigvalsh(grams), None
    values = evals.flip(-1).to(torch.float64).clamp_min(0.0).sqrt()
    return [(values[i], None if evecs is None else EigenBasis(evecs[i], d), side)
            for i in range(len(mats))]


def decompose(
    mats: torch.Tensor, *, vectors: bool = False, precision: str = "float64"
) -> tuple[torch.Tensor, EigenBasis | None, Side]:
    """Singular values (and vectors) of a batch of matrices ``(..., m, n)`` via their Gram.

    The Gram of the smaller side (``A A^T`` if ``m <= n``, else ``A^T A``) is eigendecomposed;
    its eigenvalues are the squared singular values and its eigenvectors the singular vectors of
    that side.

    Returns:
        ``(values (..., k), basis or None, side)``: values float64 on the CPU, descending;
        ``basis`` an :class:`EigenBasis` over the flattened batch (``vectors=True``); ``side`` is
        ``left`` when the basis holds left singular vectors.
    """
    m, n = mats.shape[-2:]
    batch = mats.shape[:-2]
    flat = mats.detach().reshape(-1, m, n)
    values, basis, side = decompose_many([flat], vectors=vectors, precision=precision)[0]
    return values.reshape(*batch, min(m, n)), basis, side


def spectrum_of(
    weight: torch.Tensor,
    unfolding: str,
    groups: int = 1,
    *,
    whiten: torch.Tensor | None = None,
    vectors: bool = True,
    precision: str = "auto",
) -> Spectrum:
    """The :class:`Spectrum` (with its basis) of one unfolding of one weight.

    ``whiten``: the Cholesky factor of the input Gram for a data-aware spectrum (see
    :class:`Spectrum`).
    """
    u = get_unfolding(unfolding)
    mats = u.matrix(weight.detach(), groups)
    if whiten is not None:
        m64 = mats.to(device="cpu", dtype=torch.float64)
        s = whiten.to(torch.float64).reshape(-1, *whiten.shape[-2:])
        mats = m64 @ s if u.input_side == "cols" else s.transpose(-2, -1) @ m64
    values, basis, side = decompose(mats, vectors=vectors, precision=precision)
    return Spectrum(values, basis, side, whiten, u.input_side,
                    WeightStamp.of(weight) if weight.device.type != "meta" else None)


def _balance(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank component so ``||left[:, i]|| == ||right[i, :]||`` (same product)."""
    nl = left.norm(dim=-2)
    nr = right.norm(dim=-1)
    ok = (nl > 0) & (nr > 0)
    d = torch.where(ok, (nl / torch.where(ok, nr, torch.ones_like(nr))).sqrt(),
                    torch.ones_like(nl))
    return left / d.unsqueeze(-2), right * d.unsqueeze(-1)


def _from_basis(mats: torch.Tensor, sp: Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of ``mats`` (input on the columns) from a spectrum's stored basis."""
    b = sp.top_vectors(rank)
    # the basis's own precision (float32 for large unfoldings) is the factors' precision too
    work = torch.float64 if b.dtype == torch.float64 or sp.whiten is not None else torch.float32
    m = mats.to(work)
    b = b.to(work)
    s = None if sp.whiten is None else sp.whiten.to(work)
    if sp.side == "left":
        # A = M S = U sigma V^T; the rank-r truncation of M in the S-metric is U_r U_r^T M
        left, right = b, b.transpose(-2, -1) @ m
    else:
        # A V_r V_r^T = M S V_r V_r^T S^-1
        sv = b if s is None else s @ b
        left = m @ sv
        right = b.transpose(-2, -1)
        if s is not None:
            right = torch.linalg.solve_triangular(s, right, upper=False, left=False)
    return _balance(left, right)


def _svd_pair(mats: torch.Tensor, rank: int, whiten: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced factors from a fresh SVD of ``mats`` (input on the columns), optionally whitened."""
    m = mats.to(torch.float64)
    if whiten is None:
        u, s, vh = truncated_svd(m, rank)
        root = s.sqrt()
        return u * root.unsqueeze(-2), root.unsqueeze(-1) * vh
    sw = whiten.to(torch.float64)
    u, s, vh = truncated_svd(m @ sw, rank)
    root = s.sqrt()
    right = torch.linalg.solve_triangular(sw, root.unsqueeze(-1) * vh, upper=False, left=False)
    return u * root.unsqueeze(-2), right


def factor_pair(
    mats: torch.Tensor,
    rank: int,
    *,
    spectrum: Spectrum | None = None,
    whiten: torch.Tensor | None = None,
    input_side: InputSide = "cols",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(left (g, m, r), right (g, r, n))`` with ``mats ~= left @ right``, float64 on the CPU.

    The truncation is optimal in the Frobenius norm, or, with whitening (``spectrum.whiten`` or
    ``whiten``: the Cholesky factor of the inputs' Gram), for the layer's output on the
    calibration data. A ``spectrum`` with a basis gives the factors with matrix products only;
    otherwise an SVD is computed. The rank components are balanced between the two factors.
    """
    mats = mats.detach().to("cpu")
    if spectrum is not None:
        whiten, input_side = spectrum.whiten, spectrum.input_side
    if input_side == "rows":
        sp_t = spectrum.transposed() if spectrum is not None else None
        lt, rt = factor_pair(mats.transpose(-2, -1), rank, spectrum=sp_t, whiten=whiten,
                             input_side="cols")
        return rt.transpose(-2, -1), lt.transpose(-2, -1)
    if spectrum is not None and spectrum.basis is not None:
        return _from_basis(mats, spectrum, rank)
    return _svd_pair(mats, rank, whiten)


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


def singular_values(weight: torch.Tensor, unfolding: str, groups: int = 1) -> torch.Tensor:
    """Singular values of an unfolding, ``(groups, k)`` float64 on the CPU, descending.

    Computed in float64 whatever the weight's dtype, so that energy fractions near 1 are exact.
    """
    mats = unfold(weight, unfolding, groups).to(device="cpu", dtype=torch.float64)
    return svdvals(mats)


def truncated_svd(
    mats: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` SVD ``U S Vh`` of a batch ``(g, m, n)`` of matrices.

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


def truncation_error(
    weight: torch.Tensor, unfolding: str, rank: int, groups: int = 1
) -> float:
    """Eckart-Young error ``sqrt(sum_{i>r} s_i^2)`` of the best rank-``r`` approximation."""
    s = singular_values(weight, unfolding, groups)
    return float(s[:, rank:].square().sum().sqrt())


def is_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN/Inf: one reduction (a NaN or Inf makes the sum non-finite);
    the element-wise test runs only when the sum overflowed."""
    if t.numel() == 0:
        return True
    low = t.dtype in (torch.float16, torch.bfloat16)
    s = t.detach().sum(dtype=torch.float32 if low else None)
    return bool(torch.isfinite(s)) or bool(torch.isfinite(t).all())


def check_finite(weight: torch.Tensor, layer: str) -> None:
    """Refuse to factor a weight holding NaN or Inf (the SVD would silently produce garbage)."""
    if not is_finite(weight):
        bad = int((~torch.isfinite(weight)).sum())
        raise LrfxError(
            f"layer {layer!r}: weight holds {bad} NaN/Inf value(s); fix or retrain the layer "
            "before factoring it, or leave it dense in the plan"
        )


#: Relative damping added to the diagonal of ``X X^T / n`` before the Cholesky factorization.
DAMPING = 1e-5


def whitening_factor(gram: torch.Tensor, count: int) -> torch.Tensor:
    """Lower Cholesky factor ``S`` of ``gram / count + damping * mean(diag) * I`` (batched)."""
    g = gram / max(count, 1)
    d = g.shape[-1]
    scale = torch.diagonal(g, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
    eye = torch.eye(d, dtype=g.dtype)
    damping = DAMPING
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(g + (damping * scale)[..., None, None] * eye)
        if int(info.max()) == 0:
            return chol
        damping *= 10
    raise LrfxError("input statistics are not positive definite even with damping; use more "
                    "calibration data")


def inverse_sqrt(cov: torch.Tensor, damping: float = DAMPING, rtol: float = 1e-10
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, lam^-1/2)`` of a symmetric PSD matrix ``cov = Q diag(lam) Q^T`` (batched), robust to
    rank deficiency: ``damping * mean(lam)`` is added to every eigenvalue and directions with an
    eigenvalue below ``rtol * max(lam)`` get 0 (a pseudo-inverse, where a Cholesky factor would
    fail on dead channels or constant inputs). ``S = Q diag(lam^1/2)`` is a square root of
    ``cov`` and ``S^+ = diag(lam^-1/2) Q^T``.
    """
    lam, q = torch.linalg.eigh(cov.to(torch.float64))
    lam = lam.clamp_min(0)
    top = lam.max(-1, keepdim=True).values
    scale = lam.mean(-1, keepdim=True)
    inv = torch.where(lam > rtol * top, (lam + damping * scale).rsqrt(), torch.zeros_like(lam))
    return q, inv


def fit_low_rank(weight: torch.Tensor, cross: torch.Tensor, cov: torch.Tensor, rank: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-``rank`` map ``L = left @ right`` minimizing ``E ||W x - L x~||^2`` (batched).

    ``x`` is the layer's input in the original model and ``x~`` the input it gets in the
    compressed one; ``weight`` is ``W`` (``(g, m, d)``), ``cross`` is ``E[x x~^T]`` and ``cov``
    is ``E[x~ x~^T]`` (``(g, d, d)``; centered, for a layer whose bias absorbs the means). With
    ``cov = S S^T``, the objective is ``||(W K C^+ - L) S||^2`` plus a constant, so ``L`` is the
    truncated SVD of ``M = W K S^+^T`` mapped back by ``S^+``: with ``x~ = x`` this is the
    whitened (SVD-LLM) truncation; otherwise it also corrects the error of the layers before.

    Returns:
        ``(left (g, m, r), right (g, r, d))``, each component balanced between the two.
    """
    q, inv = inverse_sqrt(cov)
    w = weight.to(torch.float64)
    m = (w @ cross.to(torch.float64) @ q) * inv.unsqueeze(-2)  # W K Q lam^-1/2
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    r = min(rank, s.shape[-1])
    root = s[..., :r].sqrt()
    left = u[..., :r] * root.unsqueeze(-2)
    right = (root.unsqueeze(-1) * vh[..., :r, :]) * inv.unsqueeze(-2) @ q.transpose(-2, -1)
    if r < rank:  # fewer input directions than the rank: pad with zero components
        pad = rank - r
        left = torch.cat([left, left.new_zeros(*left.shape[:-1], pad)], -1)
        right = torch.cat([right, right.new_zeros(*right.shape[:-2], pad, right.shape[-1])], -2)
    return _balance(left, right)


def least_squares(cross: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``A = K C^+`` minimizing ``E ||y - A z||^2`` given ``K = E[y z^T]`` and ``C = E[z z^T]``
    (batched; the pseudo-inverse of :func:`inverse_sqrt`, so rank-deficient ``z`` is fine)."""
    q, inv = inverse_sqrt(cov)
    return (cross.to(torch.float64) @ q) * (inv * inv).unsqueeze(-2) @ q.transpose(-2, -1)


# --- projections (differentiable, on the weight's own device) -------------------------------------


def project_matrix(mats: torch.Tensor, rank: int, *, clip: float | None = None,
                   svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                   ) -> torch.Tensor:
    """The best rank-``rank`` approximation of each matrix, differentiably.

    Runs on the matrices' device and dtype. The gradient is the exact derivative of the
    truncation (:class:`_Truncate`), which, unlike backpropagating through ``torch.linalg.svd``,
    has no ``1 / (s_i^2 - s_j^2)`` terms between two kept (or two dropped) values, so repeated
    singular values inside the kept part are harmless.

    Args:
        mats: ``(..., m, n)`` matrices.
        rank: How many singular values to keep.
        clip: Bound the ratio ``(s_dropped / s_kept)^2`` at this value in the gradient (the
            Decomposable-Net reference uses 0.99) so a near tie across the cut cannot blow it
            up; ``None``: exact.
        svd: ``torch.linalg.svd(mats, full_matrices=False)``, if already computed.
    """
    u, s, vh = svd if svd is not None else torch.linalg.svd(mats.detach(), full_matrices=False)
    r = min(int(rank), s.shape[-1])
    return _Truncate.apply(mats, u, s, vh, r, clip)


class _Truncate(torch.autograd.Function):
    """``W -> U_r S_r V_r^T`` with its exact derivative.

    In the basis of the SVD, a change ``A = U^T dW V`` of the weight changes the truncation by
    ``A`` on kept x kept entries, 0 on dropped x dropped ones, and mixes the pair ``(A_ij, A_ji)``
    of a kept ``i`` and a dropped ``j`` by ``[[1, p], [p, 1]] / (1 - p^2)``, ``p = s_j / s_i``
    (a symmetric map: the gradient applies the same); directions outside the spans of ``U`` or
    ``V`` pass where they meet a kept direction (``p = 0``).
    """

    @staticmethod
    def forward(ctx: Any, mats: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor,
                r: int, clip: float | None) -> torch.Tensor:
        ctx.save_for_backward(u, s, vh)
        ctx.r, ctx.clip = r, clip
        return (u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:
        (g,) = grads
        u, s, vh = ctx.saved_tensors
        r, clip = ctx.r, ctx.clip
        g = g.to(u.dtype)
        v = vh.transpose(-2, -1)
        gh = u.transpose(-2, -1) @ g @ v  # (..., k, k)
        c = torch.zeros_like(gh)
        c[..., :r, :r] = gh[..., :r, :r]
        if r < s.shape[-1]:
            kept, dropped = s[..., :r, None], s[..., None, r:]
            p = torch.where(kept > 0, dropped / kept.clamp_min(torch.finfo(s.dtype).tiny),
                            torch.zeros_like(dropped))
            if clip is not None:
                p = p.clamp(max=math.sqrt(clip))
            den = 1.0 - p * p
            a, b = gh[..., :r, r:], gh[..., r:, :r].transpose(-2, -1)
            c[..., :r, r:] = (a + p * b) / den
            c[..., r:, :r] = ((b + p * a) / den).transpose(-2, -1)
        out = u @ c @ vh
        ur, vr = u[..., :r], v[..., :r]
        out = out + (g - u @ (u.transpose(-2, -1) @ g)) @ vr @ vr.transpose(-2, -1)
        out = out + ur @ (ur.transpose(-2, -1) @ (g - (g @ v) @ vh))
        return out, None, None, None, None, None


def _top_left_vectors(mats: torch.Tensor, rank: int) -> torch.Tensor:
    u, _, _ = torch.linalg.svd(mats, full_matrices=False)
    return u[..., :rank]


def tucker2_project(weight: torch.Tensor, ranks: tuple[int, int]) -> torch.Tensor:
    """Tucker-2 (HOSVD) truncation of a conv weight on modes 0 and 1, differentiable.

    ``W ~= W x_0 (U_0 U_0^T) x_1 (U_1 U_1^T)`` with ``U_0`` the top ``r_out`` left singular
    vectors of the channel unfolding and ``U_1`` the top ``r_in`` of mode 1.
    """
    r_in, r_out = ranks
    n = weight.shape[0]
    u0 = _top_left_vectors(weight.reshape(n, -1), r_out)
    u1 = _top_left_vectors(_mode1(weight, 1)[0], r_in)
    core = torch.einsum("no,nc...->oc...", u0, weight)
    core = torch.einsum("ci,oc...->oi...", u1, core)
    w = torch.einsum("no,oi...->ni...", u0, core)
    return torch.einsum("ci,ni...->nc...", u1, w)


# --- compatibility helpers for single layers (float64, CPU) ---------------------------------------


def _f64(w: torch.Tensor) -> torch.Tensor:
    return w.detach().to(device="cpu", dtype=torch.float64)


def linear_factors(
    weight: torch.Tensor, rank: int, whiten: torch.Tensor | None = None,
    spectrum: Spectrum | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD of a linear weight ``(m, n)``: returns ``(first (r, n), second (m, r))``.

    ``whiten``: the ``(n, n)`` (or ``(1, n, n)``) Cholesky factor of the inputs' Gram matrix.
    """
    sw = None if whiten is None else whiten.reshape(1, *whiten.shape[-2:])
    left, right = factor_pair(_f64(weight).unsqueeze(0), rank, spectrum=spectrum, whiten=sw)
    return right[0], left[0]


def channel_factors(
    weight: torch.Tensor, rank: int, groups: int = 1, whiten: torch.Tensor | None = None,
    spectrum: Spectrum | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scheme 1 per group: ``(first (g*r, C/g, *k), second (N, r, 1...))``.

    ``first`` is a grouped conv with the original geometry, ``second`` a grouped 1x1 conv.
    ``whiten``: per group, the Cholesky factor of the im2col patches' Gram, ``(g, d, d)``.
    """
    w = _f64(weight)
    n, cg, *k = w.shape
    left, right = factor_pair(unfold(w, "channel", groups), rank, spectrum=spectrum,
                              whiten=whiten)  # (g, N/g, r), (g, r, C/g*k)
    first = right.reshape(groups * rank, cg, *k)
    second = left.reshape(n, rank, *([1] * len(k)))
    return first.contiguous(), second.contiguous()


def spatial_factors(
    weight: torch.Tensor, rank: int, whiten: torch.Tensor | None = None,
    spectrum: Spectrum | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scheme 2: ``(vertical (r, C, kh, 1), horizontal (N, r, 1, kw))``.

    ``whiten``: Cholesky factor ``(C*kh, C*kh)`` of the vertical patches' Gram; the input side
    is the rows of this unfolding, so the SVD is of ``S^T M`` and the left factor gets ``S^-T``.
    """
    w = _f64(weight)
    n, c, kh, kw = w.shape
    sw = None if whiten is None else _f64(whiten).reshape(1, c * kh, c * kh)
    left, right = factor_pair(unfold(w, "spatial"), rank, spectrum=spectrum, whiten=sw,
                              input_side="rows")  # (1, C*kh, r), (1, r, N*kw)
    vertical = left[0].reshape(c, kh, rank).permute(2, 0, 1).unsqueeze(-1)
    horizontal = right[0].reshape(rank, n, kw).permute(1, 0, 2).unsqueeze(2)
    return vertical.contiguous(), horizontal.contiguous()


def _top_eigvecs(gram: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` leading eigenvectors of a symmetric PSD matrix, as columns."""
    return torch.linalg.eigh(gram)[1].flip(1)[:, :k]


def tucker2_input_spectrum(weight: torch.Tensor, whiten: torch.Tensor) -> Spectrum:
    """The data-aware input side of Tucker-2 and its output-error spectrum.

    Tucker-2 reads the input through ``r_in`` channel combinations ``A x`` (``A``: ``r_in x
    C``, on every kernel tap) and the core maps them back with ``B`` (``C x r_in``): the input
    is replaced by ``Q x``, ``Q = B A`` of rank ``r_in``. With ``L L^T`` the input channels'
    covariance (the channel Gram ``whiten whiten^T`` averaged over taps) and ``M1`` the weight's
    mode-1 unfolding, the output error ``sum_t ||W_t (I - Q) x_t||^2`` is least (taps taken as
    uncorrelated) for ``B = L V``, ``A = V^T L^{-1}``, ``V`` the top eigenvectors of
    ``L^T M1 M1^T L`` (SVD-LLM on the input channels). Whatever the taps' correlation, the
    error of ``P W Q`` (``P`` the whitened channel projection) is at most the whitened channel
    tail plus ``T(s) = ||W (I - Q_s) S||^2``, computed exactly here for every ``s`` from one
    ``C x C`` table of block sums in the coordinates where ``Q_s`` is an orthogonal projection.

    Returns:
        A spectrum whose :meth:`Spectrum.tails` are ``T(s) / ||W S||^2`` (made non-increasing:
        still an upper bound), whose basis holds ``V`` (largest first from
        :meth:`Spectrum.top_vectors`) and whose ``whiten`` is ``L`` (``(1, C, C)``).
    """
    w = _f64(weight)
    n, c = w.shape[:2]
    k = w[0, 0].numel()
    s = whiten.to(torch.float64).reshape(c * k, -1)
    g = (s @ s.T).reshape(c, k, c, k)
    chol = torch.linalg.cholesky(torch.einsum("atbt->ab", g) / k)  # L: channel covariance
    w1 = torch.einsum("nak,ai->nik", w.reshape(n, c, k), chol)  # W (L (x) I)
    v = _top_eigvecs(torch.einsum("nik,njk->ij", w1, w1), c)  # (C, C), largest first
    # coordinates x' = (L^-1 V^T ... ): rotate W (L (x) I) by V, G by (V^T L^-1 (x) I)
    linv_v = torch.linalg.solve_triangular(chol.T, v, upper=True)  # L^-T V
    g = torch.einsum("ai,akbl,bj->ikjl", linv_v, g, linv_v)
    wr = torch.einsum("nak,ai->nik", w1, v)
    h = torch.einsum("nik,njl->ikjl", wr, wr)
    blocks = (g * h).sum((1, 3))  # (C, C): per pair of rotated channels
    suffix = blocks.flip(0).cumsum(0).flip(0).flip(1).cumsum(1).flip(1)
    t = torch.diagonal(suffix).clamp_min(0)
    t = torch.flip(torch.cummax(torch.flip(t, (0,)), 0).values, (0,))  # non-increasing
    t = torch.cat([t, t.new_zeros(1)])
    values = (t[:-1] - t[1:]).clamp_min(0).sqrt().unsqueeze(0)
    return Spectrum(values, EigenBasis(v.flip(-1).unsqueeze(0), c), "left",
                    chol.unsqueeze(0), "cols", WeightStamp.of(weight)
                    if weight.device.type != "meta" else None)


def tucker2_whitened_factors(
    weight: torch.Tensor, ranks: tuple[int, int], u_out: torch.Tensor, v_in: torch.Tensor,
    chol: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 factors ``P W Q`` from a data-aware output basis ``u_out`` (``N x >= r_out``,
    orthonormal) and input side ``v_in`` / ``chol`` (:func:`tucker2_input_spectrum`):
    ``first = V^T L^{-1}``, ``core = P^T W (L V (x) I)``, ``last = P``."""
    r_in, r_out = ranks
    w = _f64(weight)
    n, c = w.shape[:2]
    ones = [1] * (w.dim() - 2)
    p = _f64(u_out)[:, :r_out]
    v = _f64(v_in)[:, :r_in]
    chol = _f64(chol).reshape(c, c)
    b = chol @ v  # (C, r_in): Q = B A
    first = torch.linalg.solve_triangular(chol.T, v, upper=True).T  # A = V^T L^-1
    core = torch.einsum("no,nck,ci->oik", p, w.reshape(n, c, -1), b)
    return (first.reshape(r_in, c, *ones).contiguous(),
            core.reshape(r_out, r_in, *w.shape[2:]).contiguous(),
            p.reshape(n, r_out, *ones).contiguous())


def tucker2_factors(
    weight: torch.Tensor, ranks: tuple[int, int], n_iter_max: int = 100,
    init: tuple[torch.Tensor, torch.Tensor] | None = None, tol: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker-2 on modes 0 and 1: HOSVD start, then HOOI (alternating the two factor
    updates until the fit stops improving by ``tol``, relative to ``||W||^2``).

    Each update is the leading eigenvectors of a Gram matrix (``N x N`` or ``C x C``) of the
    weight projected on the other factor, in float64. (tensorly's ``partial_tucker`` computes the
    same iteration with a full SVD of each ``C x r_out*kh*kw`` unfolding — and its iteration loop
    ignores the ``svd=`` argument —, 8 s per update for CREPE's 1024-channel conv on 2 cores
    against 0.1 s here; tests check the two agree.)

    ``init``: the top singular vectors ``(U_out (N, >= r_out), U_in (C, >= r_in))`` of the
    channel and mode-1 unfoldings, when the spectra pass already has them (no SVD repeated).

    Returns ``(first (r_in, C, 1, 1), core (r_out, r_in, *k), last (N, r_out, 1, 1))``.
    """
    r_in, r_out = ranks
    w = _f64(weight)
    n, c = w.shape[:2]
    ones = [1] * (w.dim() - 2)
    flat = w.reshape(n, c, -1)  # (N, C, K)
    if init is not None:
        u_out, u_in = (_f64(u)[:, :r].contiguous() for u, r in zip(init, (r_out, r_in),
                                                                    strict=True))
    else:
        u_out = _top_eigvecs(torch.einsum("nck,mck->nm", flat, flat), r_out)
        u_in = _top_eigvecs(torch.einsum("nck,ndk->cd", flat, flat), r_in)
    total = float((flat * flat).sum())
    fit = -1.0
    core = torch.einsum("no,nck,ci->oik", u_out, flat, u_in)
    for _ in range(n_iter_max):
        a = torch.einsum("nck,ci->nik", flat, u_in).reshape(n, -1)  # W x_in U_in^T
        u_out = _top_eigvecs(a @ a.T, r_out)
        b = torch.einsum("no,nck->cok", u_out, flat).reshape(c, -1)  # W x_out U_out^T
        u_in = _top_eigvecs(b @ b.T, r_in)
        core = torch.einsum("cok,ci->oik", b.reshape(c, r_out, -1), u_in)
        new_fit = float((core * core).sum())  # ||W||^2 - error^2 (orthonormal factors)
        if total == 0 or abs(new_fit - fit) <= tol * total:
            break
        fit = new_fit
    core = core.reshape(r_out, r_in, *w.shape[2:])
    first = u_in.T.reshape(r_in, c, *ones)
    last = u_out.reshape(n, r_out, *ones)
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


def cp_reconstruct(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The conv weight ``(N, C, kh, kw)`` that :func:`cp_factors`' four factors compute."""
    first, vertical, horizontal, last = factors
    a_c = first[:, :, 0, 0]           # (R, C)
    a_h = vertical[:, 0, :, 0]        # (R, kh)
    a_w = horizontal[:, 0, 0, :]      # (R, kw)
    a_n = last[:, :, 0, 0]            # (N, R)
    return torch.einsum("nr,rc,rh,rw->nchw", a_n, a_c, a_h, a_w)

