"""The sharpness-aware step (rumor.algorithms.sam) and Trainer.sam_steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from rumor.algorithms.sam import perturbation, sam_step
from rumor.node.data import digits, node_loaders, partition
from rumor.node.models import build_model
from rumor.node.trainer import Trainer


class Quadratic(nn.Module):
    """F(u, v) = 1/2 sum a_u u^2 + 1/2 sum a_v v^2, so grad F = (a_u u, a_v v) exactly.

    Two parameter tensors, so a per-tensor norm would give a different perturbation from
    the global one. Every forward pass records the parameters it saw.
    """

    def __init__(self) -> None:
        super().__init__()
        self.u = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
        self.v = nn.Parameter(torch.tensor([[3.0, 0.0], [-1.0, 2.0]], dtype=torch.float64))
        self.a_u = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
        self.a_v = torch.tensor([[0.5, 1.0], [3.0, 1.5]], dtype=torch.float64)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.u.detach().clone(), self.v.detach().clone()))
        return 0.5 * (self.a_u * self.u**2).sum() + 0.5 * (self.a_v * self.v**2).sum() + 0 * x.sum()


def _objective(out: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    return out


BATCH = (torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))


def test_second_gradient_is_taken_at_y_plus_rho_g_over_global_norm() -> None:
    model, rho, lr = Quadratic(), 0.3, 0.1
    u0, v0 = model.u.detach().clone(), model.v.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sam_step(model, _objective, opt, BATCH, rho)

    g_u, g_v = model.a_u * u0, model.a_v * v0
    norm = math.sqrt(float((g_u**2).sum() + (g_v**2).sum())) + 1e-12
    e_u, e_v = rho * g_u / norm, rho * g_v / norm
    assert len(model.seen) == 2
    (u_first, v_first), (u_second, v_second) = model.seen
    assert torch.equal(u_first, u0) and torch.equal(v_first, v0)
    torch.testing.assert_close(u_second, u0 + e_u, rtol=0, atol=1e-15)
    torch.testing.assert_close(v_second, v0 + e_v, rtol=0, atol=1e-15)
    # the step starts from the restored y and uses the gradient at y + e
    torch.testing.assert_close(model.u.detach(), u0 - lr * model.a_u * (u0 + e_u))
    torch.testing.assert_close(model.v.detach(), v0 - lr * model.a_v * (v0 + e_v))


def test_weights_are_restored_bit_for_bit_after_the_perturbation() -> None:
    model = build_model("mlp:16", 8, 3, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step itself moves nothing
    x, y = (
        torch.randn(5, 8, generator=torch.Generator().manual_seed(0)),
        torch.tensor([0, 1, 2, 0, 1]),
    )
    sam_step(model, nn.functional.cross_entropy, opt, (x, y), rho=0.5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # while the gradient the optimizer got is the one at the perturbed point, not at y
    grad_at_y = torch.autograd.grad(
        nn.functional.cross_entropy(model(x), y), list(model.parameters())
    )
    assert any(
        not torch.allclose(p.grad, g) for p, g in zip(model.parameters(), grad_at_y, strict=True)
    )


def test_the_optimizer_sees_restored_weights_for_weight_decay_and_momentum() -> None:
    model, rho, lr, wd, mom = Quadratic(), 0.2, 0.05, 0.1, 0.9
    u0 = model.u.detach().clone()
    v0 = model.v.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=lr, weight_decay=wd, momentum=mom)
    sam_step(model, _objective, opt, BATCH, rho)
    g_u, g_v = model.a_u * u0, model.a_v * v0
    norm = math.sqrt(float((g_u**2).sum() + (g_v**2).sum())) + 1e-12
    # first momentum step: buffer = grad at y + e, plus wd * y (the restored weights)
    expected = u0 - lr * (model.a_u * (u0 + rho * g_u / norm) + wd * u0)
    torch.testing.assert_close(model.u.detach(), expected)


def test_perturbation_has_norm_rho_and_is_zero_for_a_zero_gradient() -> None:
    grads: list[torch.Tensor | None] = [torch.tensor([3.0, 0.0]), None, torch.tensor([[4.0]])]
    e = perturbation(grads, rho=0.5)
    assert e[1] is None
    total = math.sqrt(sum(float((t**2).sum()) for t in e if t is not None))
    assert total == pytest.approx(0.5, rel=1e-6)
    torch.testing.assert_close(e[0], torch.tensor([0.3, 0.0]))
    zero = perturbation([torch.zeros(3)], rho=0.5)
    assert zero[0] is not None and torch.equal(zero[0], torch.zeros(3))


def test_rho_zero_is_one_plain_optimizer_step() -> None:
    model = Quadratic()
    u0 = model.u.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sam_step(model, _objective, opt, BATCH, rho=0.0)
    assert len(model.seen) == 1
    torch.testing.assert_close(model.u.detach(), u0 - 0.1 * model.a_u * u0)


def test_negative_or_infinite_rho_is_refused() -> None:
    model = Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for rho in (-0.1, math.inf, math.nan):
        with pytest.raises(ValueError, match="rho"):
            sam_step(model, _objective, opt, BATCH, rho)


def test_batchnorm_statistics_move_once_per_step_as_in_a_plain_step() -> None:
    def fresh() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(2))
    sam_model, sam_opt = fresh()
    plain_model, plain_opt = fresh()
    sam_step(sam_model, nn.functional.cross_entropy, sam_opt, (x, y), rho=0.5)
    sam_step(plain_model, nn.functional.cross_entropy, plain_opt, (x, y), rho=0.0)
    bn_sam, bn_plain = sam_model[1], plain_model[1]
    assert torch.equal(bn_sam.running_mean, bn_plain.running_mean)
    assert torch.equal(bn_sam.running_var, bn_plain.running_var)
    assert int(bn_sam.num_batches_tracked) == 1
    assert not torch.equal(bn_sam.running_mean, torch.zeros(6))  # they did move


# --- through the Trainer ------------------------------------------------------------------


def _digits_trainer(seed: int = 0) -> Trainer:
    ds = digits()
    parts = partition("iid", ds.y_train, 4, seed=0)
    train, test = node_loaders(ds, parts, 0, batch_size=32, seed=seed)
    return Trainer(build_model("mlp:32", 64, 10, seed=seed), train, test, lr=0.1)


def test_trainer_sam_steps_with_rho_zero_equals_train_steps_bit_for_bit() -> None:
    a, b = _digits_trainer(), _digits_trainer()
    loss_a = a.sam_steps(7, 0.0)
    loss_b = b.train_steps(7)
    assert loss_a == loss_b
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.steps == b.steps == 7


def test_trainer_sam_steps_walk_the_same_batches_and_report_the_loss_at_y() -> None:
    sam, plain = _digits_trainer(), _digits_trainer()
    # same first batch, same weights: the reported loss is the one at y, before the step
    assert sam.sam_steps(1, 0.05) == plain.train_steps(1)
    diff = max(
        float((p - q).detach().abs().max())
        for p, q in zip(sam.model.parameters(), plain.model.parameters(), strict=True)
    )
    assert diff > 1e-6  # but the step is not the plain one
    # one batch consumed per step, from the same stream
    sam.sam_steps(3, 0.05)
    plain.train_steps(3)
    (xs, ys), (xp, yp) = sam._next_batch(), plain._next_batch()
    assert torch.equal(xs, xp) and torch.equal(ys, yp)
    assert sam.steps == plain.steps == 4


def test_sam_training_learns_digits() -> None:
    trainer = _digits_trainer()
    before = trainer.evaluate()["accuracy"]
    losses = [trainer.sam_steps(10, 0.05) for _ in range(20)]
    after = trainer.evaluate()["accuracy"]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    assert after > before + 0.4 and after > 0.8
    with pytest.raises(ValueError):
        trainer.sam_steps(0, 0.05)
