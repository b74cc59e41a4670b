"""Real node processes talking gRPC on 127.0.0.1: convergence, a crash, a rejoin."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import psutil

from rumor.api import make_trainer
from rumor.cluster import build_graph, cluster_configs, free_ports
from rumor.config import NodeConfig
from rumor.local_cluster import LocalCluster, Observer
from rumor.node.observe import consensus_distance
from tests.conftest import run

N = 5


def _configs(rounds: int) -> list[NodeConfig]:
    ports = free_ports(N)
    base = NodeConfig(
        algorithm="dpsgd",
        params={"local_steps": 1, "round_timeout": 2.0},
        rounds=rounds,
        dataset="digits",
        partition="iid",
        model="mlp",
        lr=0.05,
        seed=3,
        init="independent",
        eval_every=10,
        linger=120.0,
        heartbeat_period=0.25,
    )
    return cluster_configs(build_graph("ring", N, 3), base, lambda i: f"127.0.0.1:{ports[i]}")


def _initial_state(configs: list[NodeConfig]) -> tuple[float, float]:
    """Consensus distance and mean accuracy of the nodes' initial models, computed here."""
    trainers = [make_trainer(c) for c in configs]
    cd = consensus_distance([t.model.state_dict() for t in trainers])
    acc = sum(t.evaluate()["accuracy"] for t in trainers) / len(trainers)
    return cd, acc


async def _rounds(observer: Observer) -> dict[str, int]:
    return {r["node_id"]: r["round"] for r in await observer.statuses() if "error" not in r}


async def _wait(predicate, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await predicate():
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"condition not reached in {timeout} s")


def test_cluster_converges_survives_a_crash_and_the_node_rejoins(tmp_path: Path) -> None:
    # A budget the cluster never reaches: the test decides when to look and when to stop.
    configs = _configs(rounds=1_000_000)
    cd0, acc0 = _initial_state(configs)
    victim = configs[2].node_id
    everyone = [c.node_id for c in configs]
    others = [n for n in everyone if n != victim]
    cluster = LocalCluster(configs, tmp_path)
    with cluster:
        cluster.start()

        async def scenario() -> dict[str, float]:
            observer = Observer(cluster.addresses(), tmp_path / "cluster.jsonl")
            try:

                async def past(r: int, who: list[str]) -> bool:
                    rounds = await _rounds(observer)
                    return all(rounds.get(n, -1) >= r for n in who)

                await _wait(lambda: past(30, everyone), 90)
                cluster.signal_node(victim, signal.SIGKILL)
                killed_at = max((await _rounds(observer)).values())
                # the rest go on without it
                await _wait(lambda: past(killed_at + 40, others), 60)
                assert victim not in await _rounds(observer)
                cluster.start_node(victim)

                # it rejoins: it answers again, catches up with its neighbours' rounds, and
                # both sides count each other alive
                async def rejoined() -> bool:
                    rows = {r["node_id"]: r for r in await observer.statuses() if "error" not in r}
                    if victim not in rows:
                        return False
                    back = rows[victim]
                    behind = min(rows[n]["round"] for n in others) - back["round"]
                    mine_alive = all(p["alive"] for p in back["peers"])
                    theirs = [
                        p["alive"]
                        for n in others
                        for p in rows[n]["peers"]
                        if p["node_id"] == victim
                    ]
                    return behind < 20 and back["round"] > killed_at and mine_alive and all(theirs)

                await _wait(rejoined, 60)
                rejoined_at = (await _rounds(observer))[victim]
                await _wait(lambda: past(rejoined_at + 60, everyone), 60)
                final = await observer.observe(with_models=True)
                assert final.extra["models_pulled"] == N
                assert final.consensus_distance is not None and final.mean_accuracy is not None
                return {"cd": final.consensus_distance, "acc": final.mean_accuracy}
            finally:
                await observer.close()

        result = run(scenario(), timeout=300)
        pids = [p.pid for p in cluster.procs.values()]
        codes = cluster.stop()
    # SIGTERM is a clean shutdown: every node exits 0, and no process is left behind
    assert codes == dict.fromkeys(everyone, 0), codes
    assert not [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert result["cd"] <= cd0 / 10, (cd0, result["cd"])
    assert result["acc"] > acc0 + 0.3, (acc0, result["acc"])
    assert result["acc"] > 0.85
    assert "caught up" in (tmp_path / f"{victim}.log").read_text()
