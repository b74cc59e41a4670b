"""Bundle codec: a :class:`~rumor.protocol.bundle.Bundle` to a header plus raw payload bytes.

The wire form of a bundle is one ``BundleHeader`` (see ``proto/rumor/v1/tensor.proto``) and a
payload of exactly ``total_bytes`` bytes. The payload is every tensor's raw **little-endian**
bytes, each starting at an offset aligned to :data:`~rumor.protocol.constants.ALIGNMENT`, with
zero bytes in the gaps. ``digest`` is xxh3-128 of the payload exactly as it travels, padding
included; it is in the header, or, when the header leaves it empty, given to
:meth:`BundleDecoder.finish` after the payload (how streams send it, see
:mod:`rumor.protocol.framing`). Big-endian hosts are refused with
:class:`NotImplementedError` rather than sending or accepting byte-swapped data.

Cost model (measured in ``specs/transport-limits.md``): the sender never concatenates the
model; :meth:`EncodedBundle.chunk_parts` hands out memoryviews into the source tensors and
the only copy is the one that builds each outgoing frame. The receiver copies chunks into one
preallocated landing buffer and returns tensors that are views into it, so a decoded bundle
costs one allocation and one copy.

This module must not import grpc, know about envelopes or frames (that is
:mod:`rumor.protocol.framing`), pickle anything, or trust a header it has not validated.
"""

from __future__ import annotations

import itertools
import math
import numbers
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash

from rumor.protocol.bundle import Bundle, Scalar
from rumor.protocol.constants import (
    ALIGNMENT,
    CHUNK_SIZE,
    CODEC_VERSION,
    ENCODING_RAW_LE,
    MAX_BUNDLE_BYTES,
    MAX_NDIM,
    MAX_TENSORS,
)
from rumor.protocol.errors import Code, Rejected
from rumor.protocol.v1 import tensor_pb2

__all__ = [
    "DIGEST_SIZE",
    "BundleDecoder",
    "ByteChunk",
    "EncodedBundle",
    "bundle_digest",
    "decode",
    "dtype_from_wire",
    "dtype_to_wire",
    "encode",
    "plan",
]

#: Length of ``BundleHeader.digest`` in bytes (xxh3-128).
DIGEST_SIZE = 16

_TO_WIRE: dict[torch.dtype, int] = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
    torch.float64: tensor_pb2.DTYPE_FLOAT64,
    torch.int8: tensor_pb2.DTYPE_INT8,
    torch.int16: tensor_pb2.DTYPE_INT16,
    torch.int32: tensor_pb2.DTYPE_INT32,
    torch.int64: tensor_pb2.DTYPE_INT64,
    torch.uint8: tensor_pb2.DTYPE_UINT8,
    torch.bool: tensor_pb2.DTYPE_BOOL,
}
_FROM_WIRE: dict[int, torch.dtype] = {v: k for k, v in _TO_WIRE.items()}
_ITEMSIZE: dict[torch.dtype, int] = {d: torch.empty((), dtype=d).element_size() for d in _TO_WIRE}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_ZEROS = memoryview(bytes(ALIGNMENT))
_NAME_IN_ERRORS = 120  # characters of a tensor or meta name quoted in error messages

ByteChunk = memoryview | bytes


def _require_little_endian() -> None:
    if sys.byteorder != "little":
        raise NotImplementedError(
            "rumor's tensor wire format is little-endian; big-endian hosts are not supported"
        )


