"""Exchange stream framing: a :class:`~rumor.protocol.bundle.Message` to and from ``Frame`` bytes.

An Exchange stream in each direction is one envelope frame followed by the bundle's payload
chunks and, when the payload is not empty, a digest frame: the xxh3-128 of the payload,
which the sender takes chunk by chunk as it builds the frames (each chunk is then still in
cache) instead of in a pass over the whole model before the first byte can leave. Frames are
written and parsed by hand yet stay wire compatible with ``message Frame { oneof kind {
Envelope envelope = 1; bytes chunk = 2; bytes digest = 3; } }`` in ``node.proto``: a frame
is one protobuf field, tag ``0x0A`` (envelope), ``0x12`` (chunk) or ``0x1A`` (digest), a
varint length and the bytes. Tensor bytes thus never pass through a protobuf object: a chunk
frame is built with one copy (prefix and payload pieces joined once, the fastest of the
variants measured in ``bench/bench_codec.py``) and parsed into a zero-copy memoryview.

This module must not import grpc or talk to the network, must not decide what a message
means (rules do), and must not accept frames that are not exactly one envelope, one chunk
or one digest.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Literal

import xxhash
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from rumor.protocol import codec
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.constants import (
    CHUNK_SIZE,
    MAX_BUNDLE_BYTES,
    MAX_ENVELOPE_BYTES,
    PROTOCOL_VERSION,
)
from rumor.protocol.errors import Code, Rejected
from rumor.protocol.v1 import node_pb2, tensor_pb2

__all__ = [
    "CHUNK_TAG",
    "DIGEST_TAG",
    "ENVELOPE_TAG",
    "MessageAssembler",
    "SharedFrames",
    "chunk_frame",
    "digest_frame",
    "envelope_frame",
    "message_nbytes_on_wire",
    "message_to_envelope",
    "message_to_frames",
    "parse_frame",
]

#: Field 1 (envelope), wire type 2 (length-delimited).
ENVELOPE_TAG = 0x0A
#: Field 2 (chunk), wire type 2 (length-delimited).
CHUNK_TAG = 0x12
#: Field 3 (digest), wire type 2 (length-delimited).
DIGEST_TAG = 0x1A
_ENVELOPE_PREFIX = bytes([ENVELOPE_TAG])
_CHUNK_PREFIX = bytes([CHUNK_TAG])
_MAX_VARINT_BYTES = 10
#: Bytes of a digest frame on the wire: tag, one-byte length, digest.
_DIGEST_FRAME_BYTES = 2 + codec.DIGEST_SIZE

FrameKind = Literal["envelope", "chunk", "digest"]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_len(n: int) -> int:
    return max(1, -(-n.bit_length() // 7))


def chunk_frame(data: bytes | bytearray | memoryview) -> bytes:
    """A ``Frame(chunk=data)`` with exactly one copy of ``data``."""
    n = memoryview(data).nbytes
    return b"".join((_CHUNK_PREFIX, _varint(n), data))


def _chunk_frame_parts(parts: list[codec.ByteChunk]) -> bytes:
    """A chunk frame from the pieces of one chunk, joined with the prefix in one copy."""
    n = sum(len(p) for p in parts)
    return b"".join([_CHUNK_PREFIX, _varint(n), *parts])


def _hashed_chunk_frame(parts: list[codec.ByteChunk], hasher: xxhash.xxh3_128) -> bytes:
    """A chunk frame, its payload bytes added to ``hasher`` while they are in cache."""
    frame = _chunk_frame_parts(parts)
    n = sum(len(p) for p in parts)
    hasher.update(memoryview(frame)[len(frame) - n :])
    return frame


def digest_frame(digest: bytes) -> bytes:
    """A ``Frame(digest=digest)``: the payload's xxh3-128, after its last chunk."""
    return b"".join((bytes([DIGEST_TAG]), _varint(len(digest)), digest))


def envelope_frame(env: node_pb2.Envelope) -> bytes:
    """A ``Frame(envelope=env)``; equal to protobuf's own serialization of that frame."""
    body = env.SerializeToString()
    return b"".join((_ENVELOPE_PREFIX, _varint(len(body)), body))


