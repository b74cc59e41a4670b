"""Snapshots of a running cluster for ``rumor watch``: per-node state and a cluster summary.

A :class:`Watcher` asks every node for its ``Status`` and, unless told not to, pulls its
current model (the node-level ``rumor.pull`` message: nothing changes on the node). From one
refresh to the next it derives rates. A snapshot holds, per node: round (or event count),
exchanges, loss, accuracy, the distance of its model to its neighbourhood average, bytes/s in
and out, neighbours up and down, and staleness (seconds since its last round); for the
cluster: the consensus distance (1/n) Σ‖x_i − x̄‖² over the models pulled, round spread, mean
accuracy and progress toward a target.

Two measurement rules keep the numbers honest:

* the neighbourhood average is the one D-PSGD mixes toward, a_i = Σ_j w_ij x_j / Σ_j w_ij
  over the neighbours pulled, with Metropolis-Hastings weights w_ij = 1 / (1 + max(d_i, d_j));
  the distance is ‖x_i − a_i‖ (L2 over floating tensors), the quantity nodes log as
  ``neighbour_distance`` before they mix (the watch sees the models between rounds);
* a node counts the models the watch pulls as bytes it sent; the watch knows how many bytes
  each pull returned and subtracts them from the node's outgoing rate, so ``out_bps`` is the
  node's own traffic. Cumulative ``bytes_out`` is the node's counter as it reports it.

This module does the measuring only; :mod:`rumor.cli.watch_cmd` draws it.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rumor.node.observe import PULL_KIND, consensus_distance
from rumor.protocol.bundle import Message
from rumor.protocol.errors import PeerUnavailable, Rejected


@dataclass
class Target:
    """What "done" means for the progress line: a mean accuracy, or a consensus distance."""

    accuracy: float | None = None
    consensus: float | None = None

    def __post_init__(self) -> None:
        if self.accuracy is not None and not 0.0 < self.accuracy <= 1.0:
            raise ValueError("target accuracy must be in (0, 1]")
        if self.consensus is not None and not self.consensus > 0.0:
            raise ValueError("target consensus distance must be > 0")

    @property
    def given(self) -> bool:
        return self.accuracy is not None or self.consensus is not None


class Watcher:
    """Polls a cluster; :meth:`snapshot` returns one refresh as plain JSON-able data."""

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        timeout: float = 2.0,
        models: bool = True,
        target: Target | None = None,
        security: Any = None,
    ) -> None:
        from rumor.protocol.grpc_transport import GrpcTransport

        if not addresses:
            raise ValueError("no node addresses to watch")
        self.addresses = list(dict.fromkeys(addresses))
        self.timeout = timeout
        self.models = models
        self.target = target or Target()
        self.security = security  # rumor.protocol.security.Security, for mTLS clusters
        self.client = GrpcTransport(node_id="watch", security=security)
        self.t0 = time.time()
        self._prev: dict[str, dict[str, Any]] = {}
        self._pulled_since: dict[str, int] = {}
        self._first: dict[str, float | None] = {}

    async def close(self) -> None:
        await self.client.stop()

    async def __aenter__(self) -> Watcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ one refresh
    async def snapshot(self) -> dict[str, Any]:
        """Status of every node, then (if enabled) their models; rates against last refresh."""
        from rumor.cli.status_cmd import query

        now = time.monotonic()
        rows = await query(self.addresses, self.timeout, self.security)
        ok = [r for r in rows if "error" not in r]
        states: dict[str, dict[str, torch.Tensor]] = {}
        pulled: dict[str, int] = {}
        if self.models and ok:
            states, pulled = await self._pull({r["node_id"]: r["address"] for r in ok})
        degrees = {r["node_id"]: len(r.get("peers", [])) for r in ok}
        nodes = [self._node_row(row, now, states, degrees) for row in rows]
        # The pulls just made show up in the nodes' counters at the next refresh.
        for node_id, nbytes in pulled.items():
            self._pulled_since[node_id] = self._pulled_since.get(node_id, 0) + nbytes
        return {
            "t": time.time(),
            "elapsed": time.time() - self.t0,
            "nodes": nodes,
            "cluster": self._cluster_row(nodes, states),
        }

    async def _pull(
        self, addresses: Mapping[str, str]
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
        async def one(node_id: str, address: str) -> tuple[str, Message | None]:
            try:
                msg = Message(kind=PULL_KIND, sender="watch")
                return node_id, await self.client.request(address, msg, max(self.timeout, 5.0))
            except (PeerUnavailable, Rejected):
                return node_id, None

        replies = await asyncio.gather(*(one(n, a) for n, a in addresses.items()))
        states = {n: r.bundle.tensors for n, r in replies if r is not None and r.bundle}
        pulled = {n: r.nbytes for n, r in replies if r is not None}
        return states, pulled

    def _node_row(
        self,
        row: dict[str, Any],
        now: float,
        states: Mapping[str, dict[str, torch.Tensor]],
        degrees: Mapping[str, int],
    ) -> dict[str, Any]:
        if "error" in row:
            return {"address": row["address"], "error": row["error"]}
        node_id = row["node_id"]
        peers = row.get("peers", [])
        up = [p["node_id"] for p in peers if p.get("alive")]
        since = float(row.get("since_round_s", -1.0))
        out = {
            "node_id": node_id,
            "address": row["address"],
            "algorithm": row.get("algorithm"),
            "round": row["round"],
            "exchanges": row["exchanges"],
            "loss": row.get("loss"),
            "accuracy": row.get("accuracy"),
            "neighbour_distance": _neighbour_distance(node_id, peers, states, degrees),
            "bytes_in": row["bytes_in"],
            "bytes_out": row["bytes_out"],
            "in_bps": None,
            "out_bps": None,
            "peers_up": len(up),
            "peers_down": len(peers) - len(up),
            "peers_down_ids": [p["node_id"] for p in peers if not p.get("alive")],
            "staleness_s": since if since >= 0 else None,
            "finished": bool(row.get("finished", False)),
            "model_digest": row.get("model_digest"),
            "uptime_s": float(row.get("uptime_s", 0.0)),
        }
        prev = self._prev.get(node_id)
        if prev is not None and now > prev["at"]:
            dt = now - prev["at"]
            pulled = self._pulled_since.pop(node_id, 0)
            out["in_bps"] = max(0.0, (row["bytes_in"] - prev["bytes_in"]) / dt)
            out["out_bps"] = max(0.0, (row["bytes_out"] - prev["bytes_out"] - pulled) / dt)
        else:
            self._pulled_since.pop(node_id, None)
        self._prev[node_id] = {
            "at": now,
            "bytes_in": row["bytes_in"],
            "bytes_out": row["bytes_out"],
        }
        return out

    def _cluster_row(
        self, nodes: list[dict[str, Any]], states: Mapping[str, dict[str, torch.Tensor]]
    ) -> dict[str, Any]:
        ok = [n for n in nodes if "error" not in n]
        accs = [n["accuracy"] for n in ok if n["accuracy"] is not None]
        losses = [n["loss"] for n in ok if n["loss"] is not None]
        rounds = [n["round"] for n in ok]
        cd = consensus_distance(list(states.values())) if len(states) >= 2 else None
        rates = [n["in_bps"] + n["out_bps"] for n in ok if n["in_bps"] is not None]
        mean_acc = sum(accs) / len(accs) if accs else None
        row: dict[str, Any] = {
            "nodes": len(nodes),
            "reachable": len(ok),
            "finished": sum(1 for n in ok if n["finished"]),
            "round_min": min(rounds, default=None),
            "round_max": max(rounds, default=None),
            "mean_accuracy": mean_acc,
            "mean_loss": sum(losses) / len(losses) if losses else None,
            "consensus_distance": cd,
            "models_pulled": len(states),
            "bytes_per_s": sum(rates) if rates else None,
        }
        row["target"] = self._progress(mean_acc, cd)
        return row

    def _baseline(self, kind: str, value: float | None) -> float | None:
        """The first value of ``kind`` this watch saw (accuracy exists once nodes evaluate)."""
        if self._first.get(kind) is None:
            self._first[kind] = value
        return self._first[kind]

    def _progress(self, mean_acc: float | None, cd: float | None) -> dict[str, Any] | None:
        """Progress toward the target, measured from this watch's first observation.

        Accuracy: (a - a_0) / (target - a_0). Consensus distance shrinks geometrically, so
        progress is measured in decades: (log c_0 - log c) / (log c_0 - log target).
        """
        target = self.target
        if not target.given:
            return None
        if target.accuracy is not None:
            goal, value, kind = target.accuracy, mean_acc, "accuracy"
            reached = value is not None and value >= goal
            first = self._baseline(kind, value)
            progress = _fraction(first, value, goal, reached, log=False)
        else:
            assert target.consensus is not None
            goal, value, kind = target.consensus, cd, "consensus_distance"
            reached = value is not None and value <= goal
            first = self._baseline(kind, value)
            progress = _fraction(first, value, goal, reached, log=True)
        return {
            "metric": kind,
            "goal": goal,
            "value": value,
            "start": first,
            "progress": progress,
            "reached": reached,
        }


def _fraction(
    first: float | None, value: float | None, goal: float, reached: bool, log: bool
) -> float | None:
    if reached:
        return 1.0
    if first is None or value is None:
        return None
    if log:
        if first <= 0 or value <= 0 or first <= goal:
            return None
        span, done = math.log(first) - math.log(goal), math.log(first) - math.log(value)
    else:
        span, done = goal - first, value - first
    if span <= 0:
        return None
    return min(1.0, max(0.0, done / span))


@torch.no_grad()
def _neighbour_distance(
    node_id: str,
    peers: Sequence[Mapping[str, Any]],
    states: Mapping[str, Mapping[str, torch.Tensor]],
    degrees: Mapping[str, int],
) -> float | None:
    """‖x_i − a_i‖ with a_i the Metropolis-weighted mean of the neighbours' models pulled."""
    own = states.get(node_id)
    if own is None:
        return None
    d_i = len(peers)
    weights = {
        p["node_id"]: 1.0 / (1.0 + max(d_i, degrees.get(p["node_id"], d_i)))
        for p in peers
        if p["node_id"] in states
    }
    total = sum(weights.values())
    if total <= 0:
        return None
    squared = 0.0
    for name, x in own.items():
        if not x.is_floating_point():
            continue
        avg = sum(w * states[p][name].double() for p, w in weights.items()) / total
        squared += float(((x.double() - avg) ** 2).sum())
    return math.sqrt(squared)
