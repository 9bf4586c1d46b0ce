"""A rewritten model trains like any nn.Module: gradients reach every factor, optimizers update
them, train()/eval() propagate, BN is untouched, and fine-tuning a low-rank model on real data
(scikit-learn digits) lowers its loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _rewrite_models import SmallCNN
from torch import fx, nn

import lrfx
from lrfx.modules import Factored, LowRankMultiheadAttention

PLAN = {
    "conv1": lrfx.LayerPlan("spatial", 3),
    "conv2": lrfx.LayerPlan("tucker2", (4, 6)),
    "fc": lrfx.LayerPlan("svd", 4),
}


def _factored_params(gm: fx.GraphModule) -> dict[str, nn.Parameter]:
    out = {}
    for name, m in gm.named_modules():
        if isinstance(m, Factored):
            for pname, p in m.named_parameters():
                out[f"{name}.{pname}"] = p
    return out


def test_gradients_reach_every_factor_and_an_optimizer_step_changes_them() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    x = torch.randn(4, 3, 12, 12)
    target = torch.randint(0, 10, (4,))
    gm = lrfx.apply(model, PLAN, x)
    params = _factored_params(gm)
    assert set(params) == {
        "conv1.0.weight", "conv1.1.weight", "conv1.1.bias",
        "conv2.0.weight", "conv2.1.weight", "conv2.2.weight",
        "fc.0.weight", "fc.1.weight", "fc.1.bias",
    }
    assert all(p.requires_grad for p in params.values())
    before = {k: p.detach().clone() for k, p in params.items()}
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    # eval mode: in train mode BN cancels the gradient of the bias of the conv before it
    gm.eval()
    loss = F.cross_entropy(gm(x), target)
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None, name
        assert float(p.grad.abs().sum()) > 0.0, name
    # the optimizer sees the factors (and nothing of the replaced dense layers)
    opt_params = {id(p) for group in opt.param_groups for p in group["params"]}
    assert all(id(p) in opt_params for p in params.values())
    assert "conv2.weight" not in dict(gm.named_parameters())
    opt.step()
    for name, p in params.items():
        assert not torch.equal(p.detach(), before[name]), name
    # the user's model did not get any gradient
    assert all(p.grad is None for p in model.parameters())


def test_train_and_eval_propagate_into_factored_modules() -> None:
    model = SmallCNN()
    gm = lrfx.apply(model, PLAN, torch.randn(1, 3, 8, 8))
    assert gm.training  # a model in train mode stays in train mode
    assert all(m.training for m in gm.modules())
    gm.eval()
    assert not any(m.training for m in gm.modules())
    assert not gm.conv2[1].training and not gm.fc.training
    gm.train()
    assert all(m.training for m in gm.modules())
    assert lrfx.apply(model.eval(), PLAN, torch.randn(1, 3, 8, 8)).training is False


def test_batch_norm_is_untouched_by_the_rewrite() -> None:
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():  # non-default BN state, so "untouched" means something
        model.train()
        model(torch.randn(8, 3, 8, 8))
        model.bn1.weight.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    gm = lrfx.apply(model, PLAN, x)
    assert type(gm.bn1) is nn.BatchNorm2d
    assert gm.bn1 is not model.bn1
    for k, v in model.bn1.state_dict().items():
        assert torch.equal(gm.bn1.state_dict()[k], v), k
    assert gm.bn1.momentum == model.bn1.momentum and gm.bn1.eps == model.bn1.eps
    # training the rewritten model updates its own BN statistics, not the user's
    gm.train()
    gm(torch.randn(4, 3, 8, 8))
    assert not torch.equal(gm.bn1.running_mean, model.bn1.running_mean)
    assert int(gm.bn1.num_batches_tracked) == int(model.bn1.num_batches_tracked) + 1


def test_gradients_reach_factored_attention_projections() -> None:
    class Enc(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    gm = lrfx.apply(Enc(), {"attn.q_proj": lrfx.LayerPlan("svd", 2),
                            "attn.out_proj": lrfx.LayerPlan("svd", 3)}, x)
    assert isinstance(gm.attn, LowRankMultiheadAttention)
    gm(x).square().sum().backward()
    for name, p in gm.attn.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


# --- fine-tuning on scikit-learn digits -----------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (128,), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    model.eval()


def _loss_acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    model.eval()
    with torch.no_grad():
        out = model(x)
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def test_fine_tuning_a_low_rank_model_on_digits_lowers_the_loss(
    digits: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    x_train, y_train, x_test, y_test = digits
    torch.manual_seed(0)
    dense = DigitsCNN()
    _train(dense, x_train, y_train, steps=150, lr=3e-3)
    dense_loss, dense_acc = _loss_acc(dense, x_test, y_test)
    assert dense_acc > 0.9  # the dense model learned the task

    plan = {
        "conv2": lrfx.LayerPlan("channel", 4),
        "fc1": lrfx.LayerPlan("svd", 4),
        "fc2": lrfx.LayerPlan("svd", 4),
    }
    gm = lrfx.apply(dense, plan, x_train[:1])
    ex = gm.meta["lrfx"].extra
    assert ex["macs_after"] < 0.5 * ex["macs_before"]
    low_loss, _ = _loss_acc(gm, x_test, y_test)
    assert low_loss > dense_loss  # the truncation hurt: there is something to recover

    _train(gm, x_train, y_train, steps=80, lr=2e-3)
    tuned_loss, tuned_acc = _loss_acc(gm, x_test, y_test)
    assert tuned_loss < 0.5 * low_loss
    assert tuned_acc > 0.85
    # the result is still the low-rank structure (fine-tuning did not densify anything)
    assert gm.fc1[0].weight.shape == (4, 512) and gm.conv2[0].weight.shape == (4, 16, 3, 3)
    assert ex["macs_after"] == lrfx.run_analysis(gm, x_train[:1], spectra=False).total_macs
