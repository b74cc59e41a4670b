"""Simulation: the same nodes, the same rules, in one process on a virtual clock.

Every node is a real :class:`~rumor.node.runtime.Node` on an
:class:`~rumor.protocol.inproc.InProcNetwork`; the event loop is a
:class:`~rumor.node.clock.VirtualTimeLoop`, so heartbeats, timeouts and Poisson clocks run in
simulated time, and compute runs inline with a modelled cost per call. One seed fixes every
random choice: two runs with the same configs give identical metrics.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rumor.config import NodeConfig
from rumor.node.clock import run_virtual
from rumor.node.observe import consensus_distance
from rumor.node.runtime import Node
from rumor.protocol.inproc import InProcNetwork, InProcTransport


@dataclass
class SimulationResult:
    """What a simulated run produced."""

    summaries: list[dict[str, Any]]
    metrics: dict[str, list[dict[str, Any]]]
    consensus_distance: float
    virtual_time_s: float
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def mean_accuracy(self) -> float:
        accs = [s["accuracy"] for s in self.summaries if s.get("accuracy") is not None]
        return sum(accs) / len(accs) if accs else float("nan")


Scenario = Callable[[InProcNetwork, dict[str, Node]], Awaitable[None]]


def simulate(
    configs: list[NodeConfig],
    *,
    latency_s: float = 0.0005,
    bandwidth_bps: float = 1e9,
    step_cost_s: float = 0.01,
    wire: bool = False,
    scenario: Scenario | None = None,
) -> SimulationResult:
    """Run ``configs`` as one simulated cluster; peers' addresses are their node ids.

    ``scenario(network, nodes)`` runs beside the nodes on the same virtual clock: it may
    take nodes down (``network.set_down``), cut links, or stop nodes, to script failures.
    """
    return run_virtual(
        _simulate(configs, latency_s, bandwidth_bps, step_cost_s, wire, scenario),
        idle_real_timeout_s=5.0,
    )


async def _simulate(
    configs: list[NodeConfig],
    latency_s: float,
    bandwidth_bps: float,
    step_cost_s: float,
    wire: bool,
    scenario: Scenario | None,
) -> SimulationResult:
    from rumor.api import make_node, make_trainer
    from rumor.node.data import get_dataset, partition

    first = configs[0]
    dataset = get_dataset(first.dataset, seed=first.seed)
    parts = partition(first.partition, dataset.y_train, first.n_nodes, seed=first.seed)
    network = InProcNetwork(latency_s=latency_s, bandwidth_bps=bandwidth_bps, wire=wire)
    nodes = []
    for cfg in configs:
        transport = InProcTransport(network, cfg.node_id)
        trainer = make_trainer(cfg, dataset, parts)
        nodes.append(
            make_node(cfg, transport, trainer=trainer, simulated=True, step_cost_s=step_cost_s)
        )
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    script = (
        asyncio.ensure_future(scenario(network, {n.node_id: n for n in nodes}))
        if scenario is not None
        else None
    )
    summaries = await asyncio.gather(*(n.run() for n in nodes))
    if script is not None:
        script.cancel()
        await asyncio.gather(script, return_exceptions=True)
    states = [n.trainer.model.state_dict() for n in nodes]
    with torch.no_grad():
        cd = consensus_distance(states)
    return SimulationResult(
        summaries=list(summaries),
        metrics={n.node_id: n.metrics.records for n in nodes},
        consensus_distance=cd,
        virtual_time_s=loop.time() - t0,
        digests={n.node_id: n.model_digest() for n in nodes},
    )
