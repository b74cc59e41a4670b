"""Variance-corrected averaging (arXiv:2404.04616): the correction keeps each weight tensor's
variance through averaging, the rule gossips in simulation and between real processes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from statistics import fmean
from typing import Any

import pytest
import torch
from torch import nn

from rumor.algorithms import registry
from rumor.algorithms.averaging import mixable, weighted_average_
from rumor.algorithms.variance_corrected import (
    MODEL_KIND,
    VarianceCorrected,
    corrected_names,
    layer_variances,
    mean_variances,
    variance_correct_,
    vc_average_,
)
from rumor.claims.variance_corrected import (
    Arm,
    Setup,
    rounds_to_target,
    simulate_curve,
    xavier_tanh_mlp,
)
from rumor.cluster import build_graph, cluster_configs, free_ports, node_name
from rumor.config import NodeConfig
from rumor.local_cluster import LocalCluster
from rumor.node.simulation import simulate
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Rejected
from tests.conftest import run

ROOT = Path(__file__).resolve().parents[1]
HIDDEN = (64, 64, 64, 64, 64)


def _xavier(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bound = math.sqrt(6.0 / (rows + cols))
    return torch.empty(rows, cols).uniform_(-bound, bound, generator=g)


def _pop_var(t: torch.Tensor) -> float:
    return float(torch.var(t.detach().double(), correction=0))


def _models(k: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``k`` independently initialised deep tanh MLPs (Xavier weights, zero biases)."""
    return [
        {
            n: t.clone()
            for n, t in xavier_tanh_mlp(64, HIDDEN, 10, seed=seed + i).state_dict().items()
        }
        for i in range(k)
    ]


def _copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


# --- the correction ---------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 8])
def test_averaging_k_independent_tensors_divides_the_variance_by_k_and_the_correction_restores_it(
    k: int,
) -> None:
    inputs = [{"w": _xavier(512, 512, seed=10 * k + i)} for i in range(k)]
    xavier = 2.0 / (512 + 512)
    target = fmean([_pop_var(m["w"]) for m in inputs])
    assert abs(target / xavier - 1) < 0.01  # the inputs really are Xavier tensors

    plain = _copy(inputs[0])
    weighted_average_(plain, 1.0 / k, [(1.0 / k, m) for m in inputs[1:]])
    assert abs(_pop_var(plain["w"]) * k / target - 1) < 0.05

    corrected = _copy(inputs[0])
    vc_average_(corrected, inputs[1:], self_weight=1.0 / k, target="all")
    assert abs(_pop_var(corrected["w"]) / target - 1) < 1e-4
    assert abs(_pop_var(corrected["w"]) / xavier - 1) < 0.01


@pytest.mark.parametrize("k", [2, 4, 8])
def test_every_layer_of_a_deep_mlp_keeps_its_variance_while_plain_averaging_loses_it(
    k: int,
) -> None:
    models = _models(k, seed=100 * k)
    weights = corrected_names(models[0])
    assert weights == [f"{i}.weight" for i in (0, 2, 4, 6, 8, 10)]
    plain, corrected = _copy(models[0]), _copy(models[0])
    weighted_average_(plain, 1.0 / k, [(1.0 / k, m) for m in models[1:]])
    vc_average_(corrected, models[1:], self_weight=1.0 / k, target="all")
    for name in weights:
        inputs = fmean([_pop_var(m[name]) for m in models])
        assert abs(_pop_var(plain[name]) * k / inputs - 1) < 0.10, name
        assert abs(_pop_var(corrected[name]) / inputs - 1) < 1e-4, name


