"""MoDeST vs D-PSGD over real gRPC: bytes sent until the mean accuracy reaches a target.

The simulated claim (:mod:`rumor.claims.modest`) counts bytes on a virtual clock; this one
runs each method as ``nodes`` ``rumor node`` processes on 127.0.0.1 (a
:class:`~rumor.local_cluster.LocalCluster`), on the same random 4-regular graph and digits
split, and reads everything from the nodes' own metrics files while they run:

- **payload bytes**: the transport's own counter (``bytes_out`` on every ``round`` line:
  tensor bytes of every request and reply the node sent), the same counter for both methods;
- **wire bytes** (MoDeST only): the rule's ``wire_bytes_out``, the frame bytes of every
  message it sent (``framing.message_nbytes_on_wire``: envelopes, views, pings, pongs, acks,
  adverts and tensors). D-PSGD's envelopes are not counted, which favours D-PSGD.

The target is reached at the first moment the mean accuracy reaches it: for D-PSGD the first
round all nodes logged with a mean test accuracy at or above it, the bytes being the sum of
each node's counter on that round's line (exact); for MoDeST the first aggregated model
whose test accuracy reaches it (the model every member of the next sample trains). MoDeST's
nodes log only when they train or aggregate, so each node's bytes at that moment lie
between its last line before it and its first line after it: both sums are reported, and
the ratio is taken on the upper one (against MoDeST). The claim holds when D-PSGD's payload
bytes are at least 3x MoDeST's wire bytes for every seed.

``rumor bench claims modest --grpc`` prints the table (about 90 s per seed here).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rumor.claims import Claim

TITLE = "MoDeST vs D-PSGD over real gRPC: bytes to a target accuracy"
NAME = "modest"


@dataclass
class GrpcSetup:
    """Size and constants of the gRPC comparison (see the module docstring)."""

    nodes: int = 16
    degree: int = 4
    target: float = 0.85
    lr: float = 0.1
    batch_size: int = 32
    #: Wall seconds a method may take to reach the target before it counts as not reached.
    timeout_s: float = 300.0
    #: Wall seconds to wait, after MoDeST reached the target, for every node's next line.
    settle_s: float = 30.0
    dpsgd: dict[str, Any] = field(default_factory=lambda: {"local_steps": 1, "round_timeout": 10.0})
    modest: dict[str, Any] = field(
        default_factory=lambda: {
            "sample_size": 4,
            "aggregators": 1,
            "success_fraction": 1.0,
            "local_steps": 1,
            "ping_timeout": 1.0,
            "ping_interval": 0.25,
            "aggregation_timeout": 10.0,
            "keepalive": 5.0,
            "inactivity_threshold": 20,
        }
    )


@dataclass
class Outcome:
    """What one method's cluster measured; ``round`` is None when it missed the target."""

    algorithm: str
    round: int | None = None
    accuracy: float | None = None
    wall_s: float = 0.0
    payload_bytes: int | None = None
    wire_bytes: int | None = None
    payload_bytes_low: int | None = None
    wire_bytes_low: int | None = None
    nodes_without_later_line: int = 0
    failure: str | None = None

    @property
    def reached(self) -> bool:
        return self.round is not None


def _configs(setup: GrpcSetup, algorithm: str, seed: int) -> list[Any]:
    from rumor.cluster import build_graph, cluster_configs, free_ports
    from rumor.config import NodeConfig

    ports = free_ports(setup.nodes)
    base = NodeConfig(
        algorithm=algorithm,
        params=dict(setup.dpsgd if algorithm == "dpsgd" else setup.modest),
        rounds=1_000_000,  # the measurement decides when to stop
        dataset="digits",
        partition="iid",
        model="mlp",
        lr=setup.lr,
        batch_size=setup.batch_size,
        seed=seed,
        eval_every=1,
        heartbeat_period=0.5,
        startup_wait=60.0,
    )
    graph = build_graph(f"regular:{setup.nodes}:{setup.degree}", setup.nodes, seed)
    return cluster_configs(graph, base, lambda i: f"127.0.0.1:{ports[i]}")


def _round_lines(paths: dict[str, Path]) -> dict[str, list[dict[str, Any]]]:
    from rumor.node.metrics import read_metrics

    return {
        nid: [r for r in read_metrics(p) if r.get("event") == "round"]
        for nid, p in paths.items()
        if p.exists()
    }


