"""Specification of Exchange framing: protobuf wire compatibility and message round trips."""

from __future__ import annotations

import pytest
import torch
import xxhash
from google.protobuf import any_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from rumor.protocol import codec, framing
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.constants import MAX_ENVELOPE_BYTES, PROTOCOL_VERSION
from rumor.protocol.errors import Code, Rejected
from rumor.protocol.v1 import node_pb2


def model() -> Bundle:
    torch.manual_seed(1)
    return Bundle(
        {"layer.weight": torch.randn(16, 8), "layer.bias": torch.randn(16), "n": torch.tensor(3)},
        {"degree": 2, "weight": 0.5},
    )


def assemble(frames: list[bytes], **kwargs: object) -> Message:
    assembler = framing.MessageAssembler(**kwargs)  # type: ignore[arg-type]
    done = [m for m in (assembler.feed(f) for f in frames) if m is not None]
    assert len(done) == 1
    assert assembler.finish() is done[0]
    assert assembler.wire_bytes == sum(len(f) for f in frames)
    return done[0]


def reject(frames: list[bytes], finish: bool = True) -> Rejected:
    assembler = framing.MessageAssembler()
    with pytest.raises(Rejected) as info:
        for frame in frames:
            assembler.feed(frame)
        if finish:
            assembler.finish()
    return info.value


def envelope(**fields: object) -> node_pb2.Envelope:
    fields.setdefault("protocol_version", PROTOCOL_VERSION)
    return node_pb2.Envelope(**fields)  # type: ignore[arg-type]


# --------------------------------------------------------------- wire compatibility


@pytest.mark.parametrize(
    "env",
    [
        node_pb2.Envelope(),
        envelope(sender="a", kind="gossip.model", round=-3, time=1.5, algorithm="avg"),
        framing.message_to_envelope(
            Message(kind="k", bundle=None, payload=node_pb2.Ping(sender="x")),
        ),
    ],
)
def test_envelope_frame_equals_protobuf_serialization(env: node_pb2.Envelope) -> None:
    assert framing.envelope_frame(env) == node_pb2.Frame(envelope=env).SerializeToString()


def test_envelope_frame_with_a_bundle_header_equals_protobuf_serialization() -> None:
    frames = list(framing.message_to_frames(Message(kind="k", bundle=model())))
    kind, env = framing.parse_frame(frames[0])
    assert kind == "envelope"
    assert frames[0] == node_pb2.Frame(envelope=env).SerializeToString()


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300))
def test_chunk_frames_match_protobuf_both_ways(data: bytes) -> None:
    ours = framing.chunk_frame(data)
    theirs = node_pb2.Frame(chunk=data).SerializeToString()
    assert ours == theirs
    assert node_pb2.Frame.FromString(ours).chunk == data
    kind, view = framing.parse_frame(theirs)
    assert kind == "chunk" and isinstance(view, memoryview) and bytes(view) == data


def test_chunk_frame_of_a_large_memoryview_has_a_multi_byte_varint() -> None:
    data = memoryview(bytes(range(256)) * 4096)
    frame = framing.chunk_frame(data)
    assert frame == node_pb2.Frame(chunk=bytes(data)).SerializeToString()
    assert frame[:4] == b"\x12\x80\x80\x40"


def test_parse_frame_returns_a_zero_copy_view_for_chunks() -> None:
    frame = bytearray(framing.chunk_frame(b"abcdef"))
    _, view = framing.parse_frame(frame)
    frame[-1:] = b"Z"
    assert bytes(view) == b"abcdeZ"


def test_protobuf_reads_every_frame_we_write() -> None:
    msg = Message(kind="gossip.model", sender="n1", round=4, bundle=model())
    frames = list(framing.message_to_frames(msg, chunk_size=100))
    parsed = [node_pb2.Frame.FromString(f) for f in frames]
    assert parsed[0].WhichOneof("kind") == "envelope"
    assert parsed[0].envelope.sender == "n1"
    assert parsed[0].envelope.bundle.digest == b""  # it follows the payload
    assert all(p.WhichOneof("kind") == "chunk" for p in parsed[1:-1])
    payload = b"".join(p.chunk for p in parsed[1:-1])
    assert len(payload) == parsed[0].envelope.bundle.total_bytes
    assert parsed[-1].WhichOneof("kind") == "digest"
    assert parsed[-1].digest == xxhash.xxh3_128(payload).digest()


# ------------------------------------------------------------------------ round trips


def test_message_without_bundle_completes_at_the_envelope() -> None:
    msg = Message(kind="rumor.ack", sender="b", round=9, time=2.25, exchange_id="x1")
    frames = list(framing.message_to_frames(msg))
    assert len(frames) == 1
    out = assemble(frames)
    assert out == Message(kind="rumor.ack", sender="b", round=9, time=2.25, exchange_id="x1")


