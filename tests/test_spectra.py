"""Spectra: singular values of the documented unfoldings, energy ranks, NaN weights, sharing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lrfx
from lrfx.decompositions import singular_values, unfold
from lrfx.facts import Spectrum, get_node_facts
from lrfx.passes.analysis import annotate_costs, compute_spectra, propagate_shapes


def svdvals(m: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(m.detach().double())


def spatial_by_index(w: torch.Tensor) -> torch.Tensor:
    """algorithms.md scheme 2, element by element: M[c*kh + i, n*kw + j] = W[n, c, i, j]."""
    n, c, kh, kw = w.shape
    m = torch.empty(c * kh, n * kw, dtype=w.dtype)
    for a in range(n):
        for b in range(c):
            for i in range(kh):
                for j in range(kw):
                    m[b * kh + i, a * kw + j] = w[a, b, i, j]
    return m


def mode1_by_index(w: torch.Tensor) -> torch.Tensor:
    """Tucker-2 mode 1: M[c, n*kh*kw + i*kw + j] = W[n, c, i, j]."""
    n, c, kh, kw = w.shape
    m = torch.empty(c, n * kh * kw, dtype=w.dtype)
    for a in range(n):
        for i in range(kh):
            for j in range(kw):
                m[:, a * kh * kw + i * kw + j] = w[a, :, i, j]
    return m


def test_linear_spectrum() -> None:
    model = nn.Sequential(nn.Linear(7, 5))
    (rec,) = lrfx.analyze(model, torch.randn(3, 7)).layers
    assert set(rec.spectra) == {"rows"}
    sp = rec.spectra["rows"]
    assert sp.values.dtype == torch.float64
    assert sp.values.shape == (1, 5) and sp.groups == 1 and sp.max_rank == 5
    torch.testing.assert_close(sp.values[0], svdvals(model[0].weight))


def test_conv_spectra_channel_spatial_mode1() -> None:
    conv = nn.Conv2d(3, 5, (2, 3))
    (rec,) = lrfx.analyze(nn.Sequential(conv), torch.randn(1, 3, 6, 6)).layers
    assert set(rec.spectra) == {"channel", "spatial", "mode1"}
    w = conv.weight.detach()
    torch.testing.assert_close(rec.spectra["channel"].values[0], svdvals(w.reshape(5, 3 * 2 * 3)))
    torch.testing.assert_close(rec.spectra["spatial"].values[0], svdvals(spatial_by_index(w)))
    torch.testing.assert_close(rec.spectra["mode1"].values[0], svdvals(mode1_by_index(w)))
    assert rec.spectra["spatial"].max_rank == min(3 * 2, 5 * 3)
    assert rec.spectra["mode1"].max_rank == 3
    for sp in rec.spectra.values():
        v = sp.values[0]
        assert torch.all(v[:-1] >= v[1:])  # descending


def test_unfold_matches_documented_layout() -> None:
    w = torch.randn(4, 3, 2, 5)
    assert torch.equal(unfold(w, "spatial")[0], spatial_by_index(w))
    assert torch.equal(unfold(w, "mode1")[0], mode1_by_index(w))
    assert torch.equal(unfold(w, "channel")[0], w.reshape(4, -1))
    assert unfold(torch.zeros(8, 4, 3, 3), "spatial").shape == (1, 12, 24)
    with pytest.raises(lrfx.LrfxError):
        unfold(torch.zeros(4, 3), "channel")
    with pytest.raises(lrfx.LrfxError):
        unfold(torch.zeros(4, 2, 3, 3), "spatial", groups=2)
    with pytest.raises(lrfx.LrfxError, match="unknown unfolding"):
        unfold(w, "diagonal")


def test_grouped_conv_spectra_per_group() -> None:
    conv = nn.Conv2d(6, 9, 3, groups=3)
    (rec,) = lrfx.analyze(nn.Sequential(conv), torch.randn(1, 6, 5, 5)).layers
    assert rec.schemes == ("channel",)
    assert set(rec.spectra) == {"channel"}
    sp = rec.spectra["channel"]
    assert sp.values.shape == (3, min(3, 2 * 9))
    w = conv.weight.detach()
    for g in range(3):
        torch.testing.assert_close(sp.values[g], svdvals(w[3 * g : 3 * (g + 1)].reshape(3, -1)))
    # grouped spectra are per group, not of the whole (block-diagonal) weight
    assert not torch.allclose(sp.values[0], svdvals(w.reshape(9, -1))[:3])


def test_conv1d_spectrum() -> None:
    conv = nn.Conv1d(4, 6, 3)
    (rec,) = lrfx.analyze(nn.Sequential(conv), torch.randn(1, 4, 9)).layers
    assert set(rec.spectra) == {"channel"}
    expected = svdvals(conv.weight.reshape(6, -1))
    torch.testing.assert_close(rec.spectra["channel"].values[0], expected)


def test_multihead_attention_projection_spectra() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x)[0]

    model = Attn()
    a = lrfx.analyze(model, torch.randn(2, 3, 8))
    w = model.mha.in_proj_weight.detach()
    for i, part in enumerate(("q_proj", "k_proj", "v_proj")):
        torch.testing.assert_close(
            a[f"mha.{part}"].spectra["rows"].values[0], svdvals(w[8 * i : 8 * (i + 1)])
        )
    torch.testing.assert_close(
        a["mha.out_proj"].spectra["rows"].values[0], svdvals(model.mha.out_proj.weight)
    )
    assert not a["mha.attention"].spectra


def orthonormal(n: int, k: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64))
    return q


def test_rank_at_energy_with_known_singular_values() -> None:
    s = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    w = orthonormal(7, 5) @ torch.diag(s) @ orthonormal(6, 5).T  # (7, 6), singular values s
    lin = nn.Linear(6, 7)
    with torch.no_grad():
        lin.weight.copy_(w.float())
    (rec,) = lrfx.analyze(nn.Sequential(lin), torch.randn(1, 6)).layers
    torch.testing.assert_close(rec.spectra["rows"].values[0, :5], s, atol=1e-5, rtol=1e-5)
    # cumulative energy: 16, 25, 29, 30, 30.25 of 30.25 = .529, .826, .959, .9917, 1
    assert rec.rank_at_energy("svd", 0.5) == 1
    assert rec.rank_at_energy("svd", 0.8) == 2
    assert rec.rank_at_energy("svd", 0.9) == 3
    assert rec.rank_at_energy("svd", 0.95) == 3
    assert rec.rank_at_energy("svd", 0.99) == 4
    assert rec.rank_at_energy("svd", 0.995) == 5
    assert rec.rank_at_energy("svd", 1.0) == 5
    d = rec.to_dict()
    assert d["rank_at_energy"] == {"svd": {"0.9": 3, "0.95": 3, "0.99": 4}}
    with pytest.raises(KeyError, match="channel"):
        rec.rank_at_energy("channel", 0.9)


def test_spectrum_energy_and_value_rules() -> None:
    sp = Spectrum(torch.tensor([[3.0, 1.0, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(sp.energy(), torch.tensor([[0.9, 1.0, 1.0]], dtype=torch.float64))
    assert sp.rank_at_energy(0.9) == 1  # reaching the threshold exactly is enough
    assert sp.rank_at_energy(0.91) == 2
    assert sp.rank_at_energy(1.0) == 2
    assert sp.rank_at_value(1.0) == 2
    assert sp.rank_at_value(5.0) == 1  # at least 1
    grouped = Spectrum(torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64))
    assert grouped.rank_at_energy(0.9) == 2  # the largest over groups
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            sp.rank_at_energy(bad)


@pytest.mark.parametrize("r", [1, 3, 5])
def test_exact_low_rank_weight_gives_its_rank_at_full_energy(r: int) -> None:
    lin = nn.Linear(20, 16)
    conv = nn.Conv2d(4, 12, 3)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(16, r) @ torch.randn(r, 20))
        conv.weight.copy_((torch.randn(12, r) @ torch.randn(r, 36)).reshape(12, 4, 3, 3))
    (a,) = lrfx.analyze(nn.Sequential(lin), torch.randn(1, 20)).layers
    (c,) = lrfx.analyze(nn.Sequential(conv), torch.randn(1, 4, 5, 5)).layers
    assert a.rank_at_energy("svd", 1.0) == r
    assert c.rank_at_energy("channel", 1.0) == r
    sv = a.spectra["rows"].values[0]
    assert float(sv[r:].max()) < 1e-5 * float(sv[0])


def test_nan_weight_gets_no_spectra_and_a_note(small_cnn: nn.Module) -> None:
    with torch.no_grad():
        small_cnn.conv2.weight[0, 0, 0, 0] = float("nan")
    a = lrfx.analyze(small_cnn, torch.randn(1, 3, 8, 8))
    bad = a["conv2"]
    assert not bad.spectra
    assert not bad.factorable
    assert "NaN" in bad.note
    assert bad.macs == 16 * 16 * 72  # still counted
    assert a["conv1"].spectra and a["fc"].spectra  # the others are unaffected
    assert "NaN" in bad.to_dict()["note"]


def test_inf_weight_gets_no_spectra() -> None:
    lin = nn.Linear(3, 3)
    with torch.no_grad():
        lin.weight[1, 2] = float("inf")
    (rec,) = lrfx.analyze(nn.Sequential(lin), torch.randn(1, 3)).layers
    assert not rec.spectra and not rec.factorable


def test_spectra_of_shared_layers_are_computed_once(shared_net: nn.Module) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.shared = shared_net  # fc called twice
            self.conv = nn.Conv2d(2, 3, 3)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.shared(x), self.conv(y)

    gm = lrfx.trace(Net())
    ctx = lrfx.PassContext(example_inputs=(torch.randn(4, 6), torch.randn(1, 2, 5, 5)))
    results = lrfx.Pipeline([propagate_shapes, annotate_costs, compute_spectra]).run(gm, ctx)
    # fc: rows; conv: channel, spatial, mode1
    assert results["compute_spectra"] == 1 + 3
    fc_nodes = [n for n in gm.graph.nodes if n.target == "shared.fc"]
    assert len(fc_nodes) == 2
    first, second = (get_node_facts(n).layers[0] for n in fc_nodes)  # type: ignore[union-attr]
    assert first.spectra["rows"] is second.spectra["rows"]
    assert "spectra" in gm.meta["lrfx"].provided


def test_singular_values_are_float64_whatever_the_dtype() -> None:
    w = torch.randn(6, 4, dtype=torch.float16)
    sv = singular_values(w, "rows")
    assert sv.dtype == torch.float64 and sv.shape == (1, 4)
    torch.testing.assert_close(sv[0], svdvals(w))


def test_spectra_can_be_skipped(small_cnn: nn.Module) -> None:
    a = lrfx.analyze(small_cnn, torch.randn(1, 3, 8, 8), spectra=False)
    assert all(not r.spectra for r in a)
    assert a["conv1"].factorable
    rows = a.rows()
    assert rows[0]["r90"] == ""
