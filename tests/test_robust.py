"""Robust aggregation functions against hand-computed cases, and the robust rules end to end
(simulated, and as real processes over gRPC with a Sybil identity among them)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rumor.algorithms import registry, robust
from rumor.algorithms.attacks import attack_configs, attack_success, sybil_topology
from rumor.api import make_trainer
from rumor.cluster import build_graph, cluster_configs, free_ports, node_name
from rumor.config import NodeConfig
from rumor.local_cluster import LocalCluster
from rumor.node.data import get_dataset
from rumor.node.simulation import simulate
from rumor.protocol.codec import bundle_digest


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def test_median_is_coordinatewise_and_averages_the_middle_pair_for_even_counts() -> None:
    odd = [t(1, 5, -2), t(3, 2, 0), t(2, 9, 7)]
    assert torch.equal(robust.median(odd), t(2, 5, 0))
    even = [t(1, 10), t(4, 0), t(2, 3), t(100, 5)]
    assert torch.equal(robust.median(even), t(3, 4))


def test_trimmed_mean_drops_floor_beta_n_values_from_each_end() -> None:
    vs = [t(1, -50), t(2, 0), t(3, 1), t(100, 2), t(4, 3)]
    # beta = 0.2, n = 5: one value trimmed from each end of every coordinate
    assert torch.allclose(robust.trimmed_mean(vs, 0.2), t(3, 1))
    # beta = 0.1: floor(0.5) = 0, the plain mean
    assert torch.allclose(robust.trimmed_mean(vs, 0.1), t(22, -44 / 5))
    with pytest.raises(ValueError):
        robust.trimmed_mean(vs, 0.5)


def test_krum_selects_the_honest_cluster_when_f_outliers_are_present() -> None:
    honest = [t(0, 0), t(0.1, 0), t(0, 0.1), t(0.1, 0.1), t(0.05, 0.05)]
    outliers = [t(50, 50), t(51, 50)]
    vs = outliers + honest  # outliers first: the choice cannot come from position
    scores = robust.krum_scores(vs, f=2)
    # n = 7, f = 2: each score sums the 3 smallest squared distances to the others
    assert math.isclose(float(scores[6]), 3 * 0.005, rel_tol=1e-9)  # the centre (0.05, 0.05)
    assert torch.equal(robust.krum(vs, f=2), t(0.05, 0.05))
    chosen = robust.multi_krum(vs, f=2, m=5)
    assert torch.allclose(chosen, t(0.05, 0.05))  # the mean of the five honest vectors


def test_foolsgold_zeroes_identical_sybil_histories_and_keeps_distinct_ones() -> None:
    sybil = t(1, 1, 0, 0)
    honest = [t(1, 0, 0, 0), t(0, 0, 1, 0), t(0, 0, 0, 1)]
    w = robust.foolsgold_weights([sybil, sybil.clone(), sybil.clone(), *honest])
    assert w[:3].tolist() == [0.0, 0.0, 0.0]
    # (1, 0, 0, 0) resembles the Sybils (cosine 1/sqrt 2); pardoned by v_h / v_s = 1/sqrt 2 its
    # similarity is 1/2, so w = 1/2, and logit(1/2) + 1/2 = 1/2. The others are orthogonal.
    assert w[3:].tolist() == pytest.approx([0.5, 1.0, 1.0])
    # The aggregate ignores the Sybils: own trust 1, honest weights 1/2, 1, 1.
    own = t(0, 0, 0, 0)
    out, _ = robust.foolsgold(own, [sybil] * 3 + honest, [sybil] * 3 + honest)
    assert torch.allclose(out, t(0.5, 0, 1, 1) / 3.5)


def test_similarity_weights_match_a_hand_computed_pardoning_case() -> None:
    # cos(a, b) = 0.6, c orthogonal to both: v = (0.6, 0.6, 0) + eps, no pardoning between a
    # and b (equal v); w = (0.4, 0.4, 1) -> rescaled (0.4, 0.4, 1) -> logit(0.4) + 0.5 < 0.5
    a, b, c = t(1, 0, 0), t(0.6, 0.8, 0), t(0, 0, 1)
    w = robust.similarity_weights([a, b, c])
    expected = math.log(0.4 / 0.6) + 0.5
    assert w[0].item() == pytest.approx(expected, abs=1e-4)
    assert w[1].item() == pytest.approx(expected, abs=1e-4)
    assert w[2].item() == 1.0
    assert robust.similarity_weights([a]).tolist() == [1.0]
    assert robust.similarity_weights([t(0, 0, 0), a]).tolist() == [1.0, 1.0]  # zero: no twin


def test_every_robust_rule_is_registered_and_learns_in_simulation() -> None:
    base = NodeConfig(
        rounds=15,
        dataset="digits",
        partition="iid",
        model="logreg",
        lr=0.2,
        seed=1,
        eval_every=0,
        params={"local_steps": 2},
    )
    graph = build_graph("random_regular:4", 8, 1)
    for name in ("median", "trimmed-mean", "krum", "multi-krum", "foolsgold"):
        assert registry.get(name).name == name
        configs = cluster_configs(graph, base.replace(algorithm=name), node_name)
        result = simulate(configs)
        assert result.mean_accuracy > 0.6, (name, result.mean_accuracy)


def _metrics(path: Path) -> list[dict]:
    return [
        json.loads(line)
        for line in path.read_text().splitlines()
        if line.strip() and json.loads(line).get("event") == "round"
    ]


def test_trimmed_mean_cluster_with_a_label_flip_sybil_over_grpc(tmp_path: Path) -> None:
    rounds, steps = 12, 2
    graph = sybil_topology(3, sybils=1, attack_edges=1, radius=1.0, seed=0)
    ports = free_ports(4)
    base = NodeConfig(
        algorithm="trimmed-mean",
        params={"local_steps": steps, "round_timeout": 5.0, "beta": 0.25},
        rounds=rounds,
        dataset="digits",
        partition="dirichlet:0.5",
        model="logreg",
        lr=0.2,
        seed=2,
        eval_every=0,
        heartbeat_period=0.25,
        startup_wait=60.0,
    )
    configs = attack_configs(
        graph, base, "label-flip", address_of=lambda i: f"127.0.0.1:{ports[i]}"
    )
    sybil = next(c for c in configs if c.role != "honest")
    with LocalCluster(configs, tmp_path) as cluster:
        cluster.start()
        finished = cluster.wait(240.0)
        codes = cluster.stop()
    assert finished, f"nodes still running: {codes}"
    assert all(code == 0 for code in codes.values()), codes

    # The Sybil process trained on poisoned rows and never mixed: its model is exactly what
    # rounds * steps poisoned steps from the shared start give here.
    replica = make_trainer(sybil)
    replica.train_steps(rounds * steps)
    sybil_rounds = _metrics(cluster.metrics_path(sybil.node_id))
    assert len(sybil_rounds) == rounds and all(r.get("sybil") for r in sybil_rounds)
    assert sybil_rounds[-1]["digest"] == bundle_digest(replica.model.state_dict())
    data = get_dataset("digits", seed=2)
    assert attack_success(replica.model, data, "label-flip") > 0.5

    # Every honest node ran every round, and the attacked one accepted the Sybil's models.
    attacked = next(iter(sybil.peers))
    for cfg in configs:
        if cfg.role == "honest":
            lines = _metrics(cluster.metrics_path(cfg.node_id))
            assert len(lines) == rounds
            assert lines[-1]["rejected"] == 0
            assert lines[-1]["accuracy"] > 0.5
    received = [r["received"] for r in _metrics(cluster.metrics_path(attacked))]
    assert max(received) == len(next(c for c in configs if c.node_id == attacked).peers)
