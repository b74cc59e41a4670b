"""Prometheus metrics of one node, served on an opt-in HTTP port (``/metrics``).

Every node owns its :class:`~prometheus_client.CollectorRegistry` (never the process-wide
default), so several nodes in one process export side by side without clashing. Names
follow Prometheus's conventions: base units (bytes, seconds), the unit as the last word
before ``_total``, ``_total`` on counters, ``_ratio`` on ratios, and a timestamp rather than
an age for "when did it last happen" (Prometheus records scrape times itself; compute the
age as ``time() - rumor_last_round_timestamp_seconds``). Two kinds of series:

* counted as they happen, per neighbour (``peer`` label) and message kind:
  ``rumor_requests_total``, ``rumor_request_failures_total{reason}``,
  ``rumor_request_seconds`` (round trip, a histogram), ``rumor_peer_sent_bytes_total``,
  ``rumor_peer_received_bytes_total``, ``rumor_messages_received_total``, and
  ``rumor_last_round_timestamp_seconds`` (set when a round ends);
* read from the node when scraped: ``rumor_round``, ``rumor_loss``, ``rumor_accuracy_ratio``,
  ``rumor_finished``, ``rumor_received_bytes_total`` / ``rumor_sent_bytes_total`` /
  ``rumor_exchanges_total`` / ``rumor_rejected_total`` (the same counters ``rumor status``
  shows), ``rumor_peer_alive`` and ``rumor_peer_last_seen_seconds``.

Senders that are not neighbours (observers, the CLI) share the label ``peer="other"``: label
values never come from the wire unchecked, so a peer cannot grow the series without bound.
Scrapes run in the HTTP server's thread and only read plain attributes of the node.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector

from rumor.node.telemetry import Telemetry

log = logging.getLogger("rumor.prometheus")

OTHER = "other"
#: Round trips from sub-millisecond loopback exchanges to slow WAN transfers of big models.
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class PrometheusTelemetry(Telemetry):
    """Counts a node's traffic per neighbour and serves it with the node's state."""

    def __init__(self, node_id: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.node_id = node_id
        self.host = host
        self.port = port
        self.registry = CollectorRegistry(auto_describe=True)
        self._node: Any = None
        self._server: Any = None
        self._thread: Any = None
        labels = ["peer", "kind"]
        r = self.registry
        self.requests = Counter(
            "rumor_requests", "Requests sent to a neighbour (answered).", labels, registry=r
        )
        self.failures = Counter(
            "rumor_request_failures",
            "Requests to a neighbour that failed (unavailable or rejected).",
            ["peer", "kind", "reason"],
            registry=r,
        )
        self.rtt = Histogram(
            "rumor_request_seconds",
            "Round trip of answered requests: send the payload, receive the answer.",
            ["peer"],
            buckets=RTT_BUCKETS,
            registry=r,
        )
        self.sent = Counter(
            "rumor_peer_sent_bytes",
            "Payload bytes sent to a neighbour (requests made and answers given).",
            ["peer"],
            registry=r,
        )
        self.received = Counter(
            "rumor_peer_received_bytes",
            "Payload bytes received from a neighbour (answers and incoming messages).",
            ["peer"],
            registry=r,
        )
        self.incoming = Counter(
            "rumor_messages_received",
            "Messages received and answered, by sender.",
            labels,
            registry=r,
        )
        #: Unix time at which the node last finished a round; None before the first one.
        self.last_round_at: float | None = None
        self.registry.register(_NodeState(self))

    # ------------------------------------------------------------------ lifecycle
    async def start(self, node: Any) -> None:
        self._node = node
        self._server, self._thread = start_http_server(
            self.port, addr=self.host, registry=self.registry
        )
        self.port = int(self._server.server_address[1])
        log.info(
            "%s: Prometheus metrics on http://%s:%d/metrics", self.node_id, self.host, self.port
        )

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        # shutdown() waits for the serving thread's poll loop (up to 0.5 s): off the event loop.
        await asyncio.to_thread(server.shutdown)
        server.server_close()

    def describe(self) -> dict[str, Any]:
        return {"prometheus": f"{self.host}:{self.port}"}

    # ------------------------------------------------------------------ hooks
    def _peer(self, peer: str) -> str:
        node = self._node
        return peer if node is not None and peer in node.membership.peers else OTHER

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
        label = self._peer(peer)
        if error is not None:
            self.failures.labels(label, kind, error).inc()
            return
        self.requests.labels(label, kind).inc()
        self.rtt.labels(label).observe(seconds)
        self.sent.labels(label).inc(sent)
        self.received.labels(label).inc(received)

    def on_incoming(
        self, sender: str, kind: str, received: int, replied: int, start: float, seconds: float
    ) -> None:
        label = self._peer(sender)
        self.incoming.labels(label, kind).inc()
        self.received.labels(label).inc(received)
        self.sent.labels(label).inc(replied)

    def on_round(self, round: int, loss: float | None, accuracy: float | None) -> None:
        # Wall time, not the node's clock (which counts from its start): a timestamp can be
        # compared with Prometheus's own time() and with other nodes'.
        self.last_round_at = time.time()


class _NodeState(Collector):
    """Gauges and totals read from the node at scrape time."""

    def __init__(self, owner: PrometheusTelemetry) -> None:
        self.owner = owner

    def describe(self) -> list[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        node = self.owner._node
        if node is None:
            return
        ctx = node.ctx
        yield _gauge("rumor_round", "Rounds (or events) the node has finished.", ctx.round)
        yield _gauge("rumor_loss", "Training loss of the last round.", _num(ctx.last_loss))
        yield _gauge(
            "rumor_accuracy_ratio",
            "Test accuracy of the last evaluation (0 to 1).",
            _num(ctx.last_eval.get("accuracy")),
        )
        yield _gauge(
            "rumor_last_round_timestamp_seconds",
            "Unix time at which the node last finished a round (or event); NaN before the "
            "first. Staleness: time() - this.",
            _num(self.owner.last_round_at),
        )
        yield _gauge("rumor_finished", "1 once the node has spent its round budget.", node.finished)
        stats = node.transport.stats
        for name, value, doc in (
            ("rumor_received_bytes", stats.bytes_in, "Payload bytes received (all traffic)."),
            ("rumor_sent_bytes", stats.bytes_out, "Payload bytes sent (all traffic)."),
            ("rumor_exchanges", ctx.exchanges, "Requests to neighbours that succeeded."),
            (
                "rumor_rejected",
                stats.rejected_in,
                "Incoming requests refused (malformed or unacceptable messages, heartbeats, "
                "status requests).",
            ),
        ):
            yield CounterMetricFamily(name, doc, value=float(value))
        alive = GaugeMetricFamily(
            "rumor_peer_alive", "1 if the neighbour is believed alive.", labels=["peer"]
        )
        seen = GaugeMetricFamily(
            "rumor_peer_last_seen_seconds",
            "Seconds since the neighbour last answered (NaN if never).",
            labels=["peer"],
        )
        now = node.clock.now()
        for peer in list(node.membership.peers.values()):
            alive.add_metric([peer.node_id], 1.0 if peer.alive else 0.0)
            last = peer.last_seen
            seen.add_metric([peer.node_id], math.nan if last is None else now - last)
        yield alive
        yield seen


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)
