"""Pieces of a synchronous gossip round that several rules compose: flatten a model to one
vector and back, and one exchange (send to every live neighbour, gather the round's
messages with a timeout).

The exchange reuses :class:`~rumor.algorithms.inbox.RoundInbox` (loose rounds: later rounds
wait, earlier ones are dropped, a missing neighbour is simply missing after the timeout), as
:mod:`rumor.algorithms.gossip` does. Nothing here decides weights or aggregates.
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


async def exchange(
    ctx: Context, inbox: RoundInbox, round: int, outgoing: Message, timeout: float
) -> dict[str, Message]:
    """Send ``outgoing`` to every live neighbour and gather ``round``'s messages.

    Waits up to ``timeout`` seconds for every live neighbour (for every present one when none
    is alive, so a node does not race ahead alone), keeps only topology neighbours, and
    returns once its own sends have finished too (so the sent tensors may change again).
    """
    peers = ctx.neighbors()
    sends = [asyncio.ensure_future(ctx.send(p, outgoing)) for p in peers]
    known = set(ctx.all_neighbors())
    wait_for = peers or ctx.present_neighbors()
    try:
        arrived = await inbox.gather(round, wait_for, timeout)
    finally:
        await asyncio.gather(*sends)
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
    """The round to continue from; adopts the neighbours' mean model when far behind.

    When every live neighbour has reported a round more than ``lag`` ahead of ``round`` (the
    node restarted, or stalled), the node's own model is stale for everyone: it pulls the
    neighbours' current models, replaces ``state`` (in place) by their mean and returns
    their slowest round. Otherwise it returns ``round`` and changes nothing.
    """
    peers = ctx.neighbors()
    rounds = [ctx.peer_round(p) for p in peers]
    if not peers or any(r is None for r in rounds):
        return round
    target = min(r for r in rounds if r is not None)
    if target <= round + lag:
        return round
    models = [m for m in await asyncio.gather(*(ctx.pull(p) for p in peers)) if m]
    if not models:
        return round
    async with ctx.lock:
        weighted_average_(state, 0.0, [(1.0 / len(models), m) for m in models])
    ctx.log("caught up from round %d to %d with %d neighbours' models", round, target, len(models))
    return target
