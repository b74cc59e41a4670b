"""Averaging helpers: the in-place gossip step matches its formula and allocates nothing new;
a bundle mixes only when its tensors are exactly the model's."""

from __future__ import annotations

import math

import pytest
import torch

from rumor.algorithms.averaging import (
    MixScratch,
    check_compatible,
    gossip_step_,
    squared_distance,
    weighted_average_,
)
from rumor.protocol.bundle import Bundle
from rumor.protocol.errors import Code, Rejected
from rumor.topology import metropolis_weights


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g)}


def test_gossip_step_is_the_metropolis_hastings_average_and_reports_the_distance() -> None:
    x, y, z = _state(0), _state(1), _state(2)
    self_w, w = metropolis_weights(2, {"y": 3, "z": 2})
    expected = {k: self_w * x[k] + w["y"] * y[k] + w["z"] * z[k] for k in x}
    total = w["y"] + w["z"]
    avg = {k: (w["y"] * y[k] + w["z"] * z[k]) / total for k in x}
    expected_distance = math.sqrt(squared_distance(x, avg))
    scratch = MixScratch()
    pointers = {k: v.data_ptr() for k, v in x.items()}
    distance = gossip_step_(x, [(w["y"], y), (w["z"], z)], scratch)
    for k in x:
        torch.testing.assert_close(x[k], expected[k], rtol=1e-5, atol=1e-6)
        assert x[k].data_ptr() == pointers[k]  # in place
    assert math.isclose(distance, expected_distance, rel_tol=1e-5)


def test_weighted_average_in_place() -> None:
    x, y = _state(3), _state(4)
    expected = {k: 0.25 * x[k] + 0.75 * y[k] for k in x}
    weighted_average_(x, 0.25, [(0.75, y)])
    for k in x:
        torch.testing.assert_close(x[k], expected[k])


def test_gossip_preserves_the_network_average_on_a_ring() -> None:
    """A synchronous MH step on a regular graph keeps the mean and shrinks disagreement."""
    n = 6
    states = [_state(i) for i in range(n)]
    mean_before = {k: sum(s[k] for s in states) / n for k in states[0]}
    spread_before = sum(squared_distance(s, mean_before) for s in states)
    snapshot = [{k: v.clone() for k, v in s.items()} for s in states]
    for i, s in enumerate(states):
        scratch = MixScratch()
        left, right = snapshot[(i - 1) % n], snapshot[(i + 1) % n]
        _, w = metropolis_weights(2, {"l": 2, "r": 2})
        gossip_step_(s, [(w["l"], left), (w["r"], right)], scratch)
    mean_after = {k: sum(s[k] for s in states) / n for k in states[0]}
    for k in mean_before:
        torch.testing.assert_close(mean_after[k], mean_before[k], rtol=1e-5, atol=1e-5)
    assert sum(squared_distance(s, mean_after) for s in states) < spread_before


def test_gossip_step_matches_its_formula_for_any_number_of_neighbours_and_weights() -> None:
    """One to five neighbours, unequal weights in any order (the step reorders them)."""
    g = torch.Generator().manual_seed(7)
    for k in range(1, 6):
        x = _state(10 * k)
        others = [
            (float(torch.rand(1, generator=g)) * 0.3 + 0.01, _state(10 * k + j + 1))
            for j in range(k)
        ]
        total = sum(w for w, _ in others)
        self_w = 1.0 - total
        expected = {n: self_w * x[n] + sum(w * o[n] for w, o in others) for n in x}
        avg = {n: sum(w * o[n] for w, o in others) / total for n in x}
        expected_distance = math.sqrt(squared_distance(x, avg))
        untouched = [{n: t.clone() for n, t in o.items()} for _, o in others]
        scratch = MixScratch(block=256)  # the 40x30 tensor in blocks, the last one short
        distance = gossip_step_(x, others, scratch)
        for n in x:
            torch.testing.assert_close(x[n], expected[n], rtol=1e-5, atol=1e-5)
        for (_, o), before in zip(others, untouched, strict=True):
            for n in o:
                assert torch.equal(o[n], before[n])  # inputs are only read
        assert math.isclose(distance, expected_distance, rel_tol=1e-5)


