"""Hugging Face transformers 5.x models (tiny configs, random weights): capture, compress, export.

The architectures of ``bench/coverage.py``, at the smallest sizes that keep their structure.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import lrfx
from lrfx.modules import Factored

pytest.importorskip("transformers")

from lrfx.contrib.hf import TINY, tiny


def _first(out: Any) -> torch.Tensor:
    t = out[0] if not isinstance(out, torch.Tensor) else out
    assert isinstance(t, torch.Tensor)
    return t


def _full_rank_plan(a: lrfx.Analysis) -> dict[str, lrfx.LayerPlan]:
    plan = {}
    for rec in a.factorable:
        scheme = "svd" if rec.kind == "linear" else "channel"
        plan[rec.name] = lrfx.LayerPlan(scheme, rec.max_rank(scheme))
    return plan


@pytest.mark.parametrize("name", sorted(TINY))
def test_architecture_analyzes_reproduces_and_compresses(name: str) -> None:
    model, x = tiny(name)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        ref = _first(model(**x))
    a = lrfx.analyze(model, x, spectra=False)
    assert a.mode == "module" and a.mode_reason
    assert len(a.factorable) >= 4
    full = lrfx.apply(model, _full_rank_plan(a), x)
    assert type(full) is type(model)
    with torch.no_grad():
        got = _first(full(**x))
    assert ((got - ref).norm() / ref.norm()).item() < 1e-4
    out = lrfx.compress(model, x, macs=0.5)
    assert type(out) is type(model)
    report = lrfx.facts_of(out).report
    assert report is not None and report.macs_after <= 0.5 * report.macs_before
    with torch.no_grad():
        assert torch.isfinite(_first(out(**x))).all()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["bert", "llama", "t5_encoder"])
def test_macs_match_torch_flop_counter(name: str, flop_macs: Callable[..., int]) -> None:
    # eager attention: torch's counter skips the CPU kernel of scaled_dot_product_attention
    model, x = tiny(name, attn_implementation="eager")
    a = lrfx.analyze(model, x, spectra=False)
    assert a.total_macs == flop_macs(lambda: model(**x))


def test_eager_attention_products_are_counted() -> None:
    model, x = tiny("bert", attn_implementation="eager")
    a = lrfx.analyze(model, x, spectra=False)
    kinds = {rec.kind for rec in a}
    assert "matmul" in kinds  # q @ k^T and attn @ v of the eager implementation
    sdpa_model, _ = tiny("bert")
    assert lrfx.analyze(sdpa_model, x, spectra=False).total_macs == a.total_macs


def test_compressed_bert_saves_loads_and_exports(tmp_path: Path) -> None:
    model, x = tiny("bert")
    out = lrfx.compress(model, x, macs=0.5)
    with torch.no_grad():
        ref = out(**x).last_hidden_state
    loaded = lrfx.load(lrfx.save(out, tmp_path / "bert"), model, x)
    assert type(loaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**x).last_hidden_state, ref, rtol=0, atol=0)
    ep = torch.export.load(lrfx.export(out, tmp_path / "bert.pt2", x)).module()
    torch.testing.assert_close(ep(**x).last_hidden_state, ref, rtol=1e-5, atol=1e-5)
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(lrfx.export(out, tmp_path / "bert.onnx", x, format="onnx")))
    assert {i.name for i in sess.get_inputs()} == {"input_ids", "attention_mask"}
    got = sess.run(None, {k: v.numpy() for k, v in x.items()})[0]
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-4)


def test_compressed_causal_lm_generates_and_saves_pretrained(tmp_path: Path) -> None:
    model, x = tiny("gpt2_lm")
    a = lrfx.analyze(model, x, spectra=False)
    assert "tied to transformer.wte.weight" in a["lm_head"].note
    out = lrfx.compress(model, x, macs=0.5)
    assert out.lm_head.weight is out.transformer.wte.weight
    ids = out.generate(x["input_ids"][:1], attention_mask=x["attention_mask"][:1],
                       max_new_tokens=4, do_sample=False)
    assert ids.shape == (1, x["input_ids"].shape[1] + 4)
    out.save_pretrained(tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    # and trains in place, with the library's own loss
    out.train()
    loss = out(**x, labels=x["input_ids"]).loss
    loss.backward()
    assert all(m[0].weight.grad is not None for m in out.modules() if isinstance(m, Factored))


def test_whitened_compression_in_module_mode_covers_attention_projections() -> None:
    model, x = tiny("bert")
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(3, 100, (4, 8), generator=g),
                "attention_mask": torch.ones(4, 8, dtype=torch.long)} for _ in range(4)]
    plain = lrfx.compress(model, x, macs=0.6)
    white = lrfx.compress(model, x, macs=0.6, calibration=batches)
    report = lrfx.facts_of(white).report
    assert report is not None and report.whitened
    a = lrfx.analyze(model, x, spectra=False)
    projections = {r.name for r in a.factorable if r.name.endswith(("query", "key", "value"))}
    assert len(projections) == 6
    with torch.no_grad():
        ref = model(**batches[0]).last_hidden_state
        e_plain = (plain(**batches[0]).last_hidden_state - ref).norm() / ref.norm()
        e_white = (white(**batches[0]).last_hidden_state - ref).norm() / ref.norm()
    assert e_white < e_plain
