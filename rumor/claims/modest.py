"""Claim: MoDeST reaches a target accuracy with at least 3x fewer bytes than D-PSGD, and keeps
training when 80% of the nodes become unresponsive (de Vos et al., "MoDeST: Bridging the Gap
between Federated and Decentralized Learning with Decentralized Sampling", arXiv:2302.13837:
"3x-14x less communication than DL", "even when 80% of all nodes become unresponsive").

Scaled down to this machine: sklearn digits split IID over 64 nodes, a ReLU MLP 64-64-10, one
SGD step of batch 32 per round at lr 0.1 for both methods (one step is one local epoch here:
a node holds about 22 training digits), the same random 4-regular graph. D-PSGD mixes with
its graph neighbours every round; MoDeST samples s = 10 trainers per round from the whole
population (the graph only bootstraps it), with the reference code's defaults otherwise.

Bytes are measured the same way for both: a probe on the simulation's virtual clock sums,
every few milliseconds, what every node has put on the wire. ``model MB`` counts tensor
payloads only; ``wire MB`` adds everything else: envelopes, and for MoDeST its views, pings,
pongs, acks and adverts, each measured as the exact frame bytes it would take on gRPC. The
target is reached at the first moment the *mean accuracy* reaches it: for D-PSGD the mean
over the 64 nodes' test accuracies after a round, for MoDeST the test accuracy of the round's
aggregated model (the model every member of the next sample holds). The ratio is D-PSGD's
bytes over MoDeST's, on wire bytes.

Churn: MoDeST with the reference's crash-experiment settings (ping timeout 2 s, inactivity
threshold 20 rounds): after ``crash_after`` aggregated rounds, 80% of the nodes become
unresponsive in four waves (each wave includes the node aggregating at that moment), and the
run continues. It holds when rounds keep completing after the last wave, the aggregated
model reaches the target, and the survivors have dropped the dead nodes from their samples.

Everything runs in simulation (one process, virtual clock) with the real node runtime and
the rules' real message paths. ``rumor bench claims modest`` prints the table;
``rumor bench claims modest --grpc`` (:mod:`rumor.claims.modest_grpc`) runs the byte
comparison over real gRPC processes.
"""

from __future__ import annotations

import asyncio
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from rumor.claims import Claim

TITLE = "MoDeST vs D-PSGD: bytes to a target accuracy, and training through 80% crashes"
NAME = "modest"


@dataclass
class Setup:
    """The experiment's size and constants (see the module docstring)."""

    nodes: int = 64
    degree: int = 4
    target: float = 0.85
    dpsgd_rounds: int = 200
    modest_rounds: int = 200
    lr: float = 0.1
    batch_size: int = 32
    local_steps: int = 1
    model: str = "mlp"
    partition: str = "iid"
    modest: dict[str, Any] = field(
        default_factory=lambda: {"sample_size": 10, "aggregators": 1, "success_fraction": 1.0}
    )
    churn_nodes: int = 64
    churn_fraction: float = 0.8
    churn_waves: int = 4
    crash_after: int = 20
    churn_rounds: int = 200
    churn_params: dict[str, Any] = field(
        default_factory=lambda: {"ping_timeout": 2.0, "inactivity_threshold": 20}
    )
    #: Probe period on the virtual clock (s); a round takes tens of milliseconds.
    probe_s: float = 0.002


@dataclass
class Curve:
    """What a run produced: accuracy events and the wire-byte probe, on one clock."""

    accuracy: list[tuple[float, int, float]] = field(default_factory=list)  # (t, round, acc)
    probes: list[tuple[float, int, int]] = field(default_factory=list)  # (t, model, wire)
    final: dict[str, Any] = field(default_factory=dict)

    def to_target(self, target: float) -> tuple[int, float, int, int] | None:
        """(round, time, model bytes, wire bytes) when the accuracy first reaches ``target``."""
        for t, rnd, acc in sorted(self.accuracy):
            if acc >= target:
                for pt, model, wire in self.probes:
                    if pt >= t - 1e-12:
                        return rnd, t, model, wire
                model, wire = self.probes[-1][1:] if self.probes else (0, 0)
                return rnd, t, model, wire
        return None


