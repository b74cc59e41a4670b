"""Micro-measurement: is the bundle codec (and framing) cheap next to the network?

Times encode -> chunks -> feed -> finish on a float32 state dict (default 100 MB: 8 large
tensors plus 64 small ones) and compares it with ``np.copyto`` of the same number of bytes
into memory already in use, measured in the same rounds (interleaved, so host drift hits
both). Also times the full framing path (``message_to_frames`` -> ``MessageAssembler``), its
parts, and the ways of building one chunk frame. MB = 10^6 bytes.

Run: ``.venv/bin/python bench/bench_codec.py [--mb 100] [--reps 7] [--chunk 1048576]``.
It measures in-process CPU cost only; it must not open sockets or need a second process
(the transport limits live in ``specs/transport-limits.md``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from rumor.protocol import codec, framing
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.constants import CHUNK_SIZE
from rumor.protocol.v1 import tensor_pb2


def make_state(mb: float) -> dict[str, torch.Tensor]:
    """A state dict of about ``mb`` MB: 8 large float32 tensors and 64 small ones."""
    total = int(mb * 1e6) // 4
    small = [torch.randn(1000) for _ in range(64)]
    big_each = (total - 64 * 1000) // 8
    state = {f"layer{i}.weight": torch.randn(big_each) for i in range(8)}
    state.update({f"layer{i}.bias": t for i, t in enumerate(small)})
    return state


def codec_round(bundle: Bundle, chunk: int, check_finite: bool) -> Bundle:
    enc = codec.encode(bundle)
    dec = codec.BundleDecoder(enc.header, check_finite=check_finite)
    for piece in enc.chunks(chunk):
        dec.feed(piece)
    return dec.finish()


def framing_round(bundle: Bundle, chunk: int) -> Message:
    assembler = framing.MessageAssembler()
    out = None
    for frame in framing.message_to_frames(Message(kind="bench", bundle=bundle), chunk_size=chunk):
        out = assembler.feed(frame) or out
    assert out is not None
    return out


def frames_only(bundle: Bundle, chunk: int) -> None:
    for _ in framing.message_to_frames(Message(kind="bench", bundle=bundle), chunk_size=chunk):
        pass


def receive(header: tensor_pb2.BundleHeader, wire: memoryview, chunk: int) -> Bundle:
    dec = codec.BundleDecoder(header)
    for i in range(0, len(wire), chunk):
        dec.feed(wire[i : i + chunk])
    return dec.finish()


def frame_join(view: memoryview, chunk: int) -> None:
    for i in range(0, len(view), chunk):
        framing.chunk_frame(view[i : i + chunk])


def frame_bytearray(view: memoryview, chunk: int) -> None:
    for i in range(0, len(view), chunk):
        part = view[i : i + chunk]
        prefix = b"\x12" + framing._varint(len(part))
        buf = bytearray(len(prefix) + len(part))
        buf[: len(prefix)] = prefix
        buf[len(prefix) :] = part
        bytes(buf)  # gRPC's identity serializer wants bytes


def frame_concat(view: memoryview, chunk: int) -> None:
    for i in range(0, len(view), chunk):
        part = view[i : i + chunk]
        b"\x12" + framing._varint(len(part)) + bytes(part)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=100.0)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--chunk", type=int, default=CHUNK_SIZE)
    args = parser.parse_args()

    bundle = Bundle(make_state(args.mb))
    nbytes = bundle.nbytes
    flat = torch.cat([t.reshape(-1) for t in bundle.tensors.values()])
    src = flat.numpy()
    dst = np.empty_like(src)
    dst.fill(0)  # memory already in use, as in the transport-limits memcpy row
    view = memoryview(src).cast("B")
    chunk = args.chunk
    encoded = codec.encode(bundle)
    header = encoded.header
    wire = memoryview(b"".join(encoded.chunks())).cast("B")

    cases: dict[str, Callable[[], object]] = {
        "memcpy np.copyto (preallocated)": lambda: np.copyto(dst, src),
        "codec encode+chunks+feed+finish": lambda: codec_round(bundle, chunk, True),
        "  same, check_finite=False": lambda: codec_round(bundle, chunk, False),
        "framing frames -> MessageAssembler": lambda: framing_round(bundle, chunk),
        "  encode only (layout + digest)": lambda: codec.encode(bundle),
        "  sender: message_to_frames": lambda: frames_only(bundle, chunk),
        "  receiver: BundleDecoder feed+finish": lambda: receive(header, wire, chunk),
        "  chunk frame: b''.join (used)": lambda: frame_join(view, chunk),
        "  chunk frame: bytearray + bytes()": lambda: frame_bytearray(view, chunk),
        "  chunk frame: concat + bytes(slice)": lambda: frame_concat(view, chunk),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():  # warm-up
        fn()
    for _ in range(args.reps):  # interleaved rounds
        for name, fn in cases.items():
            times[name].append(timed(fn))

    threads = torch.get_num_threads()
    print(
        f"{nbytes / 1e6:.1f} MB float32 state dict, {len(bundle.tensors)} tensors, "
        f"chunk {chunk} B, {args.reps} interleaved reps, torch threads {threads}"
    )
    print(f"{'path':40s} {'median MB/s':>12s} {'min':>8s} {'max':>8s} {'vs memcpy':>10s}")
    base = nbytes / statistics.median(times["memcpy np.copyto (preallocated)"]) / 1e6
    for name, ts in times.items():
        rates = [nbytes / t / 1e6 for t in ts]
        med = statistics.median(rates)
        print(f"{name:40s} {med:12.0f} {min(rates):8.0f} {max(rates):8.0f} {med / base:9.0%}")


if __name__ == "__main__":
    main()
