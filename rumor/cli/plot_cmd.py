"""``rumor plot``: convergence plots of one or more run directories, plus a final summary.

Writes a PNG (loss, accuracy, consensus and traffic panels by default) and prints, per run, the
final mean accuracy and consensus distance, as text or as one JSON object.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rumor.runlog import Run

FORMATS = ("text", "json")


def register(app: typer.Typer) -> None:
    """Add the ``plot`` command to ``app``."""
    app.command("plot")(plot)


def plot(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run directories holding node-<i>.metrics.jsonl (and cluster.jsonl)."),
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out", "-o", help="PNG to write (default: <first run dir>/convergence.png)."
        ),
    ] = None,
    x: Annotated[
        str, typer.Option("--x", help="x axis: time (wall s), round, bytes, or elapsed.")
    ] = "time",
    metrics: Annotated[
        str,
        typer.Option("--metrics", help="Comma-separated panels: loss,accuracy,consensus,bytes."),
    ] = "loss,accuracy,consensus,bytes",
    per_node: Annotated[
        bool, typer.Option("--per-node/--no-per-node", help="Draw each node's curve too.")
    ] = True,
    fmt: Annotated[str, typer.Option("--format", help="Output: text or json.")] = "text",
    side_by_side: Annotated[
        bool,
        typer.Option(
            "--side-by-side/--overlay",
            help="Several runs: one column each, or overlaid in shared panels (default).",
        ),
    ] = False,
) -> None:
    """Plot convergence of one or more runs (several runs are compared side by side)."""
    from rumor.runlog import X_AXES, RunLoadError, load_run

    if x not in X_AXES:
        raise typer.BadParameter(f"expected one of {', '.join(X_AXES)}", param_hint="--x")
    if fmt not in FORMATS:
        raise typer.BadParameter(f"expected one of {', '.join(FORMATS)}", param_hint="--format")
    panels = [m.strip() for m in metrics.split(",") if m.strip()]
    if not panels:
        raise typer.BadParameter("no metrics given", param_hint="--metrics")

    runs = []
    for run_dir in run_dirs:
        try:
            runs.append(load_run(run_dir))
        except RunLoadError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    known = {"consensus", "bytes"} | {
        key
        for run in runs
        for records in run.nodes.values()
        for rec in records
        for key, value in rec.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool)
    }
    unknown = [m for m in panels if m not in known]
    if unknown:
        raise typer.BadParameter(
            f"no such metric in the runs: {', '.join(unknown)} "
            f"(available: {', '.join(sorted(known - {'t', 'elapsed'}))})",
            param_hint="--metrics",
        )

    from rumor.plotting import plot_runs

    first = run_dirs[0]
    target = (
        out
        if out is not None
        else (first if first.is_dir() else first.parent) / ("convergence.png")
    )
    written = plot_runs(
        runs, target, metrics=panels, x=x, per_node=per_node, side_by_side=side_by_side
    )

    summaries = [_summary(run) for run in runs]
    if fmt == "json":
        typer.echo(json.dumps({"out": str(written), "runs": summaries}, indent=2))
        return
    typer.echo(str(written))
    for s in summaries:
        typer.echo(
            f"{s['name']}: {s['nodes']} nodes, {_rounds(s['rounds_max'])}, "
            f"final mean accuracy {_fmt(s['final_mean_accuracy'], '.4f')}, "
            f"final consensus distance {_consensus_text(s)}"
        )


def _summary(run: Run) -> dict[str, Any]:
    final = run.final()
    return {
        "name": run.name,
        "final_mean_accuracy": final["mean_accuracy"],
        "final_consensus_distance": final["consensus_distance"],
        "final_neighbour_distance": final["neighbour_distance"],
        "nodes": final["n_nodes"],
        "rounds_max": final["rounds_max"],
        "total_bytes": final["total_bytes"],
    }


def _fmt(value: float | None, spec: str) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return format(value, spec)


def _rounds(rounds_max: int | None) -> str:
    return "no rounds" if rounds_max is None else f"up to round {rounds_max}"


def _consensus_text(summary: dict[str, Any]) -> str:
    if summary["final_consensus_distance"] is not None:
        return _fmt(summary["final_consensus_distance"], ".3g")
    if summary["final_neighbour_distance"] is not None:
        nd = _fmt(summary["final_neighbour_distance"], ".3g")
        return f"not observed (mean neighbour distance {nd})"
    return "not observed"