def test_the_target_is_the_mean_variance_of_the_received_models_by_default() -> None:
    own = {"w": _xavier(128, 128, seed=1) * 3.0}  # a node whose weights grew in training
    received = [{"w": _xavier(128, 128, seed=2)}, {"w": _xavier(128, 128, seed=3) * 2.0}]
    others = fmean([_pop_var(m["w"]) for m in received])
    state = _copy(own)
    vc_average_(state, received)
    assert abs(_pop_var(state["w"]) / others - 1) < 1e-4
    state = _copy(own)
    vc_average_(state, received, target="self")
    assert abs(_pop_var(state["w"]) / _pop_var(own["w"]) - 1) < 1e-4


def test_the_correction_leaves_the_mean_of_every_tensor_unchanged() -> None:
    g = torch.Generator().manual_seed(5)
    averaged = {"w": torch.randn(64, 32, generator=g) * 0.1 + 0.7}
    before = float(averaged["w"].double().mean())
    scales = variance_correct_(averaged, {"w": 0.04})
    assert scales["w"] == pytest.approx(2.0, rel=0.05)  # it did rescale
    assert float(averaged["w"].double().mean()) == pytest.approx(before, abs=1e-6)
    assert _pop_var(averaged["w"]) == pytest.approx(0.04, rel=1e-4)


def test_identical_inputs_make_the_correction_the_identity() -> None:
    model = _models(1)[0]
    exact = _copy(model)
    scales = variance_correct_(exact, [model, model], include_biases=True)
    for name in model:
        assert torch.equal(exact[name], model[name]), name
    assert set(scales.values()) == {1.0}
    # three copies: weights 1/3 are not exact in binary, the result is still the input
    merged = _copy(model)
    vc_average_(merged, [model, model], self_weight=1.0 / 3)
    for name in model:
        torch.testing.assert_close(merged[name], model[name], rtol=1e-6, atol=1e-7)


def test_partial_ratio_moves_part_of_the_way() -> None:
    inputs = [{"w": _xavier(256, 256, seed=20 + i)} for i in range(4)]
    full_scale = None
    for ratio in (0.0, 0.5, 1.0):
        state = _copy(inputs[0])
        scales = vc_average_(state, inputs[1:], self_weight=0.25, ratio=ratio, target="all")
        if ratio == 0:
            assert scales == {}  # plain averaging
            plain = _pop_var(state["w"])
        elif ratio == 1:
            full_scale = scales["w"]
        else:
            half = scales["w"]
    assert full_scale is not None and full_scale == pytest.approx(2.0, rel=0.03)
    assert half == pytest.approx(1 + 0.5 * (full_scale - 1), rel=1e-9)
    assert plain == pytest.approx(fmean([_pop_var(m["w"]) for m in inputs]) / 4, rel=0.05)


def test_biases_are_rescaled_only_with_include_biases() -> None:
    g = torch.Generator().manual_seed(7)
    models = [
        {"fc.weight": torch.randn(32, 32, generator=g), "fc.bias": torch.randn(32, generator=g)}
        for _ in range(4)
    ]
    plain = _copy(models[0])
    weighted_average_(plain, 0.5, [(0.5 / 3, m) for m in models[1:]])
    excluded = _copy(models[0])
    vc_average_(excluded, models[1:])
    assert torch.equal(excluded["fc.bias"], plain["fc.bias"])
    assert not torch.equal(excluded["fc.weight"], plain["fc.weight"])
    included = _copy(models[0])
    vc_average_(included, models[1:], include_biases=True)
    received = fmean([_pop_var(m["fc.bias"]) for m in models[1:]])
    assert _pop_var(included["fc.bias"]) == pytest.approx(received, rel=1e-4)


def test_batchnorm_statistics_integer_buffers_and_single_entries_are_never_rescaled() -> None:
    def model(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 1))
        net.train()
        net(torch.randn(32, 8))  # moves the running statistics away from 0 and 1
        state = {k: v.clone() for k, v in net.state_dict().items()}
        state["scale"] = torch.tensor([3.0 + seed])  # a one-entry parameter
        return state

    with torch.random.fork_rng():
        models = [model(s) for s in range(3)]
    names = corrected_names(models[0], include_biases=True)
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight"]
    state = _copy(models[0])
    before = _copy(state)
    received = [mixable(m) for m in models[1:]]
    variance_correct_(state, received, include_biases=True)
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked", "scale", "2.bias"):
        assert torch.equal(state[name], before[name]), name
    assert state["1.num_batches_tracked"].dtype == torch.int64


