"""``rumor topology rates SPEC``: DADAO's gossip rates on a topology, uniform or optimized.

Prints chi_1, chi_2 and ``lambda_mix = sqrt(2 chi_1 chi_2)`` of the uniform edge weights
(Nabli & Oyallon, ICML 2023, whose code uses them) and, with ``--optimize``, of the weights
:func:`rumor.algorithms.edge_rates.optimize_weights` finds (lower ``chi_1 chi_2``: fewer
communications per unit of time), with every edge's rate. Wire it in with
``register_rates(topology_app)``.
"""

from __future__ import annotations

import json
import math
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from rumor.cli.options import FormatOpt, OutputFormat

_SPEC_HELP = "Topology spec, e.g. ring:8, torus:4x4, ws:16:4:0.2, or a graph file."


def register_rates(topology_app: typer.Typer) -> None:
    """Add the ``rates`` command to ``rumor topology``."""
    topology_app.command("rates")(rates_cmd)


def rates_cmd(
    spec: str = typer.Argument(..., help=_SPEC_HELP),
    optimize: bool = typer.Option(False, "--optimize", help="Also minimise chi_1 * chi_2."),
    n: int | None = typer.Option(None, "--n", "-n", help="Node count, for specs without it."),
    seed: int = typer.Option(0, "--seed", help="Seed for random families."),
    fmt: OutputFormat = FormatOpt,
) -> None:
    """DADAO's total gossip rate and per-edge rates (uniform, and optimized with --optimize)."""
    from rumor.algorithms.edge_rates import optimize_weights, uniform_plan
    from rumor.topology import build

    try:
        G = build(spec, n=n, seed=seed)
        plans = {"uniform": uniform_plan(G)}
        if optimize:
            plans["optimized"] = optimize_weights(G)
    except (ValueError, OSError) as exc:
        typer.echo(f"rumor topology rates: {exc}", err=True)
        raise typer.Exit(2) from exc
    report: dict[str, Any] = {"spec": spec, "nodes": G.number_of_nodes()}
    report.update({name: plan.to_dict() for name, plan in plans.items()})
    if fmt == OutputFormat.json:
        typer.echo(json.dumps(report, indent=2))
        return
    console = Console()
    summary = Table(title=f"DADAO rates on {spec}")
    summary.add_column("weights")
    for col in ("chi_1", "chi_2", "chi_1 chi_2", "lambda_mix", "method"):
        summary.add_column(col, justify="right" if col != "method" else "left")
    for name, plan in plans.items():
        summary.add_row(
            name,
            _num(plan.chi_1),
            _num(plan.chi_2),
            _num(plan.product),
            _num(plan.lambda_mix),
            plan.method,
        )
    console.print(summary)
    best = plans.get("optimized", plans["uniform"])
    edges = Table(title=f"per-edge rates ({'optimized' if optimize else 'uniform'})")
    for col in ("edge", "weight", "rate per time unit"):
        edges.add_column(col, justify="right")
    for (u, v), w in best.weights.items():
        edges.add_row(f"{u} - {v}", _num(w), _num(best.lambda_mix * w))
    console.print(edges)


def _num(x: float) -> str:
    return f"{x:.6g}" if math.isfinite(x) else str(x)
