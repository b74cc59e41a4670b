"""A node answers malformed input with a gRPC status naming the problem, logs it (without a
traceback, rate-limited), stays up, and keeps its model untouched."""

from __future__ import annotations

import logging
import math
import random

import grpc
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from rumor.algorithms.gossip import DPSGD, MODEL_KIND
from rumor.node.runtime import Node
from rumor.node.trainer import Trainer
from rumor.protocol import framing
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.grpc_transport import MAX_SMALL_REQUEST_BYTES, GrpcTransport
from rumor.protocol.v1 import node_pb2
from tests.conftest import run
from tests.test_transport_conformance import EchoService

LIMIT = 1 << 20


def victim() -> Node:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    data = TensorDataset(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    loader = DataLoader(data, batch_size=16)
    trainer = Trainer(model, loader, loader, lr=0.1)
    transport = GrpcTransport(max_bundle_bytes=LIMIT, node_id="victim")
    return Node(
        node_id="victim",
        rule=DPSGD(),
        trainer=trainer,
        transport=transport,
        neighbours={"peer": "127.0.0.1:1"},
    )


def good_message(node: Node, **changes: object) -> Message:
    state = {k: v.clone() for k, v in node.trainer.model.state_dict().items()}
    fields = dict(kind=MODEL_KIND, sender="peer", round=0, algorithm="dpsgd")
    fields.update(changes)
    return Message(bundle=Bundle(state, {"degree": 2}), **fields)  # type: ignore[arg-type]


def frames_of(msg: Message) -> list[bytes]:
    return list(framing.message_to_frames(msg, chunk_size=256))


def with_envelope(frames: list[bytes], edit) -> list[bytes]:
    kind, env = framing.parse_frame(frames[0])
    assert kind == "envelope"
    edit(env)
    return [framing.envelope_frame(env), *frames[1:]]


async def send_raw(address: str, frames: list[bytes]) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_stream("/rumor.v1.Node/Exchange")
        try:
            async for _ in call(iter(frames), timeout=5.0):
                pass
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _unknown_dtype(env: node_pb2.Envelope) -> None:
    env.bundle.tensors[0].dtype = 42


def _shape_disagrees(env: node_pb2.Envelope) -> None:
    del env.bundle.tensors[0].shape[:]
    env.bundle.tensors[0].shape.extend([3, 3])


def _old_version(env: node_pb2.Envelope) -> None:
    env.protocol_version = 99


def _flip_byte(frames: list[bytes]) -> list[bytes]:
    chunk = bytearray(frames[1])
    chunk[-1] ^= 0xFF
    return [frames[0], bytes(chunk), *frames[2:]]


def _flip_last_byte(frames: list[bytes]) -> list[bytes]:
    last = bytearray(frames[-1])
    last[-1] ^= 0xFF
    return [*frames[:-1], bytes(last)]


def _nan_message(node: Node) -> list[bytes]:
    msg = good_message(node)
    first = next(iter(msg.bundle.tensors.values()))  # type: ignore[union-attr]
    first.view(-1)[3] = math.nan
    return frames_of(msg)


def _inf_message(node: Node) -> list[bytes]:
    msg = good_message(node)
    next(iter(msg.bundle.tensors.values())).view(-1)[0] = math.inf  # type: ignore[union-attr]
    return frames_of(msg)


def _oversize(node: Node) -> list[bytes]:
    big = Bundle({"big": torch.zeros(LIMIT // 4 + 1)}, {"degree": 2})
    return frames_of(Message(kind=MODEL_KIND, sender="peer", algorithm="dpsgd", bundle=big))


def _wrong_shape_model(node: Node) -> list[bytes]:
    msg = good_message(node)
    name = next(iter(msg.bundle.tensors))  # type: ignore[union-attr]
    msg.bundle.tensors[name] = torch.zeros(2, 2)  # type: ignore[union-attr]
    return frames_of(msg)


def _extra_tensor(node: Node) -> list[bytes]:
    msg = good_message(node)
    msg.bundle.tensors["surplus"] = torch.zeros(3)  # type: ignore[union-attr]
    return frames_of(msg)


CASES = {
    "unknown dtype": (
        lambda n: with_envelope(frames_of(good_message(n)), _unknown_dtype),
        grpc.StatusCode.INVALID_ARGUMENT,
        "unknown dtype",
    ),
    "shape and byte count disagree": (
        lambda n: with_envelope(frames_of(good_message(n)), _shape_disagrees),
        grpc.StatusCode.INVALID_ARGUMENT,
        "needs",
    ),
    "digest mismatch": (
        lambda n: _flip_byte(frames_of(good_message(n))),
        grpc.StatusCode.DATA_LOSS,
        "digest mismatch",
    ),
    "oversize": (_oversize, grpc.StatusCode.RESOURCE_EXHAUSTED, "exceeds the limit"),
    "truncated stream": (
        lambda n: frames_of(good_message(n))[:-2],
        grpc.StatusCode.INVALID_ARGUMENT,
        "payload bytes",
    ),
    "stream without its digest": (
        lambda n: frames_of(good_message(n))[:-1],
        grpc.StatusCode.INVALID_ARGUMENT,
        "before its digest frame",
    ),
    "corrupted digest frame": (
        lambda n: _flip_last_byte(frames_of(good_message(n))),
        grpc.StatusCode.DATA_LOSS,
        "digest mismatch",
    ),
    "short digest frame": (
        lambda n: [*frames_of(good_message(n))[:-1], b"\x1a\x04abcd"],
        grpc.StatusCode.INVALID_ARGUMENT,
        "digest frame of 4 bytes",
    ),
    "extra bytes": (
        lambda n: [*frames_of(good_message(n)), framing.chunk_frame(b"xx")],
        grpc.StatusCode.INVALID_ARGUMENT,
        "oversize",
    ),
    "NaN": (_nan_message, grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    "Inf": (_inf_message, grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
    "protocol version": (
        lambda n: with_envelope(frames_of(good_message(n)), _old_version),
        grpc.StatusCode.FAILED_PRECONDITION,
        "protocol version 99",
    ),
    "garbage frame": (lambda n: [b"\xff\x01\x02"], grpc.StatusCode.INVALID_ARGUMENT, "tag"),
    "model of another shape": (_wrong_shape_model, grpc.StatusCode.FAILED_PRECONDITION, "shape"),
    "model with an extra tensor": (_extra_tensor, grpc.StatusCode.INVALID_ARGUMENT, "'surplus'"),
    "another algorithm": (
        lambda n: frames_of(good_message(n, algorithm="dadao")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "does not match",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_is_refused_and_the_node_survives(case: str, caplog) -> None:
    make_frames, code, words = CASES[case]

    async def go() -> None:
        node = victim()
        address = await node.transport.start(node)
        try:
            before = node.model_digest()
            with caplog.at_level(logging.WARNING, logger="rumor.transport"):
                got_code, detail = await send_raw(address, make_frames(node))
            assert got_code == code, (got_code, detail)
            assert words.lower() in detail.lower()
            assert node.model_digest() == before
            assert node.transport.stats.rejected_in == 1
            assert any("victim rejected" in r.getMessage() for r in caplog.records)
            # still serving: a well-formed model is accepted afterwards
            ok_code, _ = await send_raw(address, frames_of(good_message(node)))
            assert ok_code == grpc.StatusCode.OK
            assert node.model_digest() == before  # buffered for its round, not mixed yet
        finally:
            await node.transport.stop()

    run(go())


# --------------------------------------------------------------- Heartbeat and Status

#: Request bodies no Ping or StatusRequest parses from: a bad tag, a truncated length, a
#: truncated varint, an end-group without a start, groups nested past the parser's limit.
GARBAGE = {
    "bad tag": b"\xff\xff\xff",
    "truncated string": b"\x0a\x05ab",
    "truncated varint": b"\x18\xff",
    "stray end-group": b"\x0c",
    "deep groups": b"\x0b" * 200,
}

ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


async def unary_raw(address: str, method: str, body: bytes) -> tuple[grpc.StatusCode, str]:
    """Call ``method`` with ``body`` as the serialized request, as a fuzzer would."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(f"/rumor.v1.Node/{method}")
        try:
            await call(body, timeout=5.0)
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


@pytest.mark.parametrize("method", ["Heartbeat", "Status"])
def test_garbage_unary_requests_answer_invalid_argument_without_a_traceback(
    method: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def go() -> None:
        server = GrpcTransport(node_id="server")
        address = await server.start(EchoService())
        try:
            for name, body in GARBAGE.items():
                code, detail = await unary_raw(address, method, body)
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, detail)
                assert "malformed" in detail, (name, detail)
            code, detail = await unary_raw(address, method, bytes(MAX_SMALL_REQUEST_BYTES + 1))
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "exceeds" in detail
            assert server.stats.rejected_in == len(GARBAGE) + 1
            # one line per peer and status code, however many refusals
            lines = [r for r in caplog.records if "server rejected" in r.getMessage()]
            assert len(lines) == 2, [r.getMessage() for r in lines]
            # a well-formed request still works
            code, _ = await unary_raw(
                address, method, node_pb2.Ping(sender="c").SerializeToString()
            )
            assert code == grpc.StatusCode.OK
        finally:
            await server.stop()

    with caplog.at_level(logging.DEBUG):
        run(go())
    _no_tracebacks(caplog)


def test_heartbeat_refuses_another_protocol_version_and_oversized_fields(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cases = {
        "version": (
            node_pb2.Ping(sender="c", protocol_version=1),
            grpc.StatusCode.FAILED_PRECONDITION,
            "protocol version 1",
        ),
        "long sender": (
            node_pb2.Ping(sender="x" * 257),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sender",
        ),
        "long address": (
            node_pb2.Ping(sender="c", address="a" * 1025),
            grpc.StatusCode.INVALID_ARGUMENT,
            "address",
        ),
        "negative round": (
            node_pb2.Ping(sender="c", round=-1),
            grpc.StatusCode.INVALID_ARGUMENT,
            "round",
        ),
    }

    async def go() -> None:
        server = GrpcTransport(node_id="server")
        address = await server.start(EchoService())
        try:
            for name, (ping, want, words) in cases.items():
                code, detail = await unary_raw(address, "Heartbeat", ping.SerializeToString())
                assert code == want and words in detail, (name, code, detail)
            current = node_pb2.Ping(sender="c", protocol_version=2, round=3)
            code, _ = await unary_raw(address, "Heartbeat", current.SerializeToString())
            assert code == grpc.StatusCode.OK
        finally:
            await server.stop()

    with caplog.at_level(logging.DEBUG):
        run(go())
    _no_tracebacks(caplog)


def test_fuzzed_unary_requests_never_answer_unknown(caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(13)
    seeds = [
        node_pb2.Ping(sender="c", address="127.0.0.1:1", round=4, degree=2).SerializeToString()
    ]

    def fuzzed() -> bytes:
        if rng.random() < 0.5:
            return rng.randbytes(rng.randrange(0, 64))
        body = bytearray(rng.choice(seeds))
        for _ in range(rng.randrange(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        return bytes(body[: rng.randrange(len(body) + 1)])

    async def go() -> None:
        server = GrpcTransport(node_id="server")
        address = await server.start(EchoService())
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                for i in range(300):
                    method = "Heartbeat" if i % 2 else "Status"
                    call = channel.unary_unary(f"/rumor.v1.Node/{method}")
                    try:
                        await call(fuzzed(), timeout=5.0)
                        code = grpc.StatusCode.OK
                    except grpc.aio.AioRpcError as err:
                        code = err.code()
                    assert code in ALLOWED, (method, code)
        finally:
            await server.stop()
        refusals = [r for r in caplog.records if "server rejected" in r.getMessage()]
        assert len(refusals) <= 8  # a few (method's host, code) keys, not one per call

    with caplog.at_level(logging.DEBUG):
        run(go())
    _no_tracebacks(caplog)


def test_repeated_refused_exchanges_are_counted_each_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def go() -> None:
        server = GrpcTransport(node_id="server")
        address = await server.start(EchoService())
        try:
            with caplog.at_level(logging.WARNING, logger="rumor.transport"):
                for _ in range(5):
                    code, _ = await send_raw(address, [b"\xff\x01\x02"])
                    assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert server.stats.rejected_in == 5
            lines = [r.getMessage() for r in caplog.records if "server rejected" in r.getMessage()]
            assert len(lines) == 1 and "unknown frame tag" in lines[0]
        finally:
            await server.stop()

    run(go())
