"""Bring any networkx graph to the form the rest of rumor expects.

Node ``i`` of an ``n``-node topology is the process ``node-i``, so every graph that leaves
:mod:`rumor.topology` is a simple undirected :class:`networkx.Graph` whose nodes are the
integers ``0..n-1``, inserted in that order, with edges listed in sorted order.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["canonical", "edge_key"]


def canonical(G: nx.Graph, label_attribute: str | None = None) -> nx.Graph:
    """Return a simple undirected copy of `G` with nodes relabelled ``0..n-1``.

    Directed graphs become undirected, parallel edges are merged (the attributes of the last
    one win) and self-loops are dropped. Nodes are numbered in sorted order: numerically when
    every label is an integer or a string holding one (as GraphML and edge-list readers
    return), otherwise by their string form. Node, edge and graph attributes are kept.

    Parameters
    ----------
    G : networkx graph
        Any graph.
    label_attribute : str, optional
        When given, each node of the result stores its original label under this attribute,
        unless the relabelling keeps every label unchanged.

    Returns
    -------
    networkx.Graph
        A new graph with nodes ``0..n-1`` in order.

    Examples
    --------
    >>> import networkx as nx
    >>> H = canonical(nx.Graph([("b", "a"), ("a", "a")]))
    >>> list(H.edges()), nx.number_of_selfloops(H)
    ([(0, 1)], 0)
    >>> sorted(canonical(nx.path_graph(["10", "9", "8"])).edges())
    [(0, 1), (1, 2)]
    """
    import networkx as nx  # here, not at import: a node imports this module, never networkx

    order = _sorted_labels(G.nodes)
    index = {u: i for i, u in enumerate(order)}
    H = nx.Graph()
    H.graph.update(G.graph)
    identity = all(_as_int(u) == i for u, i in index.items())
    for u in order:
        attrs = dict(G.nodes[u])
        if label_attribute is not None and not identity:
            attrs.setdefault(label_attribute, u)
        H.add_node(index[u], **attrs)
    edges = []
    for u, v, data in G.edges(data=True):
        if u == v:
            continue
        a, b = sorted((index[u], index[v]))
        edges.append((a, b, data))
    edges.sort(key=lambda e: (e[0], e[1]))
    for a, b, data in edges:
        if H.has_edge(a, b):
            H[a][b].update(data)
        else:
            H.add_edge(a, b, **data)
    return H


def edge_key(u: Hashable, v: Hashable) -> tuple[Hashable, Hashable]:
    """Return the edge ``{u, v}`` as a tuple with the smaller endpoint first.

    Parameters
    ----------
    u, v : hashable
        The endpoints. Labels that cannot be compared keep the order given.

    Returns
    -------
    tuple
        ``(min(u, v), max(u, v))``.

    Examples
    --------
    >>> edge_key(5, 2)
    (2, 5)
    """
    try:
        return (u, v) if u <= v else (v, u)  # type: ignore[operator]
    except TypeError:
        return (u, v)


def _as_int(label: Hashable) -> int | None:
    if isinstance(label, bool):
        return None
    if isinstance(label, int):
        return label
    if isinstance(label, str):
        try:
            return int(label.strip())
        except ValueError:
            return None
    return None


def _sorted_labels(labels: Iterable[Hashable]) -> list[Hashable]:
    labels = list(labels)
    ints = [_as_int(u) for u in labels]
    if all(i is not None for i in ints):
        return [u for _, u in sorted(zip(ints, labels, strict=True), key=lambda p: p[0])]
    return sorted(labels, key=str)
