"""Reading and writing topologies: edge lists, GraphML and node-link JSON.

The format follows the file name (``.edgelist`` or ``.txt``, ``.graphml``, ``.json``) unless
given. Loaded graphs go through :func:`rumor.topology.canonical.canonical`, so they are
simple, undirected and numbered ``0..n-1`` whatever labels the file used.

What is kept:

* edge list: the edges, an edge's ``weight`` when every edge has one, and isolated nodes
  (written as one-label lines). Lines of ``networkx.write_edgelist`` with an attribute dict
  (``0 1 {'weight': 2.0}``) are read too.
* GraphML: scalar (bool, int, float, str) node, edge and graph attributes.
* JSON: the same, plus lists of scalars (such as the ``pos`` of geometric graphs).
"""

from __future__ import annotations

import ast
import json
import math
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np

from rumor.topology.canonical import canonical

__all__ = ["FORMATS", "load", "save", "topology_format"]

FORMATS = {".edgelist": "edgelist", ".txt": "edgelist", ".graphml": "graphml", ".json": "json"}
"""File suffix -> format name."""


def topology_format(path: str | os.PathLike[str]) -> str:
    """Return the format name (``"edgelist"``, ``"graphml"`` or ``"json"``) for a file name.

    Parameters
    ----------
    path : str or path-like
        A file name; only its suffix matters (case-insensitive).

    Returns
    -------
    str

    Raises
    ------
    ValueError
        For a suffix that is not a topology format.

    Examples
    --------
    >>> topology_format("graphs/ring.GraphML")
    'graphml'
    """
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        known = ", ".join(FORMATS)
        raise ValueError(f"{os.fspath(path)!r}: unknown topology file type (use one of {known})")
    return FORMATS[suffix]


def save(G: nx.Graph, path: str | os.PathLike[str], format: str | None = None) -> None:
    """Write `G` to `path`.

    Parameters
    ----------
    G : networkx graph
        The topology; node labels are written as they are (use integer labels, as the
        builders produce, for files other programs will read).
    path : str or path-like
        Destination file; missing parent folders are created.
    format : {"edgelist", "graphml", "json"}, optional
        Defaults to the one the file suffix names.

    Examples
    --------
    >>> import tempfile
    >>> from rumor.topology.builders import ring
    >>> with tempfile.TemporaryDirectory() as d:
    ...     save(ring(5), f"{d}/ring.json")
    ...     sorted(load(f"{d}/ring.json").edges()) == sorted(ring(5).edges())
    True
    """
    fmt = _format(path, format)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "edgelist":
        path.write_text(_edgelist_text(G), encoding="utf-8")
    elif fmt == "graphml":
        nx.write_graphml(_with_attributes(G, lists=False), path)
    else:
        path.write_text(json.dumps(_node_link(G), indent=1) + "\n", encoding="utf-8")


def load(path: str | os.PathLike[str], format: str | None = None) -> nx.Graph:
    """Read a topology from `path`, numbered ``0..n-1``.

    Integer labels (and strings holding integers) keep their order; other labels are
    numbered in sorted order and kept in the node attribute ``"label"``.

    Parameters
    ----------
    path : str or path-like
        Source file.
    format : {"edgelist", "graphml", "json"}, optional
        Defaults to the one the file suffix names.

    Returns
    -------
    networkx.Graph
        Not necessarily connected: files are taken as they are.

    Raises
    ------
    ValueError
        For a malformed file.
    FileNotFoundError
        When `path` does not exist.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = Path(d, "g.txt").write_text("# hosts\\nalpha beta\\nbeta gamma\\n")
    ...     G = load(Path(d, "g.txt"))
    >>> sorted(G.edges()), G.nodes[0]["label"]
    ([(0, 1), (1, 2)], 'alpha')
    """
    fmt = _format(path, format)
    path = Path(path)
    if fmt == "edgelist":
        G = _parse_edgelist(path.read_text(encoding="utf-8"), path)
    elif fmt == "graphml":
        if not path.exists():
            raise FileNotFoundError(path)
        try:
            G = nx.read_graphml(path)
        except Exception as exc:  # the XML and GraphML parsers raise many types
            raise ValueError(f"{path}: not a readable GraphML file ({exc})") from exc
    else:
        G = _parse_node_link(path.read_text(encoding="utf-8"), path)
    return canonical(G, label_attribute="label")