def _configs(setup: Setup, algorithm: str, params: dict[str, Any], rounds: int, seed: int, n: int):
    from rumor.cluster import build_graph, cluster_configs, node_name
    from rumor.config import NodeConfig

    base = NodeConfig(
        algorithm=algorithm,
        params=dict(params),
        rounds=rounds,
        dataset="digits",
        partition=setup.partition,
        model=setup.model,
        lr=setup.lr,
        batch_size=setup.batch_size,
        seed=seed,
        eval_every=1 if algorithm == "dpsgd" else 0,
    )
    graph = build_graph(f"regular:{n}:{setup.degree}", n, seed)
    return cluster_configs(graph, base, node_name)


def _envelope_overhead(node: Any) -> int:
    """Wire bytes of a D-PSGD model message beyond its tensor payload (envelope, framing)."""
    from rumor.algorithms.averaging import mixable
    from rumor.algorithms.gossip import MODEL_KIND
    from rumor.protocol.bundle import Bundle, Message
    from rumor.protocol.framing import message_nbytes_on_wire

    state = mixable(node.trainer.model.state_dict())
    msg = Message(
        kind=MODEL_KIND,
        sender=node.node_id,
        round=999,
        time=1.0,
        bundle=Bundle(state, {"degree": 4}),
        algorithm="dpsgd",
    )
    return message_nbytes_on_wire(msg) - msg.nbytes


def _wire_totals(nodes: dict[str, Any], overhead: int) -> tuple[int, int]:
    model = wire = 0
    for node in nodes.values():
        rule = node.rule
        if hasattr(rule, "wire_bytes_out"):
            model += rule.model_bytes_out
            wire += rule.wire_bytes_out
        else:
            stats = node.transport.stats
            model += stats.bytes_out
            wire += stats.bytes_out + stats.messages_out * overhead
    return model, wire


def run_dpsgd(setup: Setup, seed: int) -> Curve:
    from rumor.node.simulation import simulate

    configs = _configs(
        setup, "dpsgd", {"local_steps": setup.local_steps}, setup.dpsgd_rounds, seed, setup.nodes
    )
    curve = Curve()

    async def probe(network: Any, nodes: dict[str, Any]) -> None:
        overhead = _envelope_overhead(next(iter(nodes.values())))
        loop = asyncio.get_running_loop()
        while True:
            curve.probes.append((loop.time(), *_wire_totals(nodes, overhead)))
            await asyncio.sleep(setup.probe_s)

    result = simulate(configs, scenario=probe)
    by_round: dict[int, list[tuple[float, float]]] = {}
    for records in result.metrics.values():
        for r in records:
            if r["event"] == "round" and r.get("accuracy") is not None:
                by_round.setdefault(r["round"], []).append((r["elapsed"], r["accuracy"]))
    for rnd, rows in sorted(by_round.items()):
        if len(rows) == len(configs):
            t = max(e for e, _ in rows)
            curve.accuracy.append((t, rnd, statistics.fmean(a for _, a in rows)))
    curve.final = {"mean_accuracy": result.mean_accuracy}
    return curve


def _modest_curve(records: dict[str, list[dict[str, Any]]]) -> Curve:
    curve = Curve()
    for rows in records.values():
        for r in rows:
            if r["event"] == "round" and r.get("role") == "aggregator" and r.get("accuracy"):
                curve.accuracy.append((r["elapsed"], r["round"], r["accuracy"]))
    return curve


