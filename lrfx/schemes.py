"""Decomposition schemes as data: one registry entry owns everything about a scheme.

A :class:`Scheme` answers, for a layer of a given geometry: does the scheme apply (and why not),
what are its ranks and their maximum, what does the factored layer look like (its *layout*: the
ordinary layers, :class:`~lrfx.cost.Piece`, it is made of — which both prices it through the cost
model and builds it), which spectra rank it and what error a rank leaves, how to compute its
factors, and how to project a weight onto it differentiably (for training-time methods).

Nothing else in lrfx branches on scheme names; everything looks the scheme up here. Adding a
scheme is one subclass registered with :func:`register_scheme` (plus its tests).

========  ==========================================  ==========================================
scheme    applies to                                  factored layout
========  ==========================================  ==========================================
svd       ``nn.Linear`` / ``F.linear``                Linear(n -> r), Linear(r -> m, bias)
channel   Conv1d/2d/3d, grouped (per group)           Conv(C -> g*r, k, g), 1x1 (g*r -> N, g)
spatial   ungrouped Conv2d with a spatial kernel      Conv(kh, 1) (C -> r), Conv(1, kw) (r -> N)
tucker2   ungrouped Conv2d                            1x1 (C -> r_in), k (r_in -> r_out),
                                                      1x1 (r_out -> N)
cp        ungrouped Conv2d with a spatial kernel      1x1, depthwise (kh, 1), depthwise (1, kw),
          (plan-only: see :class:`CP`)                1x1
========  ==========================================  ==========================================

Example:
    >>> from lrfx.cost import ConvGeometry
    >>> g = ConvGeometry(64, 64, (3, 3), (56, 56), (56, 56))
    >>> get_scheme("channel").max_rank(g), factored_cost(g, "channel", 16).macs
    ((64,), 32112640)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lrfx import decompositions as dec
from lrfx.cost import (
    ConvGeometry,
    Cost,
    Geometry,
    LinearGeometry,
    Piece,
    dense_cost,
    pieces_cost,
)
from lrfx.decompositions import Spectrum
from lrfx.errors import LrfxError, SchemeError

__all__ = [
    "CP",
    "SCHEMES",
    "Channel",
    "Rank",
    "Scheme",
    "Spatial",
    "Svd",
    "Tucker2",
    "applicable_schemes",
    "break_even_rank",
    "factored_cost",
    "get_scheme",
    "max_rank",
    "register_scheme",
    "scheme_names",
    "unregister_scheme",
]

#: A rank as users and plans write it: an int, or a tuple for multi-rank schemes.
Rank = int | tuple[int, ...]


def _prod(xs: Iterable[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _conv_args(g: ConvGeometry) -> tuple[tuple[int, ...], Any, tuple[int, ...]]:
    """Stride, padding and dilation of a conv geometry (ones / zeros when not recorded)."""
    d = g.dims
    stride = tuple(g.stride) if g.stride else (1,) * d
    padding = g.padding if isinstance(g.padding, str) or g.padding else (0,) * d
    dilation = tuple(g.dilation) if g.dilation else (1,) * d
    return stride, padding, dilation


def _split_padding(padding: Any) -> tuple[Any, Any]:
    """Height and width padding of the two 1-D convs of a split 2-D conv."""
    if isinstance(padding, str):
        return padding, padding  # "same"/"valid" apply per dim, so they split exactly
    ph, pw = padding
    return (ph, 0), (0, pw)


@dataclass(frozen=True)
class Scheme:
    """One decomposition scheme. Subclasses implement the scheme-specific methods.

    Attributes:
        name: The name plans and users write (``channel``...).
        n_ranks: How many ranks the scheme has (tucker2: 2, ``(r_in, r_out)``).
        unfoldings: The spectra that rank the scheme, one per rank, in rank order.
        allocatable: Whether allocators may choose it (else it is plan-only; see ``note``).
        note: What users should know (why it is plan-only, what it approximates).
    """

    name: str
    n_ranks: int = 1
    unfoldings: tuple[str, ...] = ()
    allocatable: bool = True
    note: str = ""

    # --- applicability and ranks -----------------------------------------------------------------

    def why_not(self, g: Geometry) -> str | None:
        """Why the scheme does not apply to a layer of this geometry (``None``: it applies)."""
        raise NotImplementedError

    def applies(self, g: Geometry) -> bool:
        return self.why_not(g) is None

    def check(self, g: Geometry) -> None:
        reason = self.why_not(g)
        if reason is not None:
            raise SchemeError(f"scheme {self.name!r} does not apply to this {_kind(g)} layer "
                              f"({reason})")

    def max_rank(self, g: Geometry) -> tuple[int, ...]:
        """Largest meaningful rank(s): at these the factorization reproduces the layer."""
        raise NotImplementedError

    def ranks(self, rank: Rank) -> tuple[int, ...]:
        """A rank as written in a plan, as a tuple of ``n_ranks`` ints."""
        if isinstance(rank, int):
            return (rank,) * self.n_ranks
        out = tuple(int(r) for r in rank)
        if len(out) != self.n_ranks:
            raise SchemeError(f"scheme {self.name!r} takes {self.n_ranks} rank(s), got {rank!r}")
        return out

    def rank_path(self, g: Geometry, round_to: int | None = None) -> np.ndarray:
        """The ranks allocators consider, ``(n, n_ranks)`` int64, cost increasing."""
        (limit,) = self.max_rank(g)
        return np.asarray(_rank_values(limit, round_to), dtype=np.int64)[:, None]

    # --- cost -------------------------------------------------------------------------------------

    def layout(self, g: Geometry, rank: Rank) -> tuple[Piece, ...]:
        """The ordinary layers the factored layer is made of, in the order they run."""
        raise NotImplementedError

    def cost(self, g: Geometry, rank: Rank) -> Cost:
        """MACs and parameters of the factored layer (bias included), from the cost model."""
        self.check(g)
        return pieces_cost(g, self.layout(g, self.ranks(rank)))

    def cost_arrays(self, calls: Sequence[Geometry], ranks: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """MACs (summed over ``calls``) and params for each row of ``ranks``, vectorized.

        A factored layer's cost is multilinear in its ranks (each piece's channels are linear in
        one rank, and only the Tucker-2 core joins two), so it is exactly determined by its value
        at ranks 1 and 2 in each coordinate; this evaluates those corners through
        :meth:`layout` and extends them to every rank in ``ranks``.
        """
        ranks = np.asarray(ranks, dtype=np.int64).reshape(len(ranks), self.n_ranks)
        macs = np.zeros(len(ranks), dtype=np.int64)
        params = np.zeros(len(ranks), dtype=np.int64)
        for i, g in enumerate(calls):
            m, p = _multilinear(lambda r, g=g: self.cost(g, r), self.n_ranks, ranks)
            macs += m
            if i == 0:
                params = p
        return macs, params

    # --- spectra and errors -----------------------------------------------------------------------

    def errors(self, spectra: Mapping[str, Spectrum], ranks: np.ndarray) -> np.ndarray:
        """Relative squared error of each row of ``ranks`` (the scheme's truncation error).

        Plain spectra give weight errors, whitened spectra output errors on the calibration data.
        """
        tails = spectra[self.unfoldings[0]].tails()
        r = np.asarray(ranks, dtype=np.int64).reshape(-1)
        return tails[np.minimum(r, len(tails) - 1)]

    # --- numerics ---------------------------------------------------------------------------------

    def factors(
        self,
        weight: torch.Tensor,
        g: Geometry,
        rank: Rank,
        *,
        spectra: Mapping[str, Spectrum] | None = None,
        whiten: Mapping[str, torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """The factor weights (float64, CPU) in :meth:`layout` order.

        ``spectra``: this layer's spectra (their stored bases, whitened or not, are used so no
        SVD is repeated); ``whiten``: per unfolding, a Cholesky factor of the input Gram to use
        instead (for spectra that carry none).
        """
        raise NotImplementedError

    def project(self, weight: torch.Tensor, rank: Rank, *, groups: int = 1) -> torch.Tensor:
        """The weight (same shape, device and dtype) truncated to ``rank``, differentiably."""
        raise NotImplementedError

    def compose(self, weights: Sequence[torch.Tensor], groups: int = 1) -> torch.Tensor:
        """The dense weight the factored layer computes, from its pieces' weights (the inverse
        of :meth:`factors`; differentiable)."""
        raise NotImplementedError

    def _spectrum(self, spectra: Mapping[str, Spectrum] | None, unit: str) -> Spectrum | None:
        return None if spectra is None else spectra.get(unit)


def _groups(g: Geometry) -> int:
    return g.groups if isinstance(g, ConvGeometry) else 1


def _kind(g: Geometry) -> str:
    return g.kind


def _rank_values(limit: int, round_to: int | None) -> list[int]:
    if not round_to or round_to <= 1:
        return list(range(1, limit + 1))
    rs = list(range(round_to, limit + 1, round_to))
    return rs or [limit]


def _multilinear(f: Any, n_ranks: int, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Extend ``f(rank) -> Cost`` (multilinear in each rank) from the corners {1, 2}^n."""
    if n_ranks == 1:
        c1, c2 = f((1,)), f((2,))
        r = ranks[:, 0] - 1
        return (c1.macs + r * (c2.macs - c1.macs), c1.params + r * (c2.params - c1.params))
    if n_ranks == 2:
        out = []
        for attr in ("macs", "params"):
            f11, f21, f12, f22 = (getattr(f(r), attr) for r in ((1, 1), (2, 1), (1, 2), (2, 2)))
            t = f22 - f21 - f12 + f11
            a, b = ranks[:, 0] - 1, ranks[:, 1] - 1
            out.append(f11 + a * (f21 - f11) + b * (f12 - f11) + a * b * t)
        return out[0], out[1]
    raise NotImplementedError("cost_arrays supports schemes with one or two ranks")