def _format(path: str | os.PathLike[str], format: str | None) -> str:
    if format is None:
        return topology_format(path)
    if format not in set(FORMATS.values()):
        raise ValueError(f"unknown topology format {format!r}; use edgelist, graphml or json")
    return format


def _edgelist_text(G: nx.Graph) -> str:
    for u in G.nodes:
        if not str(u) or "#" in str(u) or any(c.isspace() for c in str(u)):
            raise ValueError(f"node label {u!r} cannot be written to an edge list")
    weighted = G.number_of_edges() > 0 and all(
        _is_number(d.get("weight")) for _, _, d in G.edges(data=True)
    )
    lines = [f"# rumor topology: {G.number_of_nodes()} nodes, {G.number_of_edges()} edges"]
    lines += [str(u) for u in G.nodes if G.degree(u) == 0]
    for u, v, d in G.edges(data=True):
        lines.append(f"{u} {v} {float(d['weight'])!r}" if weighted else f"{u} {v}")
    return "\n".join(lines) + "\n"


def _parse_edgelist(text: str, path: Path) -> nx.Graph:
    G = nx.Graph()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        tokens = line.split(maxsplit=2)
        if len(tokens) == 1:
            G.add_node(tokens[0])
            continue
        u, v = tokens[0], tokens[1]
        attrs: dict[str, Any] = {}
        if len(tokens) == 3:
            rest = tokens[2].strip()
            try:
                if rest.startswith("{"):
                    attrs = dict(ast.literal_eval(rest))
                else:
                    (weight,) = rest.split()
                    attrs = {"weight": float(weight)}
            except (ValueError, SyntaxError, TypeError) as exc:
                raise ValueError(
                    f"{path}:{number}: expected 'u v', 'u v weight' or 'u v {{attrs}}', "
                    f"got {raw.strip()!r}"
                ) from exc
        G.add_edge(u, v, **attrs)
    return G


def _node_link(G: nx.Graph) -> dict[str, Any]:
    H = _with_attributes(G, lists=True)
    return {
        "directed": False,
        "multigraph": False,
        "graph": dict(H.graph),
        "nodes": [{"id": _json_label(u), **d} for u, d in H.nodes(data=True)],
        "edges": [
            {"source": _json_label(u), "target": _json_label(v), **d}
            for u, v, d in H.edges(data=True)
        ],
    }


def _parse_node_link(text: str, path: Path) -> nx.Graph:
    try:
        data = json.loads(text)
        nodes = data["nodes"]
        edges = data["edges"] if "edges" in data else data["links"]
        G = nx.Graph()
        G.graph.update(data.get("graph") or {})
        for node in nodes:
            attrs = {k: v for k, v in node.items() if k != "id"}
            G.add_node(_hashable(node["id"]), **attrs)
        for edge in edges:
            attrs = {k: v for k, v in edge.items() if k not in ("source", "target", "key")}
            G.add_edge(_hashable(edge["source"]), _hashable(edge["target"]), **attrs)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path}: not a node-link JSON graph ({exc!r})") from exc
    return G


def _with_attributes(G: nx.Graph, lists: bool) -> nx.Graph:
    """A copy of `G` with only the attributes the target format can hold."""

    def keep(attrs: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in attrs.items():
            value = _plain(value, lists)
            if value is not None:
                out[str(key)] = value
        return out

    H = nx.Graph()
    H.graph.update(keep(G.graph))
    H.add_nodes_from((u, keep(d)) for u, d in G.nodes(data=True))
    H.add_edges_from((u, v, keep(d)) for u, v, d in G.edges(data=True))
    return H


def _plain(value: Any, lists: bool) -> Any:
    """`value` as a plain scalar (or list of scalars when `lists`), else None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if lists and isinstance(value, (list, tuple, np.ndarray)):
        items = [_plain(v, lists=False) for v in value]
        return items if all(v is not None for v in items) else None
    return None


def _json_label(u: Hashable) -> Any:
    if isinstance(u, np.generic):
        u = u.item()
    return u if isinstance(u, (int, str)) else str(u)


def _hashable(value: Any) -> Hashable:
    return tuple(value) if isinstance(value, list) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
