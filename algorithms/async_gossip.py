"""Asynchronous pairwise gossip averaging on Poisson clocks.

Boyd, Ghosh, Prabhakar & Shah, "Randomized Gossip Algorithms", IEEE Trans. Inf. Theory 2006,
run as gossip learning (Ormándi, Hegedűs & Jelasity, "Gossip learning with linear models on
fully distributed data", 2013): each node trains continuously, and each node's own Poisson
clock of ``rate`` exchanges per second picks a live neighbour uniformly for a pairwise
average. The exchange is one request/response: the initiator sends its model m_i, the peer
answers with its model m_j, and both apply the same difference D = (m_i - m_j) / 2 with
opposite signs (x_i -= D, x_j += D). Using the exchanged pair on both sides keeps the sum of
the models exactly unchanged even when a node trains while the message is in flight.

A "round" here is ``local_steps`` (K) training steps, for metrics and the round budget.

Restarts and the end of a run. A node that starts (or resumes from a checkpoint) more than
``catch_up_lag`` rounds behind a neighbour adopts the mean model of the neighbours ahead and
continues from their round (:func:`~rumor.algorithms.rounds.catch_up`, its own model keeping
one share), so it neither pushes a stale model into the cluster nor trains on long after the
others. Partners are drawn from
every serving neighbour, including those that finished their budget and linger while a
neighbour still trains (``linger_for_neighbours``): no node ends its run training alone.

Example::

    rumor simulate --nodes 32 --topology ring --algorithm async-gossip --param rate=4
"""

from __future__ import annotations

import asyncio
from typing import Any

import torch

from rumor.algorithms.averaging import check_compatible, mixable, snapshot
from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.rounds import catch_up
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, PeerUnavailable, Rejected

EXCHANGE_KIND = "async-gossip.exchange"
REPLY_KIND = "async-gossip.reply"


@torch.no_grad()
def _apply_half_difference(
    state: dict[str, torch.Tensor],
    mine: dict[str, torch.Tensor],
    theirs: dict[str, torch.Tensor],
    sign: float,
) -> None:
    """state += sign * (mine - theirs) / 2, tensor by tensor."""
    for k, t in state.items():
        t.add_(mine[k] - theirs[k], alpha=0.5 * sign)


class AsyncGossip(MixingRule):
    """Asynchronous pairwise gossip averaging.

    Parameters
    ----------
    rate:
        Exchanges per second started by each node (its Poisson clock's rate).
    local_steps:
        K, training steps per round (a round only paces metrics and the budget).
    exchange_timeout:
        Seconds an exchange may take before it is abandoned.
    catch_up_lag:
        Rounds a node may start behind its most advanced neighbour before it takes the
        neighbours' models (mixed with its own) and round (checked once, at start). Rounds
        are local steps here, and nodes started together drift apart by a few dozen of
        them on small models, hence a larger default than the round-based rules'.
    """

    name = "async-gossip"
    #: Its whole state is the model (saved by the node). An exchange cut by a crash was
    #: applied by at most one side: the pair's sum then moves by half a difference once.
    checkpointable = True

    def __init__(
        self,
        rate: float = 2.0,
        local_steps: int = 1,
        exchange_timeout: float = 10.0,
        catch_up_lag: int = 100,
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        if catch_up_lag < 0:
            raise ValueError("catch_up_lag must be >= 0")
        self.rate = float(rate)
        self.local_steps = int(local_steps)
        self.exchange_timeout = float(exchange_timeout)
        self.catch_up_lag = int(catch_up_lag)

    async def run(self, ctx: Context) -> None:
        # nonzero after a resume from a checkpoint; far behind the neighbours: join them
        round = await catch_up(ctx, mixable(ctx.model.state_dict()), ctx.round, self.catch_up_lag)
        done = asyncio.Event()
        gossip = asyncio.ensure_future(self._gossip_loop(ctx, done))
        try:
            while not ctx.should_stop(round):
                async with ctx.lock:
                    loss = await ctx.compute(ctx.trainer.train_steps, self.local_steps)
                # Let exchanges that wait for the model in; training never starves them.
                await asyncio.sleep(0)
                ev = await ctx.maybe_evaluate(round)
                ctx.end_round(round, loss=loss, eval=ev)
                round += 1
        finally:
            done.set()
            await asyncio.gather(gossip, return_exceptions=True)

    async def _gossip_loop(self, ctx: Context, done: asyncio.Event) -> None:
        state = mixable(ctx.model.state_dict())
        async for _ in ctx.clock.poisson_ticks(self.rate, ctx.rng, done.is_set):
            peers = ctx.serving_neighbors()
            if not peers:
                continue
            peer = ctx.rng.choice(peers)
            async with ctx.lock:
                mine = snapshot(state)
            msg = ctx.message(EXCHANGE_KIND, bundle=Bundle(mine))
            try:
                reply = await ctx.request(peer, msg, self.exchange_timeout)
            except (PeerUnavailable, Rejected) as exc:
                ctx.log("exchange with %s failed: %s", peer, exc)
                continue
            if reply is None or reply.kind != REPLY_KIND or reply.bundle is None:
                ctx.log("exchange with %s: unexpected answer", peer)
                continue
            try:
                check_compatible(reply.bundle, state)
            except Rejected as exc:
                ctx.log("exchange with %s: %s", peer, exc)
                continue
            async with ctx.lock:
                _apply_half_difference(state, mine, reply.bundle.tensors, -1.0)

    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        if msg.kind != EXCHANGE_KIND or msg.bundle is None:
            raise Rejected(Code.INVALID_ARGUMENT, f"async-gossip does not handle {msg.kind!r}")
        state = mixable(ctx.model.state_dict())
        check_compatible(msg.bundle, state)
        async with ctx.lock:
            mine = snapshot(state)
            _apply_half_difference(state, msg.bundle.tensors, mine, +1.0)
        return ctx.message(REPLY_KIND, bundle=Bundle(mine))

    def describe(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "local_steps": self.local_steps,
            "exchange_timeout": self.exchange_timeout,
            "catch_up_lag": self.catch_up_lag,
        }
