"""Writes rumor's wire test vectors: the exact Exchange frames of a few small messages.

Another implementation of the protocol checks itself against these files: it decodes each
``<name>.frames`` and compares what it finds with ``vectors.json``, and encodes the message
described there and compares its frames with the file. ``docs/protocol.md`` ("Test
vectors") documents both formats; ``tests/test_vectors.py`` checks the Python codec against
the committed files and decodes them a second time with a decoder written from the document
alone.

Everything here is fixed (no randomness, no clocks), so the files only change when the wire
format does. Envelopes are written in canonical form: fields in field-number order and map
entries sorted by key, which is protobuf's deterministic serialization.

Run from the repository root::

    python -m tests.vectors.make_vectors          # rewrite the files
    python -m tests.vectors.make_vectors --check  # exit 1 if they differ from the codec's
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

from rumor.protocol import codec, framing
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.constants import CHUNK_SIZE, PROTOCOL_VERSION
from rumor.protocol.v1 import modest_pb2, node_pb2

HERE = Path(__file__).resolve().parent
INDEX = "vectors.json"
#: Every record of a ``.frames`` file: this length prefix (unsigned 32-bit, big-endian),
#: then one frame.
LENGTH_PREFIX = struct.Struct(">I")


@dataclass(frozen=True)
class Vector:
    name: str
    description: str
    message: Message
    chunk_size: int = CHUNK_SIZE


def _model() -> Vector:
    tensors = {
        "layer.weight": torch.tensor([[1.5, -2.25, 0.0], [3.0, 0.125, -0.5]], dtype=torch.float32),
        "layer.bias": torch.tensor([0.5, -0.25, 65504.0], dtype=torch.float16),
        "embed": torch.tensor([[1.0, -1.5], [0.0078125, 256.0]], dtype=torch.bfloat16),
        "scale": torch.tensor(2.5, dtype=torch.float64),  # 0-d: shape []
        "steps": torch.tensor([1, -2, 1 << 40], dtype=torch.int64),
        "mask": torch.tensor([True, False, True, True]),
        "empty": torch.zeros(0, 3, dtype=torch.float32),  # no bytes, yet an aligned offset
    }
    msg = Message(
        kind="gossip.model",
        sender="node-1",
        round=7,
        time=12.5,
        bundle=Bundle(tensors, {"degree": 2}),
        algorithm="dpsgd",
    )
    return Vector(
        "model",
        "A D-PSGD model message: seven tensors of seven dtypes, among them a 0-d and an empty "
        "tensor, padding between tensors and after the last one, four chunks of 100 bytes "
        "or less, the payload digest in a digest frame.",
        msg,
        chunk_size=100,
    )


def _meta_only() -> Vector:
    meta = {"flag": True, "lr": -0.375, "count": -5, "label": "h\u00e9llo \u2713"}
    msg = Message(kind="example.meta", sender="node-2", bundle=Bundle({}, meta))
    return Vector(
        "meta-only",
        "A bundle without tensors: an empty payload, so no chunk and no digest frame; the "
        "digest (of zero bytes) is in the header. Its metadata holds every scalar kind, a "
        "negative integer (a 10-byte varint) and a non-ASCII string. The kind is not one a "
        "node accepts: the vector tests the codec only.",
        msg,
    )


def _pull() -> Vector:
    msg = Message(kind="rumor.pull", sender="observer")
    return Vector(
        "pull",
        "A pull request as an observer sends it: an envelope and nothing else (no bundle, "
        "no algorithm).",
        msg,
    )


def _pull_reply() -> Vector:
    state = {
        "fc.weight": torch.tensor([[0.25, -0.75]], dtype=torch.float32),
        "fc.bias": torch.tensor([1.0], dtype=torch.float32),
        "bn.num_batches_tracked": torch.tensor(42, dtype=torch.int64),
    }
    msg = Message(
        kind="rumor.model",
        sender="node-3",
        round=3,
        time=40.0,
        bundle=Bundle(state, {"round": 3, "finished": False}),
        algorithm="dpsgd",
    )
    return Vector(
        "pull-reply",
        "A node's answer to a pull: its whole state dict (an integer buffer included), the "
        "round it is at and whether it finished; one chunk at the default chunk size.",
        msg,
    )


def _typed_payload() -> Vector:
    ping = modest_pb2.ModestPing(round_estimate=5, index=1, address="10.0.0.7:7000")
    msg = Message(
        kind="modest.ping", sender="node-4", round=5, time=0.75, payload=ping, algorithm="modest"
    )
    return Vector(
        "typed-payload",
        "A MoDeST ping: no bundle, a typed payload packed in google.protobuf.Any.",
        msg,
    )


def _exchange() -> Vector:
    m = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    msg = Message(
        kind="dadao.exchange",
        sender="node-5",
        time=3.25,
        exchange_id="9f1c2e:6",
        bundle=Bundle({"m": m}, {"ack": 6}),
        algorithm="dadao",
    )
    return Vector(
        "exchange",
        "A DADAO exchange: an idempotency key, one float64 vector, one chunk.",
        msg,
    )


VECTORS = (_model, _meta_only, _pull, _pull_reply, _typed_payload, _exchange)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def canonical_envelope_frame(frame: bytes) -> bytes:
    """An envelope frame re-serialized canonically (map entries sorted by key).

    A node's protobuf library may emit map entries in any order (the Python one varies it
    from process to process); the vectors fix one order so their bytes can be compared.
    """
    kind, env = framing.parse_frame(frame)
    assert kind == "envelope" and isinstance(env, node_pb2.Envelope)
    body = env.SerializeToString(deterministic=True)
    return bytes([framing.ENVELOPE_TAG]) + _varint(len(body)) + body


def frames_of(vector: Vector) -> list[bytes]:
    """The message's frames as a node sends them, the envelope in canonical form."""
    frames = list(framing.message_to_frames(vector.message, chunk_size=vector.chunk_size))
    return [canonical_envelope_frame(frames[0]), *frames[1:]]


