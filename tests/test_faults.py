"""Faults in simulated time: a dead or cut-off peer never holds a round for longer than
failure detection, laggards catch up whatever their pattern, and a finished node lingers
while its neighbours still train.

Every scenario runs real :class:`~rumor.node.runtime.Node` objects on the in-process network
and a virtual clock (``rumor.node.simulation``), so seconds of faults cost milliseconds.
``set_silent`` drops a node's traffic without an answer, as a pulled cable does: calls to it
hang until their deadline unless something cuts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from rumor.algorithms.base import PulledModel
from rumor.algorithms.rounds import catch_up
from rumor.cluster import build_graph, cluster_configs, free_ports, node_name
from rumor.config import NodeConfig
from rumor.node.runtime import Node
from rumor.node.simulation import simulate
from rumor.protocol.channels import LAN, Reconnect
from rumor.protocol.errors import PeerUnavailable
from rumor.protocol.grpc_transport import GrpcTransport
from rumor.protocol.inproc import InProcNetwork
from rumor.protocol.v1 import node_pb2
from tests.conftest import run
from tests.test_transport_conformance import EchoService

ROUND_TIMEOUT = 5.0
PERIOD, MISSES = 0.5, 3
#: Longest a silent neighbour stays alive in a node's view: ``misses`` silent periods, plus
#: the ping in flight when it fell silent (Membership.run).
DETECTION_S = PERIOD * (MISSES + 1)
STEP_S = 0.05


def _configs(topology: str, n: int, rounds: int, algorithm: str = "dpsgd", **extra: Any):
    params: dict[str, Any] = {"round_timeout": ROUND_TIMEOUT} if algorithm == "dpsgd" else {}
    base = NodeConfig(
        algorithm=algorithm,
        params=params,
        rounds=rounds,
        model="logreg",
        lr=0.2,
        eval_every=0,
        heartbeat_period=PERIOD,
        heartbeat_misses=MISSES,
        request_timeout=30.0,
        **extra,
    )
    return cluster_configs(build_graph(topology, n, 0), base, address_of=node_name)


def _round_times(records: list[dict[str, Any]]) -> list[tuple[float, int]]:
    return [(r["elapsed"], r["round"]) for r in records if r["event"] == "round"]


def _rounds_between(records: list[dict[str, Any]], start: float, end: float) -> int:
    return sum(1 for t, _ in _round_times(records) if start <= t < end)


def _longest_gap(records: list[dict[str, Any]], start: float, end: float) -> float:
    times = [t for t, _ in _round_times(records) if start <= t <= end]
    return max((b - a for a, b in itertools.pairwise(times)), default=end - start)


def _silence(
    silent: list[str], seconds: float, fault: dict[str, float]
) -> Callable[[InProcNetwork, dict[str, Node]], Awaitable[None]]:
    """A scenario: once node-0 is past round 150, the ``silent`` nodes' traffic is dropped for
    ``seconds``; the virtual times it began and ended go to ``fault``."""

    async def scenario(net: InProcNetwork, nodes: dict[str, Node]) -> None:
        loop = asyncio.get_running_loop()
        while nodes["node-0"].ctx.round < 150:
            await asyncio.sleep(0.05)
        fault["start"] = loop.time()
        for node in silent:
            net.set_silent(node)
        await asyncio.sleep(seconds)
        for node in silent:
            net.set_silent(node, False)
        fault["end"] = loop.time()

    return scenario


def test_a_silent_neighbour_holds_a_round_no_longer_than_detection() -> None:
    """hypercube:3, node-3's link dies for 12 s: its neighbours' sends to it hang (no answer)
    until membership marks it dead, and not a second longer; the survivors then run at full
    speed (each keeps a live neighbour)."""
    fault: dict[str, float] = {}
    scenario = _silence(["node-3"], 12.0, fault)
    result = simulate(_configs("hypercube:3", 8, 450), step_cost_s=STEP_S, scenario=scenario)
    start, end = fault["start"], fault["end"]
    for peer in ("node-1", "node-2", "node-7"):  # node-3's neighbours in the hypercube
        records = result.metrics[peer]
        # the one stall: the round in flight when the link died waits for detection
        assert _longest_gap(records, start, end) <= DETECTION_S + 0.5, peer
        before = _rounds_between(records, start - 5.0, start) / 5.0
        after = _rounds_between(records, start + DETECTION_S, end) / (end - start - DETECTION_S)
        assert after >= 0.5 * before, (peer, before, after)
    assert all(s["round"] == 450 for s in result.summaries)


def test_two_adjacent_laggards_catch_up_and_the_cluster_returns_to_full_rate() -> None:
    """On a ring, two adjacent nodes are cut off for 10 s: each crawls alone (one round per
    timeout) while the rest run on. After the heal neither may hold the other back: both
    jump to the cluster's round with models of neighbours that are there, and the whole
    ring is back to its fault-free rate within detection + 5 s."""
    fault: dict[str, float] = {}
    scenario = _silence(["node-3", "node-4"], 10.0, fault)
    result = simulate(_configs("ring", 8, 650), step_cost_s=STEP_S, scenario=scenario)
    start, end = fault["start"], fault["end"]
    for node in ("node-3", "node-4"):
        jumps = [r for r in result.metrics[node] if r["event"] == "catch_up"]
        assert jumps and jumps[0]["elapsed"] <= end + DETECTION_S + 5.0, node
        assert jumps[0]["to_round"] > jumps[0]["from_round"] + 100, jumps[0]
    recovered = end + DETECTION_S + 5.0
    for node, records in result.metrics.items():
        before = _rounds_between(records, start - 5.0, start) / 5.0
        after = _rounds_between(records, recovered, recovered + 5.0) / 5.0
        assert after >= 0.8 * before, (node, before, after)
    assert all(s["round"] == 650 for s in result.summaries)


class _Ctx:
    """The slice of a node's context that catch_up uses."""

    def __init__(self, rounds: dict[str, int], pulled: dict[str, int]) -> None:
        self.round = 3
        self._rounds = rounds
        self._pulled = pulled
        self.lock = asyncio.Lock()
        self.notes: list[dict[str, Any]] = []

    def serving_neighbors(self) -> list[str]:
        return sorted(self._rounds)

    def peer_round(self, peer: str) -> int | None:
        return self._rounds[peer]

    async def pull_model(self, peer: str, timeout: float | None = None) -> PulledModel | None:
        if peer not in self._pulled:
            return None
        value = float(self._pulled[peer])
        return PulledModel(peer, self._pulled[peer], False, {"w": torch.full((2,), value)})

    def log(self, msg: str, *args: Any, **kw: Any) -> None:
        pass

    def note(self, event: str, **fields: Any) -> None:
        self.notes.append({"event": event, **fields})


