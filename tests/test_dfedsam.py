"""DFedSAM and DFedSAM-MGS (rumor.algorithms.dfedsam): the round, the tags, the failures.

Most tests run the real rule on real nodes in simulation (virtual clock, in-process
network); the tagging test drives one rule directly through a minimal context.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from rumor.algorithms import registry
from rumor.algorithms.averaging import mixable
from rumor.algorithms.dfedsam import (
    MODEL_KIND,
    DFedSAM,
    DFedSAMMGS,
    split_tag,
    step_tag,
)
from rumor.api import make_trainer
from rumor.cluster import build_graph, cluster_configs, node_name
from rumor.config import NodeConfig
from rumor.node.data import get_dataset, partition
from rumor.node.observe import consensus_distance
from rumor.node.runtime import Node
from rumor.node.simulation import SimulationResult, simulate
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, Rejected
from rumor.protocol.inproc import InProcNetwork
from rumor.topology import metropolis_hastings, spectral_gap
from tests.conftest import run

Scenario = Callable[[InProcNetwork, dict[str, Node]], Awaitable[None]]


def _configs(
    topology: str, n: int, algorithm: str, rounds: int, params: dict[str, Any], **fields: Any
) -> list[NodeConfig]:
    base = NodeConfig(
        algorithm=algorithm,
        params=params,
        rounds=rounds,
        dataset="digits",
        partition="dirichlet:0.3",
        model="mlp:16",
        lr=0.05,
        seed=2,
        eval_every=0,
    ).replace(**fields)
    return cluster_configs(build_graph(topology, n, 2), base, address_of=node_name)


def _initial_states(configs: list[NodeConfig]) -> list[dict[str, torch.Tensor]]:
    first = configs[0]
    dataset = get_dataset(first.dataset, seed=first.seed)
    parts = partition(first.partition, dataset.y_train, first.n_nodes, seed=first.seed)
    return [make_trainer(c, dataset, parts).model.state_dict() for c in configs]


def _simulate(
    configs: list[NodeConfig], scenario: Scenario | None = None
) -> tuple[SimulationResult, list[dict[str, torch.Tensor]]]:
    """Run ``configs``; also return every node's final state, in node order."""
    nodes: dict[str, Node] = {}

    async def capture(network: InProcNetwork, by_id: dict[str, Node]) -> None:
        nodes.update(by_id)
        if scenario is not None:
            await scenario(network, by_id)

    result = simulate(configs, scenario=capture)
    return result, [nodes[c.node_id].trainer.model.state_dict() for c in configs]


def _rounds(result: SimulationResult, node: str) -> list[dict[str, Any]]:
    return [r for r in result.metrics[node] if r["event"] == "round"]


def _assert_states_equal_matrix_times(
    W: np.ndarray, before: list[dict[str, torch.Tensor]], after: list[dict[str, torch.Tensor]]
) -> None:
    """``after[i] == sum_j W_ij before[j]`` for every node ``i`` and every float tensor."""
    for name, ref in before[0].items():
        if not ref.is_floating_point():
            continue
        x0 = np.stack([s[name].double().numpy().ravel() for s in before])
        got = np.stack([s[name].double().numpy().ravel() for s in after])
        np.testing.assert_allclose(got, W @ x0, rtol=0, atol=1e-5, err_msg=name)


# --- names, defaults, parameters ----------------------------------------------------------


def test_registered_names_and_paper_defaults() -> None:
    plain = registry.create("dfedsam")
    mgs = registry.create("dfedsam-mgs")
    assert type(plain) is DFedSAM and type(mgs) is DFedSAMMGS
    assert (plain.rho, plain.gossip_steps, plain.local_steps) == (0.05, 1, 10)
    assert (mgs.rho, mgs.gossip_steps, mgs.local_steps) == (0.05, 4, 10)
    assert plain.lr_decay == mgs.lr_decay == 1.0
    assert registry.create("dfedsam-mgs", {"gossip_steps": 2}).describe()["gossip_steps"] == 2


