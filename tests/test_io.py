"""Round trips of rewritten models: lrfx.save / lrfx.load, and lrfx.export to pt2, ONNX (checked
with onnxruntime), TorchScript and Python."""

from __future__ import annotations

import copy
import json
import pickle
import struct
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _rewrite_models import SmallCNN, rel_err
from torch import fx, nn

import lrfx
from lrfx.modules import Factored
from lrfx.plan import FORMAT_VERSION

PLAN = {
    "conv1": lrfx.LayerPlan("spatial", 3),
    "conv2": lrfx.LayerPlan("channel", 4),
    "fc": lrfx.LayerPlan("svd", 3),
}


def _model(seed: int) -> SmallCNN:
    torch.manual_seed(seed)
    return SmallCNN().eval()


def _trained_gm(x: torch.Tensor) -> fx.GraphModule:
    """A rewritten model whose weights were changed by training steps after the rewrite."""
    gm = lrfx.apply(_model(0), PLAN, x)
    opt = torch.optim.SGD(gm.parameters(), lr=0.5)
    gm.train()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(gm(torch.randn(8, 3, 12, 12)), torch.arange(8)).backward()
        opt.step()
    return gm.eval()


@pytest.fixture(scope="module")
def example() -> torch.Tensor:
    return torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def trained(example: torch.Tensor) -> fx.GraphModule:
    return _trained_gm(example)


def _outputs_differ_from_a_fresh_rewrite(gm: fx.GraphModule, x: torch.Tensor) -> bool:
    fresh = lrfx.apply(_model(0), PLAN, x)
    with torch.no_grad():
        return bool((fresh(x) - gm(x)).abs().max() > 1e-3)


def test_save_load_round_trip_loads_the_saved_weights(
    trained: fx.GraphModule, example: torch.Tensor, tmp_path: Path
) -> None:
    # the training steps moved the weights away from what a fresh SVD would give
    assert _outputs_differ_from_a_fresh_rewrite(trained, example)
    out = lrfx.save(trained, tmp_path / "saved")
    assert out == tmp_path / "saved"
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json", "model_code.py", "plan.json", "weights.safetensors"
    ]
    # load into a model with *other* weights: everything must come from the saved directory
    loaded = lrfx.load(out, _model(99), example)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(example), trained(example))
    for k, v in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert set(loaded.state_dict()) == set(trained.state_dict())
    assert isinstance(loaded.conv2, Factored) and loaded.conv2.rank == 4


def test_saved_plan_is_the_resolved_rank_plan(trained: fx.GraphModule, tmp_path: Path) -> None:
    out = lrfx.save(trained, tmp_path)
    text = (out / "plan.json").read_text()
    data = json.loads(text)
    assert data["format"] == "lrfx.RankPlan" and data["version"] == FORMAT_VERSION
    plan = lrfx.RankPlan.from_json(text)
    assert plan == trained.meta["lrfx"].extra["plan"]
    assert {k: (lp.scheme, lp.rank) for k, lp in plan.items()} == {
        "conv1": ("spatial", 3), "conv2": ("channel", 4), "fc": ("svd", 3)
    }
    assert plan["conv2"].weight_shape == (16, 8, 3, 3)
    assert plan.macs == trained.meta["lrfx"].extra["macs_after"]


def test_weights_file_is_safetensors_without_pickle(
    trained: fx.GraphModule, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    out = lrfx.save(trained, tmp_path)
    raw = (out / "weights.safetensors").read_bytes()
    assert not raw.startswith((b"\x80", b"PK"))  # neither a pickle nor a torch zip archive
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    names = set(header) - {"__metadata__"}
    assert names == set(trained.state_dict())
    assert header["conv2.0.weight"]["shape"] == [4, 8, 3, 3]
    assert header["conv2.0.weight"]["dtype"] == "F32"
    tensors = load_file(str(out / "weights.safetensors"))
    for k, v in trained.state_dict().items():
        assert torch.equal(tensors[k], v), k


def test_manifest_and_code(trained: fx.GraphModule, tmp_path: Path) -> None:
    out = lrfx.save(trained, tmp_path, model_spec="_rewrite_models:small_cnn")
    manifest = lrfx.io.read_manifest(out)
    assert manifest["format"] == "lrfx.saved"
    assert manifest["lrfx_version"] == lrfx.__version__
    assert manifest["model"] == "_rewrite_models:small_cnn"
    assert manifest["input_shapes"] == [[2, 3, 12, 12]]
    assert manifest["macs_after"] < manifest["macs_before"]
    code = (out / "model_code.py").read_text()
    assert code == trained.code
    for name in ("conv1", "conv2", "fc"):
        assert f'getattr(self.{name}, "0")' in code and f'getattr(self.{name}, "1")' in code


def test_load_refuses_other_architectures_and_non_lrfx_directories(
    trained: fx.GraphModule, example: torch.Tensor, tmp_path: Path
) -> None:
    out = lrfx.save(trained, tmp_path / "saved")

    class Wider(SmallCNN):
        def __init__(self) -> None:
            super().__init__()
            self.conv2 = nn.Conv2d(8, 32, 3, stride=2, padding=1, bias=False)
            self.fc = nn.Linear(32, 10)

    with pytest.raises(lrfx.PlanMismatchError, match="conv2"):
        lrfx.load(out, Wider().eval(), example)
    with pytest.raises(lrfx.LrfxError, match=r"manifest\.json"):
        lrfx.load(tmp_path / "empty", _model(0), example)
    with pytest.raises(lrfx.LrfxError, match=r"lrfx\.apply"):
        lrfx.save(torch.fx.symbolic_trace(_model(0)), tmp_path / "plain")


def test_save_load_with_shared_factors_and_attention(tmp_path: Path) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)
            self.b.weight = self.a.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.attn(x, x, x, need_weights=False)[0]
            return self.a(y) + self.b(torch.relu(y))

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    plan = {"attn.q_proj": lrfx.LayerPlan("svd", 4), "attn.out_proj": lrfx.LayerPlan("svd", 6),
            "a": lrfx.LayerPlan("svd", 5), "b": lrfx.LayerPlan("svd", 5)}
    gm = lrfx.apply(Net().eval(), plan, x)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    gm(x).square().mean().backward()
    opt.step()
    lrfx.save(gm, tmp_path)
    torch.manual_seed(1)
    loaded = lrfx.load(tmp_path, Net().eval(), x)
    assert loaded.a[0].weight is loaded.b[0].weight
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


