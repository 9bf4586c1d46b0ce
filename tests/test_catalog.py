"""The bad-input and fault catalog: every case is one way a user can hand lrfx something odd.

Each case runs and is classified:

* ``ok`` — lrfx did the job and the result is right (the case checks outputs, MACs, shapes);
* ``named`` — an :class:`lrfx.LrfxError` whose message names the layer / argument / file;
* ``bare`` — any other exception (a traceback from deep inside torch or lrfx);
* ``silent`` — lrfx returned something wrong without a word (a failed check inside the case).

The test asserts each case's expected outcome (``ok`` or ``named`` with a pattern the message
must match) and that the user's model was not modified (state, training flag, structure).

Also a script, to count outcomes on any checkout (the closing note of the reliability issue gives
the counts before and after)::

    .venv/bin/python tests/test_catalog.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lrfx

#: Outcome counts of the last run, printed by conftest's terminal summary.
COUNTS: Counter[str] = Counter()


class SilentError(AssertionError):
    """Raised by a case when lrfx returned a wrong result without an error."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise SilentError(what)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> bool:
    a, b = a.detach().double(), b.detach().double()
    return a.shape == b.shape and bool(torch.isfinite(a).all()) and \
        float((a - b).norm()) <= tol * max(float(b.norm()), 1e-12)


class Ctx:
    """What a case registers: the user's models (checked unchanged afterwards)."""

    def __init__(self) -> None:
        self.models: list[tuple[nn.Module, dict[str, torch.Tensor], bool, str]] = []

    def user(self, model: nn.Module) -> nn.Module:
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.models.append((model, state, model.training, repr(model)))
        return model

    def unchanged(self) -> str | None:
        for model, state, training, text in self.models:
            now = model.state_dict()
            if set(now) != set(state) or any(
                    now[k].shape != v.shape
                    or not torch.allclose(now[k], v, rtol=0, atol=0, equal_nan=True)
                    for k, v in state.items()):
                return "the user's model's state changed"
            if model.training != training or repr(model) != text:
                return "the user's model changed (mode or structure)"
        return None


@dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[Ctx], Any]
    expect: str  # "ok", or a regex the LrfxError message must match


CASES: list[Case] = []


def case(expect: str = "ok") -> Callable[[Callable[[Ctx], Any]], Callable[[Ctx], Any]]:
    def register(fn: Callable[[Ctx], Any]) -> Callable[[Ctx], Any]:
        CASES.append(Case(fn.__name__, fn, expect))
        return fn
    return register


def classify(c: Case) -> tuple[str, str, Ctx]:
    ctx = Ctx()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            c.run(ctx)
            return "ok", "", ctx
        except SilentError as exc:
            return "silent", str(exc), ctx
        except lrfx.LrfxError as exc:
            return "named", f"{type(exc).__name__}: {exc}", ctx
        except Exception as exc:
            return "bare", f"{type(exc).__name__}: {exc}", ctx


def _one(layer: nn.Module) -> nn.Module:
    return nn.Sequential(layer).eval()


def _saved(ctx: Ctx) -> tuple[nn.Module, torch.Tensor, Path, nn.Module]:
    """A two-layer MLP rewritten and saved: (user model, inputs, directory, result)."""
    torch.manual_seed(0)
    m = ctx.user(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval())
    x = torch.randn(2, 16)
    gm = lrfx.apply(m, {"0": lrfx.LayerPlan("svd", 8), "2": lrfx.LayerPlan("svd", 2)}, x)
    d = Path(tempfile.mkdtemp())
    lrfx.save(gm, d)
    return m, x, d, gm


def _plan_json(**layers: Any) -> str:
    return json.dumps({"format": "lrfx.RankPlan", "version": 2, "layers": layers})


# --- shared weights ------------------------------------------------------------------------------


class SharedConvs(nn.Module):
    def __init__(self, **b: Any) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 6, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 3, **b)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x), self.b(x)


