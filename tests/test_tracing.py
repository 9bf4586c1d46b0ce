"""Tracing: untraceable submodules become leaves, the user's model is never touched."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import fx, nn

import lrfx
from lrfx.facts import get_graph_facts


def call_modules(gm: fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def test_untraceable_submodule_becomes_a_leaf(gated_net: nn.Module) -> None:
    gm = lrfx.trace(gated_net)
    assert call_modules(gm) == ["pre", "gate", "post"]
    facts = gm.meta["lrfx"]
    assert isinstance(facts, lrfx.GraphFacts)
    (leaf,) = facts.leaves
    assert leaf.name == "gate"
    assert leaf.type.endswith("Gate")
    assert "control flow" in leaf.reason
    assert facts.provided == frozenset({"graph"})
    assert facts.total_params == sum(p.numel() for p in gated_net.parameters())
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), gated_net(x))


def test_nested_untraceable_submodule_is_named_by_its_path(gated_net: nn.Module) -> None:
    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = gated_net
            self.head = nn.Linear(2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.inner(x))

    model = Outer()
    gm = lrfx.trace(model)
    # only the untraceable part becomes a leaf; its traceable parents are traced into
    assert call_modules(gm) == ["inner.pre", "inner.gate", "inner.post", "head"]
    assert [leaf.name for leaf in gm.meta["lrfx"].leaves] == ["inner.gate"]
    x = torch.randn(5, 4)
    assert torch.equal(gm(x), model(x))


def test_untraceable_module_called_twice(gated_net: nn.Module) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = gated_net
            self.back = nn.Linear(2, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(self.back(self.net(x)))

    model = Twice()
    gm = lrfx.trace(model)
    assert call_modules(gm).count("net.gate") == 2
    assert [leaf.name for leaf in gm.meta["lrfx"].leaves] == ["net.gate"]
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))


def test_leaf_modules_argument(gated_net: nn.Module) -> None:
    gm = lrfx.trace(gated_net, leaf_modules=["pre"])
    assert call_modules(gm) == ["pre", "gate", "post"]
    # Linear has no children: naming it changes nothing, and it is no "hidden layers" leaf
    assert [leaf.name for leaf in gm.meta["lrfx"].leaves] == ["gate"]

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) + x

    model = nn.Sequential(Block(), nn.Linear(4, 2))
    gm = lrfx.trace(model, leaf_modules=[Block])
    assert call_modules(gm) == ["0", "1"]
    (leaf,) = gm.meta["lrfx"].leaves
    assert leaf.name == "0"
    assert "leaf_modules" in leaf.reason
    gm = lrfx.trace(model)
    assert call_modules(gm) == ["0.a", "1"]
    assert gm.meta["lrfx"].leaves == ()


def test_user_model_is_not_modified_and_not_shared(gated_net: nn.Module) -> None:
    before = {k: v.clone() for k, v in gated_net.state_dict().items()}
    gm = lrfx.trace(gated_net)
    model_params = dict(gated_net.named_parameters())
    gm_params = dict(gm.named_parameters())
    assert set(gm_params) == set(model_params)
    for name, p in gm_params.items():
        assert torch.equal(p, model_params[name])
        assert p.data_ptr() != model_params[name].data_ptr()
    with torch.no_grad():
        for p in gm.parameters():
            p.add_(1.0)
    for k, v in gated_net.state_dict().items():
        assert torch.equal(v, before[k]), k
    # the user's module tree is untouched (no submodule replaced by the tracer)
    assert isinstance(gated_net.gate, nn.Module)
    assert type(gated_net).__name__ == "GatedNet"


def test_copy_model_false_shares_parameters(gated_net: nn.Module) -> None:
    gm = lrfx.trace(gated_net, copy_model=False)
    assert gm.get_parameter("pre.weight") is gated_net.pre.weight


def test_top_level_untraceable_forward_raises_trace_error() -> None:
    class Top(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.fc(x)
            return x

    with pytest.raises(lrfx.TraceError) as info:
        lrfx.trace(Top())
    err = info.value
    assert err.module_path == ""
    assert "control flow" in err.reason
    assert "control flow" in str(err)
    assert "Top" in str(err)
    assert "top-level" in str(err)
    assert isinstance(err, lrfx.LrfxError)
    assert err.__cause__ is not None


def test_concrete_args_make_top_level_control_flow_traceable() -> None:
    class Flag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, double: bool = False) -> torch.Tensor:
            y = self.fc(x)
            if double:
                return y * 2
            return y

    model = Flag()
    gm = lrfx.trace(model, concrete_args={"double": True})
    x = torch.randn(2, 4)
    assert torch.equal(gm(x, True), model(x, True))
    assert torch.equal(gm(x, True), 2 * model(x))


@pytest.mark.parametrize(
    "bad", [{"weight": torch.zeros(2)}, nn.Linear, "resnet18", None], ids=type
)
def test_non_module_input_raises_lrfx_error(bad: object) -> None:
    with pytest.raises(lrfx.LrfxError, match=r"torch\.nn\.Module"):
        lrfx.trace(bad)  # type: ignore[arg-type]
    with pytest.raises(lrfx.LrfxError, match=r"torch\.nn\.Module"):
        lrfx.analyze(bad, torch.zeros(1))  # type: ignore[arg-type]


def test_transformer_encoder_in_a_custom_module_is_a_leaf() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(16, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(x))

    model = Encoder().eval()
    gm = lrfx.trace(model)
    assert call_modules(gm) == ["enc", "head"]
    (leaf,) = get_graph_facts(gm).leaves
    assert leaf.name == "enc"
    assert "TransformerEncoder" in leaf.type
    assert leaf.reason
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


def test_multihead_attention_is_kept_whole() -> None:
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    model = Attn()
    gm = lrfx.trace(model)
    assert call_modules(gm) == ["mha"]
    assert gm.meta["lrfx"].leaves == ()  # a known leaf, not a failure
    x = torch.randn(2, 3, 8)
    assert torch.equal(gm(x), model(x))


# The ImageNet zoo, random weights, at a small input where the architecture allows.
ZOO = [
    ("resnet18", 64, {}),
    ("mobilenet_v3_small", 64, {}),
    ("googlenet", 64, {"init_weights": True}),
    ("squeezenet1_0", 64, {}),
    ("shufflenet_v2_x0_5", 64, {}),
    ("regnet_x_400mf", 64, {}),
    ("efficientnet_b0", 64, {}),
    ("vit_b_16", 224, {}),  # the class checks the image size
]


@pytest.mark.parametrize(("name", "size", "kwargs"), ZOO, ids=[z[0] for z in ZOO])
def test_torchvision_models_trace_exactly(name: str, size: int, kwargs: dict[str, object]) -> None:
    model = torchvision.models.get_model(name, **kwargs).eval()
    gm = lrfx.trace(model)
    assert gm.meta["lrfx"].leaves == ()
    assert len(call_modules(gm)) > 10
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        got = gm(x)
    assert got.shape == (1, 1000)
    assert torch.equal(got, expected)