# --- export ---------------------------------------------------------------------------------------


def test_export_pt2_reloads_and_matches(
    trained: fx.GraphModule, example: torch.Tensor, tmp_path: Path
) -> None:
    f = lrfx.export(trained, tmp_path / "m.pt2", example, format="pt2")
    assert f == tmp_path / "m.pt2" and f.is_file()
    ep = torch.export.load(str(f))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert sum("conv2d" in t for t in targets) == 4  # conv1 and conv2, two factors each
    assert sum("linear" in t for t in targets) == 2  # fc, two factors
    x2 = torch.randn_like(example)
    with torch.no_grad():
        for x in (example, x2):
            assert rel_err(ep.module()(x), trained(x)) < 1e-6


def test_export_onnx_runs_in_onnxruntime(
    trained: fx.GraphModule, example: torch.Tensor, tmp_path: Path
) -> None:
    import onnx
    import onnxruntime as ort

    f = lrfx.export(trained, tmp_path / "m.onnx", example, format="onnx")
    proto = onnx.load(str(f))
    onnx.checker.check_model(proto)
    assert sum(n.op_type == "Conv" for n in proto.graph.node) == 4
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_0"]
    x2 = torch.randn_like(example)
    with torch.no_grad():
        for x in (example, x2):
            (got,) = sess.run(None, {"input_0": x.numpy()})
            ref = trained(x)
            assert float((torch.from_numpy(got) - ref).abs().max()) < 1e-4


def test_export_torchscript_reloads_and_matches(
    trained: fx.GraphModule, example: torch.Tensor, tmp_path: Path
) -> None:
    f = lrfx.export(trained, tmp_path / "m.ts", example, format="torchscript")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ts = torch.jit.load(str(f))
    with torch.no_grad():
        assert rel_err(ts(example), trained(example)) < 1e-6
        x2 = torch.randn_like(example)
        assert rel_err(ts(x2), trained(x2)) < 1e-6


def test_export_python_writes_the_graph_code(
    trained: fx.GraphModule, example: torch.Tensor, tmp_path: Path
) -> None:
    f = lrfx.export(trained, tmp_path / "m.py", example, format="python")
    code = f.read_text()
    assert "def forward(self, x" in code
    for target in ("conv1", "conv2", "fc"):
        for i in (0, 1):
            assert f'getattr(self.{target}, "{i}")' in code
    assert "self.bn1(" in code


def test_export_keeps_the_training_mode_and_rejects_unknown_formats(
    example: torch.Tensor, tmp_path: Path
) -> None:
    gm = lrfx.apply(_model(0), PLAN, example)
    gm.train()
    lrfx.export(gm, tmp_path / "m.py", example, format="python")
    assert gm.training
    with pytest.raises(lrfx.LrfxError, match="pt2, onnx, torchscript, python"):
        lrfx.export(gm, tmp_path / "m.tflite", example, format="tflite")


def test_export_attention_model_to_onnx(tmp_path: Path) -> None:
    import onnxruntime as ort

    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.ff = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ff(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    gm = lrfx.apply(Enc().eval(), {"attn.q_proj": lrfx.LayerPlan("svd", 4),
                                   "attn.v_proj": lrfx.LayerPlan("svd", 4),
                                   "ff": lrfx.LayerPlan("svd", 3)}, x)
    f = lrfx.export(gm, tmp_path / "enc.onnx", x, format="onnx")
    sess = ort.InferenceSession(str(f), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"input_0": x.numpy()})
    with torch.no_grad():
        assert float((torch.from_numpy(got) - gm(x)).abs().max()) < 1e-4


def test_rewritten_module_can_be_deep_copied_and_pickled(
    trained: fx.GraphModule, example: torch.Tensor
) -> None:
    clone = copy.deepcopy(trained)
    with torch.no_grad():
        assert torch.equal(clone(example), trained(example))
    again = pickle.loads(pickle.dumps(trained))
    with torch.no_grad():
        assert torch.equal(again(example), trained(example))
