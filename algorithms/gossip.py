"""Synchronous gossip averaging (D-PSGD) with Metropolis-Hastings weights.

Lian et al., "Can Decentralized Algorithms Outperform Centralized Algorithms? A Case Study
for Decentralized Parallel Stochastic Gradient Descent", NeurIPS 2017. Each round a node
takes ``local_steps`` (K) SGD steps, sends its model to every live neighbour, waits up to
``round_timeout`` seconds for theirs, and mixes

    x_i <- w_ii x_i + sum_j w_ij x_j,    w_ij = 1 / (1 + max(d_i, d_j))

(Xiao & Boyd, "Fast linear iterations for distributed averaging", 2004). A neighbour whose
model did not arrive in time gives its weight to the node itself, so the row still sums to
one and a dead or slow peer never stalls the round; this is logged. Rounds are loose: every
message carries its round, later rounds are kept for later, earlier ones dropped.

Example::

    rumor cluster up --nodes 8 --topology ring --algorithm dpsgd --param local_steps=2
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import torch

from rumor.algorithms.averaging import (
    check_compatible,
    gossip_step_,
    mixable,
    weighted_average_,
)
from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.inbox import RoundInbox
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, Rejected
from rumor.topology import metropolis_weights

MODEL_KIND = "gossip.model"


class DPSGD(MixingRule):
    """Decentralized parallel SGD: K local steps, then one Metropolis-Hastings gossip step.

    Parameters
    ----------
    local_steps:
        K, local SGD steps per round (1 in the paper).
    round_timeout:
        Seconds to wait for the neighbours' models of a round before mixing without them.
    """

    name = "dpsgd"

    def __init__(
        self, local_steps: int = 1, round_timeout: float = 10.0, catch_up_lag: int = 2
    ) -> None:
        if local_steps < 0:
            raise ValueError("local_steps must be >= 0")
        self.local_steps = int(local_steps)
        self.round_timeout = float(round_timeout)
        self.catch_up_lag = int(catch_up_lag)
        self._inbox = RoundInbox()
        self._scratch: dict[str, torch.Tensor] | None = None

    async def run(self, ctx: Context) -> None:
        state = mixable(ctx.model.state_dict())
        round = 0
        while not ctx.should_stop(round):
            round = await self._catch_up(ctx, state, round)
            if ctx.should_stop(round):
                break
            async with ctx.lock:
                loss = await ctx.compute(ctx.trainer.train_steps, self.local_steps)
            peers = ctx.neighbors()
            # Mixing waits for the sends, so the live tensors cannot change while they stream.
            outgoing = ctx.message(
                MODEL_KIND, round=round, bundle=Bundle(state, {"degree": ctx.degree})
            )
            sends = [asyncio.ensure_future(ctx.send(p, outgoing)) for p in peers]
            known = set(ctx.all_neighbors())
            # With every neighbour unreachable, wait for them rather than race on alone;
            # with every neighbour gone for good (finished), there is nobody to wait for.
            wait_for = peers or ctx.present_neighbors()
            arrived = await self._inbox.gather(round, wait_for, self.round_timeout)
            received = {p: m for p, m in arrived.items() if p in known}
            await asyncio.gather(*sends)
            distance = await self._mix(ctx, state, received, round)
            ev = await ctx.maybe_evaluate(round)
            ctx.end_round(
                round, loss=loss, eval=ev, neighbour_distance=distance, received=len(received)
            )
            round += 1

    async def _catch_up(self, ctx: Context, state: dict[str, torch.Tensor], round: int) -> int:
        """Jump ahead when every live neighbour is more than ``catch_up_lag`` rounds ahead.

        This is a node that restarted or fell far behind: its messages would be stale for
        everyone and it would wait out timeouts every round. It adopts the average of its
        neighbours' current models (its own is outdated) and their slowest round.
        """
        peers = ctx.neighbors()
        rounds = [ctx.peer_round(p) for p in peers]
        if not peers or any(r is None for r in rounds):
            return round
        target = min(r for r in rounds if r is not None)
        if target <= round + self.catch_up_lag:
            return round
        models = [m for m in await asyncio.gather(*(ctx.pull(p) for p in peers)) if m]
        if not models:
            return round
        async with ctx.lock:
            weighted_average_(state, 0.0, [(1.0 / len(models), m) for m in models])
        ctx.log(
            "caught up from round %d to %d with %d neighbours' models", round, target, len(models)
        )
        return target

    async def _mix(
        self, ctx: Context, state: dict[str, torch.Tensor], received: dict[str, Message], round: int
    ) -> float | None:
        degrees = {p: int(m.bundle.meta.get("degree", ctx.degree)) for p, m in received.items()}  # type: ignore[union-attr]
        # the self weight, 1 - sum(weights), is applied by gossip_step_
        _, weights = metropolis_weights(ctx.degree, degrees)
        missing = [p for p in ctx.all_neighbors() if p not in received]
        if missing:
            ctx.log(
                "round %d: no model from %s; their weight goes to self",
                round,
                ", ".join(missing),
                level=logging.DEBUG,
            )
        if not received:
            return None
        others = [(weights[p], m.bundle.tensors) for p, m in received.items()]  # type: ignore[union-attr]
        if self._scratch is None:
            self._scratch = {k: torch.empty_like(v) for k, v in state.items()}
        async with ctx.lock:
            return gossip_step_(state, others, self._scratch)

    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        if msg.kind != MODEL_KIND:
            raise Rejected(Code.INVALID_ARGUMENT, f"dpsgd does not handle {msg.kind!r}")
        if msg.bundle is None:
            raise Rejected(Code.INVALID_ARGUMENT, "gossip.model without a model")
        check_compatible(msg.bundle, mixable(ctx.model.state_dict()))
        degree = msg.bundle.meta.get("degree")
        if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
            raise Rejected(Code.INVALID_ARGUMENT, f"gossip.model: bad degree {degree!r}")
        self._inbox.put(msg)
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "local_steps": self.local_steps,
            "round_timeout": self.round_timeout,
            "catch_up_lag": self.catch_up_lag,
        }
