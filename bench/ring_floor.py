"""What a round costs with nothing but grpc.aio: the floor under ``bench_round.py``.

Four processes on 127.0.0.1 in a ring, each a grpc.aio server on uvloop with a reused
channel to each neighbour (the node's channel and server options), run synchronous rounds
that move exactly the bytes a D-PSGD round moves: every round each process makes one call
per neighbour carrying the model's bytes, then waits until both neighbours' messages of that
round have arrived. Two call patterns are measured, each a floor for the node's own:

* ``stream``: a bidirectional streaming call that writes a small first frame and the bytes in
  1 MiB frames (each built with one copy from a preallocated buffer, as a node builds its
  chunk frames), half-closes and reads the empty answer (how a node sends large messages);
* ``unary``: one unary call whose request is the whole message, built with one copy;
* ``persist``: one long-lived stream per edge, opened before the first round, on which each
  round writes the first frame, the 1 MiB frames and an end marker (no call set-up,
  half-close or answer per message).

Only ``stream`` is what a node does today; the other two show what a different call pattern
would save. There is no SGD step, no digest, no
landing copy, no finiteness check, no mixing and no metrics: whatever a node's round costs
beyond this is the node's own work, and a round-time target below this floor cannot be met
by any node built on grpc.aio on this machine.

Reported: median round time over processes x rounds >= 2, and the CPU time per process
per round (all threads; over the measured rounds only).

Run: ``.venv/bin/python bench/ring_floor.py [--sizes 1,10,50] [--rounds 0]
[--patterns stream,unary,persist]``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import queue
import statistics
import sys
import time
from typing import Any

from rumor.cluster import free_ports

N_NODES = 4
CHUNK = 1 << 20
WARMUP = 2
END = b"end"  # closes one message on a persistent stream


def default_rounds(mb: float) -> int:
    return 150 if mb <= 2 else 60 if mb <= 20 else 30


def _node(index: int, ports: list[int], nbytes: int, rounds: int, pattern: str, out: Any) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import grpc
    import uvloop

    from rumor.protocol import channels

    async def main() -> None:
        arrived: dict[int, int] = {}
        events: dict[int, asyncio.Event] = {}

        def note(r: int) -> None:
            arrived[r] = arrived.get(r, 0) + 1
            if arrived[r] >= 2 and r in events:
                events[r].set()

        async def serve(frames: Any, context: Any) -> Any:
            r = None
            async for frame in frames:
                if r is None:
                    r = int(frame[:12])
            assert r is not None
            note(r)
            return
            yield b""  # an empty answer stream, as a node acknowledges

        async def serve_unary(request: bytes, context: Any) -> bytes:
            note(int(request[:12]))
            return b""

        async def serve_persist(frames: Any, context: Any) -> Any:
            r = None
            async for frame in frames:
                if frame == END:
                    assert r is not None
                    note(r)
                    r = None
                elif r is None:
                    r = int(frame[:12])
            return
            yield b""

        server = channels.make_server()
        handlers = {
            "Exchange": grpc.stream_stream_rpc_method_handler(serve),
            "Deliver": grpc.unary_unary_rpc_method_handler(serve_unary),
            "Persist": grpc.stream_stream_rpc_method_handler(serve_persist),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("floor", handlers),))
        server.add_insecure_port(f"127.0.0.1:{ports[index]}")
        await server.start()
        peers = [(index - 1) % N_NODES, (index + 1) % N_NODES]
        chans = [channels.make_channel(f"127.0.0.1:{ports[p]}") for p in peers]
        payload = memoryview(bytearray(os.urandom(64)) * (nbytes // 64 + 1))[:nbytes]
        header = b"\x12" + bytes(5)  # a chunk frame's prefix, as a node writes it

        persistent: list[Any] = []

        async def send(channel: Any, r: int) -> None:
            if pattern == "persist":
                call = persistent[chans.index(channel)]
                await call.write(b"%012d" % r + bytes(100))
                for off in range(0, nbytes, CHUNK):
                    await call.write(b"".join((header, payload[off : off + CHUNK])))
                await call.write(END)
                return
            if pattern == "unary":
                first = b"%012d" % r + bytes(100)
                await channel.unary_unary("/floor/Deliver")(
                    b"".join((first, header, payload)), timeout=60
                )
                return
            call = channel.stream_stream("/floor/Exchange")(timeout=60)
            await call.write(b"%012d" % r + bytes(100))  # stands in for the envelope
            for off in range(0, nbytes, CHUNK):
                await call.write(b"".join((header, payload[off : off + CHUNK])))
            await call.done_writing()
            async for _ in call:
                pass

        await asyncio.sleep(1.0)  # every server is up
        if pattern == "persist":
            persistent.extend(ch.stream_stream("/floor/Persist")(timeout=3600) for ch in chans)
        times: list[float] = []
        cpu0 = 0.0
        for r in range(rounds):
            if r == WARMUP:
                cpu0 = time.process_time()
            t0 = time.perf_counter()
            events[r] = asyncio.Event()
            if arrived.get(r, 0) >= 2:
                events[r].set()
            sends = [asyncio.ensure_future(send(ch, r)) for ch in chans]
            await asyncio.wait_for(events[r].wait(), 60)
            await asyncio.gather(*sends)
            times.append(time.perf_counter() - t0)
        cpu = (time.process_time() - cpu0) / max(rounds - WARMUP, 1)
        out.put((index, times[WARMUP:], cpu))
        await asyncio.sleep(0.5)  # neighbours finish their last sends
        for call in persistent:
            await call.done_writing()
        for ch in chans:
            await ch.close()
        await server.stop(0.5)

    uvloop.run(main())


def ring_floor(nbytes: int, rounds: int, pattern: str = "stream") -> dict[str, Any]:
    """Round times (s) and CPU per process-round (s) of the bare ring moving ``nbytes``
    per message with call ``pattern`` (``stream`` or ``unary``)."""
    if pattern not in ("stream", "unary", "persist"):
        raise ValueError(f"unknown pattern {pattern!r}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    ports = free_ports(N_NODES)
    procs = [
        ctx.Process(target=_node, args=(i, ports, nbytes, rounds, pattern, out), daemon=True)
        for i in range(N_NODES)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 120 + rounds * max(1.0, nbytes / 2e7)
    results: list[Any] = []
    try:
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=1.0))
            except queue.Empty:
                failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    why = f"exit codes {failed}" if failed else "timed out"
                    raise RuntimeError(f"bare ring failed: {why}") from None
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    times = [t for _, ts, _ in results for t in ts]
    return {
        "round_s": times,
        "cpu_per_round_s": statistics.mean(c for _, _, c in results),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1,10,50", help="bytes per message, MB (10^6 bytes)")
    ap.add_argument("--rounds", type=int, default=0, help="rounds per run (0: by size)")
    ap.add_argument("--patterns", default="stream,unary,persist", help="call patterns to measure")
    args = ap.parse_args(argv)
    for mb in (float(x) for x in args.sizes.split(",")):
        for pattern in args.patterns.split(","):
            report(mb, args.rounds or default_rounds(mb), pattern)


def report(mb: float, rounds: int, pattern: str) -> None:
    from rumor.protocol.constants import GRPC_MAX_MESSAGE_BYTES

    if pattern == "unary" and mb * 1e6 > GRPC_MAX_MESSAGE_BYTES - 1024:
        print(f"{mb:g} MB, unary: above the node's gRPC message limit, not measured")
        return
    res = ring_floor(int(mb * 1e6), rounds, pattern)
    ms = sorted(t * 1e3 for t in res["round_s"])
    cpu_ms = res["cpu_per_round_s"] * 1e3
    cores = os.cpu_count() or 1
    print(
        f"{mb:g} MB, {pattern}: bare grpc.aio ring round {statistics.median(ms):.1f} ms "
        f"({ms[0]:.1f}-{ms[-1]:.1f}), CPU {cpu_ms:.1f} ms per process-round; "
        f"{N_NODES} x CPU / {cores} cores = {N_NODES * cpu_ms / cores:.1f} ms",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
