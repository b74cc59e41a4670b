"""Inspecting a real cluster: ``rumor watch``, ``rumor status``, ``rumor plot`` and
``rumor topology draw`` against four node processes talking gRPC on 127.0.0.1.

The nodes run a short D-PSGD budget on a ring and then linger, so every number the commands
print can be checked against what the nodes wrote in their own metrics logs.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from rumor.cli import app
from rumor.cluster import build_graph, cluster_configs, free_ports
from rumor.config import NodeConfig
from rumor.local_cluster import LocalCluster
from rumor.node.observe import consensus_distance, pull_models
from rumor.runlog import read_jsonl

N = 4
ROUNDS = 12
STARTUP_TIMEOUT_S = 120.0


def _statuses(addresses: list[str]) -> list[dict[str, Any]]:
    from rumor.cli.status_cmd import query

    return asyncio.run(query(addresses, 2.0))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A finished, still serving 4-node ring; yields its run folder."""
    run_dir = tmp_path_factory.mktemp("inspect") / "ring4"
    ports = free_ports(N)
    base = NodeConfig(
        algorithm="dpsgd",
        params={"local_steps": 2, "round_timeout": 5.0},
        rounds=ROUNDS,
        partition="dirichlet:0.5",
        seed=5,
        init="independent",
        eval_every=3,
        linger=300.0,
        heartbeat_period=0.25,
    )
    configs = cluster_configs(build_graph("ring", N, 0), base, lambda i: f"127.0.0.1:{ports[i]}")
    local = LocalCluster(configs, run_dir)
    with local:
        local.start()
        addresses = list(local.addresses().values())
        end = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < end:
            rows = _statuses(addresses)
            if all("error" not in r and r["finished"] for r in rows):
                break
            assert local.running(), f"nodes exited early: {local.returncodes()}"
            time.sleep(0.5)
        else:
            raise AssertionError(f"cluster did not finish in {STARTUP_TIMEOUT_S} s")
        yield run_dir


