"""A2CiD2 (rule ``acid``): the (x, x~) ODE, the antisymmetric pairwise update, the momentum
step read from the optimizer, and a small MLP learning and averaging in simulation."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch

from rumor.algorithms.acid import ACiD, pairing_rates
from rumor.api import make_trainer
from rumor.cluster import build_graph, cluster_configs, node_name
from rumor.config import NodeConfig
from rumor.node.observe import consensus_distance
from rumor.node.simulation import simulate
from rumor.topology import build, chi_1, chi_2


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def now(self) -> float:
        return self.t


class Ctx:
    """A node with a one-tensor linear model and a settable clock."""

    def __init__(self, seed: int, clock: Clock) -> None:
        torch.manual_seed(seed)
        model = torch.nn.Linear(4, 1, bias=False)
        self.trainer = make_trainer_for(model)
        self.model = model
        self.clock = clock
        self.lock = asyncio.Lock()
        self.rng = random.Random(seed)
        self.node_id = f"n{seed}"


def make_trainer_for(model: torch.nn.Module) -> Any:
    from rumor.node.trainer import Trainer

    x = torch.randn(16, 4)
    batches = [(x, x.sum(1, keepdim=True))]
    return Trainer(model, batches, batches, loss="mse", lr=0.1, momentum=0.9)


def test_acid_ode_is_the_exponential_of_its_2x2_matrix() -> None:
    clock = Clock()
    ctx = Ctx(0, clock)
    rule = ACiD(chi_1=9.0, chi_2=4.0, tau=0.5)
    rule._start(ctx)  # type: ignore[arg-type]
    rule._xt = torch.randn(4)
    s0 = np.stack([ctx.trainer.parameters_vector().numpy(), rule._xt.numpy()]).astype(float)
    clock.t = 1.7
    x = rule._integrate(ctx).numpy()  # type: ignore[arg-type]
    eta = rule.eta
    M = np.array([[-eta, eta], [eta, -eta]])
    expected = scipy.linalg.expm(M * 1.7 / 0.5) @ s0
    assert np.allclose(x, expected[0], atol=1e-6)
    assert np.allclose(rule.momentum.numpy(), expected[1], atol=1e-6)


def test_pairwise_averaging_keeps_the_sums_of_x_and_x_tilde() -> None:
    clock = Clock()
    a, b = Ctx(1, clock), Ctx(2, clock)
    ra, rb = ACiD(chi_1=9.0, chi_2=4.0, tau=1.0), ACiD(chi_1=9.0, chi_2=4.0, tau=1.0)
    for r, c in ((ra, a), (rb, b)):
        r._start(c)  # type: ignore[arg-type]
        r._xt = torch.randn(4)
    before_x = a.trainer.parameters_vector() + b.trainer.parameters_vector()
    before_xt = ra.momentum + rb.momentum
    xa, xb = a.trainer.parameters_vector(), b.trainer.parameters_vector()
    ra._average(a, xa, xb)  # type: ignore[arg-type]
    rb._average(b, xb, xa)  # type: ignore[arg-type]
    assert torch.allclose(a.trainer.parameters_vector(), (xa + xb) / 2)
    assert torch.allclose(a.trainer.parameters_vector(), b.trainer.parameters_vector())
    assert torch.allclose(a.trainer.parameters_vector() + b.trainer.parameters_vector(), before_x)
    assert torch.allclose(ra.momentum + rb.momentum, before_xt, atol=1e-6)
    assert torch.allclose(ra.momentum - rb.momentum, before_xt - 2 * rb.momentum, atol=1e-6)


def test_gradient_event_moves_x_tilde_by_lr_times_the_momentum_buffer() -> None:
    clock = Clock()
    ctx = Ctx(3, clock)
    rule = ACiD(chi_1=9.0, chi_2=4.0, tau=1.0)
    rule._start(ctx)  # type: ignore[arg-type]

    async def two_steps() -> None:
        for _ in range(2):
            xt = rule.momentum
            await rule._gradient_event(ctx)  # type: ignore[arg-type]
            opt = ctx.trainer.optimizer
            buf = opt.state[next(iter(ctx.model.parameters()))]["momentum_buffer"].reshape(-1)
            assert torch.allclose(rule.momentum, xt - 0.1 * buf)

    ctx.compute = lambda fn, *a, cost_s=None: _now(fn(*a))  # type: ignore[attr-defined]
    asyncio.run(two_steps())
    assert rule.steps == 2


async def _now(value: Any) -> Any:
    return value


def test_prepare_computes_chi_of_the_pairing_laplacian() -> None:
    graph = build("ring:8")
    base = NodeConfig(algorithm="acid", params={"rate_com": 2.0})
    configs = cluster_configs(graph, base, address_of=node_name)
    rates = pairing_rates(graph, 2.0)
    assert all(r == pytest.approx(1.0) for r in rates.values())  # rate_com / degree
    assert configs[5].params["chi_1"] == pytest.approx(chi_1(graph, rates))
    assert configs[5].params["chi_2"] == pytest.approx(chi_2(graph, rates))


def test_acid_trains_a_small_mlp_and_the_nodes_agree_in_simulation() -> None:
    base = NodeConfig(
        algorithm="acid",
        dataset="digits",
        model="mlp:32",
        momentum=0.9,
        lr=0.05,
        rounds=250,
        eval_every=0,
        init="independent",
        seed=0,
        linger=1.0,
        params={"rate_com": 1.0},
    )
    configs = cluster_configs(build_graph("ring", 8, 0), base, address_of=node_name)
    start = consensus_distance([make_trainer(c).model.state_dict() for c in configs])
    averagings: list[int] = []

    async def count(network: Any, nodes: dict[str, Any]) -> None:
        rules = [n.rule for n in nodes.values()]
        while True:
            await asyncio.sleep(0.1)
            averagings[:] = [sum(r.averagings for r in rules)]

    result = simulate(configs, step_cost_s=0.01, scenario=count)
    assert result.consensus_distance < start / 50
    assert result.mean_accuracy > 0.85
    # each node takes part in about rate_com = 1 averaging per step: 8 * 250 / 2 pairings,
    # counted once on each side
    assert 0.6 * 8 * 250 < averagings[0] < 1.4 * 8 * 250
