"""Looking at a cluster from outside: pull models from live nodes and measure consensus.

An observer sends the node-level ``rumor.pull`` message and gets the node's current model
back (nothing is changed on the node). Consensus distance is the mean squared distance of
the nodes' models to their average, (1/n) sum_i ||x_i - x_bar||^2, over floating tensors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import torch

from rumor.protocol.bundle import Message
from rumor.protocol.errors import PeerUnavailable, Rejected
from rumor.protocol.transport import Transport

PULL_KIND = "rumor.pull"


@torch.no_grad()
def consensus_distance(states: Sequence[Mapping[str, torch.Tensor]]) -> float:
    """(1/n) sum_i ||x_i - x_bar||^2 over the floating-point tensors of the states."""
    if not states:
        return float("nan")
    total = 0.0
    for name, ref in states[0].items():
        if not ref.is_floating_point():
            continue
        stack = torch.stack([s[name].double() for s in states])
        total += float(((stack - stack.mean(0)) ** 2).sum())
    return total / len(states)


async def pull_models(
    transport: Transport, addresses: Mapping[str, str], timeout: float = 10.0
) -> dict[str, dict[str, torch.Tensor]]:
    """Current models of the reachable nodes, by node id (unreachable ones are left out)."""

    async def one(node_id: str, address: str) -> tuple[str, dict[str, torch.Tensor] | None]:
        try:
            reply = await transport.request(
                address, Message(kind=PULL_KIND, sender="observer"), timeout
            )
        except (PeerUnavailable, Rejected):
            return node_id, None
        if reply is None or reply.bundle is None:
            return node_id, None
        return node_id, reply.bundle.tensors

    pairs = await asyncio.gather(*(one(n, a) for n, a in addresses.items()))
    return {n: s for n, s in pairs if s is not None}
