"""Sparsity penalties (lrfx.methods.penalties): the subgradients are the autograd gradients of the
values and are finite everywhere, each prox (and its threshold) is the brute-force argmin on a
dense grid, the prox is odd, monotone and shrinking, the lp Newton prox agrees with the closed-form
half thresholding at p = 1/2, dtype/device/shape are kept, and bad arguments are refused."""

from __future__ import annotations

import dataclasses
import doctest
import json
import math

import pytest
import torch

from lrfx.errors import LrfxError
from lrfx.methods import penalties
from lrfx.methods.penalties import Penalty

F64 = torch.float64

# (kind, shape parameters) covering both lp extremes and Tl1 from near-l0 to near-l1
SHAPES = [
    ("l1", {}),
    ("lp", {"p": 0.1}), ("lp", {"p": 0.5}), ("lp", {"p": 0.9}),
    ("tl1", {"a": 0.5}), ("tl1", {"a": 2.0}),
]
IDS = [f"{k}-{next(iter(v.values()), '')}" for k, v in SHAPES]


def _p(x: torch.Tensor, kind: str, a: float = 1.0, p: float = 0.5) -> torch.Tensor:
    """The penalty P elementwise, written independently of the module."""
    if kind == "l1":
        return x.abs()
    if kind == "lp":
        return x.abs() ** p
    return (a + 1) * x.abs() / (a + x.abs())


def _objective(x: torch.Tensor, y: torch.Tensor, lam: float, pen: Penalty) -> torch.Tensor:
    return 0.5 * (x - y) ** 2 + lam * _p(x, pen.kind, pen.a, pen.p)


def test_value_by_hand() -> None:
    x = torch.tensor([1.0, -2.0, 3.0, 0.0])
    assert Penalty("l1", s=0.1).value(x).item() == pytest.approx(0.6)
    assert Penalty("lp", s=2.0, p=0.5).value(torch.tensor([4.0, -0.25, 0.0])).item() == (
        pytest.approx(5.0))
    # 0.5 * (3*1/3 + 3*2/4 + 3*3/5)
    assert Penalty("tl1", s=0.5, a=2.0).value(x).item() == pytest.approx(0.5 * (1 + 1.5 + 1.8))
    assert Penalty("tl1", s=0.0).value(x).item() == 0.0