def _shared(ctx: Ctx, model: nn.Module, x: torch.Tensor, plan: dict[str, Any]) -> None:
    ctx.user(model)
    gm = lrfx.apply(model, plan, x)
    with torch.no_grad():
        for got, ref in zip(gm(x), model(x), strict=True):
            check(close(got, ref), f"output {tuple(got.shape)} differs from {tuple(ref.shape)}")


@case()
def shared_weight_convs_with_other_padding(ctx: Ctx) -> None:
    plan = {"a": lrfx.LayerPlan("channel", 6), "b": lrfx.LayerPlan("channel", 6)}
    _shared(ctx, SharedConvs().eval(), torch.randn(1, 4, 9, 9), plan)


@case()
def shared_weight_convs_with_other_stride_and_dilation(ctx: Ctx) -> None:
    plan = {"a": lrfx.LayerPlan("tucker2", (4, 6)), "b": lrfx.LayerPlan("tucker2", (4, 6))}
    _shared(ctx, SharedConvs(stride=2, dilation=2).eval(), torch.randn(1, 4, 11, 11), plan)


@case()
def shared_weight_functional_convs_with_other_strides(ctx: Ctx) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4, 3, 3))

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return F.conv2d(x, self.w, padding=1), F.conv2d(x, self.w, stride=2)

    m, x = M().eval(), torch.randn(1, 4, 9, 9)
    plan = {r.name: lrfx.LayerPlan("channel", 6) for r in lrfx.analyze(m, x).factorable}
    _shared(ctx, m, x, plan)


@case()
def shared_weight_linears_counted_per_call(ctx: Ctx) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.dec = nn.Linear(8, 8)
            self.dec.weight = self.enc.weight

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.enc(x), self.dec(x[:1])

    m, x = ctx.user(M().eval()), torch.randn(3, 8)
    check(lrfx.count_macs(m, x) == 3 * 64 + 64, "MACs of a shared weight's two calls")
    _shared(ctx, m, x, {"enc": lrfx.LayerPlan("svd", 8), "dec": lrfx.LayerPlan("svd", 8)})


# --- keyword calls, extra and optional inputs ---------------------------------------------------


@case()
def layer_called_with_keyword_input(ctx: Ctx) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(input=x)

    m, x = ctx.user(M().eval()), torch.randn(1, 16)
    n = lrfx.count_macs(m, x)
    check(n == 512, f"count_macs gave {n}, torch 512")
    gm = lrfx.apply(m, {"fc": lrfx.LayerPlan("svd", 16)}, x)
    check(close(gm(x), m(x)), "keyword-called layer rewritten wrongly")


@case()
def conv_called_with_keyword_input(ctx: Ctx) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(input=x)

    m, x = ctx.user(M().eval()), torch.randn(1, 3, 8, 8)
    check(lrfx.count_macs(m, x) == 8 * 27 * 36, "MACs of a keyword-called conv")
    gm = lrfx.apply(m, {"conv": lrfx.LayerPlan("channel", 8)}, x)
    check(close(gm(x), m(x)), "keyword-called conv rewritten wrongly")


