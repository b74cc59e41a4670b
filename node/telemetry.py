"""Hooks through which a node reports what it does, for exporters that want more than metrics.

The runtime calls a :class:`Telemetry` at a handful of points: a request to a neighbour
ended (with its bytes, round trip and outcome), a message arrived, a round ended, CPU work
ran, the model lock was held. The base class does nothing, so a node without exporters pays
one method call per event. :mod:`rumor.node.prometheus` (a ``/metrics`` endpoint) and
:mod:`rumor.node.tracing` (a Chrome trace file) implement it; :class:`Fanout` feeds several.
This module must not import prometheus_client or any exporter: the node imports it always.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any


class Telemetry:
    """No-op hooks; subclasses override what they record."""

    async def start(self, node: Any) -> None:
        """Called once the node serves (``node`` is the :class:`rumor.node.runtime.Node`)."""

    async def stop(self) -> None:
        """Called when the node shuts down; flush and release resources here."""

    def describe(self) -> dict[str, Any]:
        """Fields for the node's ``start`` metrics record (where the exporter can be found)."""
        return {}

    def model_lock(self) -> asyncio.Lock:
        """The lock that owns the model's tensors (a traced one records how long it is held)."""
        return asyncio.Lock()

    @contextlib.contextmanager
    def span(self, name: str, **args: Any) -> Iterator[None]:
        """Wraps a piece of work (``compute``: training or evaluation in the worker thread)."""
        yield

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
        """A request to ``peer`` ended: payload bytes both ways, wall start and duration.

        ``error`` is None on success, else the failure's class (``unavailable``,
        ``rejected``).
        """

    def on_incoming(
        self, sender: str, kind: str, received: int, replied: int, start: float, seconds: float
    ) -> None:
        """A message from ``sender`` was answered: payload bytes in and out, handling time."""

    def on_round(self, round: int, loss: float | None, accuracy: float | None) -> None:
        """The node finished ``round`` (or event number ``round`` for event-driven rules)."""


class Fanout(Telemetry):
    """Sends every hook to several telemetries, in order."""

    def __init__(self, parts: Sequence[Telemetry]) -> None:
        self.parts = list(parts)

    async def start(self, node: Any) -> None:
        for part in self.parts:
            await part.start(node)

    async def stop(self) -> None:
        for part in self.parts:
            await part.stop()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for part in self.parts:
            out.update(part.describe())
        return out

    def model_lock(self) -> asyncio.Lock:
        # Only one part can own the lock; the first that traces it wins.
        for part in self.parts:
            if type(part).model_lock is not Telemetry.model_lock:
                return part.model_lock()
        return asyncio.Lock()

    @contextlib.contextmanager
    def span(self, name: str, **args: Any) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.span(name, **args))
            yield

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
        for part in self.parts:
            part.on_request(peer, kind, sent, received, start, seconds, error)

    def on_incoming(
        self, sender: str, kind: str, received: int, replied: int, start: float, seconds: float
    ) -> None:
        for part in self.parts:
            part.on_incoming(sender, kind, received, replied, start, seconds)

    def on_round(self, round: int, loss: float | None, accuracy: float | None) -> None:
        for part in self.parts:
            part.on_round(round, loss, accuracy)


def from_config(cfg: Any) -> Telemetry | None:
    """The exporters a :class:`rumor.config.NodeConfig` asks for (``metrics_port``, ``trace``).

    None when it asks for none, so a plain node carries no exporter at all.
    """
    parts: list[Telemetry] = []
    port = getattr(cfg, "metrics_port", None)
    if port is not None:
        from rumor.node.prometheus import PrometheusTelemetry

        host = (getattr(cfg, "listen", "") or "").rpartition(":")[0].strip("[]") or "127.0.0.1"
        parts.append(PrometheusTelemetry(cfg.node_id, host=host, port=int(port)))
    trace = getattr(cfg, "trace", None)
    if trace:
        from rumor.node.tracing import ChromeTracer

        parts.append(ChromeTracer(trace, node_id=cfg.node_id))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else Fanout(parts)
