"""Pieces of a synchronous gossip round that several rules compose: flatten a model to one
vector and back, and one exchange (send to every live neighbour, gather the round's
messages with a timeout).

The exchange reuses :class:`~rumor.algorithms.inbox.RoundInbox` (loose rounds: later rounds
wait, earlier ones are dropped, a missing neighbour is simply missing after the timeout), as
:mod:`rumor.algorithms.gossip` does. Nothing here decides weights or aggregates.

Faults. A round waits only for neighbours that can still send it something: alive
(membership), still running rounds, and not past this round (a neighbour that has moved on
finished its sends of this round before it did: what it sent is in the inbox already). The
set is re-read whenever the membership changes, and a send to a neighbour that is marked
dead is cut at that moment (``Context.request``), so a dead peer costs a round at most the
failure-detection time.
:func:`catch_up` is the rule that brings laggards back; its docstring argues why it cannot
deadlock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import torch

from rumor.algorithms.averaging import (
    MixScratch,
    check_compatible,
    gossip_step_,
    mixable,
    weighted_average_,
)
from rumor.algorithms.base import Context
from rumor.algorithms.inbox import RoundInbox
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, Rejected
from rumor.topology.mixing import metropolis_weights

__all__ = [
    "ModelMixer",
    "catch_up",
    "check_model_message",
    "exchange",
    "flatten",
    "metropolis_row",
    "unflatten_",
]


def check_model_message(ctx: Context, msg: Message, rule: str, kind: str) -> Bundle:
    """The bundle of ``msg`` if it is a ``kind`` model this node can mix; else Rejected.

    Same names, dtypes and shapes as this node's model: what every round-based rule checks
    before a model enters its inbox (rule-specific metadata is checked by the caller).
    """
    if msg.kind != kind:
        raise Rejected(Code.INVALID_ARGUMENT, f"{rule} does not handle {msg.kind!r}")
    if msg.bundle is None:
        raise Rejected(Code.INVALID_ARGUMENT, f"{kind} without a model")
    check_compatible(msg.bundle, mixable(ctx.model.state_dict()))
    return msg.bundle


@torch.no_grad()
def flatten(tensors: Mapping[str, torch.Tensor], names: list[str] | None = None) -> torch.Tensor:
    """The tensors of ``names`` (default: all, in order) concatenated into one float64 vector."""
    keys = list(tensors) if names is None else names
    if not keys:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([tensors[k].detach().reshape(-1).double() for k in keys])


@torch.no_grad()
def unflatten_(tensors: Mapping[str, torch.Tensor], vector: torch.Tensor) -> None:
    """Write ``vector`` back into ``tensors`` (in their order, cast to each dtype), in place."""
    total = sum(t.numel() for t in tensors.values())
    if vector.numel() != total:
        raise ValueError(f"vector has {vector.numel()} values, the tensors hold {total}")
    offset = 0
    for t in tensors.values():
        n = t.numel()
        t.copy_(vector[offset : offset + n].reshape(t.shape).to(t.dtype))
        offset += n


def expected_senders(ctx: Context) -> list[str]:
    """The neighbours whose model this node's current round should wait for.

    Alive neighbours still running rounds, except those that reported a round past this
    node's. A round ends only after its sends have ended, so a neighbour that has moved on
    has delivered all it will ever send for this round; waiting for more is waiting for
    nothing. Only a lead excludes: reported rounds come with heartbeats and trail the
    truth, so an old report can understate a lead (this node then waits until the next
    heartbeat) but never invent one. A neighbour that is behind is waited for: it jumps
    to this node's round as soon as it hears of it (:func:`catch_up`). When no neighbour is
    alive the node waits for the present ones (dead for now, not gone), so an isolated
    node crawls at one round per timeout instead of racing ahead alone on its own data.
    """
    mine = ctx.round
    alive = ctx.neighbors()
    if not alive:
        return ctx.present_neighbors()
    return [p for p in alive if not _ahead(ctx.peer_round(p), mine, 0)]


def _ahead(theirs: int | None, mine: int, lag: int) -> bool:
    return theirs is not None and theirs > mine + lag


async def exchange(
    ctx: Context,
    inbox: RoundInbox,
    round: int,
    outgoing: Message,
    timeout: float,
) -> dict[str, Message]:
    """Send ``outgoing`` to every live neighbour and gather ``round``'s messages.

    Waits up to ``timeout`` seconds for :func:`expected_senders` (re-read as the membership
    changes; a neighbour that comes back mid-round is sent the model then), keeps only
    topology neighbours, and returns once its own sends have finished too (so the sent
    tensors may change again); a send to a neighbour marked dead ends then.
    ``round`` is the inbox's tag (a rule may tag several exchanges per round); whether a
    neighbour has moved past it is judged on ``ctx.round``, the round neighbours report in
    heartbeats.
    """
    sends: dict[str, asyncio.Future[bool]] = {}

    def expected() -> list[str]:
        # A neighbour that came back mid-round gets this round's model too: it may be
        # waiting for it, as this node now waits for its own.
        for peer in ctx.neighbors():
            if peer not in sends:
                sends[peer] = asyncio.ensure_future(ctx.send(peer, outgoing))
        return expected_senders(ctx)

    known = set(ctx.all_neighbors())
    ctx.on_membership_change(inbox.poke)
    try:
        arrived = await inbox.gather(round, expected, timeout)
    finally:
        await asyncio.gather(*sends.values())
    return {p: m for p, m in arrived.items() if p in known}


# --- Metropolis-Hastings rounds: dpsgd, dfedsam, diging --------------------------------


def metropolis_row(ctx: Context, received: Mapping[str, Message]) -> tuple[float, dict[str, float]]:
    """``(w_ii, {j: w_ij})``: Metropolis-Hastings weights ``1 / (1 + max(d_i, d_j))`` of the
    neighbours whose messages arrived, a missing neighbour's weight left on the node itself.

    Each message carries its sender's topology degree as ``bundle.meta["degree"]`` (the
    rules check it on receipt), so both ends of an edge agree on its weight without
    agreeing on who is alive.
    """
    degrees = {p: int(m.bundle.meta["degree"]) for p, m in received.items()}  # type: ignore[union-attr]
    return metropolis_weights(ctx.degree, degrees)


class ModelMixer:
    """``x <- w_ii x + sum_j w_ij x_j`` over a model's tensors, in place, under the model lock.

    Runs through scratch kept between rounds, so mixing allocates nothing after the first
    round (:func:`~rumor.algorithms.averaging.gossip_step_`).
    """

    def __init__(self) -> None:
        self._scratch = MixScratch()

    async def mix_(
        self, ctx: Context, state: Mapping[str, torch.Tensor], received: Mapping[str, Message]
    ) -> float | None:
        """Mix the received models (:func:`exchange`) into ``state`` with
        :func:`metropolis_row`; returns ``||x - a||`` before the step (``a`` the weighted mean
        of the received models), None when nothing came."""
        if not received:
            return None
        _, weights = metropolis_row(ctx, received)
        others = [(weights[p], m.bundle.tensors) for p, m in received.items()]  # type: ignore[union-attr]
        async with ctx.lock:
            return gossip_step_(state, others, self._scratch)


async def catch_up(ctx: Context, state: dict[str, torch.Tensor], round: int, lag: int) -> int:
    """The round to continue from; when far behind, jumps ahead with models that are there.

    Rule: when **any** serving neighbour (alive, running or finished) reports a round more
    than ``lag`` ahead of ``round`` (this node restarted, was cut off, or stalled), the node
    pulls the current model of every such neighbour. Of the pulls that succeed, it keeps
    the k within ``lag`` of the most advanced one, sets ``state`` (in place) to the mean of
    its own model and those k, each weighted 1/(k+1), and continues from the lowest round
    among them, a round every model it took has actually reached. Otherwise it returns
    ``round`` and changes nothing. A jump writes a ``catch_up`` metrics line
    (``from_round``, ``to_round``, ``peers``); the rounds in between have no ``round`` lines.

    Why its own model keeps a share: a node behind is not always a node with a stale model.
    After a partition the half that ran slower (or smaller) trained on its own shards all
    along, and replacing its models by the other half's would throw that away (on skewed
    data, a large share of what the cluster knows about some classes). A restarted node's
    checkpoint is older, but its weight is one share among k+1 and the next gossip rounds
    average it out geometrically.

    Why it cannot deadlock: a jump depends only on neighbours *ahead*, never on those
    behind, so no set of laggards can hold each other back (a rule that jumps only when
    every neighbour is ahead lets two adjacent laggards wait for each other for ever). Every
    round ends within ``round_timeout``, so the most advanced node keeps advancing; a node
    that hears (by heartbeat) of a neighbour ahead stops waiting for it at once
    (:func:`expected_senders`), jumps at its next round start when the lead exceeds
    ``lag``, and runs through the rounds its neighbours have passed without waiting, to the
    round they are waiting for. After a heal each node is therefore within
    ``lag`` of its neighbours after about one heartbeat period and one pull per hop of the
    graph's diameter.
    """
    ahead = [p for p in ctx.serving_neighbors() if _ahead(ctx.peer_round(p), round, lag)]
    if not ahead:
        return round
    pulled = [m for m in await asyncio.gather(*(ctx.pull_model(p) for p in ahead)) if m]
    pulled = [m for m in pulled if m.round > round + lag]
    if not pulled:
        return round
    top = max(m.round for m in pulled)
    adopted = [m for m in pulled if m.round >= top - lag]
    target = min(m.round for m in adopted)
    async with ctx.lock:
        share = 1.0 / (len(adopted) + 1)
        weighted_average_(state, share, [(share, m.tensors) for m in adopted])
    peers = [m.peer for m in adopted]
    ctx.log("caught up from round %d to %d with the models of %s", round, target, ", ".join(peers))
    ctx.note("catch_up", from_round=round, to_round=target, peers=peers)
    ctx.round = target  # heartbeats report the new round from now on
    return target
