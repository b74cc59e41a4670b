"""The wire test vectors in tests/vectors/, checked three ways.

1. rumor's codec decodes every committed ``.frames`` file into what ``vectors.json`` says
   (tensors, metadata, payload digest, model digest).
2. rumor's codec, encoding the same messages today, writes the committed bytes.
3. A second, independent implementation written from docs/protocol.md alone (hand-written
   protobuf parsing and writing, ``struct`` and ``xxhash``; nothing from rumor) decodes every
   file to the same description and re-encodes it byte for byte. If the document left out
   something a client needs, this part could not have been written.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import xxhash

from rumor.protocol import codec, framing
from rumor.protocol.errors import Code, Rejected
from rumor.protocol.v1 import node_pb2
from tests.vectors import make_vectors

VECTORS_DIR = Path(__file__).resolve().parent / "vectors"
INDEX = json.loads((VECTORS_DIR / "vectors.json").read_text(encoding="utf-8"))
ENTRIES = {e["name"]: e for e in INDEX["vectors"]}


def committed_frames(name: str) -> list[bytes]:
    return make_vectors.unpack((VECTORS_DIR / ENTRIES[name]["file"]).read_bytes())


# ------------------------------------------------------------------ 1 and 2: rumor's codec


def test_every_vector_file_is_committed_and_the_generator_reproduces_them() -> None:
    files = make_vectors.build()
    committed = {p.name for p in VECTORS_DIR.iterdir() if p.suffix in (".frames", ".json")}
    assert committed == set(files)
    for name, data in files.items():
        assert (VECTORS_DIR / name).read_bytes() == data, f"{name} differs from the codec's"


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_the_codec_encodes_each_message_to_the_committed_frames(name: str) -> None:
    vector = next(v for v in (make() for make in make_vectors.VECTORS) if v.name == name)
    frames = list(framing.message_to_frames(vector.message, chunk_size=vector.chunk_size))
    expected = committed_frames(name)
    assert len(frames) == len(expected)
    assert frames[1:] == expected[1:]  # chunks and digest: byte for byte
    assert make_vectors.canonical_envelope_frame(frames[0]) == expected[0]
    meta = vector.message.bundle.meta if vector.message.bundle is not None else {}
    if len(meta) <= 1:  # no map order to differ in: the node's own bytes are canonical
        assert frames[0] == expected[0]


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_the_codec_decodes_each_vector_to_its_description(name: str) -> None:
    entry = ENTRIES[name]
    frames = committed_frames(name)
    assert [{"kind": framing.parse_frame(f)[0], "length": len(f)} for f in frames] == entry[
        "frames"
    ]
    assembler = framing.MessageAssembler()
    done = [assembler.feed(f) for f in frames]
    assert all(m is None for m in done[:-1]) and done[-1] is not None
    msg = assembler.finish()
    env = entry["envelope"]
    assert (msg.sender, msg.kind, msg.round, msg.time, msg.exchange_id, msg.algorithm) == (
        env["sender"],
        env["kind"],
        env["round"],
        env["time"],
        env["exchange_id"],
        env["algorithm"],
    )
    if env["payload"] is None:
        assert msg.payload is None
    else:
        assert msg.payload.type_url == env["payload"]["type_url"]
        assert msg.payload.value.hex() == env["payload"]["value_hex"]
    want = entry["bundle"]
    if want is None:
        assert msg.bundle is None
        return
    assert msg.bundle is not None
    assert list(msg.bundle.tensors) == [t["name"] for t in want["tensors"]]
    for spec in want["tensors"]:
        t = msg.bundle.tensors[spec["name"]]
        assert str(t.dtype) == "torch." + spec["dtype"]
        assert list(t.shape) == spec["shape"]
        assert t.reshape(-1).view(torch.uint8).numpy().tobytes().hex() == spec["data_hex"]
        values = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        assert values.tolist() == spec["values"]
    assert msg.bundle.meta == {k: next(iter(v.values())) for k, v in want["meta"].items()}
    assert codec.bundle_digest(msg.bundle) == want["model_digest"]
    payload = b"".join(
        bytes(c) for kind, c in (framing.parse_frame(f) for f in frames) if kind == "chunk"
    )
    assert payload.hex() == want["payload_hex"]
    assert xxhash.xxh3_128_digest(payload).hex() == want["payload_digest"]


def test_a_flipped_payload_byte_is_refused_as_data_loss() -> None:
    frames = committed_frames("model")
    chunk = bytearray(frames[1])
    chunk[-1] ^= 0x01
    assembler = framing.MessageAssembler()
    with pytest.raises(Rejected) as refused:
        for f in [frames[0], bytes(chunk), *frames[2:]]:
            assembler.feed(f)
    assert refused.value.code == Code.DATA_LOSS
    assert ENTRIES["model"]["bundle"]["payload_digest"] in refused.value.detail


# ------------------------------------------------- 3: an implementation from the document
#
# Everything below follows docs/protocol.md and the .proto field numbers it lists; it uses
# only the standard library and xxhash.

ENVELOPE, CHUNK, DIGEST = 0x0A, 0x12, 0x1A
#: dtype number -> (name, item size, struct format or None for bfloat16)
DTYPES: dict[int, tuple[str, int, str | None]] = {
    1: ("float32", 4, "<f"),
    2: ("float16", 2, "<e"),
    3: ("bfloat16", 2, None),
    4: ("float64", 8, "<d"),
    5: ("int8", 1, "<b"),
    6: ("int16", 2, "<h"),
    7: ("int32", 4, "<i"),
    8: ("int64", 8, "<q"),
    9: ("uint8", 1, "<B"),
    10: ("bool", 1, "<B"),
}
ALIGN = 64


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    for i in range(10):
        if pos + i >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos + i + 1
    raise ValueError("varint longer than 10 bytes")


def fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of each field of a protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = read_varint(data, pos)
            value, pos = data[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        yield number, wire, value


def int64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def split_frame(frame: bytes) -> tuple[int, bytes]:
    tag = frame[0]
    assert tag in (ENVELOPE, CHUNK, DIGEST)
    n, pos = read_varint(frame, 1)
    assert n == len(frame) - pos
    return tag, frame[pos:]


def decode_scalar(data: bytes) -> dict[str, Any]:
    ((number, _, value),) = list(fields(data))
    if number == 1:
        return {"f": struct.unpack("<d", value)[0]}
    if number == 2:
        return {"i": int64(value)}
    if number == 3:
        return {"s": value.decode("utf-8")}
    return {"b": bool(value)}


def decode_spec(data: bytes) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": "", "dtype_enum": 0, "shape": [], "offset": 0, "nbytes": 0}
    for number, wire, value in fields(data):
        if number == 1:
            spec["name"] = value.decode("utf-8")
        elif number == 2:
            spec["dtype_enum"] = value
        elif number == 3 and wire == 2:  # packed
            pos = 0
            while pos < len(value):
                d, pos = read_varint(value, pos)
                spec["shape"].append(int64(d))
        elif number == 3:
            spec["shape"].append(int64(value))
        elif number == 4:
            spec["offset"] = value
        elif number == 5:
            spec["nbytes"] = value
    spec["dtype"] = DTYPES[spec["dtype_enum"]][0]
    return spec


def decode_header(data: bytes) -> dict[str, Any]:
    header: dict[str, Any] = {"codec_version": 0, "tensors": [], "meta": {}, "total_bytes": 0}
    header.update(digest=b"", encoding="")
    for number, _, value in fields(data):
        if number == 1:
            header["codec_version"] = value
        elif number == 2:
            header["tensors"].append(decode_spec(value))
        elif number == 3:  # a map entry: key = 1, value = 2
            entry = {n: v for n, _, v in fields(value)}
            header["meta"][entry[1].decode("utf-8")] = decode_scalar(entry[2])
        elif number == 4:
            header["total_bytes"] = value
        elif number == 5:
            header["digest"] = value
        elif number == 6:
            header["encoding"] = value.decode("utf-8")
    return header


def decode_envelope(data: bytes) -> dict[str, Any]:
    env: dict[str, Any] = {"protocol_version": 0, "sender": "", "kind": "", "round": 0}
    env.update(time=0.0, exchange_id="", algorithm="", payload=None, bundle=None)
    strings = {2: "sender", 3: "kind", 6: "exchange_id", 9: "algorithm"}
    for number, _, value in fields(data):
        if number == 1:
            env["protocol_version"] = value
        elif number in strings:
            env[strings[number]] = value.decode("utf-8")
        elif number == 4:
            env["round"] = int64(value)
        elif number == 5:
            env["time"] = struct.unpack("<d", value)[0]
        elif number == 7:
            env["bundle"] = decode_header(value)
        elif number == 8:
            any_fields = {n: v for n, _, v in fields(value)}
            env["payload"] = {
                "type_url": any_fields.get(1, b"").decode("utf-8"),
                "value_hex": any_fields.get(2, b"").hex(),
            }
    return env


def element(dtype: int, raw: bytes) -> Any:
    name, _, fmt = DTYPES[dtype]
    if fmt is None:  # bfloat16: the upper half of a float32
        return struct.unpack("<f", b"\0\0" + raw)[0]
    value = struct.unpack(fmt, raw)[0]
    if name == "bool":
        assert value in (0, 1)
        return bool(value)
    return value


def nested(flat: list[Any], shape: list[int]) -> Any:
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = math.prod(shape[1:])
    return [nested(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def model_digest(tensors: list[tuple[str, str, list[int], bytes]]) -> str:
    hasher = xxhash.xxh3_128()
    for name, dtype, shape, raw in sorted(tensors, key=lambda t: t[0].encode("utf-8")):
        label = f"{name}\0{dtype}\0[{', '.join(str(d) for d in shape)}]".encode()
        hasher.update(struct.pack("<Q", len(label)) + label)
        hasher.update(struct.pack("<Q", len(raw)) + raw)
    return hasher.digest().hex()


def independent_decode(frames: list[bytes]) -> dict[str, Any]:
    """A message's description, as vectors.json writes it, from its frames alone."""
    tags = [split_frame(f) for f in frames]
    assert tags[0][0] == ENVELOPE
    env = decode_envelope(tags[0][1])
    header = env.pop("bundle")
    out: dict[str, Any] = {
        "frames": [
            {"kind": {ENVELOPE: "envelope", CHUNK: "chunk", DIGEST: "digest"}[t], "length": len(f)}
            for (t, _), f in zip(tags, frames, strict=True)
        ],
        "envelope": env,
        "bundle": None,
    }
    if header is None:
        assert len(frames) == 1
        return out
    chunks = [body for tag, body in tags[1:] if tag == CHUNK]
    rest = [tag for tag, _ in tags[1:] if tag != CHUNK]
    payload = b"".join(chunks)
    assert len(payload) == header["total_bytes"]
    # the order: chunks, then a digest frame exactly when the header has no digest
    if header["digest"]:
        assert rest == [] and len(header["digest"]) == 16
        digest, digest_in = header["digest"], "header"
    else:
        assert rest == [DIGEST] and tags[-1][0] == DIGEST
        digest, digest_in = tags[-1][1], "frame"
    assert digest == xxhash.xxh3_128_digest(payload)  # canonical, big-endian
    covered = bytearray(len(payload))
    cursor, tensors, described = 0, [], []
    for spec in header["tensors"]:
        name, size, _ = DTYPES[spec["dtype_enum"]]
        assert spec["offset"] == -(-cursor // ALIGN) * ALIGN  # the sender's layout rule
        assert spec["nbytes"] == math.prod(spec["shape"]) * size
        cursor = spec["offset"] + spec["nbytes"]
        raw = payload[spec["offset"] : cursor]
        covered[spec["offset"] : cursor] = b"\1" * len(raw)
        flat = [element(spec["dtype_enum"], raw[i : i + size]) for i in range(0, len(raw), size)]
        tensors.append((spec["name"], name, spec["shape"], raw))
        described.append(
            {**spec, "dtype": name, "data_hex": raw.hex(), "values": nested(flat, spec["shape"])}
        )
    assert cursor == header["total_bytes"]
    assert all(b == 0 for b, c in zip(payload, covered, strict=True) if not c)  # zero padding
    out["bundle"] = {
        "codec_version": header["codec_version"],
        "encoding": header["encoding"],
        "total_bytes": header["total_bytes"],
        "tensors": described,
        "meta": dict(sorted(header["meta"].items())),
        "digest_in": digest_in,
        "payload_hex": payload.hex(),
        "payload_digest": digest.hex(),
        "model_digest": model_digest(tensors),
    }
    return out


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64: two's complement, 10 bytes
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    return bytes(out) + bytes([n])


def field(number: int, wire: int, value: bytes) -> bytes:
    if wire == 2:
        value = varint(len(value)) + value
    return varint(number << 3 | wire) + value


def encode_scalar(scalar: dict[str, Any]) -> bytes:
    ((kind, value),) = scalar.items()
    if kind == "f":
        return field(1, 1, struct.pack("<d", value))
    if kind == "i":
        return field(2, 0, varint(value))
    if kind == "s":
        return field(3, 2, value.encode("utf-8"))
    return field(4, 0, varint(int(value)))  # written even when false: a oneof member


def encode_spec(spec: dict[str, Any]) -> bytes:
    out = field(1, 2, spec["name"].encode("utf-8")) + field(2, 0, varint(spec["dtype_enum"]))
    if spec["shape"]:
        out += field(3, 2, b"".join(varint(d) for d in spec["shape"]))
    if spec["offset"]:
        out += field(4, 0, varint(spec["offset"]))
    if spec["nbytes"]:
        out += field(5, 0, varint(spec["nbytes"]))
    return out


def independent_encode(entry: dict[str, Any]) -> list[bytes]:
    """The canonical frames of a vectors.json entry."""
    env, bundle = entry["envelope"], entry["bundle"]
    body = field(1, 0, varint(env["protocol_version"]))
    for number, key in ((2, "sender"), (3, "kind")):
        if env[key]:
            body += field(number, 2, env[key].encode("utf-8"))
    if env["round"]:
        body += field(4, 0, varint(env["round"]))
    if env["time"]:
        body += field(5, 1, struct.pack("<d", env["time"]))
    if env["exchange_id"]:
        body += field(6, 2, env["exchange_id"].encode("utf-8"))
    payload = b""
    if bundle is not None:
        payload = bytes.fromhex(bundle["payload_hex"])
        header = field(1, 0, varint(bundle["codec_version"]))
        for spec in bundle["tensors"]:
            header += field(2, 2, encode_spec(spec))
        for key in sorted(bundle["meta"]):
            entry_bytes = field(1, 2, key.encode("utf-8"))
            entry_bytes += field(2, 2, encode_scalar(bundle["meta"][key]))
            header += field(3, 2, entry_bytes)
        if bundle["total_bytes"]:
            header += field(4, 0, varint(bundle["total_bytes"]))
        if bundle["digest_in"] == "header":
            header += field(5, 2, xxhash.xxh3_128_digest(payload))
        header += field(6, 2, bundle["encoding"].encode("utf-8"))
        body += field(7, 2, header)
    if env["payload"] is not None:
        packed = field(1, 2, env["payload"]["type_url"].encode("utf-8"))
        packed += field(2, 2, bytes.fromhex(env["payload"]["value_hex"]))
        body += field(8, 2, packed)
    if env["algorithm"]:
        body += field(9, 2, env["algorithm"].encode("utf-8"))
    frames = [field(1, 2, body)]  # Frame.envelope: tag 0x0A
    size = entry["chunk_size"]
    frames += [field(2, 2, payload[i : i + size]) for i in range(0, len(payload), size)]
    if bundle is not None and bundle["digest_in"] == "frame":
        frames.append(field(3, 2, xxhash.xxh3_128_digest(payload)))
    return frames


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_an_implementation_written_from_the_document_decodes_each_vector(name: str) -> None:
    entry = ENTRIES[name]
    got = independent_decode(committed_frames(name))
    want = {k: entry[k] for k in ("frames", "envelope", "bundle")}
    assert got == want


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_an_implementation_written_from_the_document_encodes_each_vector(name: str) -> None:
    assert independent_encode(ENTRIES[name]) == committed_frames(name)


def test_the_documented_digest_examples() -> None:
    assert xxhash.xxh3_128_digest(b"abc").hex() == "06b05ab6733a618578af5f94892f3950"
    assert xxhash.xxh3_128_digest(b"").hex() == "99aa06d3014798d86001c324468d497f"
    # the chunk frame prefix of a 2 MiB chunk, as the document gives it
    assert field(2, 2, bytes(2 << 20))[:5] == bytes.fromhex("1280808001")
    assert varint(300) == b"\xac\x02"


def test_the_documented_model_digest_is_the_one_nodes_report() -> None:
    g = torch.Generator().manual_seed(3)
    state = {
        "b": torch.randn(4, generator=g),
        "a.weight": torch.randn(2, 3, generator=g).to(torch.bfloat16),
        "count": torch.tensor(7),
        "none": torch.zeros(0, 2, dtype=torch.float16),
    }
    tensors = [
        (k, str(v.dtype).removeprefix("torch."), list(v.shape), _raw(v)) for k, v in state.items()
    ]
    assert model_digest(tensors) == codec.bundle_digest(state)


def test_envelope_fields_match_the_documented_numbers() -> None:
    """The field numbers the independent implementation uses are the .proto's."""
    env = node_pb2.Envelope(protocol_version=2, sender="s", kind="k", round=-3, time=1.5)
    env.exchange_id, env.algorithm = "x", "a"
    env.bundle.total_bytes = 5
    decoded = decode_envelope(env.SerializeToString())
    assert decoded["round"] == -3 and decoded["time"] == 1.5
    assert (decoded["sender"], decoded["kind"], decoded["exchange_id"], decoded["algorithm"]) == (
        "s",
        "k",
        "x",
        "a",
    )
    assert decoded["bundle"]["total_bytes"] == 5


def _raw(t: torch.Tensor) -> bytes:
    """A tensor's elements, row-major, little-endian (this host is little-endian)."""
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
