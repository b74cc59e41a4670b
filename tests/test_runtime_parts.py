"""Small parts of the runtime: clocks, retries, config files, the rule registry, health."""

from __future__ import annotations

import asyncio
import itertools
import random
import statistics
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rumor import config as config_io
from rumor.algorithms import registry
from rumor.algorithms.base import MixingRule
from rumor.node.clock import Clock, SimulationDeadlock, run_virtual
from rumor.protocol.bundle import Message
from rumor.protocol.errors import Code, PeerUnavailable
from rumor.protocol.grpc_transport import GrpcTransport
from rumor.protocol.retry import Retry
from tests.conftest import run
from tests.test_transport_conformance import EchoService


def test_virtual_clock_jumps_to_the_next_timer_without_waiting() -> None:
    async def main() -> list[float]:
        clock = Clock()
        stamps: list[float] = []

        async def sleeper(d: float) -> None:
            await clock.sleep(d)
            stamps.append(clock.now())

        await asyncio.gather(*(sleeper(d) for d in (3600.0, 0.5, 60.0)))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(100.0), 7.0)
        stamps.append(clock.now())
        return stamps

    started = time.perf_counter()
    stamps = run_virtual(main())
    assert time.perf_counter() - started < 2.0
    assert stamps == [0.5, 60.0, 3600.0, 3607.0]


def test_poisson_ticks_have_the_requested_rate() -> None:
    async def main() -> list[float]:
        clock = Clock()
        times: list[float] = []
        async for t in clock.poisson_ticks(4.0, random.Random(1), lambda: len(times) >= 4000):
            times.append(t)
        return times

    times = run_virtual(main())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert abs(statistics.mean(gaps) - 0.25) < 0.02
    assert abs(statistics.stdev(gaps) - 0.25) < 0.03  # exponential: std equals mean


def test_a_simulation_that_can_never_progress_is_reported() -> None:
    async def stuck() -> None:
        await asyncio.Event().wait()

    with pytest.raises(SimulationDeadlock):
        run_virtual(stuck(), idle_real_timeout_s=0.2)


def test_retry_backs_off_with_full_jitter_and_gives_up() -> None:
    retry = Retry(attempts=4, base_s=0.01, cap_s=0.05, rng=random.Random(0))
    waits = [retry.backoff(i) for i in range(6)]
    assert all(0 <= w <= min(0.05, 0.01 * 2**i) for i, w in enumerate(waits))
    calls: list[float | None] = []

    async def failing(remaining: float | None) -> None:
        calls.append(remaining)
        raise PeerUnavailable("p", "down")

    with pytest.raises(PeerUnavailable):
        run(retry.run(failing, lambda e: isinstance(e, PeerUnavailable), budget_s=5.0))
    assert len(calls) == 4
    assert all(c is not None and 0 < c <= 5.0 for c in calls)
    calls.clear()
    with pytest.raises(PeerUnavailable):
        run(retry.run(failing, lambda e: False, budget_s=5.0))
    assert len(calls) == 1  # not retryable: one call only


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = config_io.NodeConfig(
        node_id="node-3",
        peers={"node-2": "10.0.0.2:50051", "node-4": "10.0.0.4:50051"},
        params={"local_steps": 2, "round_timeout": 4.5, "mode": "x", "on": True},
        advertise="10.0.0.3:50051",
    )
    path = tmp_path / "node.toml"
    path.write_text(config_io.dumps(cfg))
    assert config_io.load(path) == cfg
    with pytest.raises(ValueError, match="unknown config keys: lr_typo"):
        config_io.from_dict({"lr_typo": 1})
    assert config_io.parse_params(["a=1", "b=0.5", "c=true", "d=ring"]) == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "ring",
    }


class _ThirdPartyRule(MixingRule):
    name = "third-party"

    async def run(self, ctx: object) -> None:
        return None


def test_registry_finds_builtins_and_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    assert {"dpsgd", "async-gossip"} <= set(registry.available())
    rule = registry.create("dpsgd", {"local_steps": 3})
    assert rule.describe()["local_steps"] == 3
    with pytest.raises(ValueError, match="bad parameters"):
        registry.create("dpsgd", {"no_such_parameter": 1})
    with pytest.raises(KeyError, match="unknown algorithm"):
        registry.get("nope")

    class _EP:
        name = "third-party"
        value = f"{__name__}:_ThirdPartyRule"

    monkeypatch.setattr(registry, "entry_points", lambda group: [_EP()])
    assert registry.get("third-party") is _ThirdPartyRule


def test_grpc_node_serves_the_standard_health_service() -> None:
    async def go() -> None:
        server = GrpcTransport(node_id="h")
        address = await server.start(EchoService())
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                for service in ("", "rumor.v1.Node"):
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await server.stop()

    run(go())


def test_unreachable_address_fails_fast_after_bounded_retries() -> None:
    async def go() -> float:
        client = GrpcTransport(retry=Retry(attempts=3, base_s=0.01, cap_s=0.02))
        started = time.perf_counter()
        with pytest.raises(PeerUnavailable) as info:
            await client.request("127.0.0.1:9", Message(kind="x"), 5.0)
        await client.stop()
        assert info.value.code in {Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED}
        return time.perf_counter() - started

    assert run(go()) < 5.0


def test_compute_runs_short_jobs_inline_and_long_ones_on_the_worker_thread() -> None:
    """A job kind is first run on the worker thread and timed; kinds measured under
    INLINE_COMPUTE_S then run on the event loop (grad mode on, as on a fresh thread)."""
    import functools
    import threading

    import torch

    from rumor.api import make_node
    from rumor.config import NodeConfig
    from rumor.node import runtime
    from rumor.protocol.inproc import InProcNetwork, InProcTransport

    def short() -> tuple[str, bool]:
        return threading.current_thread().name, torch.is_grad_enabled()

    def long() -> str:
        time.sleep(3 * runtime.INLINE_COMPUTE_S)
        return threading.current_thread().name

    async def main() -> tuple[list[tuple[str, bool]], list[str], str]:
        cfg = NodeConfig(node_id="n0", dataset="digits", model="mlp:8", n_nodes=1)
        node = make_node(cfg, InProcTransport(InProcNetwork(), "n0"))
        ctx = node.ctx
        try:
            with torch.no_grad():  # the loop thread's grad mode must not leak into a job
                shorts = [await ctx.compute(short) for _ in range(3)]
            longs = [await ctx.compute(long) for _ in range(3)]
        finally:
            assert node.executor is not None
            node.executor.shutdown(wait=True)
        return shorts, longs, threading.current_thread().name

    shorts, longs, loop_thread = run(main())
    assert runtime._job_kind(lambda: 1) != runtime._job_kind(lambda: 2)
    assert runtime._job_kind(short) == runtime._job_kind(functools.partial(short))
    assert shorts[0][0].startswith("train-n0")  # unknown cost: the worker thread
    assert [name for name, _ in shorts[1:]] == [loop_thread, loop_thread]
    assert all(grad for _, grad in shorts)
    assert all(name.startswith("train-n0") for name in longs)