def parse_frame(
    frame: bytes | bytearray | memoryview,
) -> tuple[FrameKind, node_pb2.Envelope | memoryview]:
    """Split one frame into its kind and content.

    Returns ``("envelope", Envelope)``, ``("chunk", memoryview)`` or ``("digest",
    memoryview)``, a memoryview being a zero-copy window into ``frame``. Anything but exactly
    one envelope, chunk or digest field is refused with ``Rejected(INVALID_ARGUMENT)``.
    """
    mv = memoryview(frame)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    size = len(mv)
    if size == 0:
        raise Rejected(Code.INVALID_ARGUMENT, "empty frame")
    tag = mv[0]
    if tag not in (ENVELOPE_TAG, CHUNK_TAG, DIGEST_TAG):
        raise Rejected(Code.INVALID_ARGUMENT, f"unknown frame tag 0x{tag:02x}")
    length = 0
    shift = 0
    pos = 1
    while True:
        if pos >= size:
            raise Rejected(Code.INVALID_ARGUMENT, "truncated varint in frame header")
        if pos > _MAX_VARINT_BYTES:
            raise Rejected(Code.INVALID_ARGUMENT, "varint of more than 10 bytes in frame header")
        byte = mv[pos]
        pos += 1
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if length != size - pos:
        raise Rejected(
            Code.INVALID_ARGUMENT,
            f"frame length mismatch: header says {length} bytes, frame carries {size - pos}",
        )
    body = mv[pos:]
    if tag == CHUNK_TAG:
        return "chunk", body
    if tag == DIGEST_TAG:
        if length != codec.DIGEST_SIZE:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"digest frame of {length} bytes; xxh3-128 needs {codec.DIGEST_SIZE}",
            )
        return "digest", body
    if length > MAX_ENVELOPE_BYTES:
        raise Rejected(
            Code.INVALID_ARGUMENT,
            f"envelope of {length} bytes exceeds the limit of {MAX_ENVELOPE_BYTES}",
        )
    try:
        env = node_pb2.Envelope.FromString(body)
    except DecodeError as exc:
        raise Rejected(Code.INVALID_ARGUMENT, f"malformed envelope: {exc}") from None
    return "envelope", env


# ----------------------------------------------------------------------- messages


def as_any(payload: object) -> any_pb2.Any | None:
    if payload is None:
        return None
    if isinstance(payload, any_pb2.Any):
        return payload
    if isinstance(payload, ProtoMessage):
        packed = any_pb2.Any()
        packed.Pack(payload)
        return packed
    raise TypeError(f"payload must be a protobuf message, not {type(payload).__name__}")


def message_to_envelope(
    msg: Message,
    header: tensor_pb2.BundleHeader | None = None,
    algorithm: str | None = None,
) -> node_pb2.Envelope:
    """The envelope of ``msg`` (``header`` is its bundle's, when it has one)."""
    env = node_pb2.Envelope(
        protocol_version=PROTOCOL_VERSION,
        sender=msg.sender,
        kind=msg.kind,
        round=msg.round,
        time=msg.time,
        exchange_id=msg.exchange_id,
        algorithm=msg.algorithm if algorithm is None else algorithm,
    )
    if header is not None:
        env.bundle.CopyFrom(header)
    payload = as_any(msg.payload)
    if payload is not None:
        env.payload.CopyFrom(payload)
    return env


