"""Prometheus metrics and Chrome traces of real node processes on 127.0.0.1.

Two nodes run a short D-PSGD budget with ``metrics_port`` and ``trace`` set, then linger; the
test scrapes ``/metrics`` over HTTP, parses it with prometheus_client's own parser and checks
it against the nodes' Status RPC and metrics logs. In-process tests check the names against
Prometheus's naming rules and against the list in docs/inspect.md.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from rumor.cluster import build_graph, cluster_configs, free_ports
from rumor.config import NodeConfig
from rumor.local_cluster import LocalCluster
from rumor.node.prometheus import PrometheusTelemetry
from rumor.runlog import read_jsonl

ROUNDS = 8
TIMEOUT_S = 120.0


def _scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name: ``{name: [(labels, value), ...]}``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    return out


def _one(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    ((_, value),) = samples[name]
    return value


def _by_peer(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in samples.get(name, []):
        out[labels["peer"]] = out.get(labels["peer"], 0.0) + value
    return out


def _statuses(addresses: list[str]) -> list[dict[str, Any]]:
    from rumor.cli.status_cmd import query

    return asyncio.run(query(addresses, 2.0))


def test_scraped_metrics_match_the_nodes_status_and_logs_and_traces_are_written(
    tmp_path: Path,
) -> None:
    ports = free_ports(4)
    base = NodeConfig(
        algorithm="dpsgd",
        params={"local_steps": 1, "round_timeout": 5.0},
        rounds=ROUNDS,
        seed=2,
        init="independent",
        eval_every=2,
        linger=300.0,
        heartbeat_period=0.25,
    )
    configs = cluster_configs(
        build_graph("complete", 2, 0), base, lambda i: f"127.0.0.1:{ports[i]}"
    )
    configs = [
        c.replace(metrics_port=ports[2 + i], trace=str(tmp_path / f"{c.node_id}.trace.json"))
        for i, c in enumerate(configs)
    ]
    cluster = LocalCluster(configs, tmp_path)
    with cluster:
        cluster.start()
        addresses = list(cluster.addresses().values())
        end = time.monotonic() + TIMEOUT_S
        while time.monotonic() < end:
            rows = _statuses(addresses)
            if all("error" not in r and r["finished"] for r in rows):
                break
            assert cluster.running(), f"nodes exited early: {cluster.returncodes()}"
            time.sleep(0.5)
        else:
            raise AssertionError(f"cluster did not finish in {TIMEOUT_S} s")

        for i, cfg in enumerate(configs):
            first = _scrape(ports[2 + i])
            (status,) = _statuses([cfg.advertise or cfg.listen])
            time.sleep(0.3)
            again = _scrape(ports[2 + i])
            records = read_jsonl(tmp_path / f"{cfg.node_id}.metrics.jsonl")
            last = [r for r in records if r["event"] == "round"][-1]
            start = next(r for r in records if r["event"] == "start")
            assert start["prometheus"] == f"127.0.0.1:{ports[2 + i]}"
            peer = next(iter(cfg.peers))

            assert _one(first, "rumor_round") == status["round"] == ROUNDS
            assert _one(first, "rumor_loss") == status["loss"] == last["loss"]
            assert _one(first, "rumor_accuracy_ratio") == status["accuracy"]
            assert _one(first, "rumor_finished") == 1.0
            assert _one(first, "rumor_received_bytes_total") == status["bytes_in"]
            assert _one(first, "rumor_sent_bytes_total") == status["bytes_out"]
            assert _one(first, "rumor_exchanges_total") == status["exchanges"] == last["exchanges"]
            # Per neighbour: every request of the run went to the one neighbour and was answered.
            assert _by_peer(first, "rumor_requests_total") == {peer: float(ROUNDS)}
            assert _by_peer(first, "rumor_request_seconds_count") == {peer: float(ROUNDS)}
            rtt = _by_peer(first, "rumor_request_seconds_sum")[peer]
            assert 0 < rtt / ROUNDS < 5.0
            assert _by_peer(first, "rumor_request_failures_total") == {}
            # Only the two nodes talked: per-neighbour bytes add up to the node's totals.
            assert (
                sum(_by_peer(first, "rumor_peer_sent_bytes_total").values()) == status["bytes_out"]
            )
            assert (
                sum(_by_peer(first, "rumor_peer_received_bytes_total").values())
                == status["bytes_in"]
            )
            assert _by_peer(first, "rumor_peer_sent_bytes_total")[peer] > 0
            # The last round's wall time stays put while the finished node lingers, and agrees
            # with the staleness Status reports.
            last_round = _one(first, "rumor_last_round_timestamp_seconds")
            assert last_round == _one(again, "rumor_last_round_timestamp_seconds")
            assert abs((time.time() - last_round) - status["since_round_s"]) < 5.0
            assert set(_by_peer(first, "rumor_peer_alive")) == {peer}
            assert not math.isnan(_by_peer(first, "rumor_peer_last_seen_seconds")[peer])
        cluster.stop()

    for cfg in configs:
        trace = json.loads((tmp_path / f"{cfg.node_id}.trace.json").read_text())
        spans = [e for e in trace if e.get("ph") == "X"]
        names = {e["name"] for e in spans}
        assert {"compute", "mix", "send gossip.model", "receive gossip.model"} <= names
        # one training step per round, plus the evaluations
        assert sum(1 for e in spans if e["name"] == "compute") >= ROUNDS
        assert all(e["dur"] >= 0 and e["ts"] > 1e15 for e in spans)
        rounds = [e for e in trace if e.get("name") == "round"]
        assert [e["args"]["round"] for e in rounds] == list(range(ROUNDS))
        tracks = {e["args"]["name"] for e in trace if e.get("name") == "thread_name"}
        assert f"send to {next(iter(cfg.peers))}" in tracks


def test_two_nodes_in_one_process_export_side_by_side() -> None:
    a = PrometheusTelemetry("node-a")
    b = PrometheusTelemetry("node-a")  # same names, separate registries: no clash
    a.on_request("node-b", "gossip.model", 100, 50, 0.0, 0.01, None)
    a.on_request("node-b", "gossip.model", 100, 0, 0.0, 0.5, "unavailable")
    assert (
        a.registry.get_sample_value(
            "rumor_requests_total", {"peer": "other", "kind": "gossip.model"}
        )
        == 1.0
    )
    assert (
        a.registry.get_sample_value(
            "rumor_request_failures_total",
            {"peer": "other", "kind": "gossip.model", "reason": "unavailable"},
        )
        == 1.0
    )
    assert a.registry.get_sample_value("rumor_peer_sent_bytes_total", {"peer": "other"}) == 100.0
    assert (
        b.registry.get_sample_value(
            "rumor_requests_total", {"peer": "other", "kind": "gossip.model"}
        )
        is None
    )


def _fake_node(telemetry: PrometheusTelemetry) -> SimpleNamespace:
    """What the collector reads of a node, with one neighbour and a round behind it."""
    peer = SimpleNamespace(node_id="node-b", alive=True, last_seen=1.0)
    return SimpleNamespace(
        ctx=SimpleNamespace(round=3, last_loss=0.5, last_eval={"accuracy": 0.75}, exchanges=6),
        finished=False,
        transport=SimpleNamespace(stats=SimpleNamespace(bytes_in=10, bytes_out=20, rejected_in=1)),
        membership=SimpleNamespace(peers={"node-b": peer}),
        clock=SimpleNamespace(now=lambda: 4.0),
    )


def _families(telemetry: PrometheusTelemetry) -> dict[str, str]:
    """Every exported family's name (as exposed: counters with ``_total``) and type."""
    out = {}
    for family in telemetry.registry.collect():
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family.type
    return out