def run_modest(setup: Setup, seed: int) -> Curve:
    from rumor.node.simulation import simulate

    params = {**setup.modest, "local_steps": setup.local_steps}
    configs = _configs(setup, "modest", params, setup.modest_rounds, seed, setup.nodes)
    probes: list[tuple[float, int, int]] = []

    async def probe(network: Any, nodes: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            probes.append((loop.time(), *_wire_totals(nodes, 0)))
            await asyncio.sleep(setup.probe_s)

    result = simulate(configs, scenario=probe)
    curve = _modest_curve(result.metrics)
    curve.probes = probes
    return curve


@dataclass
class ChurnOutcome:
    crashed: int
    survivors: int
    rounds_before: int
    rounds_after: int
    best_after: float
    reached_target: bool
    stale_entries: float
    resends: int
    aggregator_crashes: int
    virtual_s: float


def run_churn(setup: Setup, seed: int) -> ChurnOutcome:
    """MoDeST on ``churn_nodes`` nodes; 80% become unresponsive in waves mid-run."""
    from rumor.node.simulation import simulate

    n = setup.churn_nodes
    params = {**setup.modest, **setup.churn_params, "local_steps": setup.local_steps}
    configs = _configs(setup, "modest", params, setup.churn_rounds, seed, n)
    rng = random.Random(seed)
    total = round(setup.churn_fraction * n)
    crashed: list[str] = []
    crash_time: list[float] = []
    aggregator_hits = [0]

    def aggregated(nodes: dict[str, Any]) -> int:
        return max(node.rule._agg_est for node in nodes.values())

    captured: dict[str, Any] = {}

    async def churn(network: Any, nodes: dict[str, Any]) -> None:
        captured.update(nodes)
        loop = asyncio.get_running_loop()
        while aggregated(nodes) < setup.crash_after:
            await asyncio.sleep(0.01)
        per_wave = math.ceil(total / setup.churn_waves)
        for _ in range(setup.churn_waves):
            alive = [nid for nid in nodes if nid not in crashed]
            # the node collecting the newest round goes down in every wave
            busy = max(alive, key=lambda nid: nodes[nid].rule._agg_est)
            wave = [busy, *rng.sample([a for a in alive if a != busy], per_wave - 1)]
            wave = wave[: total - len(crashed)]
            aggregator_hits[0] += 1
            for nid in wave:
                network.set_down(nid)  # unreachable both ways, as after SIGKILL
                nodes[nid].request_stop()
                crashed.append(nid)
            crash_time.append(loop.time())
            mark = aggregated(nodes)
            while aggregated(nodes) < mark + 5:  # five more rounds between waves
                await asyncio.sleep(0.01)

    result = simulate(configs, scenario=churn)
    dead = set(crashed)
    survivors = [c.node_id for c in configs if c.node_id not in dead]
    aggs = [
        (r["elapsed"], r["round"], r.get("accuracy"))
        for nid in survivors
        for r in result.metrics[nid]
        if r["event"] == "round" and r.get("role") == "aggregator"
    ]
    last_wave = crash_time[-1] if crash_time else 0.0
    first_wave = crash_time[0] if crash_time else 0.0
    before = [
        (r["elapsed"], r["round"])
        for rows in result.metrics.values()
        for r in rows
        if r["event"] == "round" and r.get("role") == "aggregator" and r["elapsed"] <= first_wave
    ]
    after = [a for a in aggs if a[0] > last_wave]
    best_after = max((a[2] for a in after if a[2] is not None), default=float("nan"))
    # crashed nodes that a survivor would still consider for its next sample
    stale = []
    for nid in survivors:
        rule = captured[nid].rule
        est = rule.round_estimate()
        stale.append(len(dead & set(rule.view.candidates(est, rule.inactivity_threshold))))
    return ChurnOutcome(
        crashed=len(dead),
        survivors=len(survivors),
        rounds_before=max((a[1] for a in before), default=-1) + 1,
        rounds_after=len({a[1] for a in after}),
        best_after=best_after,
        reached_target=best_after >= setup.target,
        stale_entries=statistics.fmean(stale) if stale else float("nan"),
        resends=sum(captured[nid].rule.resends for nid in survivors),
        aggregator_crashes=aggregator_hits[0],
        virtual_s=result.virtual_time_s,
    )


def run(quick: bool = False, seeds: int | None = None) -> Claim:
    """The bytes-to-target table for both methods and the churn row, over ``seeds`` seeds
    (3; 1 quick). ``quick`` uses fewer rounds and a lower target."""
    n_seeds = seeds if seeds is not None else (1 if quick else 3)
    if n_seeds < 1:
        raise ValueError("seeds must be >= 1")
    setup = (
        Setup(target=0.8, dpsgd_rounds=120, modest_rounds=120, churn_rounds=120)
        if quick
        else Setup()
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64 nodes share one thread; more only contend
    try:
        return _run(setup, n_seeds, quick)
    finally:
        torch.set_num_threads(threads)


def _run(setup: Setup, n_seeds: int, quick: bool) -> Claim:
    started = time.perf_counter()
    rows: list[list[Any]] = []
    ratios: list[float] = []
    reached_all = True
    for seed in range(n_seeds):
        d = run_dpsgd(setup, seed).to_target(setup.target)
        m = run_modest(setup, seed).to_target(setup.target)
        for label, hit in (("D-PSGD", d), ("MoDeST", m)):
            if hit is None:
                rows.append([seed, label, None, None, None, None])
            else:
                rows.append([seed, label, hit[0] + 1, round(hit[1], 3), hit[2] / 1e6, hit[3] / 1e6])
        if d is None or m is None:
            reached_all = False
            continue
        ratios.append(d[3] / m[3])
        rows[-1].append(round(d[3] / m[3], 2))
        rows[-2].append(None)
    churn = [run_churn(setup, seed) for seed in range(n_seeds)]
    elapsed = time.perf_counter() - started
    churn_ok = all(c.reached_target and c.rounds_after >= 5 for c in churn)
    holds = reached_all and bool(ratios) and min(ratios) >= 3.0 and churn_ok
    churn_rows = [
        [
            seed,
            c.crashed,
            c.survivors,
            c.rounds_before,
            c.rounds_after,
            round(c.best_after, 4),
            c.reached_target,
            c.resends,
            round(c.stale_entries, 2),
            round(c.virtual_s, 1),
        ]
        for seed, c in enumerate(churn)
    ]
    notes = [
        f"digits IID over {setup.nodes} nodes; MLP 64-64-10; SGD lr {setup.lr}, batch "
        f"{setup.batch_size}, {setup.local_steps} local step per round for both; D-PSGD on "
        f"a random {setup.degree}-regular graph (Metropolis-Hastings); MoDeST {setup.modest}.",
        f"target: mean accuracy {setup.target}; rounds: D-PSGD {setup.dpsgd_rounds}, MoDeST "
        f"{setup.modest_rounds} at most.",
        "wire MB includes MoDeST's views, pings, acks and adverts and both methods' "
        "envelopes; D-PSGD's bare acknowledgements are not counted (in its favour).",
        f"ratio (wire bytes D-PSGD / MoDeST): {', '.join(f'{r:.1f}' for r in ratios)}.",
        "churn: seed, crashed, survivors, rounds before the first wave, rounds completed "
        "after the last wave, best aggregated accuracy after it, target reached, trainer "
        "resends, crashed nodes still candidates in a survivor's view (mean), virtual "
        "seconds: " + "; ".join(str(r) for r in churn_rows),
        f"churn settings: {setup.churn_nodes} nodes, {setup.churn_fraction:.0%} crash in "
        f"{setup.churn_waves} waves after round {setup.crash_after}, each wave includes the "
        f"busiest aggregator; {setup.churn_params}.",
        f"{n_seeds} seed(s), wall time {elapsed:.0f} s.",
    ]
    return Claim(
        name=NAME,
        title=TITLE,
        claim=(
            "MoDeST reaches the target mean accuracy with at least 3x fewer bytes than D-PSGD "
            "on the same 4-regular graph and data, and keeps training to the target when 80% "
            "of the nodes become unresponsive (arXiv:2302.13837)."
        ),
        columns=["seed", "method", "rounds", "virtual s", "model MB", "wire MB", "ratio"],
        rows=rows,
        holds=holds,
        notes=notes,
        setup={
            "nodes": setup.nodes,
            "degree": setup.degree,
            "target": setup.target,
            "dpsgd_rounds": setup.dpsgd_rounds,
            "modest_rounds": setup.modest_rounds,
            "lr": setup.lr,
            "batch_size": setup.batch_size,
            "local_steps": setup.local_steps,
            "modest": setup.modest,
            "churn": {
                "nodes": setup.churn_nodes,
                "fraction": setup.churn_fraction,
                "waves": setup.churn_waves,
                "crash_after": setup.crash_after,
                "params": setup.churn_params,
                "rows": churn_rows,
            },
            "seeds": n_seeds,
            "quick": quick,
            "wall_time_s": round(elapsed, 1),
        },
    )