@pytest.mark.parametrize(("kind", "kw"), SHAPES, ids=IDS)
def test_subgradient_is_the_autograd_gradient_away_from_zero(kind: str, kw: dict) -> None:
    pen = Penalty(kind, s=0.3, **kw)
    x = torch.randn(64, dtype=F64)
    x = x + 0.01 * torch.sign(x)                        # away from 0 ...
    # ... but some close to it (lp's clamp at eps = 1e-3 starts below)
    x = torch.cat([x, torch.tensor([1e-3, -2e-3, 7.0], dtype=F64)])
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(pen.value(x), x)
    sub = pen.subgradient(x.detach())
    torch.testing.assert_close(sub, grad, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize(("kind", "kw"), SHAPES, ids=IDS)
def test_subgradient_is_zero_at_zero(kind: str, kw: dict) -> None:
    x = torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=F64)
    sub = Penalty(kind, s=0.3, **kw).subgradient(x)
    assert sub[:2].tolist() == [0.0, 0.0]
    assert sub[2] > 0 and sub[3] == -sub[2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_lp_subgradient_is_finite_near_zero(dtype: torch.dtype) -> None:
    tiny = torch.finfo(dtype).tiny
    x = torch.tensor([0.0, tiny, -tiny, tiny / 4, 1e-30, -1e-12, 1e-9, 1e-4, -5e-4, 1e-2],
                     dtype=F64).to(dtype)
    sub = Penalty("lp", s=0.2, p=0.5, eps=1e-8).subgradient(x)
    assert sub.dtype == dtype
    assert torch.isfinite(sub).all()
    assert sub[0] == 0
    # below eps the magnitude is the one at eps: s * p * eps**(p - 1) = 0.1 / sqrt(1e-3)
    # (checked on normal numbers: the tests run with denormals flushed to zero)
    sub = Penalty("lp", s=0.2, p=0.5, eps=1e-3).subgradient(x).double()
    xd = x.double()
    small = (xd.abs() < 1e-3) & (xd.abs() >= tiny)
    assert small.sum() >= 4
    torch.testing.assert_close(sub[small].abs(), torch.full_like(sub[small], 0.1 / 1e-3 ** 0.5),
                               rtol=1e-2, atol=0.0)
    assert (sub[small].sign() == xd[small].sign()).all()
    assert sub[-1].item() == pytest.approx(0.1 / xd[-1].item() ** 0.5, rel=1e-2)
    # extreme settings still never produce inf or NaN: p near 0, an eps below the dtype's range,
    # a weight so large that the exact value overflows
    wild = Penalty("lp", s=1e30, p=1e-3, eps=1e-300).subgradient(x)
    assert torch.isfinite(wild).all() and wild[0] == 0
    assert (wild[xd.abs() >= tiny] != 0).all()


def _cases() -> list[tuple[str, dict, float]]:
    out = []
    for kind, kw in SHAPES:
        if kind == "tl1":
            a = kw["a"]
            edge = a * a / (2 * (a + 1))
            lams = [0.4 * edge, 2.5 * edge]             # both Tl1 branches
        else:
            lams = [0.03, 0.4]
        out += [(kind, kw, lam) for lam in lams]
    return out


@pytest.mark.parametrize(("kind", "kw", "lam"), _cases(),
                         ids=[f"{k}-{next(iter(v.values()), '')}-lam{lam:.3g}"
                              for k, v, lam in _cases()])
def test_prox_is_the_brute_force_argmin(kind: str, kw: dict, lam: float) -> None:
    lr = 0.5
    pen = Penalty(kind, s=lam / lr, **kw)
    t = pen.threshold(lr)
    if kind == "tl1":
        a = kw["a"]
        if lam <= a * a / (2 * (a + 1)):
            assert t == pytest.approx(lam * (a + 1) / a)
        else:
            assert t == pytest.approx(math.sqrt(2 * lam * (a + 1)) - a / 2)
    n, h = 100_000, 4e-5                                # 200001 points on [-4, 4], 0 exact
    grid = torch.arange(-n, n + 1, dtype=F64) * h
    ys = torch.cat([torch.linspace(0.0, 3.5, 12, dtype=F64),
                    torch.tensor([0.5 * t, t * (1 - 1e-3), t, t * (1 + 1e-3), t + 0.05],
                                 dtype=F64)])
    ys = torch.cat([ys, -ys[1::3]])
    x = pen.prox(ys, lr)
    obj = _objective(grid[None, :], ys[:, None], lam, pen)
    best, at = obj.min(dim=1)
    g = grid[at]
    # the prox is at least as good as every grid point ...
    assert (_objective(x, ys, lam, pen) <= best + 1e-13).all()
    # ... and is where the grid's minimum is (except at |y| == t, where 0 and the nonzero
    # local minimum may tie)
    off = ys.abs() != t
    assert (x - g)[off].abs().max() <= h
    # the threshold is where the brute-force minimizer leaves 0
    assert (g[ys.abs() <= t * (1 - 1e-3)] == 0).all()
    assert (g[ys.abs() >= t * (1 + 1e-3)] != 0).all()


@pytest.mark.parametrize(("kind", "kw"), SHAPES, ids=IDS)
def test_prox_is_odd_monotone_shrinking_and_thresholded(kind: str, kw: dict) -> None:
    pen = Penalty(kind, s=0.4, **kw)
    lr = 0.5
    t = pen.threshold(lr)
    y = torch.cat([torch.randn(500, dtype=F64) * 2,
                   torch.tensor([0.0, t, -t, t * (1 + 1e-9), 30.0], dtype=F64)])
    x = pen.prox(y, lr)
    assert torch.equal(pen.prox(-y, lr), -x)
    inside = y.abs() <= t
    assert inside.any() and (~inside).any()
    assert (x[inside] == 0).all()
    assert (x[~inside] != 0).all()
    assert (x[~inside].sign() == y[~inside].sign()).all()
    assert (x.abs() <= y.abs()).all()
    assert (x.abs()[~inside] < y.abs()[~inside]).all()
    order = y.argsort()
    assert (x[order].diff() >= 0).all()


def test_lr_or_weight_zero_is_the_identity() -> None:
    y = torch.randn(7)
    for pen, lr in ((Penalty("lp"), 0.0), (Penalty("tl1", s=0.0), 1.0)):
        out = pen.prox(y, lr)
        assert torch.equal(out, y) and out.data_ptr() != y.data_ptr()
        assert pen.threshold(lr) == 0.0


def _half_thresholding(y: torch.Tensor, lam: float) -> torch.Tensor:
    """Xu et al. (2012) for argmin (x - y)^2 + mu |x|^(1/2); ours is that with mu = 2 lam."""
    mu = 2 * lam
    t = 54 ** (1 / 3) / 4 * mu ** (2 / 3)
    ay = y.abs()
    phi = torch.arccos((mu / 8) * (ay.clamp(min=t) / 3) ** -1.5)
    x = (2 / 3) * y * (1 + torch.cos(2 * math.pi / 3 - (2 / 3) * phi))
    return torch.where(ay > t, x, torch.zeros_like(y))


@pytest.mark.parametrize("lam", [1e-6, 0.01, 0.5, 20.0])
def test_lp_newton_matches_half_thresholding(lam: float) -> None:
    pen = Penalty("lp", s=lam, p=0.5)
    t = pen.threshold(1.0)
    assert t == pytest.approx(54 ** (1 / 3) / 4 * (2 * lam) ** (2 / 3), rel=1e-14)
    y = t * torch.cat([torch.linspace(-4, 4, 401, dtype=F64),
                       torch.tensor([1 + 1e-12, 1 + 1e-6, 1e4], dtype=F64)])
    torch.testing.assert_close(pen.prox(y, 1.0), _half_thresholding(y, lam),
                               rtol=1e-12, atol=1e-14 * t)


@pytest.mark.parametrize("p", [1e-3, 0.3, 0.99, 0.999])
def test_lp_newton_converges_for_extreme_p(p: float) -> None:
    lam = 0.7
    pen = Penalty("lp", s=lam, p=p)
    t = pen.threshold(1.0)
    beta = (2 * lam * (1 - p)) ** (1 / (2 - p))
    y = t * torch.cat([1 + torch.logspace(-12, 0, 25, dtype=F64),
                       torch.logspace(0.5, 8, 16, dtype=F64)])
    x = pen.prox(y, 1.0)
    assert (x >= beta * (1 - 1e-12)).all() and (x <= y).all() and (x[:25] < y[:25]).all()
    residual = x + lam * p * x ** (p - 1) - y             # the stationarity equation
    assert (residual.abs() <= 1e-13 * y).all()
    assert (_objective(x, y, lam, pen) < 0.5 * y ** 2).all()   # better than 0 above t


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("kind", "kw"), SHAPES, ids=IDS)
def test_dtype_device_and_shape_are_kept(kind: str, kw: dict, device: str) -> None:
    pen = Penalty(kind, s=0.05, **kw)
    ref_in = torch.randn(3, 4, 5, dtype=F64).transpose(0, 2)   # non-contiguous
    for dtype, tol in ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)):
        y = ref_in.to(device=device, dtype=dtype)
        for out, ref in ((pen.prox(y, 2.0), pen.prox(y.double(), 2.0)),
                         (pen.subgradient(y), pen.subgradient(y.double())),
                         (pen.value(y), pen.value(y.double()))):
            assert out.dtype == dtype and out.device == y.device
            assert out.shape == ref.shape
            torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
        assert pen.value(y).shape == ()
    for shape in [(), (0,), (2, 1, 3)]:
        z = torch.randn(shape, device=device)
        assert pen.prox(z, 1.0).shape == shape and pen.subgradient(z).shape == shape


