"""Latency-true compression (algorithms.md §6): measured per-layer times, a latency budget, and
plans that never factor a layer into something slower.

Timing is made deterministic with a fake timer that prices a probe from its geometry (MACs plus a
fixed overhead per kernel launched), so the checks are exact: the cache keys and reuse, which
ranks are probed, the "never slower" rule, the allocator's choice given known costs, and the
latency budget through ``compress`` and the CLI. One smoke test times a tiny model for real.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import torch
from torch import nn

import lrfx
from lrfx.cli import main
from lrfx.cost import ConvGeometry, LinearGeometry, dense_cost
from lrfx.errors import LrfxError
from lrfx.latency import (
    LatencyCache,
    LatencyModel,
    Probe,
    Timed,
    WallTimer,
    environment,
    time_models,
)
from lrfx.passes.allocation import (
    Budget,
    Candidate,
    LayerOptions,
    allocate_lc,
    latency_options,
)
from lrfx.passes.analysis.latency import LayerLatency, measure_layers, probe_indices
from lrfx.schemes import get_scheme

SECONDS_PER_MAC = 1e-9
LAUNCH = 5e-4  # seconds per kernel: factoring a small layer costs more than it saves


def _price(p: Probe, launch: float = LAUNCH) -> float:
    g = p.geometry
    if p.scheme == "dense":
        return dense_cost(g).macs * SECONDS_PER_MAC + launch
    s = get_scheme(p.scheme)
    assert p.rank is not None
    rank = p.rank[0] if len(p.rank) == 1 else p.rank
    pieces = s.layout(g, s.ranks(rank))
    return s.cost(g, rank).macs * SECONDS_PER_MAC + launch * len(pieces)


class FakeTimer:
    """Prices probes with :func:`_price`; whole models by a fixed table. Counts its jobs."""

    def __init__(self, models: dict[str, float] | None = None, launch: float = LAUNCH) -> None:
        self.jobs: list[str] = []
        self.models = models or {}
        self.launch = launch

    def __call__(self, jobs: Sequence[Timed]) -> list[float]:
        self.jobs += [j.key for j in jobs]
        return [_price(j.probe, self.launch) if j.probe is not None
                else self.models.get(j.key, 1e-3) for j in jobs]


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 8)).eval()


# --- the latency model and its cache --------------------------------------------------------------


def test_probe_keys_separate_everything_that_changes_a_time() -> None:
    g = ConvGeometry(16, 32, (3, 3), (8, 8), (8, 8), padding=(1, 1), batch=1)
    keys = {Probe(g).key, Probe(ConvGeometry(16, 32, (3, 3), (8, 8), (8, 8), padding=(1, 1),
                                             batch=4)).key,
            Probe(g, "channel", (8,)).key, Probe(g, "channel", (16,)).key,
            Probe(g, "spatial", (8,)).key}
    assert len(keys) == 5
    assert Probe(g, "channel", (8,)).key == Probe(g, "channel", (8,)).key
    assert environment("cpu", torch.float32) != environment("cpu", torch.float64)


def test_probe_builds_the_layer_it_names() -> None:
    g = ConvGeometry(16, 32, (3, 3), (8, 8), (8, 8), padding=(1, 1), batch=2)
    dense, x = Probe(g).build()
    assert isinstance(dense, nn.Conv2d) and tuple(x.shape) == (2, 16, 8, 8)
    fac, x = Probe(g, "tucker2", (4, 6)).build()
    assert isinstance(fac, lrfx.modules.Factored) and fac.rank == (4, 6)
    assert dense(x).shape == fac(x).shape == (2, 32, 8, 8)
    lin, x = Probe(LinearGeometry(10, 7, rows=5), "svd", (3,)).build(torch.float64)
    assert lin(x).shape == (5, 7) and x.dtype == torch.float64
    assert all(torch.isfinite(p).all() for p in fac.parameters())  # no uninitialized memory


def test_measured_times_are_cached_on_disk_and_reused(tmp_path) -> None:
    g = LinearGeometry(64, 64, rows=8)
    probes = [Probe(g), Probe(g, "svd", (8,)), Probe(g)]  # a repeated probe is timed once
    timer = FakeTimer()
    lm = LatencyModel(timer=timer, cache=LatencyCache(tmp_path / "lat.json"), environment="e1")
    first = lm.measure(probes)
    assert len(timer.jobs) == 2 and lm.measured == 2 and first[0] == first[2]
    assert lm.measure(probes) == first and len(timer.jobs) == 2  # memo
    again = LatencyModel(timer=timer, cache=LatencyCache(tmp_path / "lat.json"),
                         environment="e1")
    assert again.measure(probes) == first and len(timer.jobs) == 2 and again.measured == 0
    other = LatencyModel(timer=timer, cache=LatencyCache(tmp_path / "lat.json"),
                         environment="e2")  # another machine / thread count / dtype
    other.measure(probes)
    assert len(timer.jobs) == 4
    data = json.loads((tmp_path / "lat.json").read_text())
    assert set(data) == {"e1", "e2"} and len(data["e1"]) == 2


def test_a_damaged_cache_is_ignored_and_rewritten(tmp_path) -> None:
    path = tmp_path / "lat.json"
    path.write_text("{not json")
    lm = LatencyModel(timer=FakeTimer(), cache=LatencyCache(path), environment="e")
    assert lm.measure([Probe(LinearGeometry(8, 8))])[0] > 0
    assert "e" in json.loads(path.read_text())


def test_a_timer_that_drops_jobs_is_an_error() -> None:
    lm = LatencyModel(timer=lambda jobs: [1.0], cache=None)
    g = LinearGeometry(8, 8)
    with pytest.raises(LrfxError, match="returned 1 times for 2 jobs"):
        lm.measure([Probe(g), Probe(g, "svd", (2,))])


def test_wall_timer_interleaves_and_takes_medians() -> None:
    calls: list[str] = []

    def job(name: str) -> Timed:
        return Timed(name, lambda: (lambda: calls.append(name)))

    t = WallTimer(warmup=1, min_repeats=4, max_repeats=4, time_cap=0.0, slow_repeats=4)(
        [job("a"), job("b"), job("c")])
    assert len(t) == 3 and all(v >= 0 for v in t)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    rounds = [calls[3 + 3 * i: 6 + 3 * i] for i in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    # a group too slow for min_repeats rounds within the cap stops after slow_repeats
    calls.clear()
    WallTimer(warmup=1, min_repeats=10, max_repeats=10, time_cap=0.0, slow_repeats=2)(
        [job("a"), job("b")])
    assert len(calls) == 2 + 2 * 2


def test_time_models_restores_train_mode() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.Dropout()).train()
    t = time_models({"m": m}, torch.randn(2, 4),
                    timer=WallTimer(warmup=0, min_repeats=1, max_repeats=1))
    assert t["m"] > 0 and m.training and m[1].training


# --- which ranks are probed -----------------------------------------------------------------------


def test_probe_ranks_spread_and_include_hardware_multiples() -> None:
    main = torch.arange(1, 201).numpy()
    picked = main[probe_indices(main, points=6, quanta=(8, 32))]
    assert picked[0] == 1 and picked[-1] == 200
    assert any(r % 32 == 0 for r in picked) and sum(r % 8 == 0 for r in picked) >= 4
    assert len(picked) <= 18 and list(picked) == sorted(set(picked))
    assert probe_indices(main[:0]) == []
    assert main[probe_indices(main[:1])].tolist() == [1]


def test_measure_layers_sums_calls_and_uses_only_probed_candidates() -> None:
    a = lrfx.analyze(_mlp(), torch.randn(16, 512))
    from lrfx.passes.allocation import build_options

    options = build_options(a.layers)
    lm = LatencyModel(timer=FakeTimer(), cache=None)
    measured = measure_layers(options, {o.name: a[o.name].calls * 2 for o in options}, lm,
                              points=4, quanta=(8,))
    lat = measured["0"]
    one = lm.measure([Probe(a["0"].calls[0])])[0]
    assert lat.dense == pytest.approx(2 * one)  # a layer called twice costs twice
    o = next(o for o in options if o.name == "0")
    assert set(lat.times) <= set(range(1, len(o))) and 4 <= len(lat.times) <= 8


# --- the never-slower rule and the allocator ------------------------------------------------------


def _opts(name: str, ranks: list[int], errors: list[float]) -> LayerOptions:
    cands = [Candidate("dense", None, 100, 0.0, 100, 100)]
    cands += [Candidate("svd", r, r, e, r, r) for r, e in zip(ranks, errors, strict=True)]
    return LayerOptions(name, cands)


def test_latency_options_drop_every_form_not_faster_than_dense() -> None:
    opts = [_opts("fast", [1, 2, 3], [0.5, 0.2, 0.1]), _opts("slow", [1, 2], [0.5, 0.2])]
    measured = {"fast": LayerLatency("fast", 1e-3, {1: 2e-4, 2: 9.9e-4, 3: 5e-4}),
                "slow": LayerLatency("slow", 1e-3, {1: 1.2e-3, 2: 1.0e-3})}
    new, dense_only = latency_options(opts, measured)
    fast, slow = new
    assert [c.rank for c in fast.candidates] == [None, 1, 3]  # 0.99x of dense is not faster
    assert fast.cost.tolist() == [1_000_000, 200_000, 500_000]  # nanoseconds
    assert fast.error.tolist() == [0.0, 0.5, 0.1] and fast.macs.tolist() == [100, 1, 3]
    assert len(slow) == 1 and "slow" in dense_only and "1.00x" in dense_only["slow"]


def test_lc_on_measured_costs_picks_the_cheapest_error_for_the_time() -> None:
    # layer a: rank 1 fast but bad, rank 3 nearly as fast and good; b: only dense is sensible
    opts = [_opts("a", [1, 2, 3], [0.6, 0.3, 0.05]), _opts("b", [1], [0.9])]
    measured = {"a": LayerLatency("a", 4e-3, {1: 1.0e-3, 2: 1.5e-3, 3: 1.6e-3}),
                "b": LayerLatency("b", 1e-3, {1: 0.99e-3})}
    new, _ = latency_options(opts, measured)
    fixed = 1_000_000  # 1 ms outside the factorable layers: 6 ms in all
    budget = Budget("latency", target=4_000_000, total=6_000_000)
    choice, _ = allocate_lc(new, budget, fixed)
    assert choice["a"].rank == 3 and choice["b"].scheme == "dense"
    assert fixed + sum(c.cost for c in choice.values()) <= budget.target


# --- through compress, the report and the CLI -----------------------------------------------------


def test_compress_to_a_latency_budget_with_known_costs(tmp_path) -> None:
    model = _mlp()
    x = torch.randn(64, 512)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    timer = FakeTimer(models={"model:dense": 40e-3, "model:compressed": 20e-3})
    lm = LatencyModel(timer=timer, cache=LatencyCache(tmp_path / "c.json"), environment="fake")
    gm = lrfx.compress(model, x, latency=0.5, latency_model=lm)
    facts = lrfx.facts_of(gm)
    plan, report = facts.plan, facts.report
    # the small classifier never pays for its second kernel: it stays dense, and says why
    assert set(plan.factored) == {"0", "2"}
    assert "latency: no factored form measured faster" in report.skipped["4"]
    assert plan.settings["metric"] == "latency" and plan.settings["latency_environment"] == "fake"
    dense_total = 40e-3  # the measured model; the layers alone sum to less
    assert plan.settings["dense_latency_ms"] == pytest.approx(dense_total * 1e3)
    assert plan.settings["predicted_latency_ms"] <= 0.5 * dense_total * 1e3 + 1e-6
    lat = report.latency
    assert lat["ratio"] == pytest.approx(0.5) and lat["predicted_ratio"] <= 0.5
    rows = {r["layer"]: r for r in report}
    for name in ("0", "2"):
        assert rows[name]["latency_after_ms"] < rows[name]["latency_before_ms"]
        lp = plan[name]
        fac = _price(Probe(LinearGeometry(512, 512, rows=64), "svd", (int(lp.rank),)))
        assert rows[name]["latency_after_ms"] == pytest.approx(fac * 1e3)
    assert "ms after" in report.table() and "0.500x; predicted" in report.table()
    assert report.to_dict()["latency"]["dense_ms"] == pytest.approx(40.0)
    report.write(tmp_path / "report")
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| latency (ms, measured) | 40.000 | 20.000 | 0.500x |" in md
    assert "ms after" in md and "budget: latency 0.500" in md
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same call again measures nothing new
    n = len(timer.jobs)
    lrfx.compress(model, x, latency=0.5, latency_model=lm)
    assert len(timer.jobs) == n + 5  # only whole models: dense, then the plan tried and final


def test_latency_batch_sizes_never_slow_a_layer_at_any_of_them() -> None:
    # with a 50 us launch cost, the 512 -> 8 classifier's factored forms pay off at 64 rows and
    # lose at 1 row; the 512 x 512 layers win at both
    model, x = _mlp(), torch.randn(64, 512)
    models = {"model:dense": 20e-3, "model:compressed": 10e-3}
    one = lrfx.compress(model, x, latency=0.5, latency_model=LatencyModel(
        timer=FakeTimer(models, launch=5e-5), cache=None, environment="fake"))
    assert "latency:" not in lrfx.facts_of(one).report.skipped.get("4", "")
    timer = FakeTimer(models, launch=5e-5)
    both = lrfx.compress(model, x, latency=0.5, latency_batch_sizes=[64, 1],
                         latency_model=LatencyModel(timer=timer, cache=None, environment="fake"))
    facts = lrfx.facts_of(both)
    why = facts.report.skipped["4"]
    assert why.startswith("latency: no factored form measured faster") and "(1, 64)" in why
    assert set(facts.plan.factored) == {"0", "2"}
    for name in ("0", "2"):  # faster at both batch sizes
        r = int(facts.plan[name].rank)
        for rows in (1, 64):
            g = LinearGeometry(512, 512, rows=rows)
            assert _price(Probe(g, "svd", (r,)), 5e-5) < _price(Probe(g), 5e-5)
    assert any('"rows":1}' in k for k in timer.jobs)  # the layers were timed at batch 1
    lat = facts.report.latency
    assert set(lat["batches"]) == {"1", "64"} and lat["mean_ratio"] == pytest.approx(0.5)
    assert facts.plan.settings["config"]["latency_batch_sizes"] == [1, 64]
    assert "batch 1: 0.500x" in facts.report.latency_line()
    with pytest.raises(LrfxError, match="latency_batch_sizes applies to a latency budget"):
        lrfx.CompressConfig(macs=0.5, latency_batch_sizes=(1, 32))
    with pytest.raises(LrfxError, match="positive integers"):
        lrfx.CompressConfig(latency=0.5, latency_batch_sizes=(0,))
    from lrfx.api import _batched

    b0, big = _batched({"a": torch.arange(3.0)[:, None], "n": 7}, 5)
    assert b0 == 3 and big.kwargs["a"].flatten().tolist() == [0, 1, 2, 0, 1]
    assert big.kwargs["n"] == 7
    with pytest.raises(LrfxError, match="first dimension"):
        _batched((x, torch.randn(3, 2)), 8)


class ParamTimer(FakeTimer):
    """Whole models priced by their parameters, the factored ones with 60 % overhead: the layers
    timed alone under-predict the model, as real glue between the pieces does."""

    def __call__(self, jobs: Sequence[Timed]) -> list[float]:
        out = []
        for j in jobs:
            if j.module is None:
                out += super().__call__([j])
                continue
            self.jobs.append(j.key)
            n = sum(p.numel() for p in j.module.parameters())
            factored = any(isinstance(m, lrfx.modules.Factored) for m in j.module.modules())
            out.append(n * 1e-8 * (1.6 if factored else 1.0))
        return out


def test_a_plan_the_whole_model_misses_is_reallocated() -> None:
    timer = ParamTimer()
    lm = LatencyModel(timer=timer, cache=None, environment="fake")
    gm = lrfx.compress(_mlp(), torch.randn(64, 512), latency=0.5, latency_model=lm)
    plan, report = lrfx.facts_of(gm).plan, lrfx.facts_of(gm).report
    tries = plan.settings["latency_tries"]
    assert len(tries) >= 2 and tries[0]["budget"] == 0.5 and tries[0]["measured"] > 0.51
    assert tries[1]["budget"] == pytest.approx(0.5 * 0.5 / tries[0]["measured"], abs=1e-3)
    assert tries[1]["measured"] < tries[0]["measured"]
    met = [t for t in tries if t["measured"] <= 0.51]
    assert met, tries
    kept = max(met, key=lambda t: t["budget"])  # the most accurate plan within the budget
    assert report.latency["ratio"] == pytest.approx(kept["measured"], abs=1e-3)
    assert plan.settings["fraction"] == 0.5 and plan.settings["config"]["latency"] == 0.5
    assert plan.settings["allocated_fraction"] == pytest.approx(kept["budget"], abs=1e-3)
    if kept["budget"] < 0.45:  # cut deeper than asked: the report says so
        assert any("was met only by allocating for" in w for w in report.warnings)


def test_latency_budget_mistakes_are_named() -> None:
    model, x = _mlp(), torch.randn(4, 512)
    with pytest.raises(LrfxError, match="fraction in \\(0, 1\\]"):
        lrfx.compress(model, x, latency=1.5)
    with pytest.raises(LrfxError, match="one budget"):
        lrfx.compress(model, x, latency=0.5, macs=0.5)
    with pytest.raises(LrfxError, match="allocator='lc'"):
        lrfx.compress(model, x, latency=0.5, allocator="energy")
    a = lrfx.analyze(model, x)
    with pytest.raises(LrfxError, match="compress"):
        lrfx.allocate(a, lrfx.CompressConfig(latency=0.5))
    assert lrfx.CompressConfig.from_json(lrfx.CompressConfig(latency=0.6).to_json()).latency == 0.6


def test_a_real_latency_compression_of_a_small_model(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LRFX_CACHE_DIR", str(tmp_path))
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64 * 16 * 16, 10)).eval()
    x = torch.randn(4, 32, 16, 16)
    quick = WallTimer(warmup=1, min_repeats=3, max_repeats=3, time_cap=0.0)
    lm = LatencyModel(timer=quick, model_timer=quick)
    gm = lrfx.compress(model, x, latency=0.7, latency_model=lm)
    report = lrfx.facts_of(gm).report
    assert report.latency["dense_ms"] > 0 and report.latency["compressed_ms"] > 0
    assert report.latency["predicted_ratio"] <= 0.7 + 1e-9
    for row in report:  # every factored layer was measured faster than its dense form
        assert row["latency_after_ms"] < row["latency_before_ms"]
    assert (tmp_path / "latency-v1.json").is_file()
    assert gm(x).shape == (4, 10)


def test_profile_latency_shows_where_the_time_goes() -> None:
    model = _mlp()
    lm = LatencyModel(timer=FakeTimer(models={"model:model": 50e-3}), cache=None)
    p = lrfx.profile_latency(model, torch.randn(64, 512), latency_model=lm)
    assert p.model_ms == pytest.approx(50.0)
    assert [x["layer"] for x in p.layers] == ["0", "2", "4"]
    big = p.layers[0]
    assert big["ms"] == pytest.approx((64 * 512 * 512 * SECONDS_PER_MAC + LAUNCH) * 1e3)
    assert big["share"] == pytest.approx(big["ms"] / 50.0)
    text = p.table()
    assert text.splitlines()[1].startswith("0 ") and "50.000 ms" in text


def test_cli_latency_budget_and_profile(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("LRFX_CACHE_DIR", str(tmp_path / "cache"))
    small = "tests._rewrite_models:small_cnn"
    assert main(["analyze", small, "--latency", "--input", "2x3x32x32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "% time" in out and "GMAC/s" in out
    # a 3 -> 8 -> 16 channel net has nothing to gain: said in milliseconds, nothing written
    assert main(["compress", small, "--latency", "0.5", "--input", "2x3x32x32",
                 "--no-progress", "-o", str(tmp_path / "o1")]) == 2
    assert "cannot be met on this machine" in capsys.readouterr().err
    assert not (tmp_path / "o1" / "report.json").exists()
    out_dir = tmp_path / "out"
    assert main(["compress", "torchvision:resnet18", "--latency", "0.95", "--input",
                 "1x3x64x64", "--no-progress", "-o", str(out_dir)]) == 0
    report = json.loads((out_dir / "report.json").read_text())
    assert report["budget"]["metric"] == "latency" and report["latency"]["compressed_ms"] > 0
    assert report["latency"]["predicted_ratio"] <= 0.95
    capsys.readouterr()
    assert main(["compress", small, "--input", "2x3x32x32", "-o", str(tmp_path / "o2")]) == 2
    assert "--latency 0.6" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_latency_on_cuda_is_synchronized_and_keyed_by_the_gpu(tmp_path) -> None:
    model = _mlp().cuda()
    x = torch.randn(256, 512, device="cuda")
    lm = LatencyModel(device="cuda", cache=LatencyCache(tmp_path / "c.json"))
    assert torch.cuda.get_device_name() in lm.environment
    gm = lrfx.compress(model, x, latency=0.9, latency_model=lm)
    report = lrfx.facts_of(gm).report
    assert report.latency["compressed_ms"] > 0
    assert next(gm.parameters()).is_cuda and gm(x).is_cuda