def dpsgd_at_target(lines: dict[str, list[dict[str, Any]]], n: int, target: float) -> Outcome:
    """The first round every node logged with mean accuracy >= target (exact counters)."""
    by_round: dict[int, list[dict[str, Any]]] = {}
    for rows in lines.values():
        for r in rows:
            by_round.setdefault(r["round"], []).append(r)
    for rnd in sorted(by_round):
        rows = by_round[rnd]
        if len(rows) < n or any(r.get("accuracy") is None for r in rows):
            continue
        acc = statistics.fmean(r["accuracy"] for r in rows)
        if acc >= target:
            total = sum(r["bytes_out"] for r in rows)
            return Outcome("dpsgd", rnd, acc, payload_bytes=total, payload_bytes_low=total)
    return Outcome("dpsgd")


def modest_hit(lines: dict[str, list[dict[str, Any]]], target: float) -> tuple[float, int, float]:
    """(wall time, round, accuracy) of the first aggregated model at or above target."""
    hits = sorted(
        (r["t"], r["round"], r["accuracy"])
        for rows in lines.values()
        for r in rows
        if r.get("role") == "aggregator" and (r.get("accuracy") or 0.0) >= target
    )
    return hits[0] if hits else (float("nan"), -1, float("nan"))


def modest_at(lines: dict[str, list[dict[str, Any]]], t: float, rnd: int, acc: float) -> Outcome:
    """Every node's counters bracketing wall time ``t``: last line before, first after."""
    out = Outcome("modest", rnd, acc, payload_bytes=0, wire_bytes=0)
    out.payload_bytes_low = out.wire_bytes_low = 0
    for rows in lines.values():
        counted = [r for r in rows if "wire_bytes_out" in r]
        before = [r for r in counted if r["t"] <= t]
        after = [r for r in counted if r["t"] >= t]
        low = before[-1] if before else None
        high = after[0] if after else low
        if not after:
            out.nodes_without_later_line += 1
        for row, payload, wire in (
            (low, "payload_bytes_low", "wire_bytes_low"),
            (high, "payload_bytes", "wire_bytes"),
        ):
            if row is not None:
                setattr(out, payload, getattr(out, payload) + row["bytes_out"])
                setattr(out, wire, getattr(out, wire) + row["wire_bytes_out"])
    return out


def _all_logged_after(lines: dict[str, list[dict[str, Any]]], n: int, t: float) -> bool:
    return len(lines) == n and all(
        any(r["t"] >= t and "wire_bytes_out" in r for r in rows) for rows in lines.values()
    )


def measure(setup: GrpcSetup, algorithm: str, seed: int, run_dir: Path) -> Outcome:
    """Run ``algorithm`` on ``setup.nodes`` processes until it reaches the target (bounded)."""
    from rumor.local_cluster import LocalCluster

    configs = _configs(setup, algorithm, seed)
    cluster = LocalCluster(configs, run_dir)
    paths = {c.node_id: cluster.metrics_path(c.node_id) for c in configs}
    n = len(configs)
    started = time.monotonic()
    outcome = Outcome(algorithm, failure=f"not reached within {setup.timeout_s:.0f} s")
    with cluster:
        cluster.start()
        while time.monotonic() - started < setup.timeout_s:
            time.sleep(1.0)
            dead = {nid: rc for nid, rc in cluster.returncodes().items() if rc is not None}
            if dead:
                outcome.failure = f"node processes exited: {dead}"
                break
            lines = _round_lines(paths)
            if algorithm == "dpsgd":
                hit = dpsgd_at_target(lines, n, setup.target)
                if hit.reached:
                    outcome = hit
                    break
                continue
            t, rnd, acc = modest_hit(lines, setup.target)
            if rnd < 0:
                continue
            settle = time.monotonic() + setup.settle_s
            while not _all_logged_after(lines, n, t) and time.monotonic() < settle:
                time.sleep(1.0)
                lines = _round_lines(paths)
            outcome = modest_at(lines, t, rnd, acc)
            break
        outcome.wall_s = round(time.monotonic() - started, 1)
        cluster.stop()
    return outcome


def compare(setup: GrpcSetup, seed: int, work: Path) -> dict[str, Outcome]:
    """Both methods, one after the other (never at once: they would share the cores)."""
    return {a: measure(setup, a, seed, work / f"seed{seed}-{a}") for a in ("dpsgd", "modest")}


