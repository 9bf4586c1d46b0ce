"""Shift-structured conv patch Grams equal the im2col Grams they replace."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import lrfx.passes.analysis.grams as grams
from lrfx.passes.analysis.grams import patch_gram, patch_sums


def _im2col(x: torch.Tensor, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int],
            g: int) -> torch.Tensor:
    cols = F.unfold(x.double(), k, dilation=d, stride=s)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return rows.reshape(rows.shape[0], g, -1).transpose(0, 1)  # (g, n, d)


def _reference(x: torch.Tensor, k: tuple[int, int], s: tuple[int, int], d: tuple[int, int],
               g: int, y: torch.Tensor | None = None) -> torch.Tensor:
    p = _im2col(x, k, s, d, g)
    q = p if y is None else _im2col(y, k, s, d, g)
    return p.transpose(1, 2) @ q


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


CASES = list(itertools.product(
    [(3, 3), (1, 1), (3, 1), (1, 5), (5, 3), (7, 7)],  # kernel
    [(1, 1), (2, 2), (2, 1), (3, 3)],  # stride
    [(1, 1), (2, 2)],  # dilation
    [1, 2],  # groups
))


@pytest.mark.parametrize(("k", "s", "d", "g"), CASES)
def test_patch_gram_equals_the_im2col_gram(k: tuple[int, int], s: tuple[int, int],
                                           d: tuple[int, int], g: int) -> None:
    torch.manual_seed(hash((k, s, d, g)) % 1000)
    for pad, size in ((0, (13, 11)), (2, (9, 10))):
        x = F.pad(torch.randn(3, 4, *size), (pad,) * 4)
        if x.shape[2] < d[0] * (k[0] - 1) + 1 or x.shape[3] < d[1] * (k[1] - 1) + 1:
            continue
        got = patch_gram(x, k, s, d, g, pad=(pad,) * 4)
        side = 4 // g * k[0] * k[1]
        assert got.dtype == torch.float64 and got.shape == (g, side, side)
        assert _rel(got, _reference(x, k, s, d, g)) < 1e-5, (pad, size)
        # the padding hint only skips work: without it the result is the same
        assert _rel(patch_gram(x, k, s, d, g), got) < 1e-5
        # patch sums (the means of centered statistics)
        torch.testing.assert_close(patch_sums(x, k, s, d, g), _im2col(x, k, s, d, g).sum(1),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("block", [64, 1 << 17])
def test_cross_gram_vertical_gram_and_chunks(block: int, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    monkeypatch.setattr(grams, "BLOCK", block)  # one position per chunk row, or one chunk
    torch.manual_seed(0)
    x = F.pad(torch.randn(5, 6, 12, 9), (1, 1, 1, 1))
    y = F.pad(torch.randn(5, 6, 12, 9), (1, 1, 1, 1))
    for s in ((1, 1), (2, 1)):
        full, vert = patch_gram(x, (3, 3), s, pad=(1,) * 4, vertical=True)
        assert _rel(full, _reference(x, (3, 3), s, (1, 1), 1)) < 1e-5
        assert _rel(vert, _reference(x, (3, 1), s, (1, 1), 1)) < 1e-5
        cross, cvert = patch_gram(x, (3, 3), s, y=y, pad=(1,) * 4, vertical=True)
        assert _rel(cross, _reference(x, (3, 3), s, (1, 1), 1, y)) < 1e-5
        assert _rel(cvert, _reference(x, (3, 1), s, (1, 1), 1, y)) < 1e-5
        assert not torch.allclose(cross, cross.transpose(1, 2))  # a cross Gram is not symmetric
    # float64 in, float64 throughout
    g64 = patch_gram(x.double(), (3, 3), groups=2)
    assert _rel(g64, _reference(x, (3, 3), (1, 1), (1, 1), 2)) < 1e-12


def test_depthwise_reflect_padding_and_degenerate_inputs() -> None:
    torch.manual_seed(1)
    x = F.pad(torch.randn(2, 6, 8, 8), (1, 1, 1, 1), mode="reflect")  # nonzero border
    assert _rel(patch_gram(x, (3, 3), groups=6), _reference(x, (3, 3), (1, 1), (1, 1), 6)) < 1e-5
    empty = patch_gram(torch.randn(0, 3, 5, 5), (3, 3))
    assert empty.shape == (1, 27, 27) and not empty.any()
    with pytest.raises(ValueError, match="one shape"):
        patch_gram(torch.randn(2, 3, 5, 5), (3, 3), y=torch.randn(2, 3, 5, 6))
    with pytest.raises(ValueError, match="vertical"):
        patch_gram(torch.randn(2, 4, 5, 5), (3, 3), groups=2, vertical=True)


def test_long_kernels_go_through_im2col(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many taps (a 1-D kernel of 64, say): the im2col path, same results, also cross and
    vertical; and the shift path agrees with it when forced past MAX_TAPS."""
    torch.manual_seed(0)
    x = F.pad(torch.randn(3, 2, 1, 80), (3, 3, 0, 0))
    y = F.pad(torch.randn(3, 2, 1, 80), (3, 3, 0, 0))
    k = (1, 64)
    got = patch_gram(x, k, (1, 4), groups=2)
    assert _rel(got, _reference(x, k, (1, 4), (1, 1), 2)) < 1e-5
    cross, vert = patch_gram(x, k, (1, 1), y=y, vertical=True)
    assert _rel(cross, _reference(x, k, (1, 1), (1, 1), 1, y)) < 1e-5
    assert _rel(vert, _reference(x, (1, 1), (1, 1), (1, 1), 1, y)) < 1e-5
    monkeypatch.setattr(grams, "MAX_TAPS", 10_000)
    assert _rel(patch_gram(x, k, (1, 4), groups=2), got) < 1e-5


def test_pairs_assembled_in_slices_give_the_same_gram(monkeypatch: pytest.MonkeyPatch) -> None:
    """PAIR_BYTES bounds the float64 blocks assembled at once; one pair at a time (the
    smallest slice) gives the same Gram, cross Gram and vertical Gram."""
    torch.manual_seed(1)
    x = F.pad(torch.randn(2, 4, 9, 8), (1, 1, 1, 1))
    y = F.pad(torch.randn(2, 4, 9, 8), (1, 1, 1, 1))
    whole = patch_gram(x, (3, 3), (2, 1), groups=2, pad=(1, 1, 1, 1))
    cross, vert = patch_gram(x, (3, 3), y=y, pad=(1, 1, 1, 1), vertical=True)
    monkeypatch.setattr(grams, "PAIR_BYTES", 1)
    sliced = patch_gram(x, (3, 3), (2, 1), groups=2, pad=(1, 1, 1, 1))
    cross_s, vert_s = patch_gram(x, (3, 3), y=y, pad=(1, 1, 1, 1), vertical=True)
    for a, b in ((sliced, whole), (cross_s, cross), (vert_s, vert)):
        assert _rel(a, b) < 1e-12
    assert _rel(sliced, _reference(x, (3, 3), (2, 1), (1, 1), 2)) < 1e-5
    assert _rel(vert_s, _reference(x, (3, 1), (1, 1), (1, 1), 1, y)) < 1e-5
