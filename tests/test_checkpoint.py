"""Checkpoints: atomic files, nested rule state, a SIGKILLed node process that resumes, and a
checkpoint from another configuration that is refused with its exit code."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import networkx as nx
import pytest
import torch

from rumor import config as config_io
from rumor.algorithms import registry
from rumor.cluster import free_ports
from rumor.config import NodeConfig
from rumor.exit_codes import ExitCode
from rumor.local_cluster import LocalCluster
from rumor.node.checkpoint import CheckpointMismatch, CheckpointStore, config_digest
from rumor.node.metrics import read_metrics


def test_store_round_trips_nested_state_atomically_and_keeps_the_last_k(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path, "node-1", "d1", keep=2)
    model = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.float64)}
    rule = {
        "epoch": "abc",
        "next_seq": {"node-2": 7},
        "served": {"node-0": {"floor": 3, "entries": {4: {"m": torch.ones(2), "age": 0.5}}}},
        "counters": [1, 2, 3],
    }
    for r in (5, 10, 15):
        store.save(r, model, {"state": {0: {"momentum_buffer": torch.ones(3)}}}, rule, digest="x")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "ckpt-00000010.json",
        "ckpt-00000010.safetensors",
        "ckpt-00000015.json",
        "ckpt-00000015.safetensors",
    ]  # pruned to two, and no temporary files left behind
    ckpt = store.load()
    assert ckpt is not None and ckpt.round == 15
    assert torch.equal(ckpt.model["w"], model["w"]) and ckpt.model["b"].dtype == torch.float64
    assert ckpt.rule["served"]["node-0"]["entries"][4]["age"] == 0.5  # int keys survive
    assert torch.equal(ckpt.rule["served"]["node-0"]["entries"][4]["m"], torch.ones(2))
    assert torch.equal(ckpt.optimizer["state"][0]["momentum_buffer"], torch.ones(3))
    manifest = json.loads((tmp_path / "ckpt-00000015.json").read_text())
    assert manifest["config_digest"] == "d1" and manifest["round"] == 15
    with pytest.raises(CheckpointMismatch) as err:
        CheckpointStore(tmp_path, "node-1", "d2").load()
    assert "d1" in str(err.value) and "d2" in str(err.value)


def test_config_digest_covers_training_not_addresses_or_budget() -> None:
    a = NodeConfig(node_id="n", peers={"m": "127.0.0.1:1"}, lr=0.05, rounds=10)
    assert config_digest(a) == config_digest(a.replace(peers={"m": "10.0.0.9:7"}, rounds=99))
    assert config_digest(a) == config_digest(a.replace(listen="0.0.0.0:5", insecure=True))
    assert config_digest(a) != config_digest(a.replace(lr=0.1))
    assert config_digest(a) != config_digest(a.replace(params={"local_steps": 3}))
    assert config_digest(a) != config_digest(a.replace(peers={"other": "127.0.0.1:1"}))


#: Rule parameters for the resume test. dpsgd's catch_up_lag is high: the restarted node
#: must continue from its own checkpoint, not adopt its neighbour's model.
RESUMABLE = {
    "dpsgd": {"local_steps": 1, "round_timeout": 1.0, "catch_up_lag": 1_000_000},
    "async-gossip": {"rate": 5.0, "local_steps": 1},
    "variance-corrected": {"local_steps": 1, "wait_timeout": 0.5},
    "acid": {"rate_com": 1.0, "local_steps": 1},
    "dfedsam": {"local_steps": 2, "round_timeout": 1.0, "catch_up_lag": 1_000_000},
    "diging": {"round_timeout": 1.0},
}


def _configs(tmp_path: Path, ports: list[int], algorithm: str = "dpsgd") -> list[NodeConfig]:
    ids = ["node-0", "node-1"]
    configs = [
        NodeConfig(
            node_id=nid,
            index=i,
            n_nodes=2,
            listen=f"127.0.0.1:{ports[i]}",
            peers={ids[1 - i]: f"127.0.0.1:{ports[1 - i]}"},
            algorithm=algorithm,
            params=dict(RESUMABLE[algorithm]),
            rounds=1_000_000,
            seed=2,
            eval_every=0,
            heartbeat_period=0.25,
            checkpoint_dir=str(tmp_path / f"ckpt-{nid}"),
            checkpoint_every=1,
            checkpoint_keep=3,
        )
        for i, nid in enumerate(ids)
    ]
    # Rules whose constants come from the graph (acid's chi_1, chi_2) get them here.
    return registry.get(algorithm).prepare(nx.path_graph(2), configs)


def _wait(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"{what}: not reached in {timeout} s")


@pytest.mark.parametrize(
    "algorithm",
    [
        "dpsgd",
        pytest.param("async-gossip", marks=pytest.mark.slow),
        pytest.param("variance-corrected", marks=pytest.mark.slow),
        pytest.param("acid", marks=pytest.mark.slow),
        pytest.param("dfedsam", marks=pytest.mark.slow),
        pytest.param("diging", marks=pytest.mark.slow),
    ],
)
def test_sigkilled_node_resumes_from_its_last_checkpoint_without_retraining(
    tmp_path: Path, algorithm: str
) -> None:
    configs = _configs(tmp_path, free_ports(2), algorithm)
    victim = "node-1"
    metrics = tmp_path / f"{victim}.metrics.jsonl"
    ckpt_dir = Path(configs[1].checkpoint_dir or "")

    def rounds_logged() -> list[dict]:
        return (
            [r for r in read_metrics(metrics) if r["event"] == "round"] if metrics.exists() else []
        )

    with LocalCluster(configs, tmp_path) as cluster:
        cluster.start()
        _wait(lambda: len(rounds_logged()) >= 6, 90.0, "six rounds on the victim")
        cluster.signal_node(victim, signal.SIGKILL)
        cluster.procs[victim].wait(10.0)
        before = rounds_logged()
        last = before[-1]
        latest = max(ckpt_dir.glob("ckpt-*.json"))
        manifest = json.loads(latest.read_text())
        # A logged round is always saved first (checkpoint_every = 1); the kill may fall
        # between a round's save and its metrics line.
        assert manifest["round"] in (last["round"] + 1, last["round"] + 2)
        saved = {r["round"] + 1: r["digest"] for r in before}
        cluster.start_node(victim)
        _wait(lambda: len(rounds_logged()) >= len(before) + 3, 90.0, "three rounds after restart")
        cluster.stop(grace=15.0)

    records = read_metrics(metrics)
    resumes = [r for r in records if r["event"] == "resume"]
    assert len(resumes) == 1
    resume = resumes[0]
    assert resume["round"] == manifest["round"]
    # The model restored is the one saved, which is the one logged at the end of that round.
    assert resume["digest"] == manifest["digest"]
    assert saved.get(manifest["round"], manifest["digest"]) == manifest["digest"]
    after = [r["round"] for r in records[records.index(resume) :] if r["event"] == "round"]
    assert after and after[0] == manifest["round"]  # continues where it stopped ...
    assert after == list(range(after[0], after[0] + len(after)))  # ... no round twice
    finished = {r["round"] for r in records[: records.index(resume)] if r["event"] == "round"}
    assert not finished & set(after)  # no second training of finished rounds
    # SIGTERM at the end saved a last checkpoint; only the newest three are kept.
    assert len(list(ckpt_dir.glob("ckpt-*.json"))) == 3


def test_checkpoint_of_another_configuration_is_refused_with_its_exit_code(
    tmp_path: Path,
) -> None:
    old = NodeConfig(
        node_id="node-7", lr=0.05, rounds=3, checkpoint_dir=str(tmp_path / "ckpt"), eval_every=0
    )
    store = CheckpointStore(old.checkpoint_dir or "", "node-7", config_digest(old))
    store.save(2, {"w": torch.zeros(2)}, None, {})
    new = old.replace(lr=0.2)
    path = tmp_path / "node.toml"
    path.write_text(config_io.dumps(new))
    result = subprocess.run(
        [sys.executable, "-m", "rumor", "node", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=90,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == ExitCode.CHECKPOINT, result.stderr
    assert config_digest(old) in result.stderr and config_digest(new) in result.stderr
    assert "node-7" in result.stderr and "exit 4: checkpoint" in result.stderr
