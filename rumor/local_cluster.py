"""A cluster of real node processes on this machine, and an observer that watches it.

:class:`LocalCluster` writes one TOML config per node into a run folder, starts each node as
``python -m rumor node --config ...`` in its own session (so a terminal's Ctrl-C reaches only
the launcher, which then stops the nodes in order), restarts or kills single nodes, and
always tears everything down: SIGTERM first, SIGKILL for what is left after a grace period.
Each node also holds a lifeline (:mod:`rumor.node.lifeline`): should the launcher die
without that teardown, even by SIGKILL, the nodes stop by themselves.
:class:`Observer` polls the nodes' Status RPCs and pulls their models to measure consensus,
appending to ``cluster.jsonl`` in the run folder.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rumor import config as config_io
from rumor.config import NodeConfig
from rumor.node.lifeline import Lifeline


class LocalCluster:
    """Node processes on this machine, one per config."""

    def __init__(self, configs: list[NodeConfig], run_dir: Path, python: str | None = None):
        self.configs = {c.node_id: c for c in configs}
        self.run_dir = Path(run_dir)
        self.python = python or sys.executable
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: dict[str, IO[bytes]] = {}
        self.restarts: dict[str, int] = dict.fromkeys(self.configs, 0)
        self._lifeline: Lifeline | None = None

    # ----------------------------------------------------------------- files
    def config_path(self, node_id: str) -> Path:
        return self.run_dir / f"{node_id}.toml"

    def metrics_path(self, node_id: str) -> Path:
        return self.run_dir / f"{node_id}.metrics.jsonl"

    def addresses(self) -> dict[str, str]:
        return {nid: c.advertise or c.listen for nid, c in self.configs.items()}

    def write_configs(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for nid, cfg in self.configs.items():
            cfg = cfg.replace(metrics=str(self.metrics_path(nid)))
            self.configs[nid] = cfg
            self.config_path(nid).write_text(config_io.dumps(cfg))
        (self.run_dir / "addresses.json").write_text(json.dumps(self.addresses(), indent=2))

    # ----------------------------------------------------------------- processes
    def start(self) -> None:
        self.write_configs()
        for nid in self.configs:
            self.start_node(nid)

    def start_node(self, node_id: str) -> None:
        old = self.procs.get(node_id)
        if old is not None and old.poll() is None:
            raise RuntimeError(f"{node_id} is still running")
        if old is not None:
            self.restarts[node_id] += 1
            self._logs[node_id].close()
        log = (self.run_dir / f"{node_id}.log").open("ab")
        self._logs[node_id] = log
        # One torch thread per node (nodes share the cores), and two malloc arenas: a node's
        # worker thread and event loop need no more, and each arena holds memory.
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            MALLOC_ARENA_MAX="2",
        )
        if self._lifeline is None:
            self._lifeline = Lifeline()
        # The lifeline's parent-death signal fires when the thread that forks exits: start
        # nodes from the launcher's main thread (``rumor cluster up`` does), not a worker.
        self.procs[node_id] = subprocess.Popen(
            [self.python, "-m", "rumor", "node", "--config", str(self.config_path(node_id))],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **self._lifeline.popen_kwargs(env),
        )
        pids = {nid: p.pid for nid, p in self.procs.items()}
        (self.run_dir / "pids.json").write_text(json.dumps(pids, indent=2))

    def signal_node(self, node_id: str, sig: int) -> None:
        proc = self.procs[node_id]
        if proc.poll() is None:
            proc.send_signal(sig)

    def returncodes(self) -> dict[str, int | None]:
        return {nid: p.poll() for nid, p in self.procs.items()}

    def running(self) -> list[str]:
        return [nid for nid, rc in self.returncodes().items() if rc is None]

    def wait(self, timeout: float) -> bool:
        """Wait until every node has exited; False if some still run after ``timeout``."""
        end = time.monotonic() + timeout
        while self.running() and time.monotonic() < end:
            time.sleep(0.1)
        return not self.running()

    def stop(self, grace: float = 10.0) -> dict[str, int | None]:
        """SIGTERM every node, SIGKILL what is left after ``grace`` seconds."""
        for nid in self.running():
            self.signal_node(nid, signal.SIGTERM)
        if not self.wait(grace):
            for nid in self.running():
                self.signal_node(nid, signal.SIGKILL)
            self.wait(5.0)
        for log in self._logs.values():
            log.close()
        if self._lifeline is not None:  # after the orderly stop: what is left stops itself
            self._lifeline.close()
            self._lifeline = None
        return self.returncodes()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Observation:
    elapsed: float
    statuses: list[dict[str, Any]]
    consensus_distance: float | None = None
    mean_accuracy: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Observer:
    """Polls Status and pulls models from a cluster's nodes; logs to ``cluster.jsonl``."""

    def __init__(self, addresses: dict[str, str], log_path: Path | None = None) -> None:
        from rumor.protocol.grpc_transport import GrpcTransport

        self.addresses = dict(addresses)
        self.client = GrpcTransport(node_id="observer")
        self.log_path = log_path
        self.t0 = time.time()

    async def statuses(self, timeout: float = 2.0) -> list[dict[str, Any]]:
        from rumor.cli.status_cmd import query

        return await query(list(self.addresses.values()), timeout)

    async def observe(self, with_models: bool = True, timeout: float = 10.0) -> Observation:
        from rumor.node.observe import consensus_distance, pull_models

        rows = await self.statuses()
        obs = Observation(elapsed=time.time() - self.t0, statuses=rows)
        accs = [r["accuracy"] for r in rows if "error" not in r and r.get("accuracy") is not None]
        obs.mean_accuracy = sum(accs) / len(accs) if accs else None
        if with_models:
            models = await pull_models(self.client, self.addresses, timeout)
            if len(models) >= 2:
                obs.consensus_distance = consensus_distance(list(models.values()))
            obs.extra["models_pulled"] = len(models)
        if self.log_path is not None:
            alive = [r for r in rows if "error" not in r]
            record = {
                "t": time.time(),
                "elapsed": obs.elapsed,
                "event": "observe",
                "consensus_distance": obs.consensus_distance,
                "mean_accuracy": obs.mean_accuracy,
                "nodes_alive": len(alive),
                "round_min": min((r["round"] for r in alive), default=None),
                "round_max": max((r["round"] for r in alive), default=None),
            }
            with self.log_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        return obs

    async def close(self) -> None:
        await self.client.stop()


async def wait_until(predicate: Any, timeout: float, period: float = 0.2) -> bool:
    """Poll an async predicate until it is true or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await predicate():
            return True
        await asyncio.sleep(period)
    return False
