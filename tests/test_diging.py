"""DIGing (gradient tracking): the runtime rule follows the synchronous iteration exactly,
converges linearly to the minimiser of sum_i f_i, and keeps tracking the gradient sum."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from rumor.algorithms.diging import DIGing
from rumor.claims.dadao import Setup, make_problem, reference_diging
from rumor.node.simulation import simulate
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Rejected
from tests.conftest import run


def trajectory(problem: Any, alpha: float, rounds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per round: the stacked x_i and y_i of the runtime rules, in node order."""
    per_round: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    async def watch(network: Any, nodes: dict[str, Any]) -> None:
        for nid, node in nodes.items():
            rule = node.rule

            def hook(k: int, nid: str = nid, rule: DIGing = rule) -> None:
                per_round.setdefault(k, {})[nid] = (rule.x.numpy().copy(), rule.y.numpy().copy())

            rule.on_round = hook

    simulate(problem.configs("diging", {"alpha": alpha}, rounds), step_cost_s=0.0, scenario=watch)
    order = sorted(per_round[0], key=lambda s: int(s.split("-")[1]))
    return [
        (
            np.stack([per_round[k][n][0] for n in order]),
            np.stack([per_round[k][n][1] for n in order]),
        )
        for k in sorted(per_round)
    ]


@pytest.fixture(scope="module")
def problem() -> Any:
    return make_problem(Setup(nodes=6, rows=600, dim=5, cond=30.0), seed=1)


def test_diging_runtime_follows_the_synchronous_iteration(problem: Any) -> None:
    alpha = 0.2 / problem.L
    reference = reference_diging(problem, alpha, 40)
    runtime = trajectory(problem, alpha, 40)
    assert len(runtime) == 40
    for k, (xs, _) in enumerate(runtime):
        # float32 data and model on the runtime side, float64 in the reference
        assert problem.errors(xs) == pytest.approx(reference[k + 1], rel=1e-3, abs=1e-9)


def test_diging_tracks_the_sum_of_the_local_gradients(problem: Any) -> None:
    runtime = trajectory(problem, 0.2 / problem.L, 30)
    for xs, ys in runtime:
        grads = np.einsum("nij,nj->ni", problem.H, xs) - problem.b
        assert np.allclose(ys.sum(0), grads.sum(0), atol=1e-4)


def test_diging_converges_linearly_to_the_optimum(problem: Any) -> None:
    errors = [problem.errors(xs) for xs, _ in trajectory(problem, 0.2 / problem.L, 1100)]
    assert errors[-1] < 1e-6
    logs = np.log(errors[100:1000])
    slope, icept = np.polyfit(np.arange(len(logs)), logs, 1)
    resid = logs - (slope * np.arange(len(logs)) + icept)
    assert slope < 0 and 1 - resid.var() / logs.var() > 0.99


def test_diging_refuses_states_it_cannot_mix() -> None:
    class Ctx:
        model = torch.nn.Linear(3, 1, bias=False)

    rule = DIGing(alpha=0.1)
    good = {"x": torch.zeros(3, dtype=torch.float64), "y": torch.zeros(3, dtype=torch.float64)}
    for tensors, meta in (
        ({"x": good["x"]}, {"degree": 2}),
        ({**good, "x": torch.zeros(3)}, {"degree": 2}),
        (good, {"degree": 0}),
    ):
        msg = Message(kind="diging.state", sender="p", bundle=Bundle(tensors, meta))
        with pytest.raises(Rejected):
            run(rule.on_message(Ctx(), msg))  # type: ignore[arg-type]
    assert (
        run(
            rule.on_message(
                Ctx(), Message("diging.state", "p", 0, 0.0, "", Bundle(good, {"degree": 2}))
            )
        )
        is None
    )  # type: ignore[arg-type]
