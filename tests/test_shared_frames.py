"""Specification of SharedFrames: a message sent to several peers at once is encoded once,
every reader still sees exactly the frames ``message_to_frames`` would give, and frames are
kept only while a registered reader still needs them."""

from __future__ import annotations

import asyncio
import itertools
import socket

import pytest
import torch

from rumor.protocol import codec, framing
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import PeerUnavailable
from rumor.protocol.grpc_transport import GrpcTransport
from rumor.protocol.retry import Retry
from rumor.protocol.transport import NodeService
from rumor.protocol.v1 import node_pb2

CHUNK = 1000


def message() -> Message:
    g = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(37, 41, generator=g),
        "b": torch.randn(1000, generator=g, dtype=torch.float64),
        "c": torch.arange(7, dtype=torch.int16),
        "empty": torch.zeros(0),
    }
    return Message(kind="gossip.model", sender="n0", round=4, bundle=Bundle(tensors, {"d": 2}))


def expected_frames(msg: Message) -> list[bytes]:
    return list(framing.message_to_frames(msg, chunk_size=CHUNK))


def test_chunk_parts_from_an_offset_equal_the_tail_of_all_chunks() -> None:
    enc = codec.encode(message().bundle)  # type: ignore[arg-type]
    whole = [b"".join(p) for p in enc.chunk_parts(CHUNK)]
    for i in range(len(whole)):
        tail = [b"".join(p) for p in enc.chunk_parts(CHUNK, start=i * CHUNK)]
        assert tail == whole[i:]
    with pytest.raises(ValueError):
        next(enc.chunk_parts(CHUNK, start=-1))


def test_readers_advancing_together_share_every_frame_and_hold_at_most_one() -> None:
    msg = message()
    want = expected_frames(msg)
    shared = framing.SharedFrames(msg, chunk_size=CHUNK)
    readers = [shared.reader() for _ in range(3)]
    got: list[list[bytes]] = [[], [], []]
    for _ in range(len(want)):
        for out, reader in zip(got, readers, strict=True):
            out.append(next(reader))
            assert shared.cached_frames <= 1
    for reader in readers:
        assert next(reader, None) is None
    assert got == [want, want, want]
    assert shared.frames_built == shared.n_chunks == len(want) - 2  # envelope, digest
    assert shared.open_readers == 0 and shared.cached_frames == 0


def test_a_lagging_reader_gets_every_frame_then_nothing_is_kept() -> None:
    msg = message()
    want = expected_frames(msg)
    shared = framing.SharedFrames(msg, chunk_size=CHUNK)
    slow, fast = shared.reader(), shared.reader()
    first = next(slow)
    assert list(fast) == want
    assert shared.cached_frames == shared.n_chunks  # all kept for the slow reader
    assert [first, *slow] == want
    assert shared.frames_built == shared.n_chunks
    assert shared.cached_frames == 0 and shared.open_readers == 0


def test_a_late_reader_rebuilds_dropped_frames_identically() -> None:
    msg = message()
    want = expected_frames(msg)
    shared = framing.SharedFrames(msg, chunk_size=CHUNK)
    assert list(shared.reader()) == want  # alone: nothing cached behind it
    assert shared.cached_frames == 0
    assert list(shared.reader()) == want  # a retry: frames rebuilt from the same digest
    assert shared.frames_built == 2 * shared.n_chunks


def test_a_reader_closed_early_releases_what_it_was_owed() -> None:
    msg = message()
    shared = framing.SharedFrames(msg, chunk_size=CHUNK)
    quitter, other = shared.reader(), shared.reader()
    next(quitter)
    next(other)
    next(other)  # builds chunk 0 and keeps it for the quitter
    assert shared.cached_frames == 1
    quitter.close()
    assert shared.cached_frames == 0 and shared.open_readers == 1
    assert list(other) == expected_frames(msg)[2:]
    assert shared.open_readers == 0


def test_interleavings_of_three_readers_always_give_the_same_frames() -> None:
    msg = message()
    want = expected_frames(msg)
    for order in itertools.islice(itertools.permutations([0, 0, 1, 1, 2, 2, 0, 1, 2]), 0, 200, 7):
        shared = framing.SharedFrames(msg, chunk_size=CHUNK)
        readers = [shared.reader() for _ in range(3)]
        got: list[list[bytes]] = [[], [], []]
        for i in order:  # a few steps in this order, then each reader to the end
            frame = next(readers[i], None)
            if frame is not None:
                got[i].append(frame)
        for i, reader in enumerate(readers):
            got[i].extend(reader)
        assert got == [want, want, want]
        assert shared.cached_frames == 0 and shared.open_readers == 0


class Sink(NodeService):
    def __init__(self) -> None:
        self.got: list[Message] = []

    async def handle_message(self, msg: Message) -> Message | None:
        self.got.append(msg)
        return None

    async def handle_ping(self, ping: node_pb2.Ping) -> node_pb2.Pong:
        return node_pb2.Pong()

    def status(self) -> node_pb2.StatusReply:
        return node_pb2.StatusReply()


def test_one_message_sent_to_two_peers_at_once_is_encoded_once_over_grpc() -> None:
    async def scenario() -> None:
        sinks = [Sink(), Sink()]
        servers = [GrpcTransport(chunk_size=CHUNK) for _ in sinks]
        client = GrpcTransport(chunk_size=CHUNK)
        addresses = [await t.start(s) for t, s in zip(servers, sinks, strict=True)]
        await client.start(Sink())
        built: list[framing.SharedFrames] = []
        original = framing.SharedFrames.__init__

        def spy(self: framing.SharedFrames, *args: object, **kwargs: object) -> None:
            original(self, *args, **kwargs)  # type: ignore[arg-type]
            built.append(self)

        framing.SharedFrames.__init__ = spy  # type: ignore[method-assign]
        try:
            msg = message()
            await asyncio.gather(*(client.request(a, msg, 10.0) for a in addresses))
        finally:
            framing.SharedFrames.__init__ = original  # type: ignore[method-assign]
            for t in (*servers, client):
                await t.stop(0.1)
        assert len(built) == 1 and built[0].frames_built == built[0].n_chunks
        assert client._sending == {}
        for sink in sinks:
            (got,) = sink.got
            assert got.bundle is not None and msg.bundle is not None
            for name, t in msg.bundle.tensors.items():
                assert torch.equal(got.bundle.tensors[name], t)

    asyncio.run(scenario())


def test_a_peer_that_is_down_does_not_keep_the_shared_frames_alive() -> None:
    """One live and one unreachable peer at once: the live one gets the whole message, the
    failed stream releases its claims, and nothing stays cached or registered."""

    async def scenario() -> None:
        sink = Sink()
        server = GrpcTransport(chunk_size=CHUNK)
        client = GrpcTransport(chunk_size=CHUNK, retry=Retry(attempts=2, base_s=0.01))
        address = await server.start(sink)
        await client.start(Sink())
        with socket.socket() as s:  # a port nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = f"127.0.0.1:{s.getsockname()[1]}"
        msg = message()
        try:
            results = await asyncio.gather(
                client.request(address, msg, 10.0),
                client.request(dead, msg, 3.0),
                return_exceptions=True,
            )
        finally:
            for t in (server, client):
                await t.stop(0.1)
        assert results[0] is None and isinstance(results[1], PeerUnavailable)
        assert client._sending == {}
        (got,) = sink.got
        assert got.bundle is not None and msg.bundle is not None
        for name, t in msg.bundle.tensors.items():
            assert torch.equal(got.bundle.tensors[name], t)

    asyncio.run(scenario())
