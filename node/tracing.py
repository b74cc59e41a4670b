"""A node's timeline as a Chrome trace file (``--trace FILE``), bounded in size.

The file is in the Trace Event Format's JSON array form, which ``chrome://tracing``,
Perfetto (ui.perfetto.dev) and speedscope open directly. One process per node (named after
it), one track per kind of work:

* ``compute``: CPU work in the worker thread (local steps, gradients, evaluation);
* ``mix``: the model lock held without computing: merging neighbours' models into this one,
  and taking copies of it (snapshots for sending, answers to pulls);
* ``send to <peer>``: a request to a neighbour, from the first byte out to the answer, with
  the bytes each way and the outcome;
* ``from <peer>``: handling a neighbour's message (for pairwise rules, their merge);
* instant ``round`` markers with the round's loss.

Timestamps are wall-clock microseconds, so the traces of several nodes can be concatenated
into one timeline. The writer stops at ``max_bytes`` (default 64 MiB) and says so in a last
instant event: a long run cannot fill the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from rumor.node.telemetry import Telemetry

log = logging.getLogger("rumor.tracing")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
OTHER = "other"


class ChromeTracer(Telemetry):
    """Writes spans of one node's work to ``path`` as Chrome trace events."""

    def __init__(self, path: str | Path, node_id: str, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path)
        self.node_id = node_id
        self.max_bytes = int(max_bytes)
        self.pid = os.getpid()
        self.written = 0
        self.events = 0
        self.truncated = False
        self._tids: dict[str, int] = {}
        self._neighbours: frozenset[str] = frozenset()
        self._computed_while_locked = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] | None = self.path.open("w", encoding="utf-8")
        self._file.write("[\n")
        self._emit({"name": "process_name", "ph": "M", "args": {"name": node_id}}, tid=0)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, node: Any) -> None:
        self._neighbours = frozenset(node.membership.peers)

    async def stop(self) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.write("\n]\n")
            self._file.close()
            self._file = None

    def describe(self) -> dict[str, Any]:
        return {"trace": str(self.path)}

    # ------------------------------------------------------------------ hooks
    def model_lock(self) -> asyncio.Lock:
        return _TracedLock(self)

    @contextlib.contextmanager
    def span(self, name: str, **args: Any) -> Iterator[None]:
        start = time.time()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._computed_while_locked = True
            self.complete(name, name, start, time.perf_counter() - t0, args)

    def on_request(
        self,
        peer: str,
        kind: str,
        sent: int,
        received: int,
        start: float,
        seconds: float,
        error: str | None,
    ) -> None:
        args: dict[str, Any] = {"kind": kind, "bytes_out": sent, "bytes_in": received}
        if error is not None:
            args["error"] = error
        self.complete(f"send {kind}", f"send to {self._peer(peer)}", start, seconds, args)

    def on_incoming(
        self, sender: str, kind: str, received: int, replied: int, start: float, seconds: float
    ) -> None:
        args = {"kind": kind, "bytes_in": received, "bytes_out": replied}
        self.complete(f"receive {kind}", f"from {self._peer(sender)}", start, seconds, args)

    def on_round(self, round: int, loss: float | None, accuracy: float | None) -> None:
        args = {"round": round, "loss": loss, "accuracy": accuracy}
        self._emit(
            {"name": "round", "ph": "i", "s": "p", "ts": _us(time.time()), "args": args},
            tid=self._tid("compute"),
        )

    # ------------------------------------------------------------------ writing
    def complete(
        self, name: str, track: str, start: float, seconds: float, args: dict[str, Any]
    ) -> None:
        """One complete ("X") event of ``seconds`` from wall time ``start`` on ``track``."""
        event = {
            "name": name,
            "cat": track.split(" ")[0],
            "ph": "X",
            "ts": _us(start),
            "dur": max(0.0, round(seconds * 1e6, 1)),
            "args": args,
        }
        self._emit(event, tid=self._tid(track))

    def _peer(self, peer: str) -> str:
        return peer if peer in self._neighbours else OTHER

    def _tid(self, track: str) -> int:
        tid = self._tids.get(track)
        if tid is None:
            tid = self._tids[track] = len(self._tids) + 1
            meta = {"name": "thread_name", "ph": "M", "args": {"name": track}}
            self._emit(meta, tid=tid)
        return tid

    def _emit(self, event: dict[str, Any], tid: int) -> None:
        if self._file is None or self.truncated:
            return
        event = {**event, "pid": self.pid, "tid": tid}
        text = ("" if self.events == 0 else ",\n") + json.dumps(event, separators=(",", ":"))
        if self.written + len(text) > self.max_bytes:
            self.truncated = True
            note = {
                "name": "trace truncated",
                "ph": "i",
                "s": "g",
                "ts": _us(time.time()),
                "pid": self.pid,
                "tid": 0,
                "args": {"max_bytes": self.max_bytes},
            }
            self._file.write(",\n" + json.dumps(note, separators=(",", ":")))
            log.warning(
                "%s: trace %s reached %d bytes; stopped", self.node_id, self.path, self.written
            )
            return
        self._file.write(text)
        self.written += len(text)
        self.events += 1


class _TracedLock(asyncio.Lock):
    """The model lock; a hold with no compute inside it is recorded as a ``mix`` span."""

    def __init__(self, tracer: ChromeTracer) -> None:
        super().__init__()
        self._tracer = tracer
        self._since = 0.0
        self._t0 = 0.0

    async def acquire(self) -> bool:
        await super().acquire()
        self._since = time.time()
        self._t0 = time.perf_counter()
        self._tracer._computed_while_locked = False
        return True

    def release(self) -> None:
        seconds = time.perf_counter() - self._t0
        tracer = self._tracer
        if not tracer._computed_while_locked:
            tracer.complete("mix", "mix", self._since, seconds, {})
        super().release()


def _us(seconds: float) -> float:
    return round(seconds * 1e6, 1)
