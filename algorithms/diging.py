"""DIGing: synchronous decentralized gradient tracking.

Nedić, Olshevsky & Shi, "Achieving Geometric Convergence for Distributed Optimization over
Time-Varying Graphs", SIAM J. Optim. 27(4), 2017. Every node keeps its iterate x_i and a
tracker y_i of the network's average gradient; one iteration (a round) is

    x_i <- sum_j w_ij x_j - alpha y_i
    y_i <- sum_j w_ij y_j + grad f_i(x_i new) - grad f_i(x_i old)

from ``x_i = model parameters``, ``y_i = grad f_i(x_i)``, with Metropolis-Hastings weights
``w_ij = 1 / (1 + max(d_i, d_j))`` (Xiao & Boyd, 2004). Because ``W`` is doubly stochastic,
``sum_i y_i = sum_i grad f_i(x_i)`` at every round, so with a constant step the nodes reach
the exact minimiser of ``sum_i f_i`` at a linear rate for strongly convex f_i (no decaying
step as plain decentralized gradient descent needs). It is DADAO's synchronous baseline.

Runtime choices: each round a node sends ``(x_i, y_i)`` in one bundle, tagged with the
round, to every live neighbour and waits up to ``round_timeout`` seconds for theirs
(:class:`~rumor.algorithms.inbox.RoundInbox`: later rounds wait, earlier ones are dropped).
A neighbour missing at the timeout gives its weight to the node itself for both x and y;
that round's W is then not doubly stochastic and ``sum_i y_i`` stops tracking the gradient
sum exactly (logged). x and y are kept in float64; x is written into the model before each
gradient and at the end of each round. The optimizer's weight decay is added to the
gradient (the ridge term SGD would add).

Example::

    rumor simulate --nodes 10 --topology ring --algorithm diging --dataset lsq:2000:10:30 \\
        --model linear:nobias --rounds 2000 --param alpha=0.2
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.inbox import RoundInbox
from rumor.algorithms.rounds import exchange, metropolis_row
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, Rejected

__all__ = ["STATE_KIND", "DIGing"]

STATE_KIND = "diging.state"


class DIGing(MixingRule):
    """Distributed inexact gradient tracking (DIGing) with Metropolis-Hastings weights.

    Parameters
    ----------
    alpha:
        The constant step size alpha. Default: the node's learning rate (``--lr``). The
        paper's bound is conservative; in practice tune it (``rumor bench claims dadao``
        grid-searches it).
    batch:
        ``"full"`` (default: exact local gradients, the paper's setting) or ``"minibatch"``.
    round_timeout:
        Seconds to wait for the neighbours' (x, y) of a round. Default 10.

    Example
    -------
    >>> rule = DIGing(alpha=0.1)
    >>> rule.describe()["alpha"]
    0.1
    """

    name = "diging"
    checkpointable = True

    def __init__(
        self, alpha: float | None = None, batch: str = "full", round_timeout: float = 10.0
    ) -> None:
        if alpha is not None and not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"alpha must be positive and finite, got {alpha}")
        if batch not in ("full", "minibatch"):
            raise ValueError(f"batch must be 'full' or 'minibatch', got {batch!r}")
        if round_timeout <= 0:
            raise ValueError("round_timeout must be > 0")
        self.alpha = None if alpha is None else float(alpha)
        self.batch = batch
        self.round_timeout = float(round_timeout)
        self._inbox = RoundInbox()
        self._finish = False
        #: This node's iterate, tracker and last local gradient (float64), once started.
        self.x: torch.Tensor | None = None
        self.y: torch.Tensor | None = None
        self._g: torch.Tensor | None = None
        #: Rounds completed, and rounds in which some neighbour's state was missing.
        self.rounds = 0
        self.incomplete_rounds = 0
        #: Called with the round number after every round's update (a monitoring hook).
        self.on_round: Callable[[int], None] | None = None
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """x, the tracker y and the last local gradient: y's invariant (its mean is the
        mean gradient) needs all three, so none can be recomputed after a restart."""
        if self.x is None or self.y is None or self._g is None:
            raise RuntimeError("the rule has not started")
        return {"version": 1, "x": self.x.clone(), "y": self.y.clone(), "g": self._g.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output before :meth:`run` starts."""
        if state.get("version") != 1:
            raise ValueError(f"unknown diging state version {state.get('version')!r}")
        self._restored = {k: state[k] for k in ("x", "y", "g")}

    def finish(self) -> None:
        """End the run after the current round, as if the round budget were spent."""
        self._finish = True

    async def run(self, ctx: Context) -> None:
        trainer = ctx.trainer
        alpha = self.alpha if self.alpha is not None else float(trainer.lr)
        restored, self._restored = self._restored, None
        if restored is not None:  # resume: the iterate, tracker and gradient as saved
            self.x, self.y, self._g = (restored[k].to(torch.float64) for k in ("x", "y", "g"))
            if self.x.shape != trainer.parameters_vector().shape:
                raise ValueError("saved diging state does not match the model's size")
        else:
            self.x = trainer.parameters_vector().to(torch.float64)
            self._g = await self._gradient_at(ctx, self.x)
            self.y = self._g.clone()
        round = ctx.round  # nonzero after a resume from a checkpoint
        while not (self._finish or ctx.should_stop(round)):
            bundle = Bundle({"x": self.x, "y": self.y}, {"degree": ctx.degree})
            outgoing = ctx.message(STATE_KIND, round=round, bundle=bundle)
            received = await exchange(ctx, self._inbox, round, outgoing, self.round_timeout)
            missing = [p for p in ctx.all_neighbors() if p not in received]
            if missing:
                self.incomplete_rounds += 1
                ctx.log(
                    "round %d: no state from %s; their weight goes to self",
                    round,
                    ", ".join(missing),
                    level=logging.DEBUG,
                )
            x_mix, y_mix = self._mix(ctx, received)
            x_new = x_mix - alpha * self.y
            g_new = await self._gradient_at(ctx, x_new)
            self.y = y_mix + g_new - self._g
            self.x, self._g = x_new, g_new
            if self.on_round is not None:
                self.on_round(round)
            ev = await ctx.maybe_evaluate(round)
            ctx.end_round(round, eval=ev, received=len(received))
            self.rounds = round = round + 1

    def _mix(self, ctx: Context, received: dict[str, Message]) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.x is not None and self.y is not None
        self_w, weights = metropolis_row(ctx, received)
        x, y = self_w * self.x, self_w * self.y
        for p, m in received.items():
            t = m.bundle.tensors  # type: ignore[union-attr]
            x = x + weights[p] * t["x"]
            y = y + weights[p] * t["y"]
        return x, y

    async def _gradient_at(self, ctx: Context, x: torch.Tensor) -> torch.Tensor:
        """Write x into the model (what evaluation and pulls see), then grad f_i there."""
        async with ctx.lock:
            ctx.trainer.load_vector(x.to(ctx.trainer.parameters_vector().dtype))
        return await ctx.compute(self._gradient, ctx.trainer, x)

    def _gradient(self, trainer: Any, x: torch.Tensor) -> torch.Tensor:
        """grad f_i at the model's parameters (flat float64), with the optimizer's weight
        decay added."""
        grads = trainer.gradient("full" if self.batch == "full" else None)
        names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        g = torch.cat([grads[n].reshape(-1) for n in names]).to(torch.float64)
        wd = float(trainer.optimizer.param_groups[0].get("weight_decay", 0.0) or 0.0)
        return g + wd * x if wd else g

    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        if msg.kind != STATE_KIND:
            raise Rejected(Code.INVALID_ARGUMENT, f"diging does not handle {msg.kind!r}")
        bundle = msg.bundle
        if bundle is None or set(bundle.tensors) != {"x", "y"}:
            raise Rejected(Code.INVALID_ARGUMENT, "diging.state needs tensors 'x' and 'y'")
        dim = sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)
        for name, t in bundle.tensors.items():
            if t.dtype != torch.float64 or t.shape != (dim,):
                raise Rejected(
                    Code.FAILED_PRECONDITION, f"diging.state: {name!r} must be float64 of ({dim},)"
                )
            if not bool(torch.isfinite(t).all()):
                raise Rejected(Code.INVALID_ARGUMENT, f"diging.state: {name!r} is not finite")
        degree = bundle.meta.get("degree")
        if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
            raise Rejected(Code.INVALID_ARGUMENT, f"diging.state: bad degree {degree!r}")
        self._inbox.put(msg)
        return None

    def describe(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "batch": self.batch, "round_timeout": self.round_timeout}
