"""Topology specs: the short strings that name a graph on the command line and in configs.

A spec is ``family[:size][:param...]`` or the path of a saved graph::

    ring:8  path:5  star:6  complete:5  exponential:16
    grid:4x4  torus:4x4  hypercube:3
    erdos_renyi:16:0.3  regular:16:4  ba:32:2  ws:16:4:0.2  geometric:32:0.3
    graphs/office.edgelist  graphs/office.graphml  graphs/office.json

The size may be left out when the node count is given separately (``build("ring", n=8)``,
``build("ws:4:0.2", n=16)``); if both are given they must agree. ``grid`` and ``torus``
accept ``RxC`` or a node count (laid out as squarely as it divides); ``hypercube`` takes a
dimension, or a power-of-two node count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import networkx as nx

from rumor.topology import builders
from rumor.topology.io import FORMATS, load

__all__ = ["FAMILIES", "build"]


@dataclass(frozen=True)
class _Family:
    usage: str
    params: tuple[type, ...]
    make: Callable[..., nx.Graph]
    size: Callable[[str], Any] = int
    size_from_n: Callable[[int], Any] = int
    random: bool = False


def _grid_size(token: str) -> tuple[int, int]:
    if "x" in token.lower():
        rows, cols = token.lower().split("x", 1)
        return int(rows), int(cols)
    return _grid_from_n(int(token))


def _grid_from_n(n: int) -> tuple[int, int]:
    if n < 1:
        raise ValueError(f"a grid needs at least one node, got {n}")
    rows = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return rows, n // rows


def _dim_from_n(n: int) -> int:
    if n < 1 or n & (n - 1):
        raise ValueError(f"a hypercube has a power of two nodes, got {n}")
    return n.bit_length() - 1


_RING = _Family("ring:N", (), builders.ring)
_PATH = _Family("path:N", (), builders.path)
_STAR = _Family("star:N", (), builders.star)
_COMPLETE = _Family("complete:N", (), builders.complete)
_EXPONENTIAL = _Family("exponential:N", (), builders.exponential)
_GRID = _Family("grid:RxC", (), lambda rc: builders.grid_2d(*rc), _grid_size, _grid_from_n)
_TORUS = _Family("torus:RxC", (), lambda rc: builders.torus_2d(*rc), _grid_size, _grid_from_n)
_HYPERCUBE = _Family("hypercube:DIM", (), builders.hypercube, int, _dim_from_n)
_ER = _Family("erdos_renyi:N:P", (float,), builders.erdos_renyi, random=True)
_REGULAR = _Family("regular:N:D", (int,), builders.random_regular, random=True)
_BA = _Family("ba:N:M", (int,), builders.barabasi_albert, random=True)
_WS = _Family("ws:N:K:P", (int, float), builders.watts_strogatz, random=True)
_GEOMETRIC = _Family("geometric:N:RADIUS", (float,), builders.random_geometric, random=True)

FAMILIES: dict[str, _Family] = {
    "ring": _RING,
    "cycle": _RING,
    "path": _PATH,
    "line": _PATH,
    "star": _STAR,
    "complete": _COMPLETE,
    "full": _COMPLETE,
    "exponential": _EXPONENTIAL,
    "exp": _EXPONENTIAL,
    "grid": _GRID,
    "grid_2d": _GRID,
    "torus": _TORUS,
    "torus_2d": _TORUS,
    "hypercube": _HYPERCUBE,
    "erdos_renyi": _ER,
    "er": _ER,
    "gnp": _ER,
    "regular": _REGULAR,
    "random_regular": _REGULAR,
    "ba": _BA,
    "barabasi_albert": _BA,
    "ws": _WS,
    "watts_strogatz": _WS,
    "geometric": _GEOMETRIC,
    "random_geometric": _GEOMETRIC,
}
"""Spec family names (and aliases) -> how to build them."""


def build(spec: str, n: int | None = None, seed: int = 0) -> nx.Graph:
    """Return the graph a spec names.

    Parameters
    ----------
    spec : str
        ``family[:size][:param...]`` (see the module docstring; names are case-insensitive
        and ``-`` may replace ``_``) or a path ending in ``.edgelist``, ``.txt``,
        ``.graphml`` or ``.json``.
    n : int, optional
        Node count, used when the spec leaves the size out and checked against it otherwise.
    seed : int
        Seed for the random families; ignored by the others.

    Returns
    -------
    networkx.Graph
        Nodes ``0..n-1``. Graphs of the families are connected; graphs read from files are
        returned as they are.

    Raises
    ------
    ValueError
        For an unknown family, malformed or impossible parameters, or disagreeing sizes.

    Examples
    --------
    >>> build("grid:2x3").number_of_nodes()
    6
    >>> sorted(build("ring", n=4).edges())
    [(0, 1), (0, 3), (1, 2), (2, 3)]
    >>> build("ws:4:0.2", n=16, seed=1).number_of_edges()
    32
    """
    text = spec.strip()
    if Path(text).suffix.lower() in FORMATS:
        return _check_n(load(text), n, spec)
    name, *args = text.split(":")
    key = name.strip().lower().replace("-", "_")
    if key not in FAMILIES:
        known = ", ".join(sorted({f.usage.split(":")[0] for f in FAMILIES.values()}))
        raise ValueError(
            f"unknown topology {name!r} in spec {spec!r}; families: {known}, "
            f"or a file ({', '.join(FORMATS)})"
        )
    family = FAMILIES[key]
    args = [a.strip() for a in args]
    if len(args) == len(family.params) + 1:
        size = _parse(family.size, args[0], spec, family)
        params = args[1:]
    elif len(args) == len(family.params) and n is not None:
        size = _parse(family.size_from_n, n, spec, family)
        params = args
    else:
        where = "" if n is not None else " (or leave N out and pass n)"
        raise ValueError(f"spec {spec!r} does not match {family.usage}{where}")
    values = [_parse(t, a, spec, family) for t, a in zip(family.params, params, strict=True)]
    kwargs = {"seed": seed} if family.random else {}
    try:
        G = family.make(size, *values, **kwargs)
    except ValueError as exc:
        raise ValueError(f"topology {spec!r}: {exc}") from exc
    return _check_n(G, n, spec)


def _parse(convert: Callable[[Any], Any], token: Any, spec: str, family: _Family) -> Any:
    try:
        return convert(token)
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"bad value {token!r} in topology spec {spec!r} ({family.usage}): {exc}"
        ) from exc


def _check_n(G: nx.Graph, n: int | None, spec: str) -> nx.Graph:
    if n is not None and G.number_of_nodes() != n:
        raise ValueError(f"topology {spec!r} has {G.number_of_nodes()} nodes, but n={n}")
    return G