def message_to_frames(
    msg: Message,
    *,
    algorithm: str | None = None,
    chunk_size: int = CHUNK_SIZE,
    snapshot: bool = False,
) -> Iterator[bytes]:
    """The frames of ``msg``: its envelope, its bundle's payload in chunk frames, the digest.

    The bundle is laid out when this function is called, not when the iterator is first
    advanced; with ``snapshot=True`` its tensors are copied at that moment and may change
    afterwards. Otherwise they must stay unchanged until the last frame has been produced.
    ``algorithm`` overrides ``msg.algorithm`` in the envelope. Each chunk frame costs exactly
    one copy of its bytes, and the digest is taken from that copy.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    encoded = (
        codec.encode(msg.bundle, snapshot=snapshot, defer_digest=True)
        if msg.bundle is not None
        else None
    )
    env = message_to_envelope(msg, encoded.header if encoded else None, algorithm)
    first = envelope_frame(env)
    return _frames(first, encoded, chunk_size)


def _frames(first: bytes, encoded: codec.EncodedBundle | None, chunk_size: int) -> Iterator[bytes]:
    yield first
    if encoded is None or not encoded.total_bytes:
        return  # an empty payload's digest is in the header
    hasher = xxhash.xxh3_128()
    for parts in encoded.chunk_parts(chunk_size):
        yield _hashed_chunk_frame(parts, hasher)
    yield digest_frame(hasher.digest())


class SharedFrames:
    """The frames of one message, encoded once for several streams that send it at once.

    A node sends the same model to each neighbour in a round. Encoding it once (one digest,
    one frame copy per chunk) instead of once per stream saves a read and a copy of the
    model for every neighbour after the first. Each :meth:`reader` yields the whole frame
    sequence; a chunk frame is built (and added to the digest) by the first reader that
    needs it and kept only until every reader that was registered before it was built has
    taken it, so readers that advance together hold about one frame, and a lagging reader
    holds at most the frames it has not sent yet. A reader that starts after frames were
    dropped (a retry) builds those frames again for itself; the digest, taken from the
    first build of every chunk, stays the same. Not thread-safe: one event loop.

    The message's tensors must not change while any reader is open, as for
    :func:`message_to_frames`.
    """

    def __init__(
        self, msg: Message, *, algorithm: str | None = None, chunk_size: int = CHUNK_SIZE
    ) -> None:
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        self._encoded = (
            codec.encode(msg.bundle, defer_digest=True) if msg.bundle is not None else None
        )
        header = self._encoded.header if self._encoded else None
        self._first = envelope_frame(message_to_envelope(msg, header, algorithm))
        self._chunk_size = chunk_size
        total = self._encoded.total_bytes if self._encoded else 0
        self.n_chunks = -(-total // chunk_size)
        self._parts = self._encoded.chunk_parts(chunk_size) if self._encoded else iter(())
        self._built = 0
        self._hasher = xxhash.xxh3_128()
        self._digest_frame: bytes | None = None
        #: chunk index -> (frame, readers still to take it)
        self._cache: dict[int, tuple[bytes, set[int]]] = {}
        #: reader id -> index of the next chunk it will take
        self._readers: dict[int, int] = {}
        self._next_reader = 0
        #: chunk frames built, for tests and benchmarks (n_chunks when fully shared)
        self.frames_built = 0

    @property
    def open_readers(self) -> int:
        return len(self._readers)

    @property
    def cached_frames(self) -> int:
        return len(self._cache)

    def reader(self) -> Generator[bytes, None, None]:
        """All frames of the message, envelope first; close it (or exhaust it) when done.

        The reader registers when it is first advanced (a reader never advanced holds
        nothing), so readers started in the same event-loop turn share every chunk.
        """
        return self._read()

    def _read(self) -> Generator[bytes, None, None]:
        rid = self._next_reader
        self._next_reader += 1
        self._readers[rid] = 0
        try:
            yield self._first
            for index in range(self.n_chunks):
                cached = self._cache.get(index)
                if cached is not None:
                    frame, pending = cached
                    pending.discard(rid)
                    if not pending:
                        del self._cache[index]
                elif index < self._built:
                    frame = self._rebuild(index)  # dropped before this late reader came
                else:
                    frame = self._build_next(rid, index)
                self._readers[rid] = index + 1
                yield frame
            if self.n_chunks:
                yield self._digest()
        finally:
            self._release(rid)

    def _digest(self) -> bytes:
        # Every chunk was built once before any reader gets past the last one.
        assert self._built == self.n_chunks
        if self._digest_frame is None:
            self._digest_frame = digest_frame(self._hasher.digest())
        return self._digest_frame

    def _build_next(self, rid: int, index: int) -> bytes:
        frame = _hashed_chunk_frame(next(self._parts), self._hasher)
        self._built = index + 1
        self.frames_built += 1
        pending = {r for r, nxt in self._readers.items() if r != rid and nxt <= index}
        if pending:
            self._cache[index] = (frame, pending)
        return frame

    def _rebuild(self, index: int) -> bytes:
        assert self._encoded is not None
        self.frames_built += 1
        start = index * self._chunk_size
        return _chunk_frame_parts(next(self._encoded.chunk_parts(self._chunk_size, start=start)))

    def _release(self, rid: int) -> None:
        self._readers.pop(rid, None)
        for index in [i for i, (_, pending) in self._cache.items() if rid in pending]:
            pending = self._cache[index][1]
            pending.discard(rid)
            if not pending:
                del self._cache[index]


def message_nbytes_on_wire(msg: Message, chunk_size: int = CHUNK_SIZE) -> int:
    """Bytes that ``message_to_frames(msg, chunk_size=chunk_size)`` would produce.

    Computed from the layout alone: no tensor bytes are read or hashed.
    """
    header = None
    total = 0
    if msg.bundle is not None:
        header = codec.plan(msg.bundle, defer_digest=True)
        total = header.total_bytes
    env = message_to_envelope(msg, header)
    n = env.ByteSize()
    wire = 1 + _varint_len(n) + n
    full, rest = divmod(total, chunk_size)
    wire += full * (1 + _varint_len(chunk_size) + chunk_size)
    if rest:
        wire += 1 + _varint_len(rest) + rest
    if total:
        wire += _DIGEST_FRAME_BYTES
    return wire


class MessageAssembler:
    """Rebuilds one :class:`Message` from the frames of one Exchange direction.

    :meth:`feed` each frame as it arrives; it returns the message when it is complete (at
    the envelope when there is no bundle or an empty payload, at the digest frame after the
    last chunk when the header carries no digest, at the last chunk otherwise) and ``None``
    before.
    Call :meth:`finish` when the stream ends: it refuses a stream that stopped early. Every
    refusal is a :class:`Rejected` naming the problem. ``wire_bytes`` counts the frame bytes
    fed so far, for byte counters.
    """

    def __init__(self, max_bytes: int = MAX_BUNDLE_BYTES, check_finite: bool = True) -> None:
        self.max_bytes = max_bytes
        self.check_finite = check_finite
        self.wire_bytes = 0
        self._env: node_pb2.Envelope | None = None
        self._decoder: codec.BundleDecoder | None = None
        self._message: Message | None = None

    def feed(self, frame: bytes | bytearray | memoryview) -> Message | None:
        self.wire_bytes += memoryview(frame).nbytes
        kind, content = parse_frame(frame)
        if kind == "envelope":
            assert isinstance(content, node_pb2.Envelope)
            if self._env is not None:
                raise Rejected(Code.INVALID_ARGUMENT, "second envelope in one stream")
            return self._on_envelope(content)
        assert isinstance(content, memoryview)
        if self._env is None:
            raise Rejected(Code.INVALID_ARGUMENT, f"{kind} before the envelope")
        decoder = self._decoder
        if kind == "digest":
            if decoder is None or not decoder.needs_digest:
                raise Rejected(Code.INVALID_ARGUMENT, "digest frame for a message that needs none")
            if not decoder.complete:
                raise Rejected(
                    Code.INVALID_ARGUMENT,
                    f"truncated: digest frame after {decoder.received} of "
                    f"{decoder.total_bytes} payload bytes",
                )
            return self._complete(bytes(content))
        if decoder is None:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"oversize: chunk of {len(content)} bytes after the end of the message",
            )
        decoder.feed(content)
        if decoder.complete and not decoder.needs_digest:
            return self._complete()
        return None

    def finish(self) -> Message:
        """The assembled message; ``Rejected`` if the stream ended before it was complete."""
        if self._env is None:
            raise Rejected(Code.INVALID_ARGUMENT, "stream ended before any envelope")
        decoder = self._decoder
        if decoder is not None:
            if decoder.complete:
                raise Rejected(
                    Code.INVALID_ARGUMENT,
                    "truncated: stream ended after the payload, before its digest frame",
                )
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"truncated: stream ended after {decoder.received} of "
                f"{decoder.total_bytes} payload bytes",
            )
        assert self._message is not None
        return self._message

    def _on_envelope(self, env: node_pb2.Envelope) -> Message | None:
        if env.protocol_version != PROTOCOL_VERSION:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"protocol version {env.protocol_version} not supported (this node speaks "
                f"{PROTOCOL_VERSION})",
            )
        self._env = env
        if env.HasField("bundle"):
            self._decoder = codec.BundleDecoder(
                env.bundle, max_bytes=self.max_bytes, check_finite=self.check_finite
            )
            if self._decoder.complete and not self._decoder.needs_digest:
                return self._complete()
            return None
        return self._build(None)

    def _complete(self, digest: bytes | None = None) -> Message:
        assert self._decoder is not None
        bundle = self._decoder.finish(digest)
        self._decoder = None
        return self._build(bundle)

    def _build(self, bundle: Bundle | None) -> Message:
        env = self._env
        assert env is not None
        self._message = Message(
            kind=env.kind,
            sender=env.sender,
            round=env.round,
            time=env.time,
            exchange_id=env.exchange_id,
            bundle=bundle,
            payload=env.payload if env.HasField("payload") else None,
            algorithm=env.algorithm,
        )
        return self._message