def _logs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Per node: its last round record and its ``finished`` record."""
    out = {}
    for path in sorted(run_dir.glob("*.metrics.jsonl")):
        records = read_jsonl(path)
        rounds = [r for r in records if r["event"] == "round"]
        finished = [r for r in records if r["event"] == "finished"]
        out[rounds[-1]["node"]] = {"round": rounds[-1], "finished": finished[-1]}
    assert len(out) == N
    return out


def _invoke(*args: str) -> str:
    result = CliRunner(env={"COLUMNS": "160"}).invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _check_png(path: Path, min_colours: int = 50) -> np.ndarray:
    """A real picture: decodes, has a sensible size, and is not blank."""
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] >= 300 and img.shape[1] >= 300, img.shape
    pixels = (img[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    assert len(colours) >= min_colours, f"only {len(colours)} colours in {path}"
    ink = np.mean(np.any(pixels < 200, axis=1))
    assert ink > 0.01, f"{path} is almost blank ({ink:.3%} ink)"
    return img


def _addresses(run_dir: Path) -> dict[str, str]:
    return json.loads((run_dir / "addresses.json").read_text())


def test_watch_once_json_agrees_with_the_nodes_metrics_logs(cluster: Path) -> None:
    snap = json.loads(
        _invoke(
            "watch", "--run-dir", str(cluster), "--once", "--format", "json", "--interval", "0.5"
        )
    )
    logs = _logs(cluster)
    nodes = {n["node_id"]: n for n in snap["nodes"]}
    assert set(nodes) == set(logs)
    for node_id, row in nodes.items():
        last, done = logs[node_id]["round"], logs[node_id]["finished"]
        assert row["round"] == last["round"] + 1 == ROUNDS
        assert row["loss"] == last["loss"]
        assert row["accuracy"] == done["accuracy"]
        assert row["exchanges"] == last["exchanges"]
        assert row["model_digest"] == last["digest"]
        assert row["bytes_in"] >= last["bytes_in"] and row["bytes_out"] >= last["bytes_out"]
        assert row["finished"] and row["staleness_s"] > 0
        # A finished node moves no bytes of its own: the watch's pulls are taken out.
        assert row["in_bps"] == 0.0 and row["out_bps"] == 0.0
        assert row["peers_up"] + row["peers_down"] == 2

    # The distances, recomputed here from the models pulled independently.
    async def pull() -> dict[str, Any]:
        from rumor.protocol.grpc_transport import GrpcTransport

        client = GrpcTransport(node_id="test")
        try:
            return await pull_models(client, _addresses(cluster), 10.0)
        finally:
            await client.stop()

    models = asyncio.run(pull())
    assert len(models) == N
    cd = consensus_distance(list(models.values()))
    assert snap["cluster"]["consensus_distance"] == pytest.approx(cd, rel=1e-9)
    assert snap["cluster"]["consensus_distance"] > 0
    # On a ring every Metropolis weight is 1/3: the neighbourhood average is the plain mean.
    ring = {f"node-{i}": (f"node-{(i - 1) % N}", f"node-{(i + 1) % N}") for i in range(N)}
    for node_id, (left, right) in ring.items():
        x, a, b = models[node_id], models[left], models[right]
        expected = math.sqrt(
            sum(
                float(((x[k].double() - (a[k].double() + b[k].double()) / 2) ** 2).sum())
                for k in x
                if x[k].is_floating_point()
            )
        )
        assert nodes[node_id]["neighbour_distance"] == pytest.approx(expected, rel=1e-9)
    accs = [logs[n]["finished"]["accuracy"] for n in logs]
    assert snap["cluster"]["mean_accuracy"] == pytest.approx(sum(accs) / N)
    assert snap["cluster"]["round_min"] == snap["cluster"]["round_max"] == ROUNDS
    assert snap["cluster"]["finished"] == snap["cluster"]["reachable"] == N


def test_watch_progress_toward_a_target_and_the_live_table(cluster: Path) -> None:
    snap = json.loads(
        _invoke(
            "watch",
            "--run-dir",
            str(cluster),
            "--once",
            "--format",
            "json",
            "--interval",
            "0.2",
            "--target-accuracy",
            "1.0",
            "--no-models",
        )
    )
    target = snap["cluster"]["target"]
    assert target["metric"] == "accuracy" and target["goal"] == 1.0
    assert target["value"] == pytest.approx(snap["cluster"]["mean_accuracy"])
    assert target["reached"] is (target["value"] >= 1.0)
    assert snap["cluster"]["consensus_distance"] is None  # --no-models pulls nothing
    # The live table: every node is finished, so it exits after the first refresh.
    table = _invoke("watch", "--run-dir", str(cluster), "--interval", "0.2", "--duration", "20")
    for i in range(N):
        assert f"node-{i}" in table
    assert "finished" in table and "consensus distance" in table


def test_status_json_agrees_with_the_metrics_logs(cluster: Path) -> None:
    rows = json.loads(_invoke("status", "--run-dir", str(cluster), "--format", "json"))
    logs = _logs(cluster)
    assert {r["node_id"] for r in rows} == set(logs)
    for row in rows:
        last, done = logs[row["node_id"]]["round"], logs[row["node_id"]]["finished"]
        assert row["round"] == ROUNDS
        assert row["loss"] == last["loss"]
        assert row["accuracy"] == done["accuracy"]
        assert row["model_digest"] == last["digest"]
        assert row["since_round_s"] > 0


def test_plot_one_run_and_two_runs_against_round_time_and_bytes(
    cluster: Path, tmp_path: Path
) -> None:
    logs = _logs(cluster)
    for x in ("round", "time", "bytes"):
        out = tmp_path / f"one-{x}.png"
        report = json.loads(
            _invoke("plot", str(cluster), "--out", str(out), "--x", x, "--format", "json")
        )
        (summary,) = report["runs"]
        assert summary["nodes"] == N and summary["rounds_max"] == ROUNDS - 1
        accs = [logs[n]["finished"]["accuracy"] for n in logs]
        assert summary["final_mean_accuracy"] == pytest.approx(sum(accs) / N)
        _check_png(out)
    # Two runs in one picture (the second a copy under another name: same records).
    twin = tmp_path / "ring4-copy"
    twin.mkdir()
    for path in cluster.glob("*.metrics.jsonl"):
        shutil.copy(path, twin / path.name)
    out = tmp_path / "two.png"
    report = json.loads(
        _invoke("plot", str(cluster), str(twin), "--out", str(out), "--format", "json")
    )
    assert [r["name"] for r in report["runs"]] == ["ring4", "ring4-copy"]
    assert report["runs"][0]["final_mean_accuracy"] == report["runs"][1]["final_mean_accuracy"]
    _check_png(out)


def test_topology_draw_colours_from_the_live_cluster_and_from_the_logs(
    cluster: Path, tmp_path: Path
) -> None:
    logs = _logs(cluster)
    live_png = tmp_path / "live.png"
    live = json.loads(
        _invoke(
            "topology", "draw", "--run-dir", str(cluster), "--live-run", "--color", "round",
            "--out", str(live_png), "--format", "json",
        )
    )  # fmt: skip
    assert live["source"] == "live"
    assert live["values"] == {n: float(ROUNDS) for n in logs}
    assert sorted(map(tuple, live["edges"])) == sorted(
        tuple(sorted((f"node-{i}", f"node-{(i + 1) % N}"))) for i in range(N)
    )
    _check_png(live_png, min_colours=20)

    log_png = tmp_path / "log.png"
    from_log = json.loads(
        _invoke(
            "topology", "draw", "--run-dir", str(cluster), "--color", "accuracy",
            "--out", str(log_png), "--format", "json",
        )
    )  # fmt: skip
    assert from_log["source"] == "log"
    assert from_log["values"] == {n: logs[n]["finished"]["accuracy"] for n in logs}
    _check_png(log_png, min_colours=20)

    spec_png = tmp_path / "torus.png"
    assert _invoke("topology", "draw", "torus:4x4", "--out", str(spec_png), "--color", "none")
    _check_png(spec_png, min_colours=20)


def test_topology_analyze_lists_per_edge_weights_resistances_and_rates() -> None:
    report = json.loads(_invoke("topology", "analyze", "ring:6", "--edges", "--format", "json"))
    edges = report["per_edge"]
    assert len(edges) == 6
    for e in edges:
        assert e["weight"] == pytest.approx(1 / 3)
        # a ring of n unit resistors: R_eff between neighbours is (n - 1) / n
        assert e["effective_resistance"] == pytest.approx(5 / 6)
    assert sum(e["dadao_rate"] for e in edges) == pytest.approx(report["lambda_mix"])