@case()
def functional_layers_with_keyword_arguments(ctx: Ctx) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
            self.v = nn.Parameter(torch.randn(4, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.conv2d(input=x, weight=self.w, stride=2, padding=1).mean((2, 3))
            return F.linear(input=y, weight=self.v)

    m, x = ctx.user(M().eval()), torch.randn(2, 3, 8, 8)
    a = lrfx.analyze(m, x)
    check(a.total_macs == 2 * 8 * 27 * 16 + 2 * 32, f"MACs {a.total_macs}")
    plan = {r.name: lrfx.LayerPlan("svd" if r.kind == "linear" else "channel",
                                   r.max_rank("svd" if r.kind == "linear" else "channel"))
            for r in a.factorable}
    check(len(plan) == 2, f"factorable: {list(plan)}")
    check(close(lrfx.apply(m, plan, x)(x), m(x)), "keyword functional layers rewritten wrongly")


@case("example_inputs")
def extra_example_input_to_count_macs(ctx: Ctx) -> None:
    lrfx.count_macs(ctx.user(nn.Linear(16, 8)), (torch.randn(1, 16), torch.randn(1, 16)))


@case("example_inputs")
def extra_example_input_to_compress(ctx: Ctx) -> None:
    m = ctx.user(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval())
    lrfx.compress(m, (torch.randn(2, 16), torch.randn(2, 16)), macs=0.6)


@case("'nope'")
def unknown_keyword_input(ctx: Ctx) -> None:
    lrfx.analyze(ctx.user(_one(nn.Linear(4, 4))), ((), {"nope": torch.randn(1, 4)}))


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(x)
        if mask is not None:
            y = y * mask
        return y


@case()
def optional_argument_given_positionally(ctx: Ctx) -> None:
    m, x, mask = ctx.user(Masked().eval()), torch.randn(2, 16), (torch.rand(2, 16) > 0.5).float()
    gm = lrfx.apply(m, {"fc": lrfx.LayerPlan("svd", 16)}, (x, mask))
    check(close(gm(x, mask), m(x, mask)), "the mask was dropped")


@case()
def optional_argument_left_out(ctx: Ctx) -> None:
    m, x = ctx.user(Masked().eval()), torch.randn(2, 16)
    c = lrfx.compress(m, x, macs=0.6)
    check(c(x).shape == (2, 16), "wrong output shape")


class Flagged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, embed: bool = False) -> torch.Tensor:
        y = self.conv(x).mean((2, 3))
        return y if embed else self.fc(y)


@case()
def flag_given_as_keyword(ctx: Ctx) -> None:
    m, x = ctx.user(Flagged().eval()), torch.randn(1, 3, 8, 8)
    gm = lrfx.apply(m, {"conv": lrfx.LayerPlan("channel", 8)}, ((x,), {"embed": True}))
    check(close(gm(x, embed=True), m(x, embed=True)), "embed=True was not honoured")


@case("embed")
def result_called_with_another_flag_value(ctx: Ctx) -> None:
    m, x = ctx.user(Flagged().eval()), torch.randn(1, 3, 8, 8)
    gm = lrfx.apply(m, {"conv": lrfx.LayerPlan("channel", 8)}, x)
    gm(x, embed=True)


@case()
def forward_whose_first_parameter_is_not_named_self(ctx: Ctx) -> None:
    class M(nn.Module):
        def __init__(s) -> None:  # noqa: N805
            super().__init__()
            s.fc = nn.Linear(8, 8)

        def forward(s, x: torch.Tensor) -> torch.Tensor:  # noqa: N805
            return s.fc(x)

    m, x = ctx.user(M().eval()), torch.randn(2, 8)
    check(close(lrfx.apply(m, {"fc": lrfx.LayerPlan("svd", 8)}, x)(x), m(x)), "wrong output")


# --- load faults ---------------------------------------------------------------------------------


@case("damaged|non-finite")
def load_weights_with_a_flipped_exponent_byte(ctx: Ctx) -> None:
    m, x, d, gm = _saved(ctx)
    f = d / "weights.safetensors"
    b = bytearray(f.read_bytes())
    header = int.from_bytes(b[:8], "little")
    start = json.loads(b[8 : 8 + header])["0.0.weight"]["data_offsets"][0]
    b[8 + header + start + 3] ^= 0x7F  # the sign/exponent byte of the first float32
    f.write_bytes(bytes(b))
    out = lrfx.load(d, m, x)(x)
    check(close(out, gm(x)), "a damaged weights file loaded into a wrong model")


@case("non-finite")
def load_non_finite_weights_saved_without_checksums(ctx: Ctx) -> None:
    from safetensors.torch import load_file, save_file

    m, x, d, _ = _saved(ctx)
    manifest = json.loads((d / "manifest.json").read_text())
    manifest.pop("sha256", None)  # as written before checksums were recorded
    (d / "manifest.json").write_text(json.dumps(manifest))
    tensors = load_file(str(d / "weights.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("inf")
    save_file(tensors, str(d / "weights.safetensors"))
    out = lrfx.load(d, m, x)(x)
    check(bool(torch.isfinite(out).all()), "non-finite weights loaded without a word")


@case("plan.json")
def load_without_plan(ctx: Ctx) -> None:
    m, x, d, _ = _saved(ctx)
    (d / "plan.json").unlink()
    lrfx.load(d, m, x)


@case("weights.safetensors")
def load_without_weights(ctx: Ctx) -> None:
    m, x, d, _ = _saved(ctx)
    (d / "weights.safetensors").unlink()
    lrfx.load(d, m, x)


@case("weights")
def load_truncated_weights(ctx: Ctx) -> None:
    m, x, d, _ = _saved(ctx)
    f = d / "weights.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    lrfx.load(d, m, x)


@case("layer '0'")
def load_with_an_edited_rank(ctx: Ctx) -> None:
    m, x, d, _ = _saved(ctx)
    p = d / "plan.json"
    p.write_text(p.read_text().replace('"rank": 8', '"rank": 6'))
    lrfx.load(d, m, x)


@case("'2'")
def load_plan_missing_a_layer_the_weights_have(ctx: Ctx) -> None:
    m, x, d, _ = _saved(ctx)
    p = d / "plan.json"
    plan = json.loads(p.read_text())
    plan["layers"].pop("2")
    p.write_text(json.dumps(plan))
    lrfx.load(d, m, x)


@case("does not exist")
def load_from_a_missing_directory(ctx: Ctx) -> None:
    lrfx.load(Path(tempfile.mkdtemp()) / "nothing", ctx.user(_one(nn.Linear(4, 4))),
              torch.randn(1, 4))


@case("manifest")
def load_with_a_damaged_manifest(ctx: Ctx) -> None:
    m, x, d, _ = _saved(ctx)
    (d / "manifest.json").write_text("{not json")
    lrfx.load(d, m, x)


@case("conv2|shape")
def load_into_another_architecture(ctx: Ctx) -> None:
    _, x, d, _ = _saved(ctx)
    other = ctx.user(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4)).eval())
    lrfx.load(d, other, x)


@case("is a file")
def save_to_an_existing_file(ctx: Ctx) -> None:
    _, _, _, gm = _saved(ctx)
    f = Path(tempfile.mkdtemp()) / "model"
    f.write_text("x")
    lrfx.save(gm, f)


@case("not produced by lrfx|plan")
def save_a_model_lrfx_did_not_make(ctx: Ctx) -> None:
    lrfx.save(ctx.user(_one(nn.Linear(4, 4))), tempfile.mkdtemp())


# --- plan JSON ----------------------------------------------------------------------------------


@case("'fc'")
def plan_with_a_null_entry(ctx: Ctx) -> None:
    lrfx.RankPlan.from_json(_plan_json(fc=None))


@case("version")
def plan_version_as_a_string(ctx: Ctx) -> None:
    lrfx.RankPlan.from_json(json.dumps({"format": "lrfx.RankPlan", "version": "1",
                                        "layers": {}}))


@case("'fc'.*rank")
def plan_with_a_fractional_rank(ctx: Ctx) -> None:
    lrfx.RankPlan.from_json(_plan_json(fc={"scheme": "svd", "rank": 2.5}))


@case("'fc'.*bogus")
def plan_with_an_unknown_scheme(ctx: Ctx) -> None:
    lrfx.RankPlan.from_json(_plan_json(fc={"scheme": "bogus", "rank": 2}))


@case("layers")
def plan_layers_as_a_list(ctx: Ctx) -> None:
    lrfx.RankPlan.from_json(json.dumps({"format": "lrfx.RankPlan", "version": 2, "layers": []}))


@case("not valid JSON")
def plan_that_is_not_json(ctx: Ctx) -> None:
    lrfx.RankPlan.from_json("{'fc': 1}")


@case("'nope'")
def plan_naming_a_missing_layer(ctx: Ctx) -> None:
    lrfx.apply(ctx.user(_one(nn.Linear(8, 8))), {"nope": lrfx.LayerPlan("svd", 2)},
               torch.randn(1, 8))


@case("'0'.*rank")
def plan_rank_above_the_maximum(ctx: Ctx) -> None:
    lrfx.apply(ctx.user(_one(nn.Linear(8, 8))), {"0": lrfx.LayerPlan("svd", 9)},
               torch.randn(1, 8))


@case("'0'.*spatial")
def plan_scheme_that_does_not_apply(ctx: Ctx) -> None:
    lrfx.apply(ctx.user(_one(nn.Conv2d(3, 8, 1))), {"0": lrfx.LayerPlan("spatial", 2)},
               torch.randn(1, 3, 8, 8))


@case("'0'.*(NaN|Inf|finite)")
def plan_on_a_layer_with_nan_weights(ctx: Ctx) -> None:
    m = nn.Sequential(nn.Linear(8, 8)).eval()
    with torch.no_grad():
        m[0].weight[0, 0] = float("nan")
    lrfx.apply(ctx.user(m), {"0": lrfx.LayerPlan("svd", 4)}, torch.randn(1, 8))


# --- compress arguments -------------------------------------------------------------------------


def _compress(ctx: Ctx, **kwargs: Any) -> nn.Module:
    m = ctx.user(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval())
    return lrfx.compress(m, torch.randn(2, 16), **kwargs)


@case("'bogus'.*channel")
def compress_with_an_unknown_scheme(ctx: Ctx) -> None:
    _compress(ctx, macs=0.5, scheme="bogus")


@case("'bogus'.*lc")
def compress_with_an_unknown_allocator(ctx: Ctx) -> None:
    _compress(ctx, macs=0.5, allocator="bogus")


@case("round_to")
def compress_with_a_fractional_round_to(ctx: Ctx) -> None:
    _compress(ctx, macs=0.5, round_to=2.5)


@case("rank_mn.*rank_min")
def compress_with_a_misspelled_setting(ctx: Ctx) -> None:
    _compress(ctx, macs=0.5, rank_mn=5)


@case("macs")
def compress_with_a_zero_budget(ctx: Ctx) -> None:
    _compress(ctx, macs=0)


@case("macs.*params|params.*macs")
def compress_with_two_budgets(ctx: Ctx) -> None:
    _compress(ctx, macs=0.5, params=0.5)


@case("macs")
def compress_with_a_fraction_above_one(ctx: Ctx) -> None:
    _compress(ctx, macs=1.5)


@case("precision")
def compress_with_an_unknown_precision(ctx: Ctx) -> None:
    _compress(ctx, macs=0.5, precision="f16")


@case("ok")  # a DataLoader's (inputs, labels) pairs: the inputs are recognized
def calibration_as_input_label_pairs(ctx: Ctx) -> None:
    x = torch.randn(4, 16)
    _compress(ctx, macs=0.6, calibration=[(x, torch.zeros(4, dtype=torch.long))])


@case("calibration batch 0.*inputs=3")
def calibration_inputs_selector_out_of_range(ctx: Ctx) -> None:
    x = torch.randn(4, 16)
    _compress(ctx, macs=0.6, calibration=[(x, torch.zeros(4, dtype=torch.long))],
              calibration_inputs=3)


@case("exclude.*'fc9'.*not a factorable layer")
def exclude_names_no_layer(ctx: Ctx) -> None:
    _compress(ctx, macs=0.6, exclude=["fc9"])


@case("calibration")
def calibration_that_is_empty(ctx: Ctx) -> None:
    _compress(ctx, macs=0.6, calibration=[])


@case("calibration batch 0.*shape")
def calibration_with_the_wrong_width(ctx: Ctx) -> None:
    _compress(ctx, macs=0.6, calibration=[torch.randn(4, 12)])


@case("shape")
def example_inputs_of_the_wrong_shape(ctx: Ctx) -> None:
    lrfx.analyze(ctx.user(_one(nn.Conv2d(3, 8, 3))), torch.randn(1, 4, 8, 8))


@case("nn.Module|module")
def a_function_instead_of_a_model(ctx: Ctx) -> None:
    lrfx.analyze(torch.relu, torch.randn(1, 4))  # type: ignore[arg-type]


# --- unusual but valid models --------------------------------------------------------------------


@case()
def functional_layer_whose_weight_is_a_buffer(ctx: Ctx) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", torch.randn(32, 16))
            self.fc = nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.linear(x, self.w))

    m, x = ctx.user(M().eval()), torch.randn(2, 16)
    c = lrfx.compress(m, x, macs=0.6)
    check(bool(torch.isfinite(c(x)).all()), "non-finite output")
    check(close(lrfx.apply(m, {"w": lrfx.LayerPlan("svd", 16)}, x)(x), m(x)), "wrong output")


