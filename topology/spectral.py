"""Spectral quantities that predict how fast gossip mixes on a topology.

Two views are covered:

* synchronous gossip with a mixing matrix ``W``: :func:`spectral_gap`, one minus the second
  largest eigenvalue modulus;
* asynchronous pairwise gossip, where edge ``e`` fires at relative rate ``w_e`` (DADAO,
  ACiD): the Laplacian ``L(w) = sum_e w_e b_e b_e^T`` with ``b_e = e_i - e_j`` and, by
  default, ``w_e = 1 / |E|`` (every edge equally likely, so ``L = (D - A) / |E|``). From it,
  ``chi_1 = 1 / lambda_min+(L)`` (the inverse smallest positive eigenvalue) and
  ``chi_2 = max_e 1/2 b_e^T L^+ b_e`` (half the largest effective resistance of an edge),
  and the total communication rate ``lambda_mix = sqrt(2 chi_1 chi_2)``.

Matrices follow the node order ``list(G)``. Edge weights are dicts keyed by edges, either
orientation accepted; results keyed by edges use ``(u, v)`` with ``u < v``. Scaling every
weight by ``c`` divides ``chi_1`` and ``chi_2`` by ``c``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping

import networkx as nx
import numpy as np

from rumor.topology.canonical import edge_key

__all__ = [
    "algebraic_connectivity",
    "chi_1",
    "chi_2",
    "dadao_constants",
    "dadao_rates",
    "effective_resistance",
    "sampling_laplacian",
    "spectral_gap",
]

Edge = tuple[Hashable, Hashable]
EdgeWeights = Mapping[Edge, float]

_RTOL = 1e-10
"""Eigenvalues below this fraction of the largest one count as zero."""


def spectral_gap(W: np.ndarray) -> float:
    """Return ``1 - max(|lambda_2|, |lambda_n|)`` for a symmetric mixing matrix.

    With eigenvalues ``1 = lambda_1 >= lambda_2 >= ... >= lambda_n`` of a doubly stochastic
    ``W``, the distance to consensus shrinks at least by the second largest eigenvalue
    modulus (SLEM) per gossip round. A gap of 0 means no convergence (disconnected graph,
    or a bipartite one without self weights).

    Parameters
    ----------
    W : array_like
        Symmetric ``n x n`` matrix.

    Returns
    -------
    float
        The gap; 1.0 for a single node.

    Examples
    --------
    >>> round(spectral_gap(np.full((4, 4), 0.25)), 12)
    1.0
    >>> round(spectral_gap(np.array([[0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]])), 4)
    0.5
    """
    W = np.asarray(W, dtype=float)
    if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
        raise ValueError(f"W must be a non-empty square matrix, got shape {W.shape}")
    if not np.allclose(W, W.T, rtol=0, atol=1e-10 * max(1.0, float(np.abs(W).max()))):
        raise ValueError("W must be symmetric")
    if len(W) == 1:
        return 1.0
    ev = np.linalg.eigvalsh(W)  # ascending: ev[0] = lambda_n, ev[-2] = lambda_2
    return float(1.0 - max(abs(ev[-2]), abs(ev[0])))


def sampling_laplacian(G: nx.Graph, weights: EdgeWeights | None = None) -> np.ndarray:
    """Return ``L(w) = sum_e w_e b_e b_e^T``, by default ``(D - A) / |E|``.

    Parameters
    ----------
    G : networkx.Graph
        An undirected graph with at least one edge.
    weights : dict, optional
        Nonnegative relative rate of every edge, keyed ``(u, v)``; usually they sum to 1.
        Defaults to ``1 / |E|`` each.

    Returns
    -------
    numpy.ndarray
        ``n x n`` matrix, rows and columns in ``list(G)`` order.

    Examples
    --------
    >>> sampling_laplacian(nx.path_graph(3)).tolist()
    [[0.5, -0.5, 0.0], [-0.5, 1.0, -0.5], [0.0, -0.5, 0.5]]
    """
    nodes, edges, w = _edge_weights(G, weights)
    return _laplacian(len(nodes), edges, w)


def algebraic_connectivity(G: nx.Graph) -> float:
    """Return the second smallest eigenvalue of the plain Laplacian ``D - A``.

    Parameters
    ----------
    G : networkx.Graph
        An undirected graph with at least two nodes.

    Returns
    -------
    float
        Positive exactly when `G` is connected (0.0 otherwise).

    Examples
    --------
    >>> round(algebraic_connectivity(nx.complete_graph(5)), 10)
    5.0
    """
    nodes, edges, _ = _edge_weights(G, None, unit_default=True, need_edges=False)
    if len(nodes) < 2:
        raise ValueError("algebraic connectivity needs at least two nodes")
    ev = np.linalg.eigvalsh(_laplacian(len(nodes), edges, np.ones(len(edges))))
    return float(ev[1]) if ev[1] > _RTOL * max(ev[-1], 1.0) else 0.0


def chi_1(G: nx.Graph, weights: EdgeWeights | None = None) -> float:
    """Return ``chi_1 = 1 / lambda_2(L(w))``, the inverse smallest positive eigenvalue.

    Parameters
    ----------
    G : networkx.Graph
        An undirected graph with at least one edge.
    weights : dict, optional
        Relative edge rates, as in :func:`sampling_laplacian`; default ``1 / |E|``.

    Returns
    -------
    float
        ``inf`` when the edges of positive weight leave the graph disconnected.

    Examples
    --------
    >>> round(chi_1(nx.complete_graph(5)), 10)  # (n - 1) / 2
    2.0
    """
    nodes, edges, w = _edge_weights(G, weights)
    ev = np.linalg.eigvalsh(_laplacian(len(nodes), edges, w))
    return _chi_1_from(ev)


def chi_2(G: nx.Graph, weights: EdgeWeights | None = None) -> float:
    """Return ``chi_2 = max over edges (i, j) of 1/2 (e_i - e_j)^T L(w)^+ (e_i - e_j)``.

    Half the largest effective resistance across an edge, with edge conductances ``w_e``.
    Always ``chi_2 <= chi_1``.

    Parameters
    ----------
    G : networkx.Graph
        An undirected graph with at least one edge.
    weights : dict, optional
        Relative edge rates, as in :func:`sampling_laplacian`; default ``1 / |E|``.

    Returns
    -------
    float
        ``inf`` if some edge of `G` joins two parts that edges of positive weight do not.

    Examples
    --------
    >>> round(chi_2(nx.cycle_graph(6)), 10)  # (n - 1) / 2 on a ring
    2.5
    """
    nodes, edges, w = _edge_weights(G, weights)
    ev, V = np.linalg.eigh(_laplacian(len(nodes), edges, w))
    return _chi_2_from(ev, V, edges, w)


def effective_resistance(
    G: nx.Graph, u: Hashable, v: Hashable, weights: EdgeWeights | None = None
) -> float:
    """Return the effective resistance between `u` and `v`.

    Edges are unit resistors, or have conductance ``weights[e]`` when weights are given,
    so that ``chi_2(G, w) == max over edges of effective_resistance(G, i, j, w) / 2``.

    Parameters
    ----------
    G : networkx.Graph
        An undirected graph.
    u, v : node
        Two nodes of `G`.
    weights : dict, optional
        Nonnegative conductance of every edge, keyed ``(u, v)``; default 1 each.

    Returns
    -------
    float
        0.0 when ``u == v``; ``inf`` when no path of positive conductance joins them.

    Raises
    ------
    networkx.NodeNotFound
        If `u` or `v` is not in `G`.

    Examples
    --------
    >>> effective_resistance(nx.cycle_graph(4), 0, 1)  # (n - 1) / n between neighbours
    0.75
    """
    for node in (u, v):
        if node not in G:
            raise nx.NodeNotFound(f"node {node!r} is not in the graph")
    if u == v:
        return 0.0
    nodes, edges, w = _edge_weights(G, weights, unit_default=True, need_edges=False)
    index = {x: i for i, x in enumerate(nodes)}
    component = _components(len(nodes), edges, w)
    if component[index[u]] != component[index[v]]:
        return math.inf
    keep = np.flatnonzero(component == component[index[u]])
    L = _laplacian(len(nodes), edges, w)[np.ix_(keep, keep)]
    # Ground v: the reduced Laplacian of a connected graph is positive definite.
    local = {int(node): i for i, node in enumerate(keep)}
    rest = [i for i in range(len(keep)) if i != local[index[v]]]
    rhs = np.zeros(len(rest))
    rhs[rest.index(local[index[u]])] = 1.0
    potentials = np.linalg.solve(L[np.ix_(rest, rest)], rhs)
    return float(potentials[rest.index(local[index[u]])])


def dadao_constants(G: nx.Graph, weights: EdgeWeights | None = None) -> tuple[float, float]:
    """Return ``(chi_1, chi_2)`` from a single eigendecomposition.

    Parameters
    ----------
    G : networkx.Graph
        An undirected graph with at least one edge.
    weights : dict, optional
        Relative edge rates, as in :func:`sampling_laplacian`; default ``1 / |E|``.

    Returns
    -------
    tuple
        The values :func:`chi_1` and :func:`chi_2` return.

    Examples
    --------
    >>> [round(c, 10) for c in dadao_constants(nx.complete_graph(5))]
    [2.0, 2.0]
    """
    nodes, edges, w = _edge_weights(G, weights)
    ev, V = np.linalg.eigh(_laplacian(len(nodes), edges, w))
    return _chi_1_from(ev), _chi_2_from(ev, V, edges, w)


def dadao_rates(G: nx.Graph, weights: EdgeWeights | None = None) -> tuple[float, dict[Edge, float]]:
    """Return DADAO's total gossip rate and its split over the edges.

    ``lambda_mix = sqrt(2 chi_1 chi_2)``; edge ``e`` gets ``lambda_mix * w_e``.

    Parameters
    ----------
    G : networkx.Graph
        A connected undirected graph with at least one edge.
    weights : dict, optional
        Relative edge rates, as in :func:`sampling_laplacian`; default ``1 / |E|``.

    Returns
    -------
    tuple
        ``(lambda_mix, {(u, v): rate})`` with ``u < v``.

    Raises
    ------
    ValueError
        If the edges of positive weight do not connect `G`.

    Examples
    --------
    >>> total, rates = dadao_rates(nx.complete_graph(3))
    >>> round(total, 6), round(sum(rates.values()), 6)  # sqrt(2) (n - 1) / 2
    (1.414214, 1.414214)
    """
    c1, c2 = dadao_constants(G, weights)
    if math.isinf(c1):
        raise ValueError("dadao_rates needs a graph connected by edges of positive weight")
    total = math.sqrt(2.0 * c1 * c2)
    nodes, edges, w = _edge_weights(G, weights)
    rates = {
        edge_key(nodes[i], nodes[j]): total * float(we) for (i, j), we in zip(edges, w, strict=True)
    }
    return total, rates


def _edge_weights(
    G: nx.Graph,
    weights: EdgeWeights | None,
    unit_default: bool = False,
    need_edges: bool = True,
) -> tuple[list[Hashable], list[tuple[int, int]], np.ndarray]:
    """Nodes, edges as index pairs (no self-loops, each once) and their weights.

    ``weights=None`` means 1 each if `unit_default`, else ``1 / |E|`` each.
    """
    if G.is_directed():
        raise ValueError("spectral quantities need an undirected graph")
    nodes = list(G)
    index = {x: i for i, x in enumerate(nodes)}
    pairs = {frozenset((u, v)): (index[u], index[v]) for u, v in G.edges() if u != v}
    edges = list(pairs.values())
    if need_edges and not edges:
        raise ValueError("the graph has no edges")
    if weights is None:
        value = 1.0 if unit_default else 1.0 / max(len(edges), 1)
        return nodes, edges, np.full(len(edges), value)
    given: dict[frozenset[Hashable], float] = {}
    for key, value in weights.items():
        if not (isinstance(key, tuple) and len(key) == 2 and frozenset(key) in pairs):
            raise ValueError(f"weight given for {key!r}, which is not an edge of the graph")
        if frozenset(key) in given:
            raise ValueError(f"edge {key!r} has two weights")
        value = float(value)
        if not value >= 0 or math.isinf(value):
            raise ValueError(f"edge {key!r} has weight {value}; weights must be finite, >= 0")
        given[frozenset(key)] = value
    missing = [tuple(k) for k in pairs if k not in given]
    if missing:
        raise ValueError(f"no weight for {len(missing)} edge(s), e.g. {missing[0]!r}")
    return nodes, edges, np.array([given[k] for k in pairs])


def _laplacian(n: int, edges: list[tuple[int, int]], w: np.ndarray) -> np.ndarray:
    L = np.zeros((n, n))
    if edges:
        i, j = np.array(edges).T
        np.add.at(L, (i, j), -w)
        np.add.at(L, (j, i), -w)
        np.add.at(L, (i, i), w)
        np.add.at(L, (j, j), w)
    return L


def _tolerance(ev: np.ndarray) -> float:
    return _RTOL * float(np.abs(ev).max(initial=0.0))


def _chi_1_from(ev: np.ndarray) -> float:
    if len(ev) < 2 or ev[1] <= _tolerance(ev):
        return math.inf
    return float(1.0 / ev[1])


def _chi_2_from(
    ev: np.ndarray, V: np.ndarray, edges: list[tuple[int, int]], w: np.ndarray
) -> float:
    component = _components(len(ev), edges, w)
    i, j = np.array(edges).T
    if np.any(component[i] != component[j]):
        return math.inf
    positive = ev > _tolerance(ev)
    # Rows of U span L^+ = U U^T: R_ij = |U_i - U_j|^2 for every edge at once.
    U = V[:, positive] / np.sqrt(ev[positive])
    resistance = np.sum((U[i] - U[j]) ** 2, axis=1)
    return float(0.5 * resistance.max())


def _components(n: int, edges: list[tuple[int, int]], w: np.ndarray) -> np.ndarray:
    """Component label of each node, counting only edges of positive weight."""
    H = nx.Graph()
    H.add_nodes_from(range(n))
    H.add_edges_from(e for e, we in zip(edges, w, strict=True) if we > 0)
    label = np.empty(n, dtype=int)
    for c, nodes in enumerate(nx.connected_components(H)):
        label[list(nodes)] = c
    return label
