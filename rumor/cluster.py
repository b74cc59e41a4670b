"""Turning a topology into node configs, for local clusters and simulations.

Node ``i`` of an ``n``-node graph is ``node-i``, owns shard ``i`` of the partition, and has
the graph's neighbours of ``i`` as peers, at addresses the caller chooses (``host:port`` for
processes, the node id itself for the in-process network).
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import networkx as nx

from rumor.config import NodeConfig


def node_name(i: int) -> str:
    return f"node-{i}"


def build_graph(topology: str, n: int, seed: int) -> nx.Graph:
    from rumor.topology import build

    return build(topology, n=n, seed=seed)


def cluster_configs(
    graph: nx.Graph,
    base: NodeConfig,
    address_of: Callable[[int], str],
    listen_of: Callable[[int], str] | None = None,
) -> list[NodeConfig]:
    """One config per graph node, peers wired along the graph's edges.

    The rule's :meth:`~rumor.algorithms.base.MixingRule.prepare` then fills in whatever
    parameters need the whole graph.
    """
    from rumor.algorithms import registry

    n = graph.number_of_nodes()
    configs = []
    for i in sorted(graph.nodes):
        peers = {node_name(j): address_of(j) for j in sorted(graph.neighbors(i))}
        configs.append(
            base.replace(
                node_id=node_name(i),
                index=i,
                n_nodes=n,
                peers=peers,
                listen=listen_of(i) if listen_of else address_of(i),
                advertise=address_of(i),
            )
        )
    return registry.get(base.algorithm).prepare(graph, configs)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that were free a moment ago (bound, then released)."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
