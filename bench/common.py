"""Helpers shared by the benchmarks in this folder: statistics, tables, JSON-lines output,
synthetic state dicts, and the two references every benchmark is judged against (raw
loopback TCP between two processes, and ``np.copyto`` into memory already in use).

The scripts import this module as ``common`` (``python bench/<script>.py`` puts ``bench/``
first on ``sys.path``). MB = 10^6 bytes, MiB = 2^20 bytes, GB = 10^9 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import socket
import statistics
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
MB = 1_000_000
MIB = 1 << 20
TCP_BUFFER = MIB

now = time.perf_counter


# ----------------------------------------------------------------------------- statistics


@dataclass
class Summary:
    """Median, min and max of a list of repetitions."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Summary:
        vals = sorted(values)
        if not vals:
            return cls(float("nan"), float("nan"), float("nan"), 0)
        return cls(statistics.median(vals), vals[0], vals[-1], len(vals))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}

    def fmt(self, digits: int = 0, scale: float = 1.0) -> str:
        """``median (min-max)``, each multiplied by ``scale``."""
        m, lo, hi = (v * scale for v in (self.median, self.min, self.max))
        return f"{m:,.{digits}f} ({lo:,.{digits}f}-{hi:,.{digits}f})"


def rates(nbytes: float, seconds: Sequence[float], unit: float = MB) -> Summary:
    """Throughputs (``unit`` per second) of moving ``nbytes`` in each of ``seconds``."""
    return Summary.of(nbytes / unit / s for s in seconds)


# ----------------------------------------------------------------------------- output


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain aligned text table (first column left-aligned, the others right-aligned)."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        out = [row[0].ljust(widths[0])]
        out += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        return "  ".join(out)

    print(f"\n{title}")
    print(line(cells[0]))
    print("  ".join("-" * w for w in widths))
    for row in cells[1:]:
        print(line(row))
    sys.stdout.flush()


def cpu_pressure() -> float | None:
    """Share of the last 10 s in which some runnable task waited for a CPU (PSI), in %."""
    try:
        text = Path("/proc/pressure/cpu").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            fields = dict(f.split("=") for f in line.split()[1:])
            return float(fields["avg10"])
    return None


def host_load() -> dict[str, Any]:
    """How busy the host is right now (other users of the shared cores show up here)."""
    return {"loadavg_1m": os.getloadavg()[0], "cpu_pressure_pct": cpu_pressure()}


def _load_text(load: dict[str, Any]) -> str:
    pressure = load["cpu_pressure_pct"]
    return (
        f"loadavg(1 min) {load['loadavg_1m']:.2f} on {os.cpu_count()} CPUs, CPU pressure "
        f"(some, 10 s) " + ("n/a" if pressure is None else f"{pressure:.0f} %")
    )


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "cpus": os.cpu_count(),
        **host_load(),
    }


def add_out_argument(parser: argparse.ArgumentParser, name: str) -> None:
    """``--out [PATH]``: write JSON lines, by default to ``bench/results/<name>.jsonl``."""
    default = RESULTS_DIR / f"{name}.jsonl"
    parser.add_argument(
        "--out",
        nargs="?",
        const=str(default),
        default=None,
        metavar="PATH",
        help=f"append results as JSON lines (default path when given bare: {default})",
    )


class Results:
    """Collects result records; writes them as JSON lines when an output path was given."""

    def __init__(self, bench: str, out: str | None) -> None:
        self.bench = bench
        self.out = Path(out) if out else None
        self.records: list[dict[str, Any]] = []
        self.started = time.time()
        self.load_before = host_load()

    def add(self, **fields: Any) -> dict[str, Any]:
        record = {"bench": self.bench, "t": time.time(), **_plain(fields)}
        self.records.append(record)
        return record

    def write(self) -> None:
        """Note the host load at the end, print it, and write the records if asked to."""
        load = host_load()
        self.add(event="host", before=self.load_before, after=load)
        print(f"\nhost load before: {_load_text(self.load_before)}; after: {_load_text(load)}")
        pressure = self.load_before["cpu_pressure_pct"]
        if pressure is not None and pressure > 10:
            print("other work was competing for the cores when this started: expect noise")
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        with self.out.open("a", encoding="utf-8") as fh:
            for record in self.records:
                fh.write(json.dumps(record) + "\n")
        print(f"\nwrote {len(self.records)} records to {self.out}")


def _plain(value: Any) -> Any:
    if isinstance(value, Summary):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- models