def test_a_constant_tensor_gives_no_nan_and_stays_constant() -> None:
    averaged = {"w": torch.full((16, 16), 0.25), "fc.bias": torch.zeros(16)}
    scales = variance_correct_(averaged, {"w": 0.5, "fc.bias": 0.1}, include_biases=True)
    assert scales == {"w": 1.0, "fc.bias": 1.0}
    assert torch.equal(averaged["w"], torch.full((16, 16), 0.25))
    assert torch.equal(averaged["fc.bias"], torch.zeros(16))
    # zero-initialised biases of independent models: averaging and correcting stays finite
    models = _models(3)
    state = _copy(models[0])
    vc_average_(state, models[1:], include_biases=True)
    assert all(torch.isfinite(t).all() for t in state.values())


def test_half_precision_statistics_are_computed_in_float32() -> None:
    g = torch.Generator().manual_seed(3)
    received = [{"w": (torch.randn(64, 64, generator=g) * 300).half()} for _ in range(2)]
    # squared deviations overflow float16 (max 65504): a float16 variance is infinite
    assert not math.isfinite(float(((received[0]["w"] - received[0]["w"].mean()) ** 2).sum()))
    variances = layer_variances(received[0])
    assert variances["w"] == pytest.approx(_pop_var(received[0]["w"].float()), rel=1e-4)
    state = _copy(received[0])
    vc_average_(state, received[1:])
    assert state["w"].dtype == torch.float16
    assert torch.isfinite(state["w"]).all()
    target = _pop_var(received[1]["w"].float())
    assert _pop_var(state["w"].float()) == pytest.approx(target, rel=1e-2)


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(KeyError):
        variance_correct_({"w": torch.randn(4, 4)}, {"v": 1.0})
    with pytest.raises(ValueError):
        variance_correct_({"w": torch.randn(4, 4)}, {"w": 1.0}, ratio=1.5)
    with pytest.raises(TypeError):
        variance_correct_({"w": torch.randn(4, 4)}, {"w": torch.randn(4, 4)})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        mean_variances([{"w": 1.0}, {"v": 1.0}])
    with pytest.raises(ValueError):
        vc_average_({"w": torch.randn(4, 4)}, [])


# --- the rule ---------------------------------------------------------------------------------


def test_the_rule_is_registered_and_validates_its_parameters() -> None:
    rule = registry.create("variance-corrected", {"include_biases": True, "ratio": 0.5})
    assert isinstance(rule, VarianceCorrected)
    assert rule.describe()["include_biases"] is True
    assert rule.describe()["buffer_size"] == 2 and rule.describe()["self_weight"] == 0.5
    inner = registry.create("variance-corrected", {"mode": "dpsgd"})
    assert inner.describe()["mode"] == "dpsgd" and "round_timeout" in inner.describe()
    for bad in (
        {"mode": "ring"},
        {"target": "mean"},
        {"ratio": -0.1},
        {"buffer_size": 0},
        {"self_weight": 1.5},
        {"include_biases": "yes"},
        {"wait_timeout": -1},
        {"unknown": 1},
    ):
        with pytest.raises(ValueError):
            registry.create("variance-corrected", bad)


class _Ctx:
    """The slice of a node's context that ``on_message`` uses."""

    def __init__(self, neighbours: list[str]) -> None:
        self.model = xavier_tanh_mlp(64, (16,), 10, seed=0)
        self._neighbours = neighbours

    def all_neighbors(self) -> list[str]:
        return list(self._neighbours)

    def neighbors(self) -> list[str]:
        return list(self._neighbours)