class _MatrixScheme(Scheme):
    """A scheme that truncates one matrix unfolding into two ordinary layers."""

    def factors(self, weight: torch.Tensor, g: Geometry, rank: Rank, *,
                spectra: Mapping[str, Spectrum] | None = None,
                whiten: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        (r,) = self.ranks(rank)
        unit = self.unfoldings[0]
        sp = self._spectrum(spectra, unit)
        sw = None if whiten is None else whiten.get(unit)
        if sw is not None and sp is not None and not sp.whitened:
            sp = None  # explicit whitening wins over a plain spectrum
        if sp is None or sp.basis is None:
            # decompose just this unfolding (its Gram), whitened like the spectrum was
            sw = sw if sp is None else sp.whiten
            sp = dec.spectrum_of(weight, unit, _groups(g), whiten=sw)
        return self._pair(weight, g, r, sp, None)

    def _pair(self, weight: torch.Tensor, g: Geometry, r: int, sp: Spectrum | None,
              sw: torch.Tensor | None) -> list[torch.Tensor]:
        raise NotImplementedError

    def project(self, weight: torch.Tensor, rank: Rank, *, groups: int = 1) -> torch.Tensor:
        (r,) = self.ranks(rank)
        u = dec.get_unfolding(self.unfoldings[0])
        return u.fold(dec.project_matrix(u.matrix(weight, groups), r), weight.shape, groups)


@dataclass(frozen=True)
class Svd(_MatrixScheme):
    """Truncated SVD of a linear weight: ``Linear(n -> r)`` then ``Linear(r -> m, bias)``."""

    name: str = "svd"
    unfoldings: tuple[str, ...] = ("rows",)

    def why_not(self, g: Geometry) -> str | None:
        return None if isinstance(g, LinearGeometry) else "svd factors linear layers only"

    def max_rank(self, g: Geometry) -> tuple[int, ...]:
        self.check(g)
        assert isinstance(g, LinearGeometry)
        return (min(g.in_features, g.out_features),)

    def layout(self, g: Geometry, rank: Rank) -> tuple[Piece, ...]:
        assert isinstance(g, LinearGeometry)
        (r,) = self.ranks(rank)
        return (Piece(g.in_features, r), Piece(r, g.out_features, bias=g.bias))

    def _pair(self, weight: torch.Tensor, g: Geometry, r: int, sp: Spectrum | None,
              sw: torch.Tensor | None) -> list[torch.Tensor]:
        first, second = dec.linear_factors(weight, r, sw, spectrum=sp)
        return [first, second]

    def compose(self, weights: Sequence[torch.Tensor], groups: int = 1) -> torch.Tensor:
        first, second = weights
        return second @ first


def _plain_conv_reason(g: Geometry, *, two_d: bool = False, ungrouped: bool = False,
                       spatial_kernel: bool = False) -> str | None:
    if not isinstance(g, ConvGeometry):
        return "it factors convolutions only"
    if g.transposed:
        return "transposed convolutions are not factored"
    if g.depthwise:
        return "depthwise convolutions are left dense"
    if two_d and (g.dims != 2 or (ungrouped and g.groups != 1)):
        return (f"it needs an ungrouped Conv2d; this is a {g.dims}-d convolution with "
                f"groups={g.groups}")
    if ungrouped and g.groups != 1:
        return f"it needs an ungrouped convolution; this one has groups={g.groups}"
    if spatial_kernel and all(k == 1 for k in g.kernel):
        return "it needs a spatial kernel, this one is 1x1"
    return None


@dataclass(frozen=True)
class Channel(_MatrixScheme):
    """Channel-wise (TRP "NC", scheme 1): ``Conv(C -> g*r, k)`` then a 1x1 ``(g*r -> N)``.

    Grouped convs are factored per group (both convs keep ``groups``), so the result is exact
    at full rank and block diagonal below it.
    """

    name: str = "channel"
    unfoldings: tuple[str, ...] = ("channel",)

    def why_not(self, g: Geometry) -> str | None:
        return _plain_conv_reason(g)

    def max_rank(self, g: Geometry) -> tuple[int, ...]:
        self.check(g)
        assert isinstance(g, ConvGeometry)
        gr = g.groups
        return (min(g.out_channels // gr, (g.in_channels // gr) * _prod(g.kernel)),)

    def layout(self, g: Geometry, rank: Rank) -> tuple[Piece, ...]:
        assert isinstance(g, ConvGeometry)
        (r,) = self.ranks(rank)
        stride, padding, dilation = _conv_args(g)
        gr = g.groups
        return (
            Piece(g.in_channels, gr * r, g.kernel, stride, padding, dilation, gr,
                  g.padding_mode, "out"),
            Piece(gr * r, g.out_channels, (1,) * g.dims, groups=gr, at="out", bias=g.bias),
        )

    def _pair(self, weight: torch.Tensor, g: Geometry, r: int, sp: Spectrum | None,
              sw: torch.Tensor | None) -> list[torch.Tensor]:
        assert isinstance(g, ConvGeometry)
        first, second = dec.channel_factors(weight, r, g.groups, sw, spectrum=sp)
        return [first, second]

    def compose(self, weights: Sequence[torch.Tensor], groups: int = 1) -> torch.Tensor:
        first, second = weights
        n, r = second.shape[:2]
        cg, k = first.shape[1], first.shape[2:]
        left = second.reshape(groups, n // groups, r)
        right = first.reshape(groups, r, -1)
        return (left @ right).reshape(n, cg, *k)


@dataclass(frozen=True)
class Spatial(_MatrixScheme):
    """Spatial-wise (TRP "VH", scheme 2): ``Conv(kh, 1) (C -> r)`` then ``Conv(1, kw) (r -> N)``.

    The stride, padding and dilation are split between the two 1-D convs, so strided convs stay
    exact.
    """

    name: str = "spatial"
    unfoldings: tuple[str, ...] = ("spatial",)

    def why_not(self, g: Geometry) -> str | None:
        return _plain_conv_reason(g, two_d=True, ungrouped=True, spatial_kernel=True)

    def max_rank(self, g: Geometry) -> tuple[int, ...]:
        self.check(g)
        assert isinstance(g, ConvGeometry)
        kh, kw = g.kernel
        return (min(g.in_channels * kh, g.out_channels * kw),)

    def layout(self, g: Geometry, rank: Rank) -> tuple[Piece, ...]:
        assert isinstance(g, ConvGeometry)
        (r,) = self.ranks(rank)
        (sh, sw), padding, (dh, dw) = _conv_args(g)
        pad_h, pad_w = _split_padding(padding)
        kh, kw = g.kernel
        pm = g.padding_mode
        return (
            Piece(g.in_channels, r, (kh, 1), (sh, 1), pad_h, (dh, 1), 1, pm, "mid"),
            Piece(r, g.out_channels, (1, kw), (1, sw), pad_w, (1, dw), 1, pm, "out", g.bias),
        )

    def _pair(self, weight: torch.Tensor, g: Geometry, r: int, sp: Spectrum | None,
              sw: torch.Tensor | None) -> list[torch.Tensor]:
        vertical, horizontal = dec.spatial_factors(weight, r, sw, spectrum=sp)
        return [vertical, horizontal]

    def compose(self, weights: Sequence[torch.Tensor], groups: int = 1) -> torch.Tensor:
        vertical, horizontal = weights  # (r, C, kh, 1), (N, r, 1, kw)
        return torch.einsum("rci,nrj->ncij", vertical[..., 0], horizontal[:, :, 0, :])


@dataclass(frozen=True)
class Tucker2(Scheme):
    """Tucker-2 on the channel modes (Kim et al. 2016): 1x1, core conv, 1x1.

    Ranks are ``(r_in, r_out)``. Plain: factors come from HOOI started at the HOSVD given by
    the stored spectra; the allocators estimate its error by the HOSVD bound, the sum of the two
    modes' truncation tails (an upper bound of the HOOI error). Whitened (calibration data): the
    output side keeps the top vectors of ``W S`` (the whitened channel spectrum), the input side
    the data-aware channel combinations of :func:`lrfx.decompositions.tucker2_input_spectrum`,
    and the allocators' error is the output-error bound of that pair: a relative output error,
    like every other whitened scheme's.
    """

    name: str = "tucker2"
    n_ranks: int = 2
    unfoldings: tuple[str, ...] = ("mode1", "channel")

    def why_not(self, g: Geometry) -> str | None:
        return _plain_conv_reason(g, two_d=True, ungrouped=True)

    def max_rank(self, g: Geometry) -> tuple[int, ...]:
        self.check(g)
        assert isinstance(g, ConvGeometry)
        n, c, k = g.out_channels, g.in_channels, _prod(g.kernel)
        return (min(c, n * k), min(n, c * k))

    def layout(self, g: Geometry, rank: Rank) -> tuple[Piece, ...]:
        assert isinstance(g, ConvGeometry)
        r_in, r_out = self.ranks(rank)
        stride, padding, dilation = _conv_args(g)
        ones = (1,) * g.dims
        return (
            Piece(g.in_channels, r_in, ones, at="in"),
            Piece(r_in, r_out, g.kernel, stride, padding, dilation, 1, g.padding_mode, "out"),
            Piece(r_out, g.out_channels, ones, at="out", bias=g.bias),
        )

    def rank_path(self, g: Geometry, round_to: int | None = None) -> np.ndarray:
        lim_in, lim_out = self.max_rank(g)
        rows = []
        for r_out in _rank_values(lim_out, round_to):
            r_in = min(lim_in, max(1, round(r_out * lim_in / lim_out)))
            if round_to and round_to > 1:
                r_in = min(lim_in, max(round_to, round(r_in / round_to) * round_to))
            rows.append((r_in, r_out))
        return np.asarray(rows, dtype=np.int64).reshape(-1, 2)

    def errors(self, spectra: Mapping[str, Spectrum], ranks: np.ndarray) -> np.ndarray:
        t_in, t_out = (spectra[u].tails() for u in self.unfoldings)
        r = np.asarray(ranks, dtype=np.int64).reshape(-1, 2)
        e = t_in[np.minimum(r[:, 0], len(t_in) - 1)] + t_out[np.minimum(r[:, 1], len(t_out) - 1)]
        return np.minimum(1.0, e)

    def factors(self, weight: torch.Tensor, g: Geometry, rank: Rank, *,
                spectra: Mapping[str, Spectrum] | None = None,
                whiten: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        r_in, r_out = self.ranks(rank)
        out_sp, in_sp = self._spectrum(spectra, "channel"), self._spectrum(spectra, "mode1")
        if (out_sp is not None and out_sp.whitened and out_sp.basis is not None
                and out_sp.side == "left" and in_sp is not None and in_sp.whitened
                and in_sp.basis is not None):
            # data-aware on both sides, no HOOI (it would fit the weight, not the output): the
            # error the allocator was given (tucker2_input_spectrum) bounds this one's
            assert in_sp.whiten is not None
            return list(dec.tucker2_whitened_factors(
                weight, (r_in, r_out), out_sp.top_vectors(r_out)[0],
                in_sp.top_vectors(r_in)[0], in_sp.whiten[0]))
        modes = []
        for unit, r in (("channel", r_out), ("mode1", r_in)):
            sp = self._spectrum(spectra, unit)
            if sp is None or sp.basis is None or sp.whitened:
                sp = dec.spectrum_of(weight, unit)  # the mode's plain Gram eigenvectors
            # HOSVD needs the mode's left singular vectors (the Gram of its rows)
            modes.append(sp.top_vectors(r)[0] if sp.side == "left" else None)
        init = (modes[0], modes[1]) if modes[0] is not None and modes[1] is not None else None
        first, core, last = dec.tucker2_factors(weight, (r_in, r_out), init=init)
        return [first, core, last]

    def project(self, weight: torch.Tensor, rank: Rank, *, groups: int = 1) -> torch.Tensor:
        r_in, r_out = self.ranks(rank)
        return dec.tucker2_project(weight, (r_in, r_out))

    def compose(self, weights: Sequence[torch.Tensor], groups: int = 1) -> torch.Tensor:
        first, core, last = weights  # (r_in, C, 1..), (r_out, r_in, *k), (N, r_out, 1..)
        w = torch.einsum("no,oi...->ni...", last.flatten(1), core)
        return torch.einsum("ni...,ic->nc...", w, first.flatten(1))


@dataclass(frozen=True)
class CP(Scheme):
    """CP decomposition of a conv kernel (Lebedev et al. 2015): 1x1, two depthwise, 1x1.

    Plan-only: the error of a rank-R CP decomposition has no closed form from the spectra (it
    takes an iterative ALS fit per rank to know it), so allocators never choose ``cp``; write it
    into a plan by hand (``LayerPlan("cp", R)``) and ``lrfx.apply`` builds it.
    """

    name: str = "cp"
    allocatable: bool = False
    note: str = ("cp is plan-only: its error at a rank is only known after an ALS fit, so "
                 "allocators cannot rank it; write LayerPlan('cp', R) into a plan by hand")

    def why_not(self, g: Geometry) -> str | None:
        return _plain_conv_reason(g, two_d=True, ungrouped=True, spatial_kernel=True)

    def max_rank(self, g: Geometry) -> tuple[int, ...]:
        self.check(g)
        assert isinstance(g, ConvGeometry)
        # tensor rank of an (n, c, kh, kw) tensor is at most the product of all dims but the largest
        dims = sorted((g.out_channels, g.in_channels, *g.kernel))
        return (dims[0] * dims[1] * dims[2],)

    def layout(self, g: Geometry, rank: Rank) -> tuple[Piece, ...]:
        assert isinstance(g, ConvGeometry)
        (r,) = self.ranks(rank)
        (sh, sw), padding, (dh, dw) = _conv_args(g)
        pad_h, pad_w = _split_padding(padding)
        kh, kw = g.kernel
        pm = g.padding_mode
        return (
            Piece(g.in_channels, r, (1, 1), at="in"),
            Piece(r, r, (kh, 1), (sh, 1), pad_h, (dh, 1), r, pm, "mid"),
            Piece(r, r, (1, kw), (1, sw), pad_w, (1, dw), r, pm, "out"),
            Piece(r, g.out_channels, (1, 1), at="out", bias=g.bias),
        )

    def errors(self, spectra: Mapping[str, Spectrum], ranks: np.ndarray) -> np.ndarray:
        raise LrfxError(self.note)

    def factors(self, weight: torch.Tensor, g: Geometry, rank: Rank, *,
                spectra: Mapping[str, Spectrum] | None = None,
                whiten: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        (r,) = self.ranks(rank)
        return list(dec.cp_factors(weight, r))

    def project(self, weight: torch.Tensor, rank: Rank, *, groups: int = 1) -> torch.Tensor:
        """The CP reconstruction; ALS is not differentiated, so the gradient passes straight
        through (``w + (cp(w) - w).detach()``)."""
        (r,) = self.ranks(rank)
        with torch.no_grad():
            rec = dec.cp_reconstruct(dec.cp_factors(weight, r)).to(weight)
        return weight + (rec - weight).detach()

    def compose(self, weights: Sequence[torch.Tensor], groups: int = 1) -> torch.Tensor:
        return dec.cp_reconstruct(weights)


# --- the registry ---------------------------------------------------------------------------------

_REGISTRY: dict[str, Scheme] = {}


def register_scheme(scheme: Scheme) -> Scheme:
    """Add a scheme to the registry (its ``name`` must be new); returns it.

    Example:
        >>> get_scheme("svd").name
        'svd'
    """
    if not isinstance(scheme, Scheme):
        raise TypeError(f"register_scheme takes a lrfx.schemes.Scheme, got {type(scheme)}")
    if scheme.name in _REGISTRY or scheme.name == "dense":
        raise LrfxError(f"a scheme named {scheme.name!r} is already registered")
    _REGISTRY[scheme.name] = scheme
    return scheme


def unregister_scheme(name: str) -> Scheme:
    """Remove a scheme added with :func:`register_scheme` (the built-ins stay); returns it."""
    if name in SCHEMES:
        raise LrfxError(f"the built-in scheme {name!r} cannot be unregistered")
    try:
        return _REGISTRY.pop(name)
    except KeyError:
        raise SchemeError(f"no scheme named {name!r} is registered") from None


for _s in (Svd(), Channel(), Spatial(), Tucker2(), CP()):
    register_scheme(_s)

#: The built-in scheme names (see :func:`scheme_names` for the registry as it is now).
SCHEMES: tuple[str, ...] = tuple(_REGISTRY)


def scheme_names() -> tuple[str, ...]:
    """Every registered scheme, in registration order."""
    return tuple(_REGISTRY)


def get_scheme(name: str) -> Scheme:
    """The registered scheme called ``name``.

    Raises:
        SchemeError: No such scheme (names the valid ones).
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise SchemeError(f"unknown scheme {name!r}; expected one of "
                          f"{', '.join(_REGISTRY)}") from None


def applicable_schemes(g: Geometry) -> tuple[str, ...]:
    """The schemes that apply to a layer of this geometry (may be empty), in registry order."""
    return tuple(name for name, s in _REGISTRY.items() if s.applies(g))


def max_rank(g: Geometry, scheme: str) -> tuple[int, ...]:
    """Largest meaningful rank(s) of a scheme on this layer (one int per rank of the scheme).

    At these ranks the factorization reproduces the layer exactly (cp excepted: its bound is the
    generic upper bound on tensor rank).
    """
    return get_scheme(scheme).max_rank(g)


def factored_cost(g: Geometry, scheme: str, rank: Rank) -> Cost:
    """MACs and parameters of a layer factored with ``scheme`` at ``rank``.

    Args:
        g: The layer's geometry.
        scheme: A registered scheme that applies to the layer.
        rank: An int, or for ``tucker2`` a pair ``(r_in, r_out)`` (an int means both).
    """
    return get_scheme(scheme).cost(g, rank)


def break_even_rank(g: Geometry, scheme: str) -> int:
    """Smallest rank at which the factored layer costs at least as many MACs as the dense one.

    A plan keeps a layer dense at this rank or above. For ``tucker2`` the rank is the common
    value ``r_in = r_out`` scaled by the layer's ``(C, N)`` aspect; it is reported as ``r_out``.
    """
    s = get_scheme(scheme)
    dense = dense_cost(g).macs
    hi = max(s.max_rank(g))

    def cost_at(r: int) -> int:
        if s.n_ranks == 2:
            assert isinstance(g, ConvGeometry)
            r_in = max(1, round(r * g.in_channels / g.out_channels))
            return s.cost(g, (min(r_in, s.max_rank(g)[0]), r)).macs
        return s.cost(g, r).macs

    if cost_at(hi) < dense:
        return hi + 1
    lo = 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cost_at(mid) >= dense:
            hi = mid
        else:
            lo = mid + 1
    return lo