def make_state(nbytes: int, n_big: int = 8, n_small: int = 64, small: int = 1000) -> dict:
    """A float32 state dict of about ``nbytes``: ``n_big`` large matrices, ``n_small`` vectors.

    The shape of a trained MLP or CNN: most bytes in a few weight matrices, plus many small
    bias and norm vectors. Values are Gaussian (finite, incompressible).
    """
    import torch

    gen = torch.Generator().manual_seed(0)
    total = nbytes // 4
    n_small = min(n_small, max(0, total // (2 * small)))
    big_each = max(1, (total - n_small * small) // max(1, n_big))
    cols = 1024 if big_each >= 4096 else 1
    state: dict[str, torch.Tensor] = {}
    for i in range(n_big):
        rows = max(1, big_each // cols)
        state[f"layer{i}.weight"] = torch.randn(rows, cols, generator=gen)
    for i in range(n_small):
        state[f"layer{i}.bias"] = torch.randn(small, generator=gen)
    return state


def state_nbytes(state: dict) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


# ----------------------------------------------------------------------------- references


class Memcpy:
    """``np.copyto`` of ``copies`` distinct sources of ``nbytes`` each into one buffer that is
    already in use (touched before timing), so page faults are excluded.

    With ``copies = k`` it reads the same number of distinct bytes as averaging k models.
    """

    def __init__(self, nbytes: int, copies: int = 1) -> None:
        self.nbytes = nbytes
        self.srcs = [np.full(nbytes, i + 1, dtype=np.uint8) for i in range(copies)]
        self.dst = np.empty(nbytes, dtype=np.uint8)
        np.copyto(self.dst, self.srcs[0])

    def seconds(self) -> float:
        dst = self.dst
        t0 = now()
        for src in self.srcs:
            np.copyto(dst, src)
        return now() - t0


def _tcp_receiver(port_pipe: Any, bufsize: int) -> None:
    """Child process: accept one connection; per message, recv_into a reused buffer, ack."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port_pipe.send(srv.getsockname()[1])
    port_pipe.close()
    conn, _ = srv.accept()
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(bufsize)
    mv = memoryview(buf)
    try:
        while True:
            head = _recv_exact(conn, 8)
            if head is None:
                return
            (total,) = struct.unpack("!Q", head)
            if total == 0:
                return
            got = 0
            while got < total:
                n = conn.recv_into(mv, min(bufsize, total - got))
                if n == 0:
                    return
                got += n
            conn.sendall(b"k")
    finally:
        conn.close()
        srv.close()


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            return None
        data += part
    return data


class TcpReference:
    """Raw loopback TCP to a receiver process: ``sendall`` from a preallocated buffer, the
    receiver ``recv_into`` a preallocated buffer and acknowledges the last byte.

    Use as a context manager; :meth:`send` returns the seconds one transfer took.
    """

    def __init__(self, bufsize: int = TCP_BUFFER) -> None:
        self.bufsize = bufsize
        self._proc: Any = None
        self._sock: socket.socket | None = None
        self._data = memoryview(bytearray(np.random.default_rng(0).bytes(bufsize)))

    def __enter__(self) -> TcpReference:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe(duplex=False)
        self._proc = ctx.Process(target=_tcp_receiver, args=(child, self.bufsize), daemon=True)
        self._proc.start()
        child.close()
        if not parent.poll(60):
            raise RuntimeError("TCP receiver did not start")
        port = parent.recv()
        self._sock = socket.create_connection(("127.0.0.1", port))
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send(self, total: int) -> float:
        sock = self._sock
        assert sock is not None
        data, size = self._data, self.bufsize
        t0 = now()
        sock.sendall(struct.pack("!Q", total))
        sent = 0
        while sent < total:
            n = min(size, total - sent)
            sock.sendall(data[:n])
            sent += n
        if sock.recv(1) != b"k":
            raise RuntimeError("TCP receiver did not acknowledge")
        return now() - t0

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.sendall(struct.pack("!Q", 0))
            self._sock.close()
            self._sock = None
        stop_process(self._proc)
        self._proc = None


def stop_process(proc: Any, grace: float = 5.0) -> None:
    """Join a multiprocessing child; terminate, then kill it if it does not exit."""
    if proc is None:
        return
    proc.join(grace)
    if proc.is_alive():
        proc.terminate()
        proc.join(grace)
    if proc.is_alive():
        proc.kill()
        proc.join()


class CpuMeter:
    """CPU seconds (all threads) used so far by this process and by ``pids``.

    This process is read with ``time.process_time``; the others from the scheduler's
    nanosecond run-time counters (``/proc/<pid>/task/*/schedstat``), which, unlike the
    10 ms ticks of ``/proc/<pid>/stat``, are exact for short intervals. Threads that exit
    take their time with them, which the long-lived threads of gRPC servers do not do.
    """

    def __init__(self, pids: Iterable[int]) -> None:
        self.pids = list(pids)

    @staticmethod
    def process_seconds(pid: int) -> float:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue  # the thread just exited
        return total / 1e9

    def read(self) -> float:
        return time.process_time() + sum(self.process_seconds(p) for p in self.pids)


def timed(fn: Callable[[], Any]) -> float:
    t0 = now()
    fn()
    return now() - t0