@case()
def legacy_weight_norm(ctx: Ctx) -> None:
    m = nn.Sequential(torch.nn.utils.weight_norm(nn.Linear(16, 16)), nn.ReLU(),
                      nn.Linear(16, 4)).eval()
    m, x = ctx.user(m), torch.randn(2, 16)
    lrfx.compress(m, x, macs=0.6)
    check(close(lrfx.apply(m, {"0": lrfx.LayerPlan("svd", 16)}, x)(x), m(x)), "wrong output")


@case()
def weight_read_directly_besides_the_call(ctx: Ctx) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) + self.proj.weight.sum()

    m, x = ctx.user(M().eval()), torch.randn(2, 16)
    check(close(lrfx.apply(m, {"proj": lrfx.LayerPlan("svd", 16)}, x)(x), m(x)),
          "wrong output")


@case()
def non_leaf_tensor_kept_as_an_attribute(ctx: Ctx) -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16, 16)
            self.cache: torch.Tensor | None = None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            self.cache = y * 2
            return y

    m, x = M(), torch.randn(2, 16)
    m(x)  # fills the cache with a tensor that has a grad_fn
    ctx.user(m)
    c = lrfx.compress(m, x, macs=0.6)
    check(c(x).shape == (2, 16), "wrong output shape")


@case()
def attention_as_the_whole_model(ctx: Ctx) -> None:
    m = ctx.user(nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True).eval())
    x = torch.randn(2, 5, 16)
    a = lrfx.analyze(m, (x, x, x), spectra=False)
    check(a.total_macs == 4 * 2 * 5 * 16 * 16 + 2 * 2 * 5 * 6 * 16, f"MACs {a.total_macs}")
    plan = {r.name: lrfx.LayerPlan("svd", 16) for r in a.factorable}
    check(len(plan) == 4, f"factorable: {list(plan)}")
    gm = lrfx.apply(m, plan, (x, x, x))
    check(close(gm(x, x, x)[0], m(x, x, x)[0]), "wrong output")


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) if x.sum() > 0 else -self.fc(x)


