"""A lean SGD for node processes.

The first call into any ``torch.optim.Optimizer`` method makes torch import ``torch._dynamo``
(with sympy, ``torch.distributed`` and ``torch.onnx``: about 820 modules), which costs a
node process about 73 MiB of resident memory for nothing it uses (docs/performance.md,
section 3). :class:`SGD` applies exactly ``torch.optim.SGD``'s update rule (momentum,
dampening, weight decay, Nesterov) with the same public surface the runtime and the rules
use — ``param_groups``, ``state[p]["momentum_buffer"]``, ``step``, ``zero_grad``,
``state_dict``/``load_state_dict`` — without that import. Any ``torch.optim`` optimizer
still works where one is passed in explicitly.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


class SGD:
    """Stochastic gradient descent, update for update the same as ``torch.optim.SGD``.

    Parameters
    ----------
    params:
        The tensors to optimise.
    lr:
        Learning rate eta.
    momentum:
        Heavy-ball momentum mu (0 disables the buffer).
    dampening:
        Dampening of the momentum term.
    weight_decay:
        L2 coefficient lambda: the gradient gets ``lambda * p`` added.
    nesterov:
        Nesterov momentum.

    Example
    -------
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = SGD([w], lr=0.5)
    >>> w.grad = torch.ones(2)
    >>> opt.step()
    >>> w.data.tolist()
    [0.5, 0.5]
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum needs momentum > 0 and no dampening")
        self.param_groups: list[dict[str, Any]] = [
            {
                "params": list(params),
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
            }
        ]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_()
                    p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            damp, wd = group["dampening"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if wd != 0:
                    d_p = d_p.add(p, alpha=wd)
                if mu != 0:
                    state = self.state.setdefault(p, {})
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.clone(d_p).detach()
                    else:
                        buf.mul_(mu).add_(d_p, alpha=1 - damp)
                    d_p = d_p.add(buf, alpha=mu) if group["nesterov"] else buf
                p.add_(d_p, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        index = {p: i for i, p in enumerate(self.param_groups[0]["params"])}
        return {
            "state": {index[p]: dict(s) for p, s in self.state.items() if p in index},
            "param_groups": [
                {k: v for k, v in g.items() if k != "params"} for g in self.param_groups
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = self.param_groups[0]["params"]
        self.param_groups[0].update(state["param_groups"][0])
        self.state = {params[int(i)]: dict(s) for i, s in state["state"].items()}
