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

Under faults (:mod:`rumor.algorithms.rounds`): a round stops waiting for a neighbour the
moment membership marks it dead, and its send to that neighbour is cut then too, so a dead
or cut-off peer costs a round at most the failure-detection time (``heartbeat_period`` x
``heartbeat_misses``), never ``round_timeout`` per round. A node more than
``catch_up_lag`` rounds behind any neighbour (restarted, cut off) pulls the models of the
neighbours ahead, averages them with its own and jumps to their round
(:func:`~rumor.algorithms.rounds.catch_up`).

Example::

    rumor cluster up --nodes 8 --topology ring --algorithm dpsgd --param local_steps=2
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rumor.algorithms.averaging import mixable
from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.inbox import RoundInbox
from rumor.algorithms.rounds import ModelMixer, catch_up, check_model_message, exchange
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, Rejected

MODEL_KIND = "gossip.model"


class DPSGD(MixingRule):
    """Decentralized parallel SGD: K local steps, then one Metropolis-Hastings gossip step.

    Parameters
    ----------
    local_steps:
        K, local SGD steps per round (1 in the paper).
    round_timeout:
        Seconds to wait for the neighbours' models of a round before mixing without them.
    catch_up_lag:
        Rounds a node may fall behind a neighbour before it jumps to the neighbours' round
        (:func:`~rumor.algorithms.rounds.catch_up`).
    """

    name = "dpsgd"
    #: Between rounds its state is the model alone (the inbox only holds messages of rounds
    #: not yet started), so a checkpoint of model and round resumes it exactly.
    checkpointable = True

    def __init__(
        self, local_steps: int = 1, round_timeout: float = 10.0, catch_up_lag: int = 2
    ) -> None:
        if local_steps < 0:
            raise ValueError("local_steps must be >= 0")
        self.local_steps = int(local_steps)
        self.round_timeout = float(round_timeout)
        self.catch_up_lag = int(catch_up_lag)
        self._inbox = RoundInbox()
        self._mixer = ModelMixer()

    async def run(self, ctx: Context) -> None:
        state = mixable(ctx.model.state_dict())
        round = ctx.round  # nonzero after a resume from a checkpoint
        while not ctx.should_stop(round):
            # a node far behind a neighbour (restarted, cut off) jumps with the models ahead
            round = await catch_up(ctx, state, round, self.catch_up_lag)
            if ctx.should_stop(round):
                break
            async with ctx.lock:
                loss = await ctx.compute(ctx.trainer.train_steps, self.local_steps)
            # Mixing waits for the sends, so the live tensors cannot change while they stream.
            outgoing = ctx.message(
                MODEL_KIND, round=round, bundle=Bundle(state, {"degree": ctx.degree})
            )
            received = await exchange(ctx, self._inbox, round, outgoing, self.round_timeout)
            distance = await self._mix(ctx, state, received, round)
            ev = await ctx.maybe_evaluate(round)
            ctx.end_round(
                round, loss=loss, eval=ev, neighbour_distance=distance, received=len(received)
            )
            round += 1

    async def _mix(
        self, ctx: Context, state: dict[str, torch.Tensor], received: dict[str, Message], round: int
    ) -> float | None:
        """Mix the round's received models into ``state`` (a subclass may add to the merge)."""
        missing = [p for p in ctx.all_neighbors() if p not in received]
        if missing:
            ctx.log(
                "round %d: no model from %s; their weight goes to self",
                round,
                ", ".join(missing),
                level=logging.DEBUG,
            )
        return await self._mixer.mix_(ctx, state, received)

    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        check_model_message(ctx, msg, self.name, MODEL_KIND)
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
