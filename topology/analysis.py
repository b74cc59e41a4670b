"""One-call summary of a topology: size, degrees, distances and mixing speed."""

from __future__ import annotations

import math
from typing import Any

import networkx as nx

from rumor.topology.mixing import metropolis_hastings
from rumor.topology.spectral import algebraic_connectivity, dadao_constants, spectral_gap

__all__ = ["analyze"]


def analyze(G: nx.Graph) -> dict[str, Any]:
    """Return the numbers that describe how well gossip will run on `G`.

    Parameters
    ----------
    G : networkx.Graph
        A non-empty undirected graph.

    Returns
    -------
    dict
        With keys

        * ``n``, ``edges``: node and edge counts;
        * ``degree_min``, ``degree_mean``, ``degree_max``;
        * ``is_connected``, ``diameter``;
        * ``algebraic_connectivity``: second smallest eigenvalue of ``D - A``;
        * ``spectral_gap``: of the Metropolis-Hastings matrix
          (:func:`~rumor.topology.mixing.metropolis_hastings`);
        * ``chi_1``, ``chi_2``, ``lambda_mix``: DADAO's constants for uniform edge sampling
          (:mod:`rumor.topology.spectral`).

        Values that are undefined or infinite (a disconnected graph's diameter or
        ``chi_1``; anything about edges when there are none) are ``None``, so the dict
        converts to JSON as it is.

    Examples
    --------
    >>> report = analyze(nx.cycle_graph(4))
    >>> report["n"], report["edges"], report["diameter"], round(report["spectral_gap"], 4)
    (4, 4, 2, 0.6667)
    """
    n = G.number_of_nodes()
    if n == 0:
        raise ValueError("cannot analyze an empty graph")
    if G.is_directed():
        raise ValueError("analyze needs an undirected graph")
    degrees = [sum(1 for v in G[u] if v != u) for u in G]
    connected = nx.is_connected(G)
    edges = sum(degrees) // 2
    report: dict[str, Any] = {
        "n": n,
        "edges": edges,
        "degree_min": min(degrees),
        "degree_mean": sum(degrees) / n,
        "degree_max": max(degrees),
        "is_connected": connected,
        "diameter": nx.diameter(G) if connected else None,
        "algebraic_connectivity": algebraic_connectivity(G) if n > 1 else None,
        "spectral_gap": spectral_gap(metropolis_hastings(G)),
        "chi_1": None,
        "chi_2": None,
        "lambda_mix": None,
    }
    if edges:
        c1, c2 = dadao_constants(G)
        report["chi_1"], report["chi_2"] = _finite(c1), _finite(c2)
        report["lambda_mix"] = _finite(math.sqrt(2.0 * c1 * c2))
    return report


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