def _msg(sender: str, seed: int, kind: str = MODEL_KIND, **change: Any) -> Message:
    tensors = {
        k: v.clone() for k, v in xavier_tanh_mlp(64, (16,), 10, seed=seed).state_dict().items()
    }
    tensors.update(change)
    return Message(kind=kind, sender=sender, bundle=Bundle(tensors), algorithm="variance-corrected")


def test_the_buffer_keeps_one_model_per_neighbour_and_refuses_what_it_cannot_use() -> None:
    rule = VarianceCorrected()
    ctx = _Ctx(["a", "b"])

    async def deliver() -> None:
        for seed in range(5):  # a fast neighbour sends five models before a merge
            await rule.on_message(ctx, _msg("a", seed))  # type: ignore[arg-type]
        await rule.on_message(ctx, _msg("b", 9))  # type: ignore[arg-type]
        with pytest.raises(Rejected, match="not a neighbour"):
            await rule.on_message(ctx, _msg("stranger", 1))  # type: ignore[arg-type]
        with pytest.raises(Rejected, match="not finite"):
            bad = torch.full((16, 64), float("nan"))
            await rule.on_message(ctx, _msg("b", 2, **{"0.weight": bad}))  # type: ignore[arg-type]
        with pytest.raises(Rejected, match="shape"):
            await rule.on_message(ctx, _msg("b", 2, **{"0.weight": torch.zeros(3, 3)}))  # type: ignore[arg-type]
        with pytest.raises(Rejected):
            await rule.on_message(ctx, _msg("b", 2, kind="gossip.model"))  # type: ignore[arg-type]

    run(deliver())
    assert sorted(rule._buffer) == ["a", "b"]
    latest = xavier_tanh_mlp(64, (16,), 10, seed=4).state_dict()["0.weight"]
    assert torch.equal(rule._buffer["a"][0]["0.weight"], latest)
    assert rule._buffer["a"][1] == layer_variances(rule._buffer["a"][0])  # recorded on arrival


def _configs(n: int, topology: str, rounds: int, **params: Any) -> list[NodeConfig]:
    base = NodeConfig(
        algorithm="variance-corrected",
        params=dict(params),
        rounds=rounds,
        dataset="digits",
        partition="iid",
        model="mlp:32",
        lr=0.3,
        seed=2,
        init="independent",
        eval_every=0,
    )
    return cluster_configs(build_graph(topology, n, 2), base, address_of=node_name)


def _rounds(result: Any, node: str) -> list[dict[str, Any]]:
    return [r for r in result.metrics[node] if r["event"] == "round"]


@pytest.mark.parametrize("mode", ["buffer", "dpsgd"])
def test_the_rule_learns_in_simulation_and_its_correction_fades_as_models_agree(mode: str) -> None:
    result = simulate(_configs(6, "regular:6:2", 60, mode=mode))
    assert result.mean_accuracy > 0.88
    assert result.consensus_distance < 0.1
    if mode == "buffer":
        for node in result.metrics:
            rounds = _rounds(result, node)
            assert len(rounds) == 60
            merges = [r for r in rounds if r["merged"]]
            assert len(merges) >= 50, node  # the buffer fills about every round
            assert merges[0]["vc_scale"] > 1.2  # independent models: variance restored
            assert abs(merges[-1]["vc_scale"] - 1) < 0.05  # correlated models: ~identity


def test_a_leaf_of_the_graph_merges_with_its_only_neighbour() -> None:
    result = simulate(_configs(3, "path", 20))
    for node in result.metrics:
        assert sum(bool(r["merged"]) for r in _rounds(result, node)) >= 15, node