def ratios(out: dict[str, Outcome]) -> tuple[float | None, float | None]:
    """(payload ratio, D-PSGD payload / MoDeST wire), None when either missed the target."""
    d, m = out["dpsgd"], out["modest"]
    if not (d.reached and m.reached) or not d.payload_bytes:
        return None, None
    if not m.payload_bytes or not m.wire_bytes:
        return None, None
    return d.payload_bytes / m.payload_bytes, d.payload_bytes / m.wire_bytes


def run(quick: bool = False, seeds: int | None = None, work: Path | None = None) -> Claim:
    """``seeds`` seeds (3; 1 quick, at target 0.8), each seed on a new graph and data split."""
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    if n_seeds < 1:
        raise ValueError("seeds must be >= 1")
    setup = GrpcSetup(target=0.8) if quick else GrpcSetup()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="rumor-modest-grpc-") as tmp:
        base = Path(work) if work is not None else Path(tmp)
        results = {seed: compare(setup, seed, base) for seed in range(n_seeds)}
    elapsed = time.monotonic() - started
    rows: list[list[Any]] = []
    wire_ratios: list[float] = []
    failures: list[str] = []
    for seed, out in results.items():
        payload_ratio, wire_ratio = ratios(out)
        for label, o in (("D-PSGD", out["dpsgd"]), ("MoDeST", out["modest"])):
            if o.failure:
                failures.append(f"seed {seed} {label}: {o.failure}")
            last = label == "MoDeST"
            rows.append(
                [
                    seed,
                    label,
                    None if o.round is None else o.round + 1,
                    None if o.accuracy is None else round(o.accuracy, 4),
                    o.wall_s,
                    _mb(o.payload_bytes),
                    _mb(o.wire_bytes),
                    _ratio(payload_ratio) if last else None,
                    _ratio(wire_ratio) if last else None,
                ]
            )
        if wire_ratio is not None:
            wire_ratios.append(wire_ratio)
    holds = len(wire_ratios) == n_seeds and min(wire_ratios) >= 3.0
    m_out = [out["modest"] for out in results.values()]
    notes = [
        f"{setup.nodes} rumor node processes per method on 127.0.0.1 (gRPC), digits IID, MLP "
        f"64-64-10, SGD lr {setup.lr} batch {setup.batch_size}, one local step per round, "
        f"the same random {setup.degree}-regular graph; D-PSGD {setup.dpsgd}; "
        f"MoDeST {setup.modest}.",
        f"target: mean accuracy {setup.target}; each method at most {setup.timeout_s:.0f} s.",
        "payload MB: the transports' bytes_out counters (tensors), summed over the nodes; "
        "wire MB: MoDeST's frame bytes of everything it sent (views, pings, acks, "
        "envelopes). ratio (payload): D-PSGD / MoDeST payload; ratio (wire): D-PSGD payload "
        "/ MoDeST wire (D-PSGD's envelopes not counted: in its favour).",
        "MoDeST bytes are each node's first metrics line at or after the target (an upper "
        "bound); the last lines before it sum to: "
        + "; ".join(
            f"seed {s}: {_mb(o.payload_bytes_low)} payload / {_mb(o.wire_bytes_low)} wire MB"
            f" ({o.nodes_without_later_line} nodes without a later line)"
            for s, o in enumerate(m_out)
        )
        + ".",
        *failures,
        f"{n_seeds} seed(s), wall time {elapsed:.0f} s.",
    ]
    return Claim(
        name=NAME,
        title=TITLE,
        claim=(
            "Over real gRPC, MoDeST reaches the target mean accuracy with at least 3x fewer "
            "bytes than D-PSGD on the same 4-regular graph and data (arXiv:2302.13837)."
        ),
        columns=[
            "seed",
            "method",
            "rounds",
            "accuracy",
            "wall s",
            "payload MB",
            "wire MB",
            "ratio (payload)",
            "ratio (wire)",
        ],
        rows=rows,
        holds=holds,
        notes=notes,
        setup={
            **asdict(setup),
            "seeds": n_seeds,
            "quick": quick,
            "wall_time_s": round(elapsed, 1),
            "outcomes": {
                str(s): {a: asdict(o) for a, o in out.items()} for s, out in results.items()
            },
        },
    )


def _mb(n: int | None) -> float | None:
    return None if n is None else round(n / 1e6, 3)


def _ratio(r: float | None) -> float | None:
    return None if r is None else round(r, 2)