@case("'1'.*DataDependent")
def export_pt2_of_a_data_dependent_leaf(ctx: Ctx) -> None:
    m = ctx.user(nn.Sequential(nn.Linear(8, 8), DataDependent()).eval())
    x = torch.ones(2, 8)
    c = lrfx.compress(m, x, macs=0.6)
    lrfx.export(c, Path(tempfile.mkdtemp()) / "m.pt2", x, format="pt2")


@case("format")
def export_in_an_unknown_format(ctx: Ctx) -> None:
    _, x, _, gm = _saved(ctx)
    lrfx.export(gm, Path(tempfile.mkdtemp()) / "m.bin", x, format="tflite")


# --- the test -----------------------------------------------------------------------------------


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_catalog_case(c: Case) -> None:
    kind, detail, ctx = classify(c)
    COUNTS[kind] += 1
    assert ctx.unchanged() is None, ctx.unchanged()
    if c.expect == "ok":
        assert kind == "ok", detail
    else:
        assert kind == "named", detail
        assert re.search(c.expect, detail), f"the message does not name {c.expect!r}: {detail}"


def main() -> int:
    counts: Counter[str] = Counter()
    for c in CASES:
        kind, detail, ctx = classify(c)
        changed = ctx.unchanged()
        if changed:
            kind, detail = "silent", changed
        counts[kind] += 1
        print(f"{kind:6s} {c.name:52s} {detail[:110]}")
    print(f"\n{len(CASES)} cases: " + ", ".join(f"{k} {counts[k]}"
                                                for k in ("ok", "named", "bare", "silent")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
