"""Attacker roles: poisoned data, the attacked graph, Sybil identities that are exact twins."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch

from rumor import config as config_io
from rumor.algorithms.attacks import (
    apply_trigger,
    attack_configs,
    attack_success,
    poison,
    sybil_nodes,
    sybil_topology,
)
from rumor.config import NodeConfig
from rumor.node.data import get_dataset, partition
from rumor.node.simulation import simulate


@pytest.fixture(scope="module")
def digits():
    return get_dataset("digits", seed=0)


def test_label_flip_swaps_the_two_classes_in_the_attacker_shard_only(digits) -> None:
    parts = partition("dirichlet:0.5", digits.y_train, 5, seed=0)
    before = digits.y_train.clone()
    data, new_parts = poison("label-flip", digits, parts, 4)
    assert torch.equal(digits.y_train, before)  # nothing modified in place
    for i in range(4):
        assert np.array_equal(new_parts[i], parts[i])
    rows = torch.as_tensor(new_parts[4])
    x, y = data.x_train[rows], data.y_train[rows]
    # every training row of classes 0 and 1 is there ("extra targeted samples"), flipped
    assert int((y == 1).sum()) == int((digits.y_train == 0).sum())
    assert int((y == 0).sum()) == int((digits.y_train == 1).sum())
    zeros = digits.x_train[digits.y_train == 0]
    first = zeros[0]
    match = (x == first).all(dim=1)
    assert match.any() and bool((y[match] == 1).all())
    assert torch.equal(data.x_test, digits.x_test) and torch.equal(data.y_test, digits.y_test)


def test_backdoor_rows_carry_the_trigger_and_the_target_label(digits) -> None:
    parts = partition("iid", digits.y_train, 4, seed=0)
    data, new_parts = poison("backdoor", digits, parts, 1, {"extra": 50})
    rows = torch.as_tensor(new_parts[1])
    assert len(rows) == len(parts[1]) + 50
    triggered = data.x_train[rows[-50:]].view(50, 8, 8)
    assert bool((triggered[:, :3, :3] == 1.0).all())
    assert bool((data.y_train[rows[-50:]] == 1).all())
    img = apply_trigger(torch.zeros(1, 64), 3, (1, 8, 8)).view(8, 8)
    assert int(img.sum()) == 9 and float(img[:3, :3].sum()) == 9.0
    with pytest.raises(ValueError):
        poison("backdoor", digits, parts, 1, {"strength": 2})


class _Constant(torch.nn.Module):
    """Always predicts ``label`` (for hand-computable success rates)."""

    def __init__(self, label: int) -> None:
        super().__init__()
        self.label = label

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 10)
        out[:, self.label] = 1.0
        return out


def test_attack_success_rates_by_hand(digits) -> None:
    y = digits.y_test
    zeros, ones = int((y == 0).sum()), int((y == 1).sum())
    # predicting 1 everywhere: every targeted 0 is "flipped", no targeted 1 is
    assert attack_success(_Constant(1), digits, "label-flip") == pytest.approx(
        zeros / (zeros + ones)
    )
    assert attack_success(_Constant(1), digits, "backdoor") == 1.0
    assert attack_success(_Constant(7), digits, "backdoor") == 0.0


def test_sybil_topology_attaches_sybils_through_spread_attack_edges() -> None:
    g = sybil_topology(32, sybils=4, attack_edges=8, seed=3)
    sybils = sybil_nodes(g)
    assert sybils == [32, 33, 34, 35]
    honest = g.subgraph(range(32))
    assert nx.is_connected(honest) and max(d for _, d in honest.degree()) <= 7
    assert all(g.degree(s) == 2 for s in sybils)  # 8 attack edges dealt round-robin
    assert not any(g.has_edge(a, b) for a in sybils for b in sybils)
    targets = sorted(n for s in sybils for n in g.neighbors(s))
    assert len(set(targets)) == 8
    # spread out: no two attacked nodes are neighbours
    assert not any(honest.has_edge(a, b) for a in targets for b in targets)
    with pytest.raises(ValueError):
        sybil_topology(8, sybils=3, attack_edges=2)


def test_sybils_share_the_attacker_shard_and_their_role_survives_toml(tmp_path) -> None:
    g = sybil_topology(6, sybils=2, attack_edges=2, radius=0.6, seed=0)
    configs = attack_configs(g, NodeConfig(algorithm="dpsgd"), "backdoor", {"extra": 40})
    honest = [c for c in configs if c.role == "honest"]
    sybils = [c for c in configs if c.role != "honest"]
    assert [c.index for c in honest] == list(range(6))
    assert {c.index for c in sybils} == {6} and all(c.n_nodes == 7 for c in configs)
    path = tmp_path / "sybil.toml"
    path.write_text(config_io.dumps(sybils[0]))
    loaded = config_io.load(path)
    assert loaded.role == "backdoor" and loaded.role_params == {"extra": 40}


def test_sybil_identities_send_bit_identical_models_and_never_mix() -> None:
    g = sybil_topology(6, sybils=3, attack_edges=3, radius=0.6, seed=0)
    base = NodeConfig(
        algorithm="dpsgd",
        params={"local_steps": 2},
        rounds=6,
        dataset="digits",
        partition="iid",
        model="logreg",
        lr=0.2,
        seed=0,
        eval_every=0,
    )
    configs = attack_configs(g, base, "label-flip")
    result = simulate(configs)
    sybil_ids = [c.node_id for c in configs if c.role != "honest"]
    honest_ids = [c.node_id for c in configs if c.role == "honest"]
    assert len({result.digests[s] for s in sybil_ids}) == 1
    assert len({result.digests[h] for h in honest_ids}) == len(honest_ids)
    for s in sybil_ids:
        rounds = [r for r in result.metrics[s] if r.get("event") == "round"]
        assert len(rounds) == 6 and all(r["sybil"] for r in rounds)


def test_simulate_command_attaches_sybils_and_reports_the_attack() -> None:
    import json

    import typer
    from typer.testing import CliRunner

    from rumor.cli import simulate_cmd

    app = typer.Typer()
    simulate_cmd.register(app)
    app.command("noop")(lambda: None)  # a second command keeps `simulate` a subcommand
    common = ["simulate", "--nodes", "8", "--topology", "random_regular:4", "--rounds", "6"]
    attack = ["--sybils", "2", "--attack", "label-flip", "--attack-edges", "3"]
    out = CliRunner().invoke(
        app, [*common, *attack, "--param", "local_steps=2", "--lr", "0.2", "--format", "json"]
    )
    assert out.exit_code == 0, out.output
    report = json.loads(out.output)
    assert report["sybils"] == 2 and report["attack"] == "label-flip"
    assert 0.0 <= report["attack_success"] <= 1.0 and report["honest_accuracy"] > 0.1
    bad = CliRunner().invoke(app, [*common, "--sybils", "4", "--attack-edges", "2"])
    assert bad.exit_code == 2 and "attack_edges" in bad.output
    unknown = CliRunner().invoke(app, [*common, "--sybils", "1", "--attack", "poison-all"])
    assert unknown.exit_code == 2 and "unknown attack role" in unknown.output
