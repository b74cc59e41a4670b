"""Model exchange between two processes over rumor's gRPC transport, against raw loopback TCP.

A server process runs a :class:`~rumor.protocol.grpc_transport.GrpcTransport` (uvloop, the
node's defaults: digest and finiteness checks on) whose service accepts a model and answers
with a bare acknowledgement. This process is the client: it sends a float32 state dict of
``--sizes`` MB (8 large matrices, 64 small vectors) with ``GrpcTransport.request`` and times
from the call until the acknowledgement has arrived, so the time covers encoding, framing,
the stream, the receiver's landing copy, digest and finiteness check, and the ack.

Reference, measured in the same run and interleaved rep by rep (TCP, gRPC, TCP, gRPC, ...):
raw TCP to a receiver process, ``sendall`` from a preallocated buffer and ``recv_into`` a
preallocated buffer in 1 MiB pieces, timed until the receiver acknowledges the last byte.
The figure of merit is gRPC MB/s as a percentage of TCP MB/s (target: at least 30 % at 100
MB). A second reference, also interleaved, is the ``bare e2e`` row: what grpc.aio itself
reaches tensor to tensor on this machine, by the end-to-end path of
``../shared/specs/transport-limits.md`` (``tensor1``): the client yields
``bytes(memoryview(t.numpy())[i:i + 1 MiB])`` per tensor, a bare handler copies each chunk
into a reused, preallocated landing buffer and answers; no envelope, digest, finiteness
check or validation. MB = 10^6 bytes. The ``CPU ms/MB`` column is the CPU time of both
processes (all threads, from the scheduler's counters) per MB moved: on a machine whose
cores are all busy, as in a local cluster, it is what limits throughput. Both processes use
one torch thread, like a node (``torch_threads = 1``), and both apply a node's allocator tuning
(:mod:`rumor.node.allocator`; ``RUMOR_MALLOC_TUNING=0`` leaves it off). ``--torch-threads 2``
shows what the receiver's finiteness check costs when its reductions must wait for a
second, busy core.

``--breakdown`` adds rows that show where the time goes, each interleaved in the same reps:

- ``prebuilt``: the same Exchange call with frames built before the clock starts (removes
  the sender's digest and frame copies from the timed path; the receiver still decodes).
- ``null``: the same prebuilt frames to a bare grpc.aio handler with the transport's
  channel options that only drops the frames and acknowledges (the gRPC floor).
- ``encode`` / ``decode``: in-process time of ``message_to_frames`` (digest + one copy per
  frame) and of ``MessageAssembler`` over ready frames (landing copy, digest, finite check).
- ``server``: from the call until the server's handler saw the complete message
  (process clocks are the same wall clock on one machine).

``--chunks`` sweeps the transport's ``chunk_size`` (bytes per frame).

Run: ``.venv/bin/python bench/bench_exchange.py [--sizes 10,100,400] [--reps 5]
[--chunks 2097152] [--breakdown] [--torch-threads 1] [--out]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import multiprocessing as mp
import time
from collections import defaultdict
from typing import Any

from common import (
    MB,
    MIB,
    CpuMeter,
    Results,
    Summary,
    TcpReference,
    add_out_argument,
    machine_info,
    make_state,
    now,
    print_table,
    state_nbytes,
    stop_process,
)

from rumor.protocol.constants import CHUNK_SIZE

STOP_KIND = "bench.stop"
STATS_KIND = "bench.stats"
MODEL_KIND = "bench.model"
NULL_METHOD = "/bench.Null/Exchange"
BARE_METHOD = "/bench.Null/Land"
TIMEOUT_S = 300.0
#: Untimed reps first. Two, because the first bare-e2e call allocates its landing buffer,
#: which takes the heap block the node's landing buffer had freed; the next rumor call then
#: lands in fresh memory, and page faults on this VM made that one call 3-4x slower.
WARMUP_REPS = 2


# ----------------------------------------------------------------------------- server


def _serve(pipe: Any, chunk_size: int, torch_threads: int) -> None:
    """Child process: a GrpcTransport that acks every model, plus a bare null handler."""
    import torch
    import uvloop

    from rumor.node.allocator import keep_freed_memory

    keep_freed_memory()  # as every node process does at start (RUMOR_MALLOC_TUNING=0: off)
    torch.set_num_threads(torch_threads)
    uvloop.run(_serve_async(pipe, chunk_size))


async def _serve_async(pipe: Any, chunk_size: int) -> None:
    import grpc

    from rumor.protocol import channels, framing
    from rumor.protocol.bundle import Bundle, Message
    from rumor.protocol.grpc_transport import ACK_KIND, GrpcTransport
    from rumor.protocol.v1 import node_pb2

    stop = asyncio.Event()
    handled: list[float] = []

    class AckService:
        async def handle_message(self, msg: Message) -> Message | None:
            if msg.kind == STOP_KIND:
                stop.set()
            elif msg.kind == STATS_KIND:
                times = ",".join(repr(t) for t in handled)
                handled.clear()
                return Message(kind=STATS_KIND, bundle=Bundle({}, {"handled": times}))
            else:
                handled.append(time.time())
            return None

        async def handle_ping(self, ping: node_pb2.Ping) -> node_pb2.Pong:
            return node_pb2.Pong(node_id="server")

        def status(self) -> node_pb2.StatusReply:
            return node_pb2.StatusReply(node_id="server")

    [ack] = framing.message_to_frames(Message(kind=ACK_KIND))  # one envelope frame

    async def null_exchange(frames: Any, context: Any) -> Any:
        async for _ in frames:
            pass
        yield ack

    landing: dict[int, memoryview] = {}  # one reused buffer per model size

    async def bare_land(frames: Any, context: Any) -> Any:
        total = int(dict(context.invocation_metadata())["x-total"])
        buf = landing.get(total)
        if buf is None:
            buf = landing[total] = memoryview(bytearray(total))
        pos = 0
        async for frame in frames:
            n = len(frame)
            buf[pos : pos + n] = frame
            pos += n
        yield ack

    null_server = channels.make_server()
    null_server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "bench.Null",
                {
                    "Exchange": grpc.stream_stream_rpc_method_handler(null_exchange),
                    "Land": grpc.stream_stream_rpc_method_handler(bare_land),
                },
            ),
        )
    )
    null_port = channels.bind(null_server, "127.0.0.1:0")
    await null_server.start()
    transport = GrpcTransport("127.0.0.1:0", chunk_size=chunk_size, node_id="server")
    address = await transport.start(AckService())
    pipe.send((address, f"127.0.0.1:{null_port}"))
    pipe.close()
    try:
        await stop.wait()
    finally:
        await transport.stop(grace=0.5)
        await null_server.stop(0.5)


# ----------------------------------------------------------------------------- client


class Exchange:
    """The client side: one GrpcTransport per chunk size, and the server process."""

    def __init__(self, chunks: list[int], torch_threads: int = 1) -> None:
        self.chunks = chunks
        self.torch_threads = torch_threads
        self.proc: Any = None
        self.address = ""
        self.null_address = ""
        self.clients: dict[int, Any] = {}

    def start_server(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(
            target=_serve, args=(child, CHUNK_SIZE, self.torch_threads), daemon=True
        )
        self.proc.start()
        child.close()
        if not parent.poll(120):
            raise RuntimeError("gRPC server process did not start")
        self.address, self.null_address = parent.recv()

    async def open(self) -> None:
        from rumor.protocol.grpc_transport import GrpcTransport

        for c in self.chunks:
            self.clients[c] = GrpcTransport(chunk_size=c, node_id=f"client-{c}")

    async def send(self, chunk: int, msg: Any) -> float:
        t0 = now()
        await self.clients[chunk].request(self.address, msg, TIMEOUT_S)
        return now() - t0

    async def send_frames(self, frames: list[bytes], null: bool) -> float:
        from rumor.protocol.grpc_transport import _EXCHANGE

        client = next(iter(self.clients.values()))
        target = self.null_address if null else self.address
        call = client.channel(target).stream_stream(NULL_METHOD if null else _EXCHANGE)
        t0 = now()
        async for _ in call(iter(frames), timeout=TIMEOUT_S):
            pass
        return now() - t0

    async def send_bare(self, state: dict[str, Any]) -> float:
        """The transport-limits end-to-end path: one ``bytes`` copy per 1 MiB slice."""
        client = next(iter(self.clients.values()))
        call = client.channel(self.null_address).stream_stream(BARE_METHOD)
        total = state_nbytes(state)

        def chunks() -> Any:
            for t in state.values():
                mv = memoryview(t.numpy()).cast("B")
                for i in range(0, len(mv), MIB):
                    yield bytes(mv[i : i + MIB])

        t0 = now()
        async for _ in call(chunks(), timeout=TIMEOUT_S, metadata=(("x-total", str(total)),)):
            pass
        return now() - t0

    async def server_times(self) -> list[float]:
        from rumor.protocol.bundle import Message

        client = next(iter(self.clients.values()))
        reply = await client.request(self.address, Message(kind=STATS_KIND), TIMEOUT_S)
        raw = str(reply.bundle.meta["handled"]) if reply and reply.bundle else ""
        return [float(x) for x in raw.split(",") if x]

    async def close(self) -> None:
        from rumor.protocol.bundle import Message
        from rumor.protocol.errors import PeerUnavailable, Rejected

        clients = list(self.clients.values())
        if clients and self.proc is not None and self.proc.is_alive():
            with contextlib.suppress(PeerUnavailable, Rejected):
                await clients[0].request(self.address, Message(kind=STOP_KIND), 10.0)
        for c in clients:
            await c.stop(grace=0.1)
        self.clients.clear()

    def stop_server(self) -> None:
        stop_process(self.proc)
        self.proc = None


async def measure(
    sizes: list[float],
    reps: int,
    chunks: list[int],
    breakdown: bool,
    torch_threads: int,
    res: Results,
) -> list[dict[str, Any]]:
    from rumor.protocol import framing
    from rumor.protocol.bundle import Bundle, Message

    rows: list[dict[str, Any]] = []
    import torch

    from rumor.node.allocator import keep_freed_memory

    keep_freed_memory()
    torch.set_num_threads(torch_threads)
    ex = Exchange(chunks, torch_threads)
    ex.start_server()
    try:
        await ex.open()
        with TcpReference() as tcp:
            tcp_cpu = CpuMeter([tcp.pid])
            grpc_cpu = CpuMeter([ex.proc.pid])
            for mb in sizes:
                state = make_state(int(mb * MB))
                nbytes = state_nbytes(state)
                msg = Message(
                    kind=MODEL_KIND, sender="client", bundle=Bundle.from_state_dict(state)
                )
                times: dict[str, list[float]] = {"tcp": []}
                cpu: dict[str, float] = defaultdict(float)
                sent_at: list[float] = []
                frames: list[bytes] = []
                if breakdown:
                    frames = list(framing.message_to_frames(msg, chunk_size=chunks[0]))
                for rep in range(WARMUP_REPS + reps):
                    keep = rep >= WARMUP_REPS
                    c0 = tcp_cpu.read()
                    dt = tcp.send(nbytes)
                    if keep:
                        times["tcp"].append(dt)
                        cpu["tcp"] += tcp_cpu.read() - c0
                    for c in chunks:
                        gc.collect()
                        wall = time.time()
                        c0 = grpc_cpu.read()
                        dt = await ex.send(c, msg)
                        if keep:
                            times.setdefault(f"rumor/{c}", []).append(dt)
                            cpu[f"rumor/{c}"] += grpc_cpu.read() - c0
                            if c == chunks[0]:
                                sent_at.append(wall)
                    gc.collect()
                    c0 = grpc_cpu.read()
                    dt = await ex.send_bare(state)
                    if keep:
                        times.setdefault("bare e2e", []).append(dt)
                        cpu["bare e2e"] += grpc_cpu.read() - c0
                    if breakdown:
                        for name, null in (("prebuilt", False), ("null", True)):
                            c0 = grpc_cpu.read()
                            dt = await ex.send_frames(frames, null)
                            if keep:
                                times.setdefault(name, []).append(dt)
                                cpu[name] += grpc_cpu.read() - c0
                        t0 = now()
                        for _ in framing.message_to_frames(msg, chunk_size=chunks[0]):
                            pass
                        if keep:
                            times.setdefault("encode", []).append(now() - t0)
                        t0 = now()
                        asm = framing.MessageAssembler()
                        for f in frames:
                            asm.feed(f)
                        asm.finish()
                        if keep:
                            times.setdefault("decode", []).append(now() - t0)
                        del asm
                handled = await ex.server_times()
                per_rep = len(chunks) + (1 if breakdown else 0)  # models the server decoded
                if breakdown and len(handled) == per_rep * (WARMUP_REPS + reps):
                    # The warm-up reps first, then per rep: each chunk size, then prebuilt;
                    # the first chunk size's model of each kept rep pairs with sent_at.
                    first = [handled[per_rep * (WARMUP_REPS + r)] for r in range(reps)]
                    times["server"] = [h - s for h, s in zip(first, sent_at, strict=True)]
                tcp_rate = Summary.of(nbytes / MB / t for t in times["tcp"])
                for mode, ts in times.items():
                    rate = Summary.of(nbytes / MB / t for t in ts)
                    row = {
                        "size_mb": mb,
                        "bytes": nbytes,
                        "mode": mode,
                        "ms": Summary.of(t * 1e3 for t in ts),
                        "MBps": rate,
                        "pct_of_tcp": 100 * rate.median / tcp_rate.median,
                        # CPU of both processes per MB moved (None: in-process rows)
                        "cpu_ms_per_mb": 1e3 * cpu[mode] / (len(ts) * nbytes / MB)
                        if mode in cpu
                        else None,
                    }
                    rows.append(row)
                    res.add(**row)
                del msg, state, frames
                gc.collect()
    finally:
        try:
            await ex.close()
        finally:
            ex.stop_server()
    return rows


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    import uvloop

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="10,100,400", help="model sizes, MB (10^6 bytes)")
    ap.add_argument(
        "--reps", type=int, default=5, help=f"timed reps per mode (after {WARMUP_REPS} warm-ups)"
    )
    ap.add_argument(
        "--chunks",
        default=str(CHUNK_SIZE),
        help="comma-separated chunk sizes (bytes) to sweep (default: the transport's)",
    )
    ap.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads in both processes (nodes default to 1)",
    )
    ap.add_argument("--breakdown", action="store_true", help="add the where-does-time-go rows")
    add_out_argument(ap, "exchange")
    args = ap.parse_args(argv)
    sizes = [float(x) for x in args.sizes.split(",")]
    chunks = [int(x) for x in args.chunks.split(",")]
    res = Results("exchange", args.out)
    res.add(event="machine", **machine_info())
    rows = uvloop.run(measure(sizes, args.reps, chunks, args.breakdown, args.torch_threads, res))
    table = []
    for r in rows:
        mode = r["mode"]
        if mode.startswith("rumor/"):
            c = int(mode.split("/")[1])
            mode = f"rumor gRPC, chunk {c / MIB:g} MiB"
        table.append(
            [
                f"{r['size_mb']:g}",
                mode,
                r["MBps"].fmt(0),
                r["ms"].fmt(1),
                f"{r['pct_of_tcp']:.0f} %",
                "-" if r["cpu_ms_per_mb"] is None else f"{r['cpu_ms_per_mb']:.2f}",
            ]
        )
    print_table(
        f"Model exchange, 2 processes on 127.0.0.1 (median (min-max) over {args.reps} "
        "interleaved reps; target: rumor gRPC >= 30 % of TCP at 100 MB)",
        ["MB", "path", "MB/s", "ms", "% of TCP", "CPU ms/MB"],
        table,
    )
    res.write()
    return rows


if __name__ == "__main__":
    main()
