"""The same nodes in one process on a virtual clock: deterministic and converging."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from rumor.api import make_trainer
from rumor.cluster import build_graph, cluster_configs, node_name
from rumor.config import NodeConfig
from rumor.node.observe import consensus_distance
from rumor.node.simulation import simulate


def _configs(n: int, algorithm: str, rounds: int, **params: object) -> list[NodeConfig]:
    base = NodeConfig(
        algorithm=algorithm,
        params=dict(params),
        rounds=rounds,
        dataset="digits",
        partition="dirichlet:0.5",
        model="logreg",
        lr=0.2,
        seed=1,
        init="independent",
        eval_every=0,
    )
    return cluster_configs(build_graph("ring", n, 1), base, address_of=node_name)


def _initial_consensus(configs: list[NodeConfig]) -> float:
    return consensus_distance([make_trainer(c).model.state_dict() for c in configs])


def test_simulated_dpsgd_converges_and_contracts() -> None:
    configs = _configs(8, "dpsgd", 100, local_steps=2)
    result = simulate(configs)
    assert result.mean_accuracy > 0.88
    assert result.consensus_distance < _initial_consensus(configs) / 10
    last_rounds = {
        [r for r in m if r["event"] == "round"][-1]["round"] for m in result.metrics.values()
    }
    assert last_rounds == {99}


def test_simulated_async_gossip_converges_and_contracts() -> None:
    configs = _configs(8, "async-gossip", 100, rate=200.0, local_steps=2)
    result = simulate(configs)
    assert result.mean_accuracy > 0.85
    assert result.consensus_distance < _initial_consensus(configs) / 10


def test_simulation_is_reproducible_with_one_seed() -> None:
    a = simulate(_configs(12, "dpsgd", 10))
    b = simulate(_configs(12, "dpsgd", 10))
    assert a.digests == b.digests
    strip = [{k: v for k, v in r.items() if k != "t"} for m in a.metrics.values() for r in m]
    strip_b = [{k: v for k, v in r.items() if k != "t"} for m in b.metrics.values() for r in m]
    assert strip == strip_b


def test_simulate_cli_100_nodes_twice_gives_identical_results() -> None:
    from rumor.cli import app

    runner = CliRunner()
    args = ["simulate", "--nodes", "100", "--rounds", "8", "--seed", "7", "--format", "json"]
    first = runner.invoke(app, args)
    second = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    one, two = json.loads(first.output), json.loads(second.output)
    assert one["cluster_digest"] == two["cluster_digest"]
    assert one["mean_accuracy"] == two["mean_accuracy"]
    assert one["consensus_distance"] == two["consensus_distance"]
    assert one["nodes"] == 100
