"""The node's SGD matches torch.optim.SGD update for update, without importing torch._dynamo."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from rumor.node.optim import SGD


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.1},
        {"lr": 0.05, "momentum": 0.9},
        {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3},
        {"lr": 0.05, "momentum": 0.9, "dampening": 0.1},
        {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4},
    ],
)
def test_sgd_matches_torch_sgd(kwargs: dict) -> None:
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    b = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    b.load_state_dict(a.state_dict())
    ours, theirs = SGD(a.parameters(), **kwargs), torch.optim.SGD(b.parameters(), **kwargs)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x, y = torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)
        for model, opt in ((a, ours), (b, theirs)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_state_dict_round_trip_keeps_momentum() -> None:
    w = torch.nn.Parameter(torch.ones(3))
    opt = SGD([w], lr=0.1, momentum=0.9)
    w.grad = torch.ones(3)
    opt.step()
    other = SGD([w], lr=0.5, momentum=0.0)
    other.load_state_dict(opt.state_dict())
    assert other.param_groups[0]["lr"] == 0.1 and other.param_groups[0]["momentum"] == 0.9
    torch.testing.assert_close(other.state[w]["momentum_buffer"], torch.ones(3))


def test_a_training_step_does_not_import_dynamo() -> None:
    code = (
        "import sys, torch\n"
        "from rumor.node.optim import SGD\n"
        "m = torch.nn.Linear(4, 2); o = SGD(m.parameters(), lr=0.1, momentum=0.9)\n"
        "m(torch.randn(3, 4)).sum().backward(); o.step(); o.zero_grad()\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
