"""``rumor topology``: inspect, save and print the mixing matrix of a topology spec.

``analyze`` reports size, degrees, diameter and mixing constants; ``build`` writes the graph
to an edge list, GraphML or JSON file; ``mixing`` prints a gossip matrix. Specs are those of
:func:`rumor.topology.build` (``ring:8``, ``torus:4x4``, ``ws:16:4:0.2``, a saved file ...).
:mod:`rumor.topology` is imported inside the commands, so registering them costs nothing.
"""

from __future__ import annotations

import json
import math
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    import networkx as nx

topology_app = typer.Typer(
    name="topology",
    help="Build, inspect and save communication topologies.",
    no_args_is_help=True,
)


class TopologyFormat(str, Enum):
    table = "table"
    json = "json"


class MixingKind(str, Enum):
    metropolis = "metropolis"
    max_degree = "max-degree"
    uniform = "uniform"


_SPEC_HELP = "Topology spec, e.g. ring:8, torus:4x4, ws:16:4:0.2, or a graph file."
_N_HELP = "Node count, for specs that leave it out (checked against specs that give it)."


def register(app: typer.Typer) -> None:
    from rumor.cli.topology_rates import register_rates

    register_rates(topology_app)
    app.add_typer(topology_app, name="topology")


@topology_app.command("analyze")
def analyze_cmd(
    spec: str = typer.Argument(..., help=_SPEC_HELP),
    n: int | None = typer.Option(None, "--n", "-n", help=_N_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed for random families."),
    fmt: TopologyFormat = typer.Option(
        TopologyFormat.table, "--format", help="Output as a table or JSON."
    ),
) -> None:
    """Size, degrees, diameter, spectral gap and DADAO constants of a topology."""
    from rumor.topology import analyze

    report = analyze(_build(spec, n, seed))
    if fmt == TopologyFormat.json:
        typer.echo(json.dumps(report, indent=2))
        return
    table = Table(title=f"topology {spec}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, _show(value))
    Console().print(table)


@topology_app.command("build")
def build_cmd(
    spec: str = typer.Argument(..., help=_SPEC_HELP),
    out: Path = typer.Option(
        ..., "--out", "-o", help="File to write: .edgelist/.txt, .graphml or .json."
    ),
    n: int | None = typer.Option(None, "--n", "-n", help=_N_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed for random families."),
) -> None:
    """Build a topology and save it; the file extension picks the format."""
    from rumor.topology import save

    G = _build(spec, n, seed)
    try:
        save(G, out)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {G.number_of_nodes()} nodes, {G.number_of_edges()} edges to {out}")


@topology_app.command("mixing")
def mixing_cmd(
    spec: str = typer.Argument(..., help=_SPEC_HELP),
    kind: MixingKind = typer.Option(MixingKind.metropolis, "--kind", help="Weighting rule."),
    n: int | None = typer.Option(None, "--n", "-n", help=_N_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed for random families."),
    fmt: TopologyFormat = typer.Option(
        TopologyFormat.table, "--format", help="Output as a table or JSON."
    ),
) -> None:
    """Print a topology's gossip mixing matrix (row i: how node i averages)."""
    from rumor.topology import mixing_matrix

    G = _build(spec, n, seed)
    try:
        W = mixing_matrix(G, kind.value)
    except ValueError as exc:
        _fail(str(exc))
    nodes = list(G)
    if fmt == TopologyFormat.json:
        typer.echo(json.dumps({"kind": kind.value, "nodes": nodes, "matrix": W.tolist()}))
        return
    table = Table(title=f"{kind.value} mixing matrix of {spec}")
    table.add_column("")
    for v in nodes:
        table.add_column(str(v), justify="right")
    for u, row in zip(nodes, W, strict=True):
        table.add_row(str(u), *(f"{x:.4g}" if x else "0" for x in row))
    Console().print(table)


def _build(spec: str, n: int | None, seed: int) -> nx.Graph:
    from rumor.topology import build

    try:
        return build(spec, n=n, seed=seed)
    except (ValueError, OSError) as exc:
        _fail(str(exc))


def _fail(message: str) -> NoReturn:
    typer.echo(f"rumor topology: {message}", err=True)
    raise typer.Exit(2)


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return str(value)