def pack(frames: list[bytes]) -> bytes:
    """The contents of a ``.frames`` file: each frame after its 4-byte big-endian length."""
    return b"".join(LENGTH_PREFIX.pack(len(f)) + f for f in frames)


def unpack(data: bytes) -> list[bytes]:
    """The frames of a ``.frames`` file."""
    frames, pos = [], 0
    while pos < len(data):
        (n,) = LENGTH_PREFIX.unpack_from(data, pos)
        pos += LENGTH_PREFIX.size
        frames.append(data[pos : pos + n])
        pos += n
    if pos != len(data):
        raise ValueError("truncated .frames file")
    return frames


def _values(t: torch.Tensor) -> Any:
    """The tensor's values as JSON (nested lists; a plain number or bool for a 0-d tensor)."""
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.tolist()


def _scalar(value: object) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"b": value}
    if isinstance(value, int):
        return {"i": value}
    if isinstance(value, float):
        return {"f": value}
    return {"s": value}


def describe(vector: Vector, frames: list[bytes]) -> dict[str, Any]:
    """What a decoder must find in the frames, as the ``vectors.json`` entry."""
    msg = vector.message
    kinds = [framing.parse_frame(f)[0] for f in frames]
    payload = framing.as_any(msg.payload)
    entry: dict[str, Any] = {
        "name": vector.name,
        "description": vector.description,
        "file": f"{vector.name}.frames",
        "chunk_size": vector.chunk_size,
        "frames": [{"kind": k, "length": len(f)} for k, f in zip(kinds, frames, strict=True)],
        "envelope": {
            "protocol_version": PROTOCOL_VERSION,
            "sender": msg.sender,
            "kind": msg.kind,
            "round": msg.round,
            "time": msg.time,
            "exchange_id": msg.exchange_id,
            "algorithm": msg.algorithm,
            "payload": None
            if payload is None
            else {"type_url": payload.type_url, "value_hex": payload.value.hex()},
        },
        "bundle": None,
    }
    if msg.bundle is not None:
        encoded = codec.encode(msg.bundle)
        header = encoded.header
        payload_bytes = b"".join(bytes(c) for c in encoded.chunks())
        digest = xxhash.xxh3_128_digest(payload_bytes)
        assert digest == header.digest
        tensors = []
        for spec, (name, t) in zip(header.tensors, msg.bundle.tensors.items(), strict=True):
            data = payload_bytes[spec.offset : spec.offset + spec.nbytes]
            tensors.append(
                {
                    "name": name,
                    "dtype": str(t.dtype).removeprefix("torch."),
                    "dtype_enum": spec.dtype,
                    "shape": list(spec.shape),
                    "offset": spec.offset,
                    "nbytes": spec.nbytes,
                    "data_hex": data.hex(),
                    "values": _values(t),
                }
            )
        entry["bundle"] = {
            "codec_version": header.codec_version,
            "encoding": header.encoding,
            "total_bytes": header.total_bytes,
            "tensors": tensors,
            "meta": {k: _scalar(v) for k, v in sorted(msg.bundle.meta.items())},
            "digest_in": "frame" if header.total_bytes else "header",
            "payload_hex": payload_bytes.hex(),
            "payload_digest": digest.hex(),
            "model_digest": codec.bundle_digest(msg.bundle),
        }
    return entry


def build() -> dict[str, bytes]:
    """Every vector file by name: the ``.frames`` files and ``vectors.json``."""
    files: dict[str, bytes] = {}
    entries = []
    for make in VECTORS:
        vector = make()
        frames = frames_of(vector)
        files[f"{vector.name}.frames"] = pack(frames)
        entries.append(describe(vector, frames))
    index = {
        "format": (
            "Each <name>.frames file is a sequence of records: a 4-byte unsigned big-endian "
            "length, then that many bytes of one Exchange frame (one gRPC message). Envelopes "
            "are in canonical form (fields in field-number order, map entries sorted by key). "
            "See docs/protocol.md, section 'Test vectors'."
        ),
        "vectors": entries,
    }
    files[INDEX] = (_json(index) + "\n").encode("utf-8")
    return files


def _json(value: Any, indent: str = "") -> str:
    """JSON with objects one key per line, and lists of plain values and small flat objects
    on one line."""
    inner = indent + "  "
    flat = json.dumps(value, ensure_ascii=False)
    nested = isinstance(value, dict) and any(isinstance(v, dict | list) for v in value.values())
    if isinstance(value, dict) and value and len(flat) <= 60 and not nested:
        return flat
    if isinstance(value, dict) and value:
        items = [f"{inner}{json.dumps(k)}: {_json(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        items = [inner + _json(v, inner) for v in value]
        return "[\n" + ",\n".join(items) + "\n" + indent + "]"
    return flat


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    files = build()
    if args.check:
        stale = [n for n, data in files.items() if (HERE / n).read_bytes() != data]
        for name in stale:
            print(f"{name} differs from what the codec writes", file=sys.stderr)
        return 1 if stale else 0
    for name, data in files.items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(files)} files to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