def _align(n: int) -> int:
    return -(-n // ALIGNMENT) * ALIGNMENT


def _q(name: str) -> str:
    """A name quoted for an error message, shortened if a peer sent something huge."""
    if len(name) > _NAME_IN_ERRORS:
        name = name[:_NAME_IN_ERRORS] + "..."
    return repr(name)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_to_wire(dtype: torch.dtype) -> int:
    """The ``DType`` enum value of a torch dtype; :class:`TypeError` if it cannot travel."""
    try:
        return _TO_WIRE[dtype]
    except KeyError:
        supported = ", ".join(_dtype_name(d) for d in _TO_WIRE)
        raise TypeError(f"dtype {dtype} cannot be sent; supported: {supported}") from None


def dtype_from_wire(value: int) -> torch.dtype:
    """The torch dtype of a ``DType`` enum value; ``Rejected`` for unknown values."""
    try:
        return _FROM_WIRE[value]
    except KeyError:
        try:
            label = f"{tensor_pb2.DType.Name(value)} ({value})"
        except ValueError:
            label = str(value)
        raise Rejected(Code.INVALID_ARGUMENT, f"unknown dtype {label}") from None


def _checked(name: str, t: object) -> torch.Tensor:
    """``t`` detached, after checking that it can travel at all (no copy)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor {_q(name)} is a {type(t).__name__}, not a torch.Tensor")
    if t.layout != torch.strided:
        raise TypeError(f"tensor {_q(name)} has layout {t.layout}; only dense tensors travel")
    dtype_to_wire(t.dtype)
    return t.detach()


def _wire_tensor(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as a detached, contiguous CPU tensor; copies only when it has to."""
    t = _checked(name, t)
    if t.device.type != "cpu":
        t = t.to("cpu")
    if t.is_neg():
        t = t.resolve_neg()
    if not t.is_contiguous():
        t = t.contiguous()
    return t


def _empty_bytes(n: int) -> torch.Tensor:
    """An uninitialised uint8 tensor of ``n`` bytes for a landing or snapshot buffer.

    Allocated by numpy, which asks Linux for transparent huge pages on large blocks: first
    writes into fresh memory then fault 2 MiB at a time instead of 4 KiB. On the reference
    machine that lands a 100 MB payload about 4x faster than ``torch.empty`` (see
    ``bench/bench_codec.py``). The tensor shares the array's memory and keeps it alive.
    """
    if n == 0:
        return torch.empty(0, dtype=torch.uint8)  # from_numpy gives stride 0 here; no dtype views
    return torch.from_numpy(np.empty(n, dtype=np.uint8))


def _byte_view(t: torch.Tensor) -> memoryview:
    """Zero-copy bytes of a contiguous CPU tensor (bf16 and bool go through a uint8 view)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")


def _scalar_to_wire(key: str, value: Scalar) -> tensor_pb2.Scalar:
    # bool before int: bool is an int subclass in Python.
    if isinstance(value, bool | np.bool_):
        return tensor_pb2.Scalar(b=bool(value))
    if isinstance(value, numbers.Integral):
        v = int(value)
        if not _INT64_MIN <= v <= _INT64_MAX:
            raise ValueError(f"meta {_q(key)}: {v} does not fit in int64")
        return tensor_pb2.Scalar(i=v)
    if isinstance(value, numbers.Real):
        return tensor_pb2.Scalar(f=float(value))
    if isinstance(value, str):
        return tensor_pb2.Scalar(s=value)
    raise TypeError(f"meta {_q(key)} is a {type(value).__name__}; use bool, int, float or str")


def _scalar_from_wire(key: str, value: tensor_pb2.Scalar) -> Scalar:
    kind = value.WhichOneof("value")
    if kind is None:
        raise Rejected(Code.INVALID_ARGUMENT, f"meta {_q(key)} has no value")
    return getattr(value, kind)


# --------------------------------------------------------------------------------- encode


@dataclass
class EncodedBundle:
    """A bundle ready to stream: its header and the pieces of its payload.

    Unless it was encoded with ``snapshot=True``, the payload pieces are views into the
    caller's tensors, which this object keeps alive. The caller must not modify those tensors
    until streaming ends: the receiver would reject changed bytes with ``DATA_LOSS`` (the
    digest was taken at encode time, or is taken as the chunks go out).
    """

    header: tensor_pb2.BundleHeader
    _pieces: list[ByteChunk] = field(default_factory=list, repr=False)
    _keep: list[torch.Tensor] = field(default_factory=list, repr=False)

    @property
    def total_bytes(self) -> int:
        return self.header.total_bytes

    def chunk_parts(
        self, chunk_size: int = CHUNK_SIZE, start: int = 0
    ) -> Iterator[list[ByteChunk]]:
        """The payload as chunks of ``chunk_size`` bytes (the last may be shorter).

        Each chunk is a list of zero-copy pieces (tensor bytes and zero padding) whose
        lengths add up to the chunk's length, so a writer can join them with its own prefix
        in a single copy. The lists are fresh; the pieces are views and must not outlive
        this object's tensors. ``start`` (a byte offset) skips the payload before it, so
        chunk ``i`` alone is ``next(chunk_parts(size, start=i * size))``.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, not {start}")
        parts: list[ByteChunk] = []
        room = chunk_size
        skip = start
        for piece in self._pieces:
            pos, n = 0, len(piece)
            if skip >= n:
                skip -= n
                continue
            pos, skip = skip, 0
            while pos < n:
                take = min(room, n - pos)
                parts.append(piece if take == n else piece[pos : pos + take])
                pos += take
                room -= take
                if room == 0:
                    yield parts
                    parts, room = [], chunk_size
        if parts:
            yield parts

    def chunks(self, chunk_size: int = CHUNK_SIZE) -> Iterator[ByteChunk]:
        """The payload in chunks of at most ``chunk_size`` bytes, padding included.

        A chunk inside a single tensor is a zero-copy memoryview; a chunk that spans tensors
        or padding is joined into ``bytes`` (one copy of that chunk only).
        """
        for parts in self.chunk_parts(chunk_size):
            yield parts[0] if len(parts) == 1 else b"".join(parts)


def _layout(
    bundle: Bundle, wire_ready: bool
) -> tuple[tensor_pb2.BundleHeader, list[torch.Tensor], list[int]]:
    """Header without digest, the tensors and their offsets.

    With ``wire_ready`` the tensors are contiguous CPU tensors whose bytes can be viewed;
    otherwise they are only detached (no copy), for callers that copy them anyway.
    """
    _require_little_endian()
    header = tensor_pb2.BundleHeader(codec_version=CODEC_VERSION, encoding=ENCODING_RAW_LE)
    tensors: list[torch.Tensor] = []
    offsets: list[int] = []
    cursor = 0
    for name, raw in bundle.tensors.items():
        t = _wire_tensor(name, raw) if wire_ready else _checked(name, raw)
        nbytes = t.numel() * _ITEMSIZE[t.dtype]
        offset = _align(cursor)
        header.tensors.add(
            name=name,
            dtype=_TO_WIRE[t.dtype],
            shape=list(t.shape),
            offset=offset,
            nbytes=nbytes,
        )
        tensors.append(t)
        offsets.append(offset)
        cursor = offset + nbytes
    header.total_bytes = cursor
    for key, value in bundle.meta.items():
        header.meta[key].CopyFrom(_scalar_to_wire(key, value))
    return header, tensors, offsets


def plan(bundle: Bundle, *, defer_digest: bool = False) -> tensor_pb2.BundleHeader:
    """The header :func:`encode` would produce, but with an all-zero digest (or none).

    Neither reads nor copies tensor bytes; useful to size a message before sending it.
    ``defer_digest`` as for :func:`encode`.
    """
    header, _, _ = _layout(bundle, wire_ready=False)
    if not (defer_digest and header.total_bytes):
        header.digest = bytes(DIGEST_SIZE)
    return header


def _snapshot(tensors: list[torch.Tensor], offsets: list[int], total: int) -> torch.Tensor:
    """The payload copied once into one new buffer (straight from any device or layout)."""
    buf = _empty_bytes(total)
    end = 0
    for t, offset in zip(tensors, offsets, strict=True):
        if offset > end:
            buf[end:offset].zero_()
        end = offset + t.numel() * _ITEMSIZE[t.dtype]
        if end > offset:
            buf[offset:end].view(t.dtype).view(t.shape).copy_(t)
    return buf


def encode(bundle: Bundle, *, snapshot: bool = False, defer_digest: bool = False) -> EncodedBundle:
    """Lay out ``bundle`` for the wire and compute its digest (one read of every byte).

    Tensors keep their dtype and shape; non-contiguous tensors are made contiguous and
    tensors on other devices are moved to the CPU (those are the only copies). With
    ``snapshot=True`` all tensors are instead copied once into one new buffer, so the caller
    may keep modifying them (e.g. keep training) while the payload streams. With
    ``defer_digest=True`` a non-empty payload is not read here and ``header.digest`` stays
    empty: the caller hashes the chunks as it sends them and sends the digest after the last
    one (an Exchange stream's ``Frame.digest``), so the first chunk can leave at once.
    """
    header, tensors, offsets = _layout(bundle, wire_ready=not snapshot)
    pieces: list[ByteChunk] = []
    keep: list[torch.Tensor]
    if snapshot:
        buf = _snapshot(tensors, offsets, header.total_bytes)
        keep = [buf]
        if header.total_bytes:
            pieces.append(memoryview(buf.numpy()).cast("B"))
    else:
        keep = tensors
        end = 0
        for t, offset in zip(tensors, offsets, strict=True):
            if offset > end:
                pieces.append(_ZEROS[: offset - end])
            end = offset
            if t.numel():
                view = _byte_view(t)
                pieces.append(view)
                end += len(view)

    if not (defer_digest and header.total_bytes):
        hasher = xxhash.xxh3_128()
        for piece in pieces:
            hasher.update(piece)
        header.digest = hasher.digest()
    return EncodedBundle(header=header, _pieces=pieces, _keep=keep)


# --------------------------------------------------------------------------------- decode


def _shape_str(shape: list[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _validate(header: tensor_pb2.BundleHeader, max_bytes: int) -> list[torch.dtype]:
    """Check everything a header claims; return the dtype of each tensor."""
    if header.codec_version != CODEC_VERSION:
        raise Rejected(
            Code.FAILED_PRECONDITION,
            f"codec version {header.codec_version} not supported (this node speaks "
            f"{CODEC_VERSION})",
        )
    if header.encoding != ENCODING_RAW_LE:
        raise Rejected(
            Code.INVALID_ARGUMENT,
            f"unknown encoding {_q(header.encoding)} (this node knows {ENCODING_RAW_LE!r})",
        )
    total = header.total_bytes
    if total > max_bytes:
        raise Rejected(
            Code.RESOURCE_EXHAUSTED, f"bundle of {total} bytes exceeds the limit of {max_bytes}"
        )
    if len(header.digest) not in (0, DIGEST_SIZE):  # empty: it follows the payload
        raise Rejected(
            Code.INVALID_ARGUMENT,
            f"digest of {len(header.digest)} bytes; xxh3-128 needs {DIGEST_SIZE}",
        )
    if len(header.tensors) > MAX_TENSORS:
        raise Rejected(
            Code.INVALID_ARGUMENT,
            f"too many tensors: {len(header.tensors)}, the limit is {MAX_TENSORS}",
        )
    dtypes: list[torch.dtype] = []
    names: set[str] = set()
    spans: list[tuple[int, int, str]] = []
    end_of_layout = 0
    for spec in header.tensors:
        name = spec.name
        if name in names:
            raise Rejected(Code.INVALID_ARGUMENT, f"duplicate tensor name {_q(name)}")
        names.add(name)
        try:
            dtype = dtype_from_wire(spec.dtype)
        except Rejected as exc:
            raise Rejected(exc.code, f"tensor {_q(name)}: {exc.detail}") from None
        dtypes.append(dtype)
        shape = list(spec.shape)
        if len(shape) > MAX_NDIM:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"tensor {_q(name)}: too many dims: {len(shape)}, the limit is {MAX_NDIM}",
            )
        if any(d < 0 for d in shape):
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"tensor {_q(name)}: negative dim in shape {_shape_str(shape)}",
            )
        need = math.prod(shape) * _ITEMSIZE[dtype]
        if need != spec.nbytes:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"tensor {_q(name)}: shape {_shape_str(shape)} of {_dtype_name(dtype)} needs "
                f"{need} bytes, header says {spec.nbytes}",
            )
        if spec.offset % ALIGNMENT:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"tensor {_q(name)}: offset {spec.offset} is misaligned (must be a multiple "
                f"of {ALIGNMENT})",
            )
        end = spec.offset + spec.nbytes
        if end > total:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"tensor {_q(name)}: bytes [{spec.offset}, {end}) are out of range of a "
                f"payload of {total} bytes",
            )
        end_of_layout = max(end_of_layout, end)
        if spec.nbytes:
            spans.append((spec.offset, end, name))
    spans.sort(key=lambda span: span[0])  # stable: ties keep header order
    for (_, prev_end, prev), (start, _, cur) in itertools.pairwise(spans):
        if start < prev_end:
            raise Rejected(
                Code.INVALID_ARGUMENT, f"tensors {_q(prev)} and {_q(cur)} overlap in the payload"
            )
    if total != end_of_layout:
        raise Rejected(
            Code.INVALID_ARGUMENT,
            f"total_bytes {total} does not match the layout, whose tensors end at {end_of_layout}",
        )
    for key, value in header.meta.items():
        _scalar_from_wire(key, value)
    return dtypes


