"""Inputs in every form (positional, keyword, both), flags bound automatically, bad inputs named."""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

import pytest
import torch
from torch import fx, nn

import lrfx
from lrfx.cli import main
from lrfx.inputs import Inputs, bind


class FlagNet(nn.Module):
    """A CNN whose forward branches on a Python flag the caller never passes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        h = h.mean(dim=(2, 3))
        if embed:
            return h
        return self.fc(h)


class MaskedEncoder(nn.Module):
    """Keyword tensors, an optional mask, and a flag: the shape of a Hugging Face forward."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)
        self.out = nn.Linear(32, 16)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_dict: bool = True) -> torch.Tensor | dict[str, torch.Tensor]:
        h = self.out(torch.relu(self.proj(self.embed(input_ids))))
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return {"hidden": h} if return_dict else h


def _ids() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 50, (2, 6))
    mask = torch.ones(2, 6)
    mask[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_defaulted_flag_is_bound_without_concrete_args() -> None:
    model, x = FlagNet().eval(), torch.randn(2, 3, 16, 16)
    gm = lrfx.compress(model, x, macs=0.5)
    assert isinstance(gm, fx.GraphModule)  # FX mode: the graph is the result
    report = lrfx.facts_of(gm).report
    assert report is not None and report.mode == "fx"
    assert report.macs_after <= 0.5 * report.macs_before
    with torch.no_grad():
        assert gm(x).shape == (2, 10)
        assert torch.isfinite(gm(x)).all()
    # the flag stays a parameter, fixed to the traced value: another value is refused loudly
    with pytest.raises(lrfx.LrfxError, match="embed"):
        gm(x, True)


def test_full_rank_flag_model_is_exact() -> None:
    model, x = FlagNet().eval(), torch.randn(2, 3, 16, 16)
    a = lrfx.analyze(model, x, spectra=False)
    plan = {rec.name: lrfx.LayerPlan("svd" if rec.kind == "linear" else "channel",
                                     rec.max_rank("svd" if rec.kind == "linear" else "channel"))
            for rec in a.factorable}
    gm = lrfx.apply(model, plan, x)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_passing_the_flag_traces_the_other_branch() -> None:
    model, x = FlagNet().eval(), torch.randn(2, 3, 16, 16)
    a = lrfx.analyze(model, (x, True), spectra=False)
    assert "fc" not in a  # embed=True never reaches fc
    assert "fc" in lrfx.analyze(model, x, spectra=False)


@pytest.mark.parametrize("form", ["dict", "args_kwargs", "tuple", "list"])
def test_every_input_form_gives_the_same_analysis(form: str) -> None:
    model = MaskedEncoder().eval()
    kw = _ids()
    example: object = {
        "dict": kw,
        "args_kwargs": ((kw["input_ids"],), {"attention_mask": kw["attention_mask"]}),
        "tuple": (kw["input_ids"], kw["attention_mask"]),
        "list": [kw["input_ids"], kw["attention_mask"]],
    }[form]
    a = lrfx.analyze(model, example, spectra=False)
    assert a.mode == "fx"
    # proj: 12 rows x 16 x 32, out: 12 x 32 x 16
    assert a["proj"].macs == 12 * 16 * 32 and a["out"].macs == 12 * 32 * 16
    gm = lrfx.compress(model, example, macs=0.6)
    with torch.no_grad():
        out = gm(**kw)["hidden"] if form == "dict" else \
            gm(kw["input_ids"], kw["attention_mask"])["hidden"]
    assert out.shape == (2, 6, 16)
    assert torch.all(out[1, -2:] == 0)  # the mask is a real input, not baked in


def test_batch_encoding_is_a_mapping_input() -> None:
    transformers = pytest.importorskip("transformers")
    model = MaskedEncoder().eval()
    enc = transformers.BatchEncoding(_ids())
    a = lrfx.analyze(model, enc, spectra=False)
    assert a["proj"].macs == 12 * 16 * 32


def test_keyword_calibration_batches_whiten() -> None:
    model = MaskedEncoder().eval()
    kw = _ids()
    batches = [{"input_ids": torch.randint(0, 50, (4, 6)), "attention_mask": torch.ones(4, 6)}
               for _ in range(3)]
    gm = lrfx.compress(model, kw, macs=0.6, calibration=batches)
    report = lrfx.facts_of(gm).report
    assert report is not None and report.whitened


def test_unknown_keyword_input_is_named_with_a_suggestion() -> None:
    model = MaskedEncoder().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {"input_ids": torch.zeros(2, 6, dtype=torch.long), "atention_mask": torch.ones(2, 6)}
    with pytest.raises(lrfx.LrfxError) as info:
        lrfx.compress(model, bad, macs=0.5)
    msg = str(info.value)
    assert "'atention_mask'" in msg and "did you mean 'attention_mask'" in msg
    assert "example_inputs" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_failing_forward_names_the_module_and_exception() -> None:
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 1e9:  # untraceable: forces module mode
                return x
            return self.fc(x)

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(4, 6), Inner())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.mean() > 1e9:
                return x
            return self.block(x)

    model = Outer()
    with pytest.raises(lrfx.LrfxError) as info:
        lrfx.analyze(model, torch.randn(2, 4))
    msg = str(info.value)
    assert "'block.1.fc'" in msg  # the deepest module where the forward failed
    assert "RuntimeError" in msg and "(2, 4)" in msg