def test_blocked_and_whole_tensor_steps_give_bitwise_the_same_model() -> None:
    """Large tensors go block by block, small ones whole: same bits, same distance."""
    g = torch.Generator().manual_seed(11)

    def state(seed: int) -> dict[str, torch.Tensor]:
        h = torch.Generator().manual_seed(seed)
        return {
            "w": torch.randn(70, 33, generator=h),
            "d": torch.randn(500, generator=h, dtype=torch.float64),
            "h": torch.randn(300, generator=h).to(torch.bfloat16),
            "t": torch.randn(33, 70, generator=h).t(),  # not contiguous: mixed whole
            "b": torch.randn(5, generator=h),
        }

    for k in (1, 2, 3):
        x = state(100 * k)
        others = [
            (float(torch.rand(1, generator=g)) * 0.3 + 0.01, state(100 * k + j + 1))
            for j in range(k)
        ]
        whole, blocks = {n: t.clone() for n, t in x.items()}, {n: t.clone() for n, t in x.items()}
        blocks["t"] = x["t"].clone().t().contiguous().t()  # keep it non-contiguous
        d_whole = gossip_step_(whole, others, MixScratch(block=10**9))
        scratch = MixScratch(block=128)
        d_blocks = gossip_step_(blocks, others, scratch)
        assert scratch.blocked(blocks["w"]) and not scratch.blocked(blocks["t"])
        for n in x:
            assert torch.equal(whole[n], blocks[n]), n
        assert math.isclose(d_whole, d_blocks, rel_tol=1e-3)  # bfloat16 norms: ~3 digits


def test_gossip_step_reuses_its_scratch_between_rounds() -> None:
    x, y = _state(5), _state(6)
    scratch = MixScratch(block=256)
    gossip_step_(x, [(0.5, y)], scratch)
    block = scratch.block_of(torch.float32)
    small = scratch.like("b", x["b"])
    gossip_step_(x, [(0.5, y)], scratch)
    assert scratch.block_of(torch.float32) is block and scratch.like("b", x["b"]) is small


def _refusal(tensors: dict[str, torch.Tensor]) -> Rejected:
    with pytest.raises(Rejected) as refused:
        check_compatible(Bundle(tensors), _state(0))
    return refused.value


def test_check_compatible_accepts_exactly_the_models_tensors() -> None:
    check_compatible(Bundle(_state(1)), _state(0))


def test_check_compatible_refuses_extra_tensors_naming_them() -> None:
    err = _refusal({**_state(1), "extra": torch.zeros(2)})
    assert err.code == Code.INVALID_ARGUMENT
    assert "'extra'" in err.detail
    many = _refusal({**_state(1), **{f"x{i}": torch.zeros(1) for i in range(9)}})
    assert many.code == Code.INVALID_ARGUMENT
    assert "9 tensors" in many.detail and "'x0'" in many.detail and "4 more" in many.detail
    assert "'x8'" not in many.detail  # a flood of names stays one short line


def test_check_compatible_refuses_missing_or_mismatched_tensors() -> None:
    state = _state(1)
    missing = _refusal({"w": state["w"]})
    assert missing.code == Code.FAILED_PRECONDITION and "lacks tensor 'b'" in missing.detail
    renamed = _refusal({"w": state["w"], "bias": state["b"]})
    assert renamed.code == Code.FAILED_PRECONDITION
    assert "'b'" in renamed.detail and "'bias'" in renamed.detail
    shape = _refusal({"w": state["w"][:2], "b": state["b"]})
    assert shape.code == Code.FAILED_PRECONDITION and "shape" in shape.detail
    dtype = _refusal({"w": state["w"].double(), "b": state["b"]})
    assert dtype.code == Code.FAILED_PRECONDITION and "dtype" in dtype.detail