def test_names_follow_the_prometheus_rules_and_docs_list_every_series() -> None:
    telemetry = PrometheusTelemetry("node-a")
    telemetry._node = _fake_node(telemetry)
    telemetry.on_request("node-b", "gossip.model", 100, 50, 0.0, 0.01, None)
    telemetry.on_request("node-b", "gossip.model", 100, 0, 0.0, 0.5, "unavailable")
    telemetry.on_incoming("node-b", "gossip.model", 40, 0, 0.0, 0.001)
    before = time.time()
    telemetry.on_round(3, 0.5, 0.75)
    families = _families(telemetry)

    for name, kind in families.items():
        assert re.fullmatch(r"rumor_[a-z_]+", name), name
        assert name.endswith("_total") == (kind == "counter"), name
        assert "bytes" not in name or name.endswith(("_bytes", "_bytes_total")), name
        assert "seconds" not in name or name.endswith(("_seconds", "_seconds_total")), name
    assert "rumor_scrape_timestamp_seconds" not in families  # Prometheus records it itself

    get = telemetry.registry.get_sample_value
    assert get("rumor_accuracy_ratio") == 0.75
    assert get("rumor_received_bytes_total") == 10.0
    assert get("rumor_sent_bytes_total") == 20.0
    assert get("rumor_rejected_total") == 1.0
    assert get("rumor_peer_received_bytes_total", {"peer": "node-b"}) == 90.0
    assert before <= get("rumor_last_round_timestamp_seconds") <= time.time()
    assert get("rumor_peer_last_seen_seconds", {"peer": "node-b"}) == 3.0

    docs = Path(__file__).resolve().parents[1] / "docs" / "inspect.md"
    text = docs.read_text()
    table = text[text.index("## Prometheus metrics") :]
    table = table[: table.index("\n\n", table.index("| series"))]
    documented = set(re.findall(r"`(rumor_[a-z_]+)`", table))
    assert documented == set(families)


def test_last_round_timestamp_is_nan_before_the_first_round() -> None:
    telemetry = PrometheusTelemetry("node-a")
    telemetry._node = _fake_node(telemetry)
    assert math.isnan(telemetry.registry.get_sample_value("rumor_last_round_timestamp_seconds"))