def test_catch_up_jumps_on_any_neighbour_ahead_to_a_round_its_models_have_reached() -> None:
    # a is behind too (a laggard beside this one): it must not hold this node back
    ctx = _Ctx({"a": 4, "b": 40, "c": 41, "d": 30}, {"a": 4, "b": 40, "c": 41, "d": 30})
    state = {"w": torch.zeros(2)}
    target = run(catch_up(ctx, state, 3, 2))  # type: ignore[arg-type]
    # b and c are within lag of the most advanced pull (41); d (30) is too far behind it;
    # its own model (0) keeps one share of three
    assert target == 40 and ctx.round == 40
    assert torch.allclose(state["w"], torch.full((2,), 27.0))
    assert ctx.notes == [
        {"event": "catch_up", "from_round": 3, "to_round": 40, "peers": ["b", "c"]}
    ]


def test_catch_up_trusts_the_pulled_round_over_a_heartbeat_and_stays_when_pulls_fail() -> None:
    # heartbeats said b was far ahead, but its model is at round 4: no jump
    ctx = _Ctx({"b": 40, "c": 50}, {"b": 4})
    state = {"w": torch.zeros(2)}
    assert run(catch_up(ctx, state, 3, 2)) == 3  # type: ignore[arg-type]
    assert torch.equal(state["w"], torch.zeros(2)) and not ctx.notes
    # nobody ahead: nothing pulled, nothing changed
    ctx = _Ctx({"b": 5, "c": 4}, {})
    assert run(catch_up(ctx, state, 3, 2)) == 3  # type: ignore[arg-type]


