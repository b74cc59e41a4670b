"""Failure detection and rejoin, in simulated time: dead neighbours are skipped, not waited on
forever, and taken back when they answer again."""

from __future__ import annotations

import asyncio

from rumor.cluster import build_graph, cluster_configs, node_name
from rumor.config import NodeConfig
from rumor.node.runtime import Node
from rumor.node.simulation import simulate
from rumor.protocol.inproc import InProcNetwork

ROUND_TIMEOUT = 5.0


def _configs(n: int, rounds: int) -> list[NodeConfig]:
    base = NodeConfig(
        algorithm="dpsgd",
        params={"round_timeout": ROUND_TIMEOUT},
        rounds=rounds,
        model="logreg",
        lr=0.2,
        eval_every=0,
        heartbeat_period=1.0,
        heartbeat_misses=3,
    )
    return cluster_configs(build_graph("ring", n, 0), base, address_of=node_name)


def test_a_dead_neighbour_is_skipped_and_taken_back_when_it_answers() -> None:
    seen: dict[str, object] = {}

    async def scenario(net: InProcNetwork, nodes: dict[str, Node]) -> None:
        watcher = nodes["node-1"]
        while watcher.ctx.round < 20:
            await asyncio.sleep(0.05)
        net.set_down("node-2")
        start = asyncio.get_running_loop().time()
        while "node-2" in watcher.membership.alive():
            await asyncio.sleep(0.05)
        seen["detected_after_s"] = asyncio.get_running_loop().time() - start
        seen["round_when_down"] = watcher.ctx.round
        await asyncio.sleep(20.0)  # twenty seconds of simulated time without node-2
        seen["rounds_while_down"] = watcher.ctx.round - int(seen["round_when_down"])
        net.set_down("node-2", False)
        start = asyncio.get_running_loop().time()
        while "node-2" not in watcher.membership.alive():
            await asyncio.sleep(0.05)
        seen["back_after_s"] = asyncio.get_running_loop().time() - start

    result = simulate(_configs(5, 3000), step_cost_s=0.01, scenario=scenario)
    # detected by a failed exchange or three missed heartbeats, well within a few seconds
    assert float(seen["detected_after_s"]) <= 3 * 1.0 + ROUND_TIMEOUT
    # the others kept going at full speed (a round costs ~10 ms), not one round per timeout
    assert int(seen["rounds_while_down"]) > 20.0 / ROUND_TIMEOUT * 50
    # the next heartbeat brings it back
    assert float(seen["back_after_s"]) <= 1.5
    assert all(s["round"] == 3000 for s in result.summaries)


def test_a_node_with_every_neighbour_unreachable_waits_instead_of_racing_alone() -> None:
    rounds_done: dict[str, int] = {}

    async def scenario(net: InProcNetwork, nodes: dict[str, Node]) -> None:
        lonely = nodes["node-0"]
        while lonely.ctx.round < 5:
            await asyncio.sleep(0.05)
        net.set_down("node-1")
        net.set_down("node-2")
        before = lonely.ctx.round
        await asyncio.sleep(30.0)
        rounds_done["alone"] = lonely.ctx.round - before
        net.set_down("node-1", False)
        net.set_down("node-2", False)

    simulate(_configs(3, 200), step_cost_s=0.01, scenario=scenario)
    # it waits a round timeout per round for neighbours that may come back
    assert rounds_done["alone"] <= 30.0 / ROUND_TIMEOUT + 2


def test_an_exchange_finishing_after_a_leave_does_not_take_the_neighbour_back() -> None:
    """A neighbour said it left while one of our exchanges with it was still in flight; that
    exchange then completes. Waiting for it again would cost every later round its timeout
    (seen as a node that cannot shut down in time), so only its heartbeat brings it back."""
    from rumor.node.clock import Clock
    from rumor.node.membership import Membership

    loop = asyncio.new_event_loop()
    m = Membership("a", {"b": "addr-b", "c": "addr-c"}, Clock(loop))
    loop.close()  # the clock is only read, never slept on
    m.on_leave("b")
    m.on_success("b")  # the late answer of an exchange started before the leave
    assert m.present() == ["c"] and m.alive() == ["c"]
    m.on_success("b", degree=2, round=7, heartbeat=True)  # it restarted and pings again
    assert m.present() == ["b", "c"] and m.alive() == ["b", "c"]
    assert m.peers["b"].round == 7
