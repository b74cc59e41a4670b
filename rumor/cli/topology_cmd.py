"""``rumor topology``: inspect, save and print the mixing matrix of a topology spec.

``analyze`` reports size, degrees, diameter and mixing constants (``--edges``: per edge, its
Metropolis weight, effective resistance and DADAO rate); ``build`` writes the graph to an edge
list, GraphML or JSON file; ``mixing`` prints a gossip matrix; ``draw`` writes a PNG of the
graph, its nodes coloured by a live cluster's or a run's metrics. Specs are those of
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
    edges: bool = typer.Option(
        False, "--edges", help="Also per edge: mixing weight, effective resistance, DADAO rate."
    ),
) -> None:
    """Size, degrees, diameter, spectral gap and DADAO constants of a topology."""
    from rumor.topology import analyze

    G = _build(spec, n, seed)
    report = analyze(G)
    per_edge = _edge_report(G) if edges else None
    if fmt == TopologyFormat.json:
        typer.echo(
            json.dumps(report if per_edge is None else {**report, "per_edge": per_edge}, indent=2)
        )
        return
    table = Table(title=f"topology {spec}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, _show(value))
    console = Console()
    console.print(table)
    if per_edge is not None:
        rows = Table(title="per edge")
        for col in ("edge", "W_uv", "R_eff(u, v)", "DADAO rate"):
            rows.add_column(col, justify="right")
        for e in per_edge:
            rows.add_row(
                f"{e['u']} - {e['v']}",
                _show(e["weight"]),
                _show(e["effective_resistance"]),
                _show(e["dadao_rate"]),
            )
        console.print(rows)


def _edge_report(G: nx.Graph) -> list[dict[str, Any]]:
    """Per edge: its Metropolis-Hastings weight W_uv, effective resistance and DADAO rate.

    Rates are lambda_mix * w_e with uniform w_e = 1/|E| (None when the graph is
    disconnected); an edge of high effective resistance is a bottleneck for mixing.
    """
    import networkx as nx

    from rumor.topology import dadao_rates, effective_resistance, metropolis_hastings

    index = {v: i for i, v in enumerate(G)}
    W = metropolis_hastings(G)
    connected = G.number_of_edges() > 0 and nx.is_connected(G)
    rates = dadao_rates(G)[1] if connected else {}
    out = []
    for u, v in sorted(G.edges, key=lambda e: (min(e), max(e))):
        if u == v:
            continue
        a, b = (u, v) if u < v else (v, u)
        rate = rates.get((a, b))
        resistance = effective_resistance(G, a, b) if connected else None
        out.append(
            {
                "u": a,
                "v": b,
                "weight": float(W[index[a], index[b]]),
                "effective_resistance": resistance,
                "dadao_rate": rate,
            }
        )
    return out


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


class ColorBy(str, Enum):
    accuracy = "accuracy"
    round = "round"
    loss = "loss"
    neighbour_distance = "neighbour_distance"
    staleness = "staleness"
    none = "none"


_COLOR_LABELS = {
    "accuracy": "test accuracy",
    "round": "round",
    "loss": "training loss",
    "neighbour_distance": "‖x − neighbourhood mean‖",
    "staleness": "seconds since last round",
}


@topology_app.command("draw")
def draw_cmd(
    spec: str = typer.Argument(None, help=_SPEC_HELP + " Optional with --run-dir or --live."),
    out: Path = typer.Option(..., "--out", "-o", help="PNG file to write."),
    run_dir: Path = typer.Option(
        None, "--run-dir", help="A run folder: graph from its node configs, colours from its logs."
    ),
    live: list[str] = typer.Option(
        None, "--live", help="Colour from live nodes (host:port; repeat). See also --live-run."
    ),
    live_run: bool = typer.Option(
        False, "--live-run", help="Colour from the live nodes of --run-dir (addresses.json)."
    ),
    color: ColorBy = typer.Option(ColorBy.accuracy, "--color", help="What colours the nodes."),
    layout: str = typer.Option("auto", "--layout", help="auto, spring, circular, kamada-kawai..."),
    n: int | None = typer.Option(None, "--n", "-n", help=_N_HELP),
    seed: int = typer.Option(0, "--seed", help="Seed for random families and the layout."),
    timeout: float = typer.Option(2.0, help="Seconds to wait for each live node."),
    fmt: TopologyFormat = typer.Option(
        TopologyFormat.table, "--format", help="What to print: the file, or JSON of the values."
    ),
) -> None:
    """Draw a topology as a PNG, nodes coloured by a live cluster's or a run's state.

    Links a live node believes down are dashed red.
    """
    from rumor.plotting import LAYOUTS, draw_topology

    if layout not in LAYOUTS:
        _fail(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    addresses = list(live or [])
    if live_run:
        if run_dir is None:
            _fail("--live-run needs --run-dir")
        addresses += _run_addresses(run_dir)
    if spec is not None:
        G = _relabel(_build(spec, n, seed))
    elif run_dir is not None:
        G = _graph_of_run(run_dir)
    elif not addresses:
        _fail("give a topology spec, --run-dir or --live")
    else:
        G = None  # from the live nodes' peer lists

    values: dict[str, float | None] = {}
    down: list[tuple[str, str]] = []
    source = "none"
    if addresses:
        import asyncio

        from rumor.cli.status_cmd import query

        rows = [r for r in asyncio.run(query(addresses, timeout)) if "error" not in r]
        if not rows:
            _fail("no live node answered")
        if G is None:
            G = _graph_of_status(rows)
        values = {r["node_id"]: _status_value(r, color.value) for r in rows}
        down = [
            (r["node_id"], p["node_id"]) for r in rows for p in r.get("peers", []) if not p["alive"]
        ]
        source = "live"
    elif run_dir is not None and color != ColorBy.none:
        from rumor.runlog import RunLoadError, load_run

        try:
            final = load_run(run_dir).final()["nodes"]
        except RunLoadError as exc:
            _fail(str(exc))
        if color == ColorBy.staleness:
            _fail("--color staleness needs a live cluster (--live or --live-run)")
        values = {node: final[node][color.value] for node in final}
        source = "log"
    assert G is not None
    if color == ColorBy.none:
        values = {}
    values = {k: v for k, v in values.items() if k in G}
    title = spec or (run_dir.name if run_dir is not None else "live cluster")
    if values:
        title += f", colour: {_COLOR_LABELS[color.value]} ({source})"
    written = draw_topology(
        G,
        out,
        values=values or None,
        value_label=_COLOR_LABELS.get(color.value, ""),
        title=title,
        layout=layout,
        seed=seed,
        down_edges=down,
    )
    if fmt == TopologyFormat.json:
        report = {
            "out": str(written),
            "nodes": sorted(G.nodes),
            "edges": sorted(sorted(e) for e in G.edges),
            "color": color.value,
            "source": source,
            "values": values,
            "down_edges": down,
        }
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(str(written))


def _relabel(G: nx.Graph) -> nx.Graph:
    """Integer nodes ``i`` become ``node-i``, the names launchers give processes."""
    import networkx as nx

    from rumor.cluster import node_name

    if all(isinstance(v, int) for v in G):
        return nx.relabel_nodes(G, {v: node_name(v) for v in G})
    return G


def _run_addresses(run_dir: Path) -> list[str]:
    try:
        return list(json.loads((run_dir / "addresses.json").read_text()).values())
    except (OSError, ValueError) as exc:
        _fail(f"cannot read {run_dir / 'addresses.json'}: {exc}")


def _graph_of_run(run_dir: Path) -> nx.Graph:
    """The graph a run was started with, from its node configs' peer lists."""
    import networkx as nx

    from rumor.config import load

    G = nx.Graph()
    for path in sorted(run_dir.glob("*.toml")):
        try:
            cfg = load(path)
        except (OSError, ValueError) as exc:
            _fail(f"{path}: {exc}")
        G.add_node(cfg.node_id)
        G.add_edges_from((cfg.node_id, peer) for peer in cfg.peers)
    if G.number_of_nodes() == 0:
        _fail(f"{run_dir}: no node configs (*.toml); give a topology spec")
    return G


def _graph_of_status(rows: list[dict[str, Any]]) -> nx.Graph:
    import networkx as nx

    G = nx.Graph()
    for row in rows:
        G.add_node(row["node_id"])
        G.add_edges_from((row["node_id"], p["node_id"]) for p in row.get("peers", []))
    return G


def _status_value(row: dict[str, Any], color: str) -> float | None:
    if color == "staleness":
        since = float(row.get("since_round_s", -1.0))
        return since if since >= 0 else None
    if color in ("accuracy", "loss", "round"):
        value = row.get(color)
        return None if value is None else float(value)
    return None  # neighbour distance: not in Status; use a run's logs or `rumor watch`