def test_a_finished_node_lingers_while_a_neighbour_trains_and_leaves_when_all_are_done() -> None:
    """async-gossip on a ring of 4: node-0 has a quarter of the others' budget. It keeps
    answering exchanges after its last round (its neighbours still pick it) and leaves when
    both neighbours have finished; with linger_for_neighbours = 0 it leaves at once."""

    def configs(linger_for_neighbours: float) -> list[NodeConfig]:
        cfgs = _configs(
            "ring", 4, 400, algorithm="async-gossip", linger_for_neighbours=linger_for_neighbours
        )
        return [cfgs[0].replace(rounds=100), *cfgs[1:]]

    def event(records: list[dict[str, Any]], name: str) -> dict[str, Any]:
        return next(r for r in records if r["event"] == name)

    lingering = simulate(configs(60.0), step_cost_s=STEP_S)
    mine = lingering.metrics["node-0"]
    done, left = event(mine, "finished")["elapsed"], event(mine, "stop")["elapsed"]
    last_neighbour = max(
        event(lingering.metrics[n], "finished")["elapsed"] for n in ("node-1", "node-3")
    )
    assert done < last_neighbour - 1.0  # it really finished early
    assert last_neighbour <= left <= last_neighbour + 1.0  # and left once they were done
    # it kept answering exchanges, so its model still moved after its last round
    last_round = [r for r in mine if r["event"] == "round"][-1]
    assert event(mine, "stop")["exchanges"] == last_round["exchanges"]  # it started none
    assert event(mine, "stop")["digest"] != last_round["digest"]

    alone = simulate(configs(0.0), step_cost_s=STEP_S)
    mine = alone.metrics["node-0"]
    assert event(mine, "stop")["elapsed"] - event(mine, "finished")["elapsed"] < 0.1


def _seconds_to_reach(reconnect: Reconnect, down_s: float) -> float:
    """A client pings a port where nothing listens for ``down_s`` seconds (its channel backs
    off), then a server starts there: seconds from the server's start to the first answer."""

    async def go() -> float:
        address = f"127.0.0.1:{free_ports(1)[0]}"
        client = GrpcTransport(node_id="client", reconnect=reconnect)
        server = GrpcTransport(address, node_id="server")
        loop = asyncio.get_running_loop()
        try:
            end = loop.time() + down_s
            while loop.time() < end:
                with contextlib.suppress(PeerUnavailable):
                    await client.ping(address, node_pb2.Ping(sender="client"), 0.5)
                await asyncio.sleep(0.05)
            await server.start(EchoService())
            started = loop.time()
            while loop.time() - started < 30.0:
                try:
                    await client.ping(address, node_pb2.Ping(sender="client"), 0.5)
                    return loop.time() - started
                except PeerUnavailable:
                    await asyncio.sleep(0.05)
            return float("inf")
        finally:
            await client.stop()
            await server.stop()

    return run(go())


def test_a_peer_that_comes_back_is_reached_within_the_reconnect_backoff() -> None:
    # six seconds of refused connections grow gRPC's default backoff (1 s x 1.6^k) past 3 s;
    # the LAN defaults cap it at 1 s
    assert _seconds_to_reach(LAN, 6.0) <= LAN.max_s + 0.5


def test_a_channel_replaced_by_reconnect_dials_at_once() -> None:
    """With gRPC's own slow backoff, ``Transport.reconnect`` (what a node does when a dead
    neighbour calls it) makes the next call dial without waiting out the backoff."""

    slow = Reconnect(initial_s=5.0, max_s=60.0, connect_timeout_s=5.0)

    async def go() -> float:
        address = f"127.0.0.1:{free_ports(1)[0]}"
        client = GrpcTransport(node_id="client", reconnect=slow)
        server = GrpcTransport(address, node_id="server")
        loop = asyncio.get_running_loop()
        try:
            with contextlib.suppress(PeerUnavailable):  # fails, and backs off for 5 s
                await client.ping(address, node_pb2.Ping(sender="client"), 0.5)
            await server.start(EchoService())
            started = loop.time()
            with pytest.raises(PeerUnavailable):  # still backing off
                await client.ping(address, node_pb2.Ping(sender="client"), 0.5)
            client.reconnect(address)
            await client.ping(address, node_pb2.Ping(sender="client"), 2.0)
            return loop.time() - started
        finally:
            await client.stop()
            await server.stop()

    assert run(go()) < 2.0