def test_tl1_prox_keeps_float32_precision_for_large_a() -> None:
    # a >> |y| (close to l1): the textbook arccos form loses most float32 digits here
    pen = Penalty("tl1", s=1e-3, a=1e3)
    y = torch.linspace(-1.0, 1.0, 201, dtype=F64)
    out = pen.prox(y.float(), 1.0).double()
    ref = pen.prox(y, 1.0)
    assert (out - ref).abs().max() <= 1e-6


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"kind": "L2"}, r"kind 'L2'.*'l1', 'lp', 'tl1'"),
    ({"kind": "TL1"}, "did you mean 'tl1'"),
    ({"kind": 3}, "kind"),
    ({"s": -1.0}, "s must be"),
    ({"s": float("nan")}, "s must be"),
    ({"s": float("inf")}, "s must be"),
    ({"s": True}, "s must be"),
    ({"s": "0.1"}, "s must be"),
    ({"a": 0.0}, "a must be"),
    ({"a": float("inf")}, "a must be"),
    ({"p": 0.0}, r"p must be in \(0, 1\)"),
    ({"p": 1.0}, r"p must be in \(0, 1\).*kind='l1'"),
    ({"eps": 0.0}, "eps must be"),
    ({"eps": -1e-8}, "eps must be"),
])
def test_bad_arguments_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(LrfxError, match=match):
        Penalty(**kwargs)