@pytest.mark.parametrize("chunk_size", [1, 7, 100, 1 << 20])
def test_message_with_bundle_round_trips(chunk_size: int) -> None:
    sent = model()
    msg = Message(kind="gossip.model", sender="a", round=3, bundle=sent, algorithm="avg")
    out = assemble(list(framing.message_to_frames(msg, chunk_size=chunk_size)))
    assert (out.kind, out.sender, out.round, out.algorithm) == ("gossip.model", "a", 3, "avg")
    assert out.payload is None
    assert out.bundle is not None
    assert list(out.bundle.tensors) == list(sent.tensors)
    for name, t in sent.tensors.items():
        assert out.bundle.tensors[name].dtype == t.dtype
        assert torch.equal(out.bundle.tensors[name], t)
    assert out.bundle.meta == sent.meta


def test_bundle_with_empty_payload_completes_at_the_envelope() -> None:
    msg = Message(kind="k", bundle=Bundle({"e": torch.empty(0)}, {"n": 1}))
    frames = list(framing.message_to_frames(msg))
    assert len(frames) == 1
    out = assemble(frames)
    assert out.bundle is not None and out.bundle.tensors["e"].shape == (0,)


def test_typed_payload_is_packed_and_unpacked() -> None:
    ping = node_pb2.Ping(sender="a", address="127.0.0.1:1", round=5, degree=3)
    out = assemble(list(framing.message_to_frames(Message(kind="k", payload=ping))))
    assert isinstance(out.payload, any_pb2.Any)
    got = node_pb2.Ping()
    assert out.payload.Unpack(got)
    assert got == ping


def test_an_any_payload_is_passed_through() -> None:
    packed = any_pb2.Any()
    packed.Pack(node_pb2.Pong(node_id="z", alive=["a", "b"]))
    msg = Message(kind="k", payload=packed, bundle=model())
    out = assemble(list(framing.message_to_frames(msg, chunk_size=64)))
    assert out.payload == packed


def test_payload_that_is_not_protobuf_is_refused_by_the_sender() -> None:
    with pytest.raises(TypeError, match="protobuf"):
        framing.message_to_frames(Message(kind="k", payload={"a": 1}))


def test_algorithm_override_and_protocol_version_are_in_the_envelope() -> None:
    frames = framing.message_to_frames(Message(kind="k", algorithm="a"), algorithm="b")
    _, env = framing.parse_frame(next(iter(frames)))
    assert isinstance(env, node_pb2.Envelope)
    assert env.algorithm == "b" and env.protocol_version == PROTOCOL_VERSION


def test_frames_snapshot_the_bundle_when_asked() -> None:
    sent = model()
    before = sent.tensors["layer.weight"].clone()
    frames = framing.message_to_frames(Message(kind="k", bundle=sent), snapshot=True)
    sent.tensors["layer.weight"].mul_(2)
    out = assemble(list(frames))
    assert out.bundle is not None and torch.equal(out.bundle.tensors["layer.weight"], before)


def test_non_finite_tensors_are_refused_unless_allowed() -> None:
    bad = Bundle({"w": torch.tensor([1.0, float("nan")])})
    frames = list(framing.message_to_frames(Message(kind="k", bundle=bad)))
    assert "tensor 'w' has non-finite values" in reject(frames).detail
    out = assemble(frames, check_finite=False)
    assert out.bundle is not None and out.bundle.tensors["w"].isnan().any()


def test_bundle_over_the_receivers_limit_is_resource_exhausted() -> None:
    frames = list(framing.message_to_frames(Message(kind="k", bundle=model())))
    assembler = framing.MessageAssembler(max_bytes=100)
    with pytest.raises(Rejected) as info:
        assembler.feed(frames[0])
    assert info.value.code == Code.RESOURCE_EXHAUSTED


@pytest.mark.parametrize("chunk_size", [1, 100, 1 << 20])
def test_wire_size_is_predicted_without_encoding(chunk_size: int) -> None:
    ping = node_pb2.Ping(sender="a")
    for msg in (Message(kind="k"), Message(kind="k", bundle=model(), payload=ping)):
        frames = list(framing.message_to_frames(msg, chunk_size=chunk_size))
        predicted = framing.message_nbytes_on_wire(msg, chunk_size=chunk_size)
        assert predicted == sum(len(f) for f in frames)


# --------------------------------------------------------------------- malformed streams


def frames_of_model(chunk_size: int = 200) -> list[bytes]:
    return list(framing.message_to_frames(Message(kind="k", bundle=model()), chunk_size=chunk_size))


def test_chunk_before_envelope_is_refused() -> None:
    err = reject([framing.chunk_frame(b"abc")])
    assert err.code == Code.INVALID_ARGUMENT and "chunk before the envelope" in err.detail