def test_a_node_that_receives_nothing_keeps_training() -> None:
    configs = _configs(4, "ring", 40)
    isolated = configs[0].node_id

    async def cut_off(network: Any, nodes: dict[str, Any]) -> None:
        for peer in configs[0].peers:
            network.cut(isolated, peer)

    result = simulate(configs, scenario=cut_off)
    rounds = _rounds(result, isolated)
    assert len(rounds) == 40
    assert all(r["merged"] == 0 and r["sent"] == 0 for r in rounds)
    first, last = (fmean(r["loss"] for r in part) for part in (rounds[:5], rounds[-5:]))
    assert last < 0.6 * first
    summary = next(s for s in result.summaries if s["node"] == isolated)
    assert summary["accuracy"] > 0.5
    others = [n for n in result.metrics if n != isolated]
    assert all(any(r["merged"] for r in _rounds(result, n)) for n in others)


def test_three_real_node_processes_gossip_with_the_rule(tmp_path: Path) -> None:
    ports = free_ports(3)
    # momentum damps the one-sample batch that ends each pass over a 449-row shard
    base = _configs(3, "ring", 50)[0].replace(
        eval_every=50, heartbeat_period=0.25, lr=0.1, momentum=0.9
    )
    configs = cluster_configs(
        build_graph("ring", 3, 2), base, address_of=lambda i: f"127.0.0.1:{ports[i]}"
    )
    with LocalCluster(configs, tmp_path) as cluster:
        cluster.start()
        finished = cluster.wait(timeout=120)
        codes = cluster.stop()
    assert finished and codes == dict.fromkeys(codes, 0), codes
    for cfg in configs:
        lines = (tmp_path / f"{cfg.node_id}.metrics.jsonl").read_text().splitlines()
        rounds = [r for r in map(json.loads, lines) if r["event"] == "round"]
        assert len(rounds) == 50
        merges = [r for r in rounds if r["merged"]]
        assert len(merges) >= 35, cfg.node_id
        assert merges[0]["vc_scale"] > 1.2 and abs(merges[-1]["vc_scale"] - 1) < 0.05
        # real processes are not deterministic: a loose bound (chance is 0.1; about 0.9 is
        # typical with these settings)
        assert rounds[-1]["accuracy"] > 0.75


# --- the claim's pieces and the example -------------------------------------------------------


def test_the_claim_model_is_a_xavier_initialised_tanh_mlp() -> None:
    model = xavier_tanh_mlp(64, HIDDEN, 10, seed=3)
    assert sum(isinstance(m, nn.Tanh) for m in model) == 5
    for m in model:
        if isinstance(m, nn.Linear):
            xavier = 2.0 / (m.in_features + m.out_features)
            assert _pop_var(m.weight) == pytest.approx(xavier, rel=0.15)
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    state = torch.random.get_rng_state()
    xavier_tanh_mlp(64, HIDDEN, 10, seed=4)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched


def test_rounds_to_target_is_the_first_evaluated_round_at_or_above_it() -> None:
    curve = [(5, 0.4), (10, 0.79), (15, 0.8), (20, 0.7), (25, 0.9)]
    assert rounds_to_target(curve, 0.8) == 15
    assert rounds_to_target(curve, 0.95) is None


def test_the_claim_harness_separates_plain_and_corrected_averaging_on_a_small_graph() -> None:
    setup = Setup(nodes=8, rounds=60, eval_every=10)
    plain = simulate_curve(Arm("plain", "independent", {"ratio": 0.0}), 0, setup)
    corrected = simulate_curve(Arm("vc", "independent", {"ratio": 1.0}), 0, setup)
    assert [r for r, _ in plain] == [10, 20, 30, 40, 50, 60]
    assert rounds_to_target(plain, 0.8) is None  # the plateau: stuck near chance
    assert max(acc for _, acc in plain) < 0.3
    found = rounds_to_target(corrected, 0.8)
    assert found is not None and found <= 60


def test_the_example_runs_and_prints_both_arms() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "variance_corrected_digits.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr
    assert "plain averaging" in out.stdout and "variance-corrected" in out.stdout