def test_bad_call_arguments_are_refused() -> None:
    pen = Penalty("tl1")
    y = torch.randn(3)
    for lr in (-0.1, float("nan"), float("inf"), True, None):
        with pytest.raises(LrfxError, match="lr must be a finite step size >= 0"):
            pen.prox(y, lr)  # type: ignore[arg-type]
    with pytest.raises(LrfxError, match=r"x must be a floating-point torch\.Tensor.*int64"):
        pen.subgradient(torch.arange(3))
    with pytest.raises(LrfxError, match=r"y must be a floating-point torch\.Tensor.*list"):
        pen.prox([1.0], 1.0)  # type: ignore[arg-type]
    with pytest.raises(LrfxError, match="x must be"):
        pen.value(torch.ones(2, dtype=torch.complex64))


def test_dict_round_trip_and_frozen() -> None:
    pen = Penalty("tl1", s=3, a=2, eps=1e-6)
    d = pen.to_dict()
    assert d == {"kind": "tl1", "s": 3.0, "a": 2.0, "p": 0.5, "eps": 1e-6}
    assert all(type(v) is float for k, v in d.items() if k != "kind")
    assert Penalty.from_dict(json.loads(json.dumps(d))) == pen
    assert Penalty.from_dict({"kind": "lp"}) == Penalty("lp")
    with pytest.raises(LrfxError, match=r"unknown field 'eps_'.*did you mean 'eps'"):
        Penalty.from_dict({"eps_": 1.0})
    with pytest.raises(LrfxError, match="data must be a mapping"):
        Penalty.from_dict([("kind", "l1")])  # type: ignore[arg-type]
    with pytest.raises(LrfxError, match="p must be"):
        Penalty.from_dict({"kind": "lp", "p": 2})
    with pytest.raises(dataclasses.FrozenInstanceError):
        pen.s = 1.0  # type: ignore[misc]


def test_docstring_example_runs() -> None:
    result = doctest.testmod(penalties, verbose=False)
    assert result.attempted >= 4 and result.failed == 0