def test_second_envelope_is_refused() -> None:
    frames = frames_of_model()
    assert "second envelope" in reject([frames[0], frames[0]]).detail
    one = list(framing.message_to_frames(Message(kind="a")))
    assert "second envelope" in reject(one + one).detail


def test_stream_that_ends_mid_bundle_is_truncated() -> None:
    frames = frames_of_model()
    err = reject(frames[:-2])  # the last chunk and the digest are missing
    assert err.code == Code.INVALID_ARGUMENT and err.detail.startswith("truncated:")
    assert "payload bytes" in err.detail


def test_stream_that_ends_before_the_digest_is_truncated() -> None:
    err = reject(frames_of_model()[:-1])
    assert err.code == Code.INVALID_ARGUMENT
    assert err.detail == "truncated: stream ended after the payload, before its digest frame"


def test_digest_frame_before_the_last_chunk_is_refused() -> None:
    frames = frames_of_model()
    err = reject([*frames[:-2], frames[-1]], finish=False)
    assert err.code == Code.INVALID_ARGUMENT and "truncated: digest frame after" in err.detail


def test_digest_frame_where_none_is_due_is_refused() -> None:
    digest = framing.digest_frame(bytes(16))
    only = list(framing.message_to_frames(Message(kind="k")))
    assert "needs none" in reject([*only, digest], finish=False).detail
    frames = frames_of_model()
    assert "needs none" in reject([*frames, digest], finish=False).detail
    assert "digest before the envelope" in reject([digest]).detail


def test_header_digest_still_accepted_without_a_digest_frame() -> None:
    bundle = model()
    enc = codec.encode(bundle)  # digest in the header, as a non-streaming sender may do
    env = framing.message_to_envelope(Message(kind="k", bundle=bundle), enc.header)
    frames = [framing.envelope_frame(env), *(framing.chunk_frame(c) for c in enc.chunks(100))]
    out = assemble(frames)
    assert out.bundle is not None and torch.equal(
        out.bundle.tensors["layer.bias"], bundle.tensors["layer.bias"]
    )


def test_stream_without_envelope_is_refused() -> None:
    assert "before any envelope" in reject([]).detail


def test_chunk_after_the_message_is_oversize() -> None:
    frames = frames_of_model()
    assert "oversize" in reject([*frames, framing.chunk_frame(b"x")], finish=False).detail
    only = list(framing.message_to_frames(Message(kind="k")))
    assert "oversize" in reject([*only, framing.chunk_frame(b"x")], finish=False).detail


@pytest.mark.parametrize("which", [-2, -1], ids=["last chunk", "digest frame"])
def test_corrupted_chunk_or_digest_is_data_loss(which: int) -> None:
    frames = frames_of_model()
    bad = bytearray(frames[which])
    bad[-1] ^= 1
    frames[which] = bytes(bad)
    err = reject(frames, finish=False)
    assert err.code == Code.DATA_LOSS and "digest mismatch" in err.detail


def test_wrong_protocol_version_is_a_failed_precondition() -> None:
    frame = framing.envelope_frame(envelope(protocol_version=PROTOCOL_VERSION + 1, kind="k"))
    err = reject([frame])
    assert err.code == Code.FAILED_PRECONDITION
    assert f"protocol version {PROTOCOL_VERSION + 1} not supported" in err.detail


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (b"", "empty frame"),
        (b"\x22\x00", "unknown frame tag 0x22"),
        (b"\x1a\x00", "digest frame of 0 bytes; xxh3-128 needs 16"),
        (b"\x1a\x11" + bytes(17), "digest frame of 17 bytes"),
        (b"\x08\x01", "unknown frame tag 0x08"),
        (b"\x12", "truncated varint"),
        (b"\x12\x80", "truncated varint"),
        (b"\x12" + b"\x80" * 10 + b"\x00", "varint of more than 10 bytes"),
        (b"\x12" + b"\xff" * 9 + b"\x01", "length mismatch"),
        (b"\x12\x05abc", "length mismatch: header says 5 bytes, frame carries 3"),
        (b"\x12\x01abc", "length mismatch"),
        (b"\x0a\x02\xff\xff", "malformed envelope"),
        (node_pb2.Frame(chunk=b"x").SerializeToString() * 2, "length mismatch"),
    ],
)
def test_malformed_frames_are_refused(frame: bytes, problem: str) -> None:
    with pytest.raises(Rejected) as info:
        framing.parse_frame(frame)
    assert info.value.code == Code.INVALID_ARGUMENT
    assert problem in info.value.detail


def test_envelope_over_the_limit_is_refused_before_parsing() -> None:
    length = MAX_ENVELOPE_BYTES + 1
    frame = b"\x0a" + framing._varint(length) + bytes(length)
    with pytest.raises(Rejected) as info:
        framing.parse_frame(frame)
    assert f"envelope of {length} bytes exceeds the limit" in info.value.detail