def test_missing_required_input_is_named() -> None:
    with pytest.raises(lrfx.LrfxError, match="needs 'input_ids'"):
        lrfx.analyze(MaskedEncoder(), {"attention_mask": torch.ones(2, 6)})


def test_bind_fixes_non_tensors_and_traces_tensors() -> None:
    sig = inspect.signature(MaskedEncoder.forward)
    sig = sig.replace(parameters=list(sig.parameters.values())[1:])
    spec = bind(sig, Inputs.of({"input_ids": torch.zeros(1, 2, dtype=torch.long)}))
    assert spec.names == ("input_ids",)
    assert dict(spec.fixed) == {"attention_mask": None, "return_dict": True}
    spec = bind(sig, Inputs.of(((torch.zeros(1, 2),), {"attention_mask": torch.ones(1, 2)})))
    assert spec.names == ("input_ids", "attention_mask")
    # a later call feeds the graph positionally, whatever form it comes in
    fed = spec.feed(Inputs.of({"attention_mask": torch.ones(1, 2), "input_ids": torch.zeros(1, 2)}))
    assert [tuple(t.shape) for t in fed] == [(1, 2), (1, 2)]
    with pytest.raises(lrfx.LrfxError, match="return_dict"):
        spec.feed(Inputs.of(((torch.zeros(1, 2), torch.ones(1, 2), False), {})))


@pytest.mark.parametrize("bad", [3, "x", object()], ids=["int", "str", "object"])
def test_unsupported_input_form_is_refused(bad: object) -> None:
    with pytest.raises(lrfx.LrfxError, match="example_inputs must be"):
        lrfx.analyze(nn.Linear(2, 2), bad)


def test_cli_factory_may_return_model_and_keyword_inputs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Enc(nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = nn.Embedding(50, 16)
                self.proj = nn.Linear(16, 32)
                self.out = nn.Linear(32, 16)

            def forward(self, input_ids, attention_mask=None):
                h = self.out(torch.relu(self.proj(self.embed(input_ids))))
                return h if attention_mask is None else h * attention_mask[..., None]

        def build():
            return Enc(), {"input_ids": torch.randint(0, 50, (2, 6))}

        def bare():
            return Enc()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["analyze", "mynets:build", "--no-spectra"]) == 0
    out = capsys.readouterr().out
    assert "proj" in out and f"{12 * 16 * 32:,}" in out
    # keyword inputs on the command line, with a dtype
    assert main(["analyze", "mynets:bare", "--no-spectra", "--input", "input_ids=1x4:int64"]) == 0
    assert f"{4 * 16 * 32:,}" in capsys.readouterr().out
    assert main(["analyze", "mynets:bare", "--no-spectra"]) == 2
    assert "input_ids=1x128:int64" in capsys.readouterr().err
    assert main(["compress", "mynets:build", "--macs", "0.6", "-o", str(tmp_path / "out"),
                 "--no-progress"]) == 0
    assert (tmp_path / "out" / "model.pt2").is_file()


def test_fx_results_export_with_the_inputs_as_given(tmp_path: Path) -> None:
    model, x = FlagNet().eval(), torch.randn(2, 3, 16, 16)
    gm = lrfx.compress(model, x, macs=0.5)
    with torch.no_grad():
        ref = gm(x)
    for fmt in ("pt2", "onnx", "torchscript", "python"):
        assert lrfx.export(gm, tmp_path / f"flag.{fmt}", x, format=fmt).is_file()
    torch.testing.assert_close(torch.export.load(tmp_path / "flag.pt2").module()(x), ref)
    enc, kw = MaskedEncoder().eval(), _ids()
    gm = lrfx.compress(enc, kw, macs=0.6)
    with torch.no_grad():
        ref = gm(**kw)["hidden"]
    ep = torch.export.load(lrfx.export(gm, tmp_path / "enc.pt2", kw)).module()
    torch.testing.assert_close(ep(**kw)["hidden"], ref)  # called by keyword, as traced
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(lrfx.export(gm, tmp_path / "enc.onnx", kw, format="onnx")))
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    got = sess.run(None, {k: v.numpy() for k, v in kw.items()})[0]
    torch.testing.assert_close(torch.from_numpy(got), ref, rtol=1e-4, atol=1e-5)
