"""One conformance suite, run against the gRPC and the in-process transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest
import torch

from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, PeerUnavailable, Rejected
from rumor.protocol.grpc_transport import GrpcTransport
from rumor.protocol.inproc import InProcNetwork, InProcTransport
from rumor.protocol.transport import Transport
from rumor.protocol.v1 import node_pb2
from tests.conftest import run


class EchoService:
    """A node stand-in: echoes bundles, acks, refuses, or stalls, by message kind."""

    def __init__(self) -> None:
        self.seen: list[Message] = []

    async def handle_message(self, msg: Message) -> Message | None:
        self.seen.append(msg)
        if msg.kind == "echo":
            return Message(kind="echo.reply", sender="server", round=msg.round, bundle=msg.bundle)
        if msg.kind == "ack":
            return None
        if msg.kind == "refuse":
            raise Rejected(Code.FAILED_PRECONDITION, "refused: tensor 'w' is wrong")
        if msg.kind == "stall":
            await asyncio.sleep(30)
        return None

    async def handle_ping(self, ping: node_pb2.Ping) -> node_pb2.Pong:
        return node_pb2.Pong(node_id="server", round=ping.round + 1, degree=3)

    def status(self) -> node_pb2.StatusReply:
        return node_pb2.StatusReply(node_id="server", round=7)


Pair = tuple[Transport, Transport, str, EchoService]


@asynccontextmanager
async def grpc_pair() -> AsyncIterator[Pair]:
    server, client, service = GrpcTransport(node_id="server"), GrpcTransport(), EchoService()
    address = await server.start(service)
    try:
        yield server, client, address, service
    finally:
        await client.stop()
        await server.stop()


@asynccontextmanager
async def inproc_pair() -> AsyncIterator[Pair]:
    net = InProcNetwork(wire=True)
    server, client, service = (
        InProcTransport(net, "server"),
        InProcTransport(net, "client"),
        EchoService(),
    )
    address = await server.start(service)
    try:
        yield server, client, address, service
    finally:
        await server.stop()


PAIRS: dict[str, Callable[[], object]] = {"grpc": grpc_pair, "inproc": inproc_pair}


@pytest.fixture(params=sorted(PAIRS))
def pair(request: pytest.FixtureRequest) -> Callable[[], object]:
    return PAIRS[request.param]


def sample_bundle() -> Bundle:
    g = torch.Generator().manual_seed(0)
    return Bundle(
        {
            "w": torch.randn(300, 70, generator=g),
            "b16": torch.randn(33, generator=g).to(torch.bfloat16),
            "h": torch.randn(5, 5, generator=g).half(),
            "d": torch.randn(2, 3, generator=g).double(),
            "i": torch.arange(10, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros(0, 4),
        },
        {"degree": 2, "lr": 0.1, "name": "x", "flag": True},
    )


def test_request_round_trips_every_dtype_and_meta(pair) -> None:
    async def go() -> None:
        async with pair() as (_, client, address, service):
            sent = sample_bundle()
            reply = await client.request(
                address, Message(kind="echo", sender="c", round=4, bundle=sent), 5.0
            )
            assert reply is not None and reply.kind == "echo.reply" and reply.round == 4
            assert reply.bundle is not None
            assert reply.bundle.meta == sent.meta
            for name, t in sent.tensors.items():
                got = reply.bundle.tensors[name]
                assert got.dtype == t.dtype and got.shape == t.shape
                assert torch.equal(got, t)
                assert got.data_ptr() != t.data_ptr() or t.numel() == 0
            assert service.seen[0].sender == "c"

    run(go())


def test_typed_payload_arrives_as_any(pair) -> None:
    async def go() -> None:
        async with pair() as (_, client, address, service):
            await client.request(
                address, Message(kind="ack", payload=node_pb2.Ping(sender="p", round=9)), 5.0
            )
            got = node_pb2.Ping()
            assert service.seen[0].payload.Unpack(got)
            assert got.sender == "p" and got.round == 9

    run(go())


def test_ack_is_none(pair) -> None:
    async def go() -> None:
        async with pair() as (_, client, address, _svc):
            assert await client.request(address, Message(kind="ack"), 5.0) is None

    run(go())


def test_refusal_reaches_the_caller_with_its_code_and_reason(pair) -> None:
    async def go() -> None:
        async with pair() as (_server, client, address, _svc):
            with pytest.raises(Rejected) as info:
                await client.request(address, Message(kind="refuse"), 5.0)
            assert info.value.code == Code.FAILED_PRECONDITION
            assert "tensor 'w' is wrong" in info.value.detail
            # the server keeps serving
            assert await client.request(address, Message(kind="ack"), 5.0) is None

    run(go())


def test_deadline_gives_peer_unavailable(pair) -> None:
    async def go() -> None:
        async with pair() as (_, client, address, _svc):
            with pytest.raises(PeerUnavailable) as info:
                await client.request(address, Message(kind="stall"), 0.3)
            assert info.value.code == Code.DEADLINE_EXCEEDED

    run(go())


def test_unreachable_peer(pair) -> None:
    async def go() -> None:
        async with pair() as (server, client, address, _svc):
            await server.stop()
            with pytest.raises(PeerUnavailable):
                await client.request(address, Message(kind="ack"), 2.0)
            with pytest.raises(PeerUnavailable):
                await client.ping(address, node_pb2.Ping(sender="c"), 1.0)

    run(go())


def test_ping_and_status(pair) -> None:
    async def go() -> None:
        async with pair() as (_, client, address, _svc):
            pong = await client.ping(address, node_pb2.Ping(sender="c", round=1), 2.0)
            assert pong.node_id == "server" and pong.round == 2 and pong.degree == 3
            status = await client.status(address, 2.0)
            assert status.node_id == "server" and status.round == 7

    run(go())


def test_byte_counters_agree_on_both_ends(pair) -> None:
    async def go() -> None:
        async with pair() as (server, client, address, _svc):
            b = Bundle({"w": torch.ones(1000)})
            await client.request(address, Message(kind="echo", bundle=b), 5.0)
            assert client.stats.bytes_out == 4000 and server.stats.bytes_in == 4000
            assert server.stats.bytes_out == 4000 and client.stats.bytes_in == 4000

    run(go())


def test_concurrent_requests_keep_their_own_answers(pair) -> None:
    async def go() -> None:
        async with pair() as (_, client, address, _svc):
            msgs = [
                Message(kind="echo", round=i, bundle=Bundle({"x": torch.full((1000,), float(i))}))
                for i in range(12)
            ]
            replies = await asyncio.gather(*(client.request(address, m, 10.0) for m in msgs))
            for i, r in enumerate(replies):
                assert r is not None and r.round == i
                assert torch.all(r.bundle.tensors["x"] == i)

    run(go())


def test_large_bundle_spans_many_chunks(pair) -> None:
    async def go() -> None:
        async with pair() as (_, client, address, _svc):
            t = torch.randn(3_000_001)  # 12 MB: many 1 MiB chunks and a ragged tail
            r = await client.request(address, Message(kind="echo", bundle=Bundle({"t": t})), 20.0)
            assert r is not None and torch.equal(r.bundle.tensors["t"], t)

    run(go())
