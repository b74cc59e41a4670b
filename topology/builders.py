"""Graph families for gossip topologies.

Every builder returns a connected, simple, undirected :class:`networkx.Graph` with nodes
``0..n-1`` and raises :class:`ValueError` for parameters no such graph exists for. Random
builders take an integer ``seed`` and return the same graph for the same arguments; when a
draw comes out disconnected they either redraw with seeds derived from ``seed`` (a bounded
number of times) or, for random geometric graphs, add the shortest joining edges.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import networkx as nx
import numpy as np

from rumor.topology.canonical import canonical

__all__ = [
    "barabasi_albert",
    "complete",
    "erdos_renyi",
    "exponential",
    "grid_2d",
    "hypercube",
    "path",
    "random_geometric",
    "random_regular",
    "ring",
    "star",
    "torus_2d",
    "watts_strogatz",
]

MAX_ATTEMPTS = 100
"""How many seeds the redrawing builders try before giving up."""


def ring(n: int) -> nx.Graph:
    """Return the cycle ``0 - 1 - ... - (n-1) - 0``.

    Parameters
    ----------
    n : int
        Number of nodes, at least 3 (use :func:`path` for two nodes).

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> sorted(ring(4).edges())
    [(0, 1), (0, 3), (1, 2), (2, 3)]
    """
    _check_int("n", n, 3)
    return canonical(nx.cycle_graph(n))


def path(n: int) -> nx.Graph:
    """Return the path ``0 - 1 - ... - (n-1)``.

    Parameters
    ----------
    n : int
        Number of nodes, at least 1.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> sorted(path(3).edges())
    [(0, 1), (1, 2)]
    """
    _check_int("n", n, 1)
    return canonical(nx.path_graph(n))


def star(n: int) -> nx.Graph:
    """Return the star with hub 0 and leaves ``1..n-1``.

    Parameters
    ----------
    n : int
        Number of nodes, hub included, at least 1.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> sorted(star(4).edges())
    [(0, 1), (0, 2), (0, 3)]
    """
    _check_int("n", n, 1)
    return canonical(nx.star_graph(n - 1))


def complete(n: int) -> nx.Graph:
    """Return the complete graph on ``n`` nodes.

    Parameters
    ----------
    n : int
        Number of nodes, at least 1.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> complete(5).number_of_edges()
    10
    """
    _check_int("n", n, 1)
    return canonical(nx.complete_graph(n))


def grid_2d(rows: int, cols: int) -> nx.Graph:
    """Return the ``rows x cols`` grid; the node in row ``r``, column ``c`` is ``r * cols + c``.

    Parameters
    ----------
    rows, cols : int
        Grid dimensions, each at least 1.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> sorted(grid_2d(2, 2).edges())
    [(0, 1), (0, 2), (1, 3), (2, 3)]
    """
    _check_int("rows", rows, 1)
    _check_int("cols", cols, 1)
    return _lattice(rows, cols, periodic=False)


def torus_2d(rows: int, cols: int) -> nx.Graph:
    """Return the ``rows x cols`` torus (a grid whose rows and columns wrap around).

    Node numbering is that of :func:`grid_2d`. Every node has degree 4.

    Parameters
    ----------
    rows, cols : int
        Torus dimensions, each at least 3 (smaller ones would repeat edges).

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> G = torus_2d(3, 4)
    >>> G.number_of_nodes(), {d for _, d in G.degree()}
    (12, {4})
    """
    _check_int("rows", rows, 3)
    _check_int("cols", cols, 3)
    return _lattice(rows, cols, periodic=True)


def hypercube(dim: int) -> nx.Graph:
    """Return the ``dim``-dimensional hypercube on ``2**dim`` nodes.

    Nodes whose binary representations differ in exactly one bit are neighbours.

    Parameters
    ----------
    dim : int
        Dimension, at least 0.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> sorted(hypercube(2).edges())
    [(0, 1), (0, 2), (1, 3), (2, 3)]
    """
    _check_int("dim", dim, 0)
    n = 1 << dim
    G = nx.Graph()
    G.add_nodes_from(range(n))
    G.add_edges_from((u, u ^ (1 << b)) for u in range(n) for b in range(dim) if u < u ^ (1 << b))
    return canonical(G)


def exponential(n: int) -> nx.Graph:
    """Return the undirected exponential graph: ``i`` is linked to ``i ± 2**k (mod n)``.

    The powers run over ``k = 0, 1, ..., floor(log2(n - 1))``, as in the static exponential
    graph of the decentralized SGD literature; its degree is about ``2 log2(n)`` and its
    spectral gap does not shrink with ``n`` polynomially as a ring's does.

    Parameters
    ----------
    n : int
        Number of nodes, at least 1.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> sorted(exponential(8)[0])
    [1, 2, 4, 6, 7]
    """
    _check_int("n", n, 1)
    G = nx.Graph()
    G.add_nodes_from(range(n))
    hop = 1
    while hop < n:
        G.add_edges_from((i, (i + hop) % n) for i in range(n))
        hop *= 2
    return canonical(G)


def erdos_renyi(n: int, p: float, seed: int = 0, max_attempts: int = MAX_ATTEMPTS) -> nx.Graph:
    """Return a connected G(n, p) random graph.

    The first draw uses ``seed`` itself (so it equals ``nx.gnp_random_graph(n, p, seed)``
    when that graph is connected); later draws use seeds derived from ``seed`` and the
    attempt number.

    Parameters
    ----------
    n : int
        Number of nodes, at least 1.
    p : float
        Edge probability in ``[0, 1]``; it must be positive when ``n > 1``. Draws are
        likely connected once ``p`` exceeds ``log(n) / n``.
    seed : int
        Random seed.
    max_attempts : int
        Draws to try before raising.

    Returns
    -------
    networkx.Graph

    Raises
    ------
    ValueError
        For bad parameters, or when no draw was connected.

    Examples
    --------
    >>> G = erdos_renyi(16, 0.3, seed=1)
    >>> nx.is_connected(G), G.number_of_nodes()
    (True, 16)
    """
    _check_int("n", n, 1)
    _check_probability("p", p)
    if n > 1 and p == 0:
        raise ValueError("erdos_renyi: p = 0 gives no edges, so no connected graph")
    return _redraw(
        lambda s: nx.gnp_random_graph(n, p, seed=s),
        seed,
        max_attempts,
        f"erdos_renyi(n={n}, p={p})",
        f"raise p above log(n)/n = {math.log(max(n, 2)) / n:.3g}",
    )


def random_regular(n: int, d: int, seed: int = 0, max_attempts: int = MAX_ATTEMPTS) -> nx.Graph:
    """Return a connected random ``d``-regular graph on ``n`` nodes.

    Draws are redrawn as in :func:`erdos_renyi` until connected. For ``d >= 3`` almost all
    draws are connected; for ``d == 2`` (a random union of cycles) large ``n`` may need many
    attempts.

    Parameters
    ----------
    n : int
        Number of nodes, at least 1.
    d : int
        Degree, ``0 <= d < n`` with ``n * d`` even; ``d = 0`` only for ``n = 1`` and
        ``d = 1`` only for ``n = 2``, as other such graphs are disconnected.
    seed : int
        Random seed.
    max_attempts : int
        Draws to try before raising.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> G = random_regular(10, 3, seed=0)
    >>> {deg for _, deg in G.degree()}
    {3}
    """
    _check_int("n", n, 1)
    _check_int("d", d, 0)
    if d >= n:
        raise ValueError(f"random_regular: need d < n, got d={d}, n={n}")
    if (n * d) % 2:
        raise ValueError(f"random_regular: n * d must be even, got n={n}, d={d}")
    if (d == 0 and n > 1) or (d == 1 and n > 2):
        raise ValueError(f"random_regular: every {d}-regular graph on {n} nodes is disconnected")
    return _redraw(
        lambda s: nx.random_regular_graph(d, n, seed=s),
        seed,
        max_attempts,
        f"random_regular(n={n}, d={d})",
        "use d >= 3",
    )


def barabasi_albert(n: int, m: int, seed: int = 0) -> nx.Graph:
    """Return a Barabási-Albert preferential-attachment graph.

    Each new node attaches to ``m`` existing nodes chosen with probability proportional to
    their degree, so the graph is connected by construction.

    Parameters
    ----------
    n : int
        Number of nodes.
    m : int
        Edges per new node, ``1 <= m < n``.
    seed : int
        Random seed.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> barabasi_albert(32, 2, seed=0).number_of_edges()
    60
    """
    _check_int("m", m, 1)
    _check_int("n", n, m + 1)
    _check_int("seed", seed, None)
    return _connected_or_raise(canonical(nx.barabasi_albert_graph(n, m, seed=seed)), "ba")


def watts_strogatz(
    n: int, k: int, p: float, seed: int = 0, max_attempts: int = MAX_ATTEMPTS
) -> nx.Graph:
    """Return a connected Watts-Strogatz small-world graph.

    Starts from a ring where each node is linked to its ``k / 2`` nearest neighbours on each
    side, then rewires each edge with probability ``p``; draws are repeated (deterministically
    from ``seed``) until connected.

    Parameters
    ----------
    n : int
        Number of nodes.
    k : int
        Even ring degree, ``2 <= k < n``.
    p : float
        Rewiring probability in ``[0, 1]``.
    seed : int
        Random seed.
    max_attempts : int
        Draws to try before raising.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> G = watts_strogatz(16, 4, 0.2, seed=0)
    >>> G.number_of_nodes(), G.number_of_edges()
    (16, 32)
    """
    _check_int("k", k, 2)
    _check_int("n", n, k + 1)
    if k % 2:
        raise ValueError(f"watts_strogatz: k must be even, got {k}")
    _check_probability("p", p)
    _check_int("seed", seed, None)
    try:
        G = nx.connected_watts_strogatz_graph(n, k, p, tries=max_attempts, seed=seed)
    except nx.NetworkXError as exc:
        raise ValueError(f"watts_strogatz(n={n}, k={k}, p={p}): {exc}") from exc
    return _connected_or_raise(canonical(G), "watts_strogatz")


def random_geometric(n: int, radius: float, seed: int = 0) -> nx.Graph:
    """Return a random geometric graph in the unit square, joined up if needed.

    ``n`` points are drawn uniformly in ``[0, 1]^2`` and points closer than ``radius`` are
    linked. If that leaves several components, the longer edges of the Euclidean minimum
    spanning tree of the points are added, i.e. components are joined through their closest
    pairs of points. Positions are kept in the node attribute ``"pos"``.

    Parameters
    ----------
    n : int
        Number of nodes, at least 1.
    radius : float
        Connection distance, at least 0.
    seed : int
        Random seed.

    Returns
    -------
    networkx.Graph

    Examples
    --------
    >>> G = random_geometric(32, 0.1, seed=0)
    >>> nx.is_connected(G), len(G.nodes[0]["pos"])
    (True, 2)
    """
    _check_int("n", n, 1)
    if not isinstance(radius, (int, float)) or not radius >= 0:
        raise ValueError(f"random_geometric: radius must be a number >= 0, got {radius!r}")
    _check_int("seed", seed, None)
    G = canonical(nx.random_geometric_graph(n, radius, seed=seed))
    if not nx.is_connected(G):
        points = np.array([G.nodes[i]["pos"] for i in range(n)], dtype=float)
        G.add_edges_from((u, v) for u, v, length in _euclidean_mst(points) if length > radius)
        G = canonical(G)
    return _connected_or_raise(G, "random_geometric")


def _lattice(rows: int, cols: int, periodic: bool) -> nx.Graph:
    G = nx.grid_2d_graph(rows, cols, periodic=periodic)
    return canonical(nx.relabel_nodes(G, {(r, c): r * cols + c for r, c in G.nodes}))


def _redraw(
    draw: Callable[[int], nx.Graph], seed: int, max_attempts: int, what: str, hint: str
) -> nx.Graph:
    _check_int("seed", seed, None)
    _check_int("max_attempts", max_attempts, 1)
    for attempt in range(max_attempts):
        G = canonical(draw(seed if attempt == 0 else _derived_seed(seed, attempt)))
        if nx.is_connected(G):
            return G
    raise ValueError(f"{what}: no connected draw in {max_attempts} attempts; {hint}")


def _derived_seed(seed: int, attempt: int) -> int:
    entropy = [abs(seed), int(seed < 0), attempt]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint32)[0])


def _euclidean_mst(points: np.ndarray) -> list[tuple[int, int, float]]:
    """Prim's algorithm on the complete Euclidean graph: O(n^2) time, O(n) memory."""
    n = len(points)
    in_tree = np.zeros(n, dtype=bool)
    in_tree[0] = True
    best = np.linalg.norm(points - points[0], axis=1)
    parent = np.zeros(n, dtype=int)
    edges = []
    for _ in range(n - 1):
        candidates = np.where(in_tree, np.inf, best)
        v = int(np.argmin(candidates))
        edges.append((int(parent[v]), v, float(best[v])))
        in_tree[v] = True
        dist = np.linalg.norm(points - points[v], axis=1)
        closer = ~in_tree & (dist < best)
        best[closer] = dist[closer]
        parent[closer] = v
    return edges


def _connected_or_raise(G: nx.Graph, what: str) -> nx.Graph:
    if not nx.is_connected(G):  # pragma: no cover - guarded by construction
        raise ValueError(f"{what}: the graph came out disconnected")
    return G


def _check_int(name: str, value: object, minimum: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_probability(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")
