"""Gossip mixing matrices: symmetric, doubly stochastic weights over a graph's edges.

Row ``i`` of a mixing matrix ``W`` says how node ``i`` averages: ``x_i <- sum_j W_ij x_j``,
with ``W_ij > 0`` only for neighbours and ``i`` itself. Rows and columns follow the order of
``list(G)`` (``0..n-1`` for rumor's own graphs). Self-loops are ignored and parallel edges
count once. A running node computes its own row with :func:`metropolis_weights`, from its
degree and its neighbours' degrees alone.

Every ``rumor node`` process imports this module (for :func:`metropolis_weights`), so it must
not import :mod:`networkx` at import time: that would add about 12 MiB and 300 modules to
each node. The matrix builders, which take a graph, import it when called.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import TYPE_CHECKING, TypeVar

import numpy as np

if TYPE_CHECKING:
    import networkx as nx

__all__ = [
    "MIXING_KINDS",
    "max_degree",
    "metropolis_hastings",
    "metropolis_weights",
    "mixing_matrix",
    "uniform",
]

P = TypeVar("P", bound=Hashable)

MIXING_KINDS = ("metropolis", "max-degree", "uniform")
"""The names :func:`mixing_matrix` accepts."""


def metropolis_hastings(G: nx.Graph) -> np.ndarray:
    """Return the Metropolis-Hastings mixing matrix of `G`.

    ``W_ij = 1 / (1 + max(d_i, d_j))`` for each edge ``ij`` and ``W_ii = 1 - sum_j W_ij``.
    It is symmetric and doubly stochastic on any graph, with ``W_ii > 0``.

    Parameters
    ----------
    G : networkx.Graph
        An undirected graph.

    Returns
    -------
    numpy.ndarray
        ``n x n`` matrix, rows and columns in ``list(G)`` order.

    Examples
    --------
    >>> import networkx as nx
    >>> W = metropolis_hastings(nx.path_graph(3))
    >>> W.round(3).tolist()
    [[0.667, 0.333, 0.0], [0.333, 0.333, 0.333], [0.0, 0.333, 0.667]]
    """
    A = _adjacency(G)
    d = A.sum(axis=1)
    W = A / (1.0 + np.maximum.outer(d, d))
    return _with_diagonal(W)


def max_degree(G: nx.Graph) -> np.ndarray:
    """Return the max-degree mixing matrix of `G`.

    ``W_ij = 1 / (1 + d_max)`` for each edge and ``W_ii = 1 - d_i / (1 + d_max)``: one
    weight for every edge, symmetric and doubly stochastic on any graph.

    Parameters
    ----------
    G : networkx.Graph
        An undirected graph.

    Returns
    -------
    numpy.ndarray
        ``n x n`` matrix, rows and columns in ``list(G)`` order.

    Examples
    --------
    >>> import networkx as nx
    >>> max_degree(nx.star_graph(2)).round(3).tolist()
    [[0.333, 0.333, 0.333], [0.333, 0.667, 0.0], [0.333, 0.0, 0.667]]
    """
    A = _adjacency(G)
    d_max = A.sum(axis=1).max() if len(A) else 0.0
    return _with_diagonal(A / (1.0 + d_max))


def uniform(G: nx.Graph) -> np.ndarray:
    """Return the uniform-averaging matrix of a regular graph.

    Each node averages itself and its ``d`` neighbours equally: ``W_ij = 1 / (1 + d)`` for
    each edge and ``W_ii = 1 / (1 + d)``. This is doubly stochastic only when every degree
    is the same, so other graphs are refused.

    Parameters
    ----------
    G : networkx.Graph
        An undirected regular graph.

    Returns
    -------
    numpy.ndarray
        ``n x n`` matrix, rows and columns in ``list(G)`` order.

    Raises
    ------
    ValueError
        If `G` is not regular; use :func:`metropolis_hastings` or :func:`max_degree` there.

    Examples
    --------
    >>> import networkx as nx
    >>> uniform(nx.cycle_graph(3)).round(3).tolist()
    [[0.333, 0.333, 0.333], [0.333, 0.333, 0.333], [0.333, 0.333, 0.333]]
    """
    A = _adjacency(G)
    d = A.sum(axis=1)
    if len(d) and d.min() != d.max():
        raise ValueError(
            "uniform weights 1/(1+d_i) are doubly stochastic only on regular graphs, and "
            f"degrees here range from {int(d.min())} to {int(d.max())}; "
            "use metropolis_hastings (or max_degree) instead"
        )
    return _with_diagonal(A / (1.0 + (d[0] if len(d) else 0.0)))


def mixing_matrix(G: nx.Graph, kind: str = "metropolis") -> np.ndarray:
    """Return the mixing matrix of `G` of the named kind.

    Parameters
    ----------
    G : networkx.Graph
        An undirected graph.
    kind : {"metropolis", "max-degree", "uniform"}
        :func:`metropolis_hastings`, :func:`max_degree` or :func:`uniform`. Underscores may
        replace dashes.

    Returns
    -------
    numpy.ndarray

    Examples
    --------
    >>> import networkx as nx
    >>> mixing_matrix(nx.complete_graph(2), "max-degree").tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """
    name = kind.strip().lower().replace("_", "-")
    if name in ("metropolis", "metropolis-hastings", "mh"):
        return metropolis_hastings(G)
    if name == "max-degree":
        return max_degree(G)
    if name == "uniform":
        return uniform(G)
    raise ValueError(f"unknown mixing kind {kind!r}; use one of {', '.join(MIXING_KINDS)}")


def metropolis_weights(
    degree_i: int, neighbour_degrees: Mapping[P, int]
) -> tuple[float, dict[P, float]]:
    """Return node ``i``'s Metropolis-Hastings row from local knowledge.

    Node ``i`` needs only its own degree and the degrees of the neighbours it mixes with:
    ``w_ij = 1 / (1 + max(d_i, d_j))`` and the self weight is ``1 - sum_j w_ij``. Passing
    fewer neighbours than ``degree_i`` (say, those whose models arrived this round) moves
    the missing neighbours' weight to the self weight, which keeps it positive.

    Parameters
    ----------
    degree_i : int
        Degree of node ``i`` in the topology.
    neighbour_degrees : mapping
        ``{peer: degree of peer}`` for at most `degree_i` neighbours.

    Returns
    -------
    tuple
        ``(self weight, {peer: weight})``; over a whole graph these rows equal
        :func:`metropolis_hastings`.

    Raises
    ------
    ValueError
        For negative degrees, or more neighbours than `degree_i`.

    Examples
    --------
    >>> self_w, w = metropolis_weights(2, {"node-1": 2, "node-3": 3})
    >>> round(self_w, 4), w
    (0.4167, {'node-1': 0.3333333333333333, 'node-3': 0.25})
    """
    if degree_i < 0:
        raise ValueError(f"degree_i must be >= 0, got {degree_i}")
    if len(neighbour_degrees) > degree_i:
        raise ValueError(
            f"{len(neighbour_degrees)} neighbours given for a node of degree {degree_i}"
        )
    weights: dict[P, float] = {}
    for peer, d in neighbour_degrees.items():
        if d < 0:
            raise ValueError(f"degree of {peer!r} must be >= 0, got {d}")
        weights[peer] = 1.0 / (1.0 + max(degree_i, d))
    return 1.0 - sum(weights.values()), weights


def _adjacency(G: nx.Graph) -> np.ndarray:
    if G.is_directed():
        raise ValueError("mixing matrices need an undirected graph")
    import networkx as nx

    A = nx.to_numpy_array(G, nodelist=list(G), weight=None, dtype=float)
    np.fill_diagonal(A, 0.0)
    return (A > 0).astype(float)


def _with_diagonal(W: np.ndarray) -> np.ndarray:
    np.fill_diagonal(W, 0.0)
    np.fill_diagonal(W, 1.0 - W.sum(axis=1))
    return W