@pytest.mark.parametrize(
    "params",
    [
        {"rho": -0.1},
        {"local_steps": -1},
        {"gossip_steps": 0},
        {"lr_decay": 0.0},
        {"lr_decay": 1.5},
        {"round_timeout": 0.0},
        {"local_epochs": -1.0},
    ],
)
def test_bad_parameters_are_refused(params: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        registry.create("dfedsam", params)


def test_local_epochs_set_k_from_the_number_of_batches() -> None:
    trainer = make_trainer(_configs("ring", 4, "dfedsam", 1, {})[1])
    batches = len(trainer.train_loader)
    assert DFedSAM(local_steps=3).steps_per_round(trainer) == 3
    assert DFedSAM(local_epochs=2).steps_per_round(trainer) == 2 * batches
    assert DFedSAM(local_epochs=0.5).steps_per_round(trainer) == -(-batches // 2)


def test_step_tags_order_round_then_step() -> None:
    tags = [step_tag(r, q, 4) for r in range(3) for q in range(4)]
    assert tags == list(range(12))
    assert split_tag(step_tag(5, 3, 4), 4) == (5, 3)
    for bad in [(0, 4, 4), (0, -1, 4), (-1, 0, 4), (0, 0, 0)]:
        with pytest.raises(ValueError):
            step_tag(*bad)


# --- pure gossip: the mixing the spectral gap predicts ------------------------------------


@pytest.mark.parametrize(("topology", "q"), [("ring", 4), ("torus:4x4", 4), ("ring", 1)])
def test_q_gossip_steps_contract_consensus_by_lambda_to_the_2q(topology: str, q: int) -> None:
    # K = 0: no training, so one round is exactly Q synchronous Metropolis-Hastings steps
    configs = _configs(
        topology, 16, "dfedsam-mgs", 1, {"local_steps": 0, "gossip_steps": q}, init="independent"
    )
    before = _initial_states(configs)
    result, after = _simulate(configs)
    W = metropolis_hastings(build_graph(topology, 16, 2))
    lam = 1.0 - spectral_gap(W)
    cd_before, cd_after = consensus_distance(before), consensus_distance(after)
    assert cd_after == pytest.approx(result.consensus_distance)
    assert cd_after <= lam ** (2 * q) * cd_before
    # and not by luck: the nodes hold exactly W^Q times the initial models
    _assert_states_equal_matrix_times(np.linalg.matrix_power(W, q), before, after)
    assert {r["received"] for n in result.metrics for r in _rounds(result, n)} == {
        q * d for _, d in build_graph(topology, 16, 2).degree()
    }


def test_more_gossip_steps_leave_less_disagreement_after_training() -> None:
    cds = {}
    for q in (1, 4):
        configs = _configs("ring", 8, "dfedsam-mgs", 10, {"local_steps": 5, "gossip_steps": q})
        cds[q] = simulate(configs).consensus_distance
    assert cds[4] < cds[1] / 2


# --- rho = 0 is DFedAvg ---------------------------------------------------------------------


def test_rho_zero_is_local_sgd_plus_gossip_exactly_dpsgd_with_k_steps() -> None:
    k, rounds = 3, 6
    dfedavg = simulate(
        _configs("ring", 6, "dfedsam", rounds, {"rho": 0.0, "local_steps": k}, init="independent")
    )
    dpsgd = simulate(_configs("ring", 6, "dpsgd", rounds, {"local_steps": k}, init="independent"))
    assert dfedavg.digests == dpsgd.digests
    sam = simulate(
        _configs("ring", 6, "dfedsam", rounds, {"rho": 0.05, "local_steps": k}, init="independent")
    )
    assert sam.digests != dpsgd.digests  # rho > 0 really does take SAM steps


# --- tags keep the gossip steps apart -------------------------------------------------------


class _Context:
    """Just enough of :class:`rumor.algorithms.base.Context` for one rule's gossip step."""

    def __init__(self, node_id: str, peers: dict[str, int], model: nn.Module) -> None:
        self.node_id = node_id
        self._peers = sorted(peers)
        self.model = model
        self.lock = asyncio.Lock()
        self.sent: list[tuple[str, Message]] = []
        self.logs: list[str] = []

    def neighbors(self) -> list[str]:
        return list(self._peers)

    all_neighbors = present_neighbors = neighbors
    round = 0

    def peer_round(self, peer: str) -> int | None:
        return None

    def on_membership_change(self, callback: Any) -> None:
        pass

    @property
    def degree(self) -> int:
        return len(self._peers)

    def message(
        self, kind: str, *, round: int = 0, bundle: Bundle | None = None, **fields: Any
    ) -> Message:
        return Message(kind=kind, sender=self.node_id, round=round, bundle=bundle, **fields)

    async def send(self, peer: str, msg: Message, timeout: float | None = None) -> bool:
        self.sent.append((peer, msg))
        return True

    def log(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        self.logs.append(msg % args)


def _scalar_model(value: float) -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(value)
    return model


def _model_message(
    sender: str, value: float, round: int, step: int, steps: int, degree: int = 1, tag=None
) -> Message:
    tensors = {"weight": torch.full((1, 1), value)}
    meta = {"degree": degree, "round": round, "step": step, "steps": steps}
    return Message(
        kind=MODEL_KIND,
        sender=sender,
        round=step_tag(round, step, steps) if tag is None else tag,
        bundle=Bundle(tensors, meta),
    )


def test_a_message_for_step_q_plus_1_waits_for_step_q_plus_1() -> None:
    # two nodes a - b, both of degree 1: each step is z_a <- (z_a + z_b) / 2
    rule = DFedSAMMGS(gossip_steps=2, round_timeout=30.0)
    ctx = _Context("a", {"b": 1}, _scalar_model(0.0))
    state = mixable(ctx.model.state_dict())

    async def scenario() -> tuple[tuple[int, float | None], tuple[int, float | None]]:
        # b is fast: its step-1 model arrives before its step-0 model
        await rule.on_message(ctx, _model_message("b", 10.0, 0, 1, 2))
        first = asyncio.ensure_future(rule.gossip(ctx, state, 0, 0))
        await asyncio.sleep(0)  # a now waits for step 0; the step-1 model must not do
        assert not first.done()
        await rule.on_message(ctx, _model_message("b", 2.0, 0, 0, 2))
        got0 = await first
        assert float(state["weight"]) == 1.0  # (0 + 2) / 2: step 0 mixed b's step-0 model
        got1 = await rule.gossip(ctx, state, 0, 1)  # already there: no waiting
        return got0, got1

    got0, got1 = run(scenario(), timeout=20)
    assert float(state["weight"]) == 5.5  # (1 + 10) / 2
    assert (got0[0], got1[0]) == (1, 1)
    assert [m.round for _, m in ctx.sent] == [0, 1]
    assert [(m.bundle.meta["round"], m.bundle.meta["step"]) for _, m in ctx.sent] == [
        (0, 0),
        (0, 1),
    ]


def test_a_late_message_of_a_finished_step_is_not_mixed_later() -> None:
    rule = DFedSAMMGS(gossip_steps=2, round_timeout=0.05)
    ctx = _Context("a", {"b": 1}, _scalar_model(0.0))
    state = mixable(ctx.model.state_dict())

    async def scenario() -> None:
        await rule.gossip(ctx, state, 0, 0)  # b's model never comes: times out
        await rule.on_message(ctx, _model_message("b", 8.0, 0, 0, 2))  # too late
        await rule.on_message(ctx, _model_message("b", 4.0, 0, 1, 2))
        await rule.gossip(ctx, state, 0, 1)

    run(scenario(), timeout=20)
    assert float(state["weight"]) == 2.0  # only the step-1 model: (0 + 4) / 2
    assert any("no model from b" in line for line in ctx.logs)


def test_messages_with_another_q_or_an_inconsistent_tag_are_refused() -> None:
    rule = DFedSAMMGS(gossip_steps=4)
    ctx = _Context("a", {"b": 1}, _scalar_model(0.0))

    async def refuse(msg: Message) -> Rejected:
        with pytest.raises(Rejected) as info:
            await rule.on_message(ctx, msg)
        return info.value

    async def scenario() -> list[Rejected]:
        return [
            await refuse(_model_message("b", 1.0, 0, 1, 2)),  # sender runs Q = 2
            await refuse(_model_message("b", 1.0, 1, 0, 4, tag=3)),  # tag says round 0 step 3
            await refuse(_model_message("b", 1.0, 0, 0, 4, degree=0)),
        ]

    errors = run(scenario(), timeout=20)
    assert [e.code for e in errors] == [
        Code.FAILED_PRECONDITION,
        Code.INVALID_ARGUMENT,
        Code.INVALID_ARGUMENT,
    ]


# --- failures ----------------------------------------------------------------------------


def test_a_dead_neighbours_weight_goes_to_self(caplog: pytest.LogCaptureFixture) -> None:
    n, dead, q = 6, 3, 2
    configs = _configs(
        "ring",
        n,
        "dfedsam-mgs",
        1,
        {"local_steps": 0, "gossip_steps": q},
        init="independent",
        startup_wait=0.5,
    )

    async def crash(network: InProcNetwork, nodes: dict[str, Node]) -> None:
        network.set_down(node_name(dead))  # before anyone starts

    before = _initial_states(configs)
    with caplog.at_level(logging.INFO, logger="rumor.node"):
        result, after = _simulate(configs, crash)
    # the live graph is a path 4-5-0-1-2; node 3 keeps its own model
    ring = build_graph("ring", n, 2)
    W = metropolis_hastings(ring)
    for j in (2, 4):
        W[j, j] += W[j, dead]
        W[j, dead] = W[dead, j] = 0.0
    W[dead, dead] = 1.0
    assert np.allclose(W.sum(axis=1), 1.0)
    _assert_states_equal_matrix_times(np.linalg.matrix_power(W, q), before, after)
    for j in (2, 4):
        (rec,) = _rounds(result, node_name(j))
        assert (rec["received"], rec["missing"]) == (q, q)
    assert "node-3; their weight goes to self" in caplog.text


def test_a_node_back_from_an_outage_catches_up_with_its_neighbours() -> None:
    rounds, lag = 150, 2
    configs = _configs(
        "ring",
        6,
        "dfedsam-mgs",
        rounds,
        {"local_steps": 1, "gossip_steps": 2, "round_timeout": 0.2, "catch_up_lag": lag},
        startup_wait=0.5,
    )
    victim = "node-0"

    async def outage(network: InProcNetwork, nodes: dict[str, Node]) -> None:
        me, far = nodes[victim], nodes["node-3"]
        for _ in range(100_000):  # virtual-time polling, bounded
            if me.ctx.round >= 5:
                break
            await asyncio.sleep(0.001)
        network.set_down(victim)
        for _ in range(100_000):
            if far.ctx.round >= me.ctx.round + 30:
                break
            await asyncio.sleep(0.001)
        network.set_down(victim, False)

    result, _ = _simulate(configs, outage)
    seen = [r["round"] for r in _rounds(result, victim)]
    jumps = [b - a for a, b in itertools.pairwise(seen)]
    assert max(jumps) > lag + 1, "the victim never jumped ahead"
    assert seen[-1] == rounds - 1
    assert all(_rounds(result, c.node_id)[-1]["round"] == rounds - 1 for c in configs)
    # it continued from its neighbours' model, not from its stale one
    accuracy = {s["node"]: s["accuracy"] for s in result.summaries}
    others = [a for node, a in accuracy.items() if node != victim]
    assert abs(accuracy[victim] - sum(others) / len(others)) < 0.05


def test_lr_decays_per_round() -> None:
    configs = _configs("ring", 4, "dfedsam", 5, {"local_steps": 1, "lr_decay": 0.5})
    result = simulate(configs)
    lrs = [r["lr"] for r in _rounds(result, "node-1")]
    assert lrs == pytest.approx([0.05 * 0.5**t for t in range(5)])


def test_dfedsam_mgs_learns_digits_in_simulation() -> None:
    configs = _configs("ring", 8, "dfedsam-mgs", 30, {"local_steps": 5}, lr=0.2)
    before = sum(make_trainer(c).evaluate()["accuracy"] for c in configs) / len(configs)
    result = simulate(configs)
    assert before < 0.3
    assert result.mean_accuracy > 0.8