def _finite(t: torch.Tensor) -> bool:
    if t.numel() == 0:
        return True
    # A finite sum proves every element finite (NaN and Inf propagate; Inf - Inf is NaN);
    # only a non-finite sum, which large finite values can also produce, needs the exact test.
    if math.isfinite(t.sum().item()):
        return True
    return bool(torch.isfinite(t).all().item())


class BundleDecoder:
    """Receives one bundle: validate the header, :meth:`feed` chunks, :meth:`finish`.

    The header is checked on construction, before any memory is reserved; every refusal is
    a :class:`Rejected` whose message names the problem. The payload lands in one uint8
    buffer of ``total_bytes`` allocated once, and the returned tensors are views into it:
    writable, owned by the receiver, and independent of the sender.
    """

    def __init__(
        self,
        header: tensor_pb2.BundleHeader,
        max_bytes: int = MAX_BUNDLE_BYTES,
        check_finite: bool = True,
    ) -> None:
        _require_little_endian()
        self._dtypes = _validate(header, max_bytes)
        self.header = header
        self.check_finite = check_finite
        self.total_bytes: int = header.total_bytes
        self.received = 0
        self._landing = _empty_bytes(self.total_bytes)
        self._landing_mv = memoryview(self._landing.numpy()).cast("B")
        self._hasher = xxhash.xxh3_128()
        self._finished = False

    @property
    def complete(self) -> bool:
        """Whether all announced bytes have arrived."""
        return self.received == self.total_bytes

    def feed(self, chunk: bytes | bytearray | memoryview) -> None:
        """Copy one chunk into the landing buffer (and into the running digest)."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        mv = memoryview(chunk)
        if mv.ndim != 1 or mv.format != "B":
            mv = mv.cast("B")
        n = len(mv)
        pos = self.received
        if pos + n > self.total_bytes:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"oversize: got at least {pos + n} bytes of a payload announced as "
                f"{self.total_bytes}",
            )
        self._landing_mv[pos : pos + n] = mv
        self._hasher.update(mv)
        self.received = pos + n

    @property
    def needs_digest(self) -> bool:
        """Whether the header left the digest out, so :meth:`finish` must be given it."""
        return not self.header.digest

    def finish(self, digest: bytes | None = None) -> Bundle:
        """Check length, digest and (optionally) finiteness; return the decoded bundle.

        ``digest`` is the one sent after the payload, required exactly when the header
        carries none (:attr:`needs_digest`).
        """
        if self._finished:
            raise RuntimeError("finish() called twice")
        if self.received != self.total_bytes:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"truncated: got {self.received} of {self.total_bytes} bytes",
            )
        if self.header.digest:
            if digest is not None:
                raise Rejected(
                    Code.INVALID_ARGUMENT, "a second digest after the payload; the header has one"
                )
            expected, source = self.header.digest, "header"
        elif digest is None:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                "no digest: the header has none and none followed the payload",
            )
        elif len(digest) != DIGEST_SIZE:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"digest of {len(digest)} bytes after the payload; xxh3-128 needs {DIGEST_SIZE}",
            )
        else:
            expected, source = digest, "sender"
        actual = self._hasher.digest()
        if actual != expected:
            raise Rejected(
                Code.DATA_LOSS,
                f"digest mismatch: payload hashes to {actual.hex()}, {source} says "
                f"{expected.hex()}",
            )
        tensors: dict[str, torch.Tensor] = {}
        for spec, dtype in zip(self.header.tensors, self._dtypes, strict=True):
            raw = self._landing[spec.offset : spec.offset + spec.nbytes]
            t = raw.view(dtype).reshape(tuple(spec.shape))
            if self.check_finite and dtype.is_floating_point and not _finite(t):
                raise Rejected(
                    Code.INVALID_ARGUMENT, f"tensor {_q(spec.name)} has non-finite values"
                )
            tensors[spec.name] = t
        meta = {k: _scalar_from_wire(k, v) for k, v in sorted(self.header.meta.items())}
        self._finished = True
        return Bundle(tensors, meta)


def decode(
    header: tensor_pb2.BundleHeader,
    payload: bytes | bytearray | memoryview,
    max_bytes: int = MAX_BUNDLE_BYTES,
    check_finite: bool = True,
    digest: bytes | None = None,
) -> Bundle:
    """Decode a complete payload in one call (copies it once into the landing buffer).

    ``digest`` is required when the header carries none (see :func:`encode`).
    """
    decoder = BundleDecoder(header, max_bytes=max_bytes, check_finite=check_finite)
    decoder.feed(payload)
    return decoder.finish(digest)


# --------------------------------------------------------------------------------- digest


def bundle_digest(tensors: Mapping[str, torch.Tensor] | Bundle) -> str:
    """Hex xxh3-128 of named tensors, for logs and status: equal models, equal digests.

    Tensors are hashed in sorted-name order; each name, dtype and shape is mixed in with
    its bytes, so a renamed, reshaped or reinterpreted tensor changes the digest. It depends
    neither on dict order nor on the wire layout (it is not ``BundleHeader.digest``).
    """
    _require_little_endian()
    if isinstance(tensors, Bundle):
        tensors = tensors.tensors
    hasher = xxhash.xxh3_128()
    for name in sorted(tensors):
        t = _wire_tensor(name, tensors[name])
        label = f"{name}\0{_dtype_name(t.dtype)}\0{_shape_str(list(t.shape))}"
        raw = label.encode("utf-8", "surrogatepass")
        hasher.update(len(raw).to_bytes(8, "little"))
        hasher.update(raw)
        hasher.update((t.numel() * _ITEMSIZE[t.dtype]).to_bytes(8, "little"))
        if t.numel():
            hasher.update(_byte_view(t))
    return hasher.hexdigest()
