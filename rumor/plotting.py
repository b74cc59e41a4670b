"""Convergence plots of one or more runs, written as PNG files.

:func:`plot_runs` draws one panel per metric: training loss and test accuracy per node (thin,
translucent lines) with the mean over nodes (thick); model disagreement (the observer's
consensus distance on a log axis when ``cluster.jsonl`` has it, otherwise the nodes' mean
neighbour distance); and the cumulative traffic of the whole cluster. Several runs share the
panels, one colour per run, which makes algorithm comparisons a single picture.

matplotlib is imported inside the functions (Agg backend, no display), so importing this module
stays cheap.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rumor.runlog import X_AXES, Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes

DEFAULT_METRICS: tuple[str, ...] = ("loss", "accuracy", "consensus", "bytes")
DPI = 110
PANEL_SIZE_IN = (6.0, 4.0)
"""Width and height of one panel in inches; the figure is a grid of at most two columns."""

_TITLES = {
    "loss": "Training loss",
    "accuracy": "Test accuracy",
    "test_loss": "Test loss",
    "neighbour_distance": "Distance to neighbourhood average",
    "exchanges": "Exchanges",
    "alive": "Neighbours believed alive",
}
_YLABELS = {
    "loss": "loss (training batch)",
    "accuracy": "accuracy (fraction correct)",
    "test_loss": "loss (test set)",
    "neighbour_distance": "‖x − neighbourhood mean‖ (L2)",
    "exchanges": "exchanges (cumulative)",
    "alive": "neighbours",
}
_XLABELS = {
    "time": "wall time since run start (s)",
    "elapsed": "node clock (s)",
    "round": "round",
    "bytes": "traffic per node, in + out (bytes)",
}
_CONSENSUS_LABEL = "consensus distance (1/n)Σ‖xᵢ − x̄‖²"
_NEIGHBOUR_LABEL = "mean ‖x − neighbourhood mean‖ (L2)"


def figure_size(n_panels: int) -> tuple[float, float]:
    """Figure size in inches for ``n_panels`` panels (two columns once there are two or more)."""
    n = max(1, n_panels)
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    return PANEL_SIZE_IN[0] * cols, PANEL_SIZE_IN[1] * rows


def run_label(run: Run) -> str:
    """The legend entry of a run: its name, plus its algorithm when the name does not say it."""
    algorithm = run.algorithm
    if algorithm and algorithm.lower() not in run.name.lower():
        return f"{run.name} ({algorithm})"
    return run.name


def plot_runs(
    runs: Sequence[Run],
    out: str | Path,
    metrics: Sequence[str] = DEFAULT_METRICS,
    x: str = "time",
    per_node: bool = True,
    title: str | None = None,
    dpi: int = DPI,
    side_by_side: bool = False,
) -> Path:
    """Write a PNG with one panel per metric for ``runs`` to ``out`` and return its path.

    ``metrics`` are round-record fields (``loss``, ``accuracy``, ``test_loss``, ...) plus
    ``"consensus"`` and ``"bytes"``; ``x`` is one of ``time``, ``elapsed``, ``round``,
    ``bytes``. ``per_node=False`` draws only the means. Several runs share each panel
    (overlaid, one colour per run), or with ``side_by_side`` get one column each, a row per
    metric, y axes shared along a row so the columns compare at a glance.
    """
    if not runs:
        raise ValueError("no runs to plot")
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; expected one of {', '.join(X_AXES)}")
    metrics = list(metrics) or list(DEFAULT_METRICS)

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure on an Agg canvas: no pyplot state, no display, the caller's backend untouched.
    fig = Figure(figsize=figure_size(len(metrics)), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    cols = 1 if len(metrics) == 1 else 2
    rows = math.ceil(len(metrics) / cols)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    colours = _colours(len(runs))
    if side_by_side and len(runs) > 1:
        return _side_by_side(runs, out, metrics, x, per_node, title, dpi, colours)

    for ax, metric in zip(axes, metrics, strict=False):
        if metric == "consensus":
            _consensus_panel(ax, runs, colours, x, per_node)
        elif metric == "bytes":
            _bytes_panel(ax, runs, colours, x)
        else:
            _node_metric_panel(ax, runs, colours, metric, x, per_node)
        ax.grid(True, alpha=0.3, linewidth=0.6)
    for ax in axes[len(metrics) :]:
        ax.remove()

    _legend(axes[0], runs, colours, per_node)
    fig.suptitle(title or _default_title(runs), fontsize=12)

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def _side_by_side(
    runs: Sequence[Run],
    out: str | Path,
    metrics: list[str],
    x: str,
    per_node: bool,
    title: str | None,
    dpi: int,
    colours: list[Any],
) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = PANEL_SIZE_IN[0] * 0.8 * len(runs), PANEL_SIZE_IN[1] * 0.8 * len(metrics)
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(metrics), len(runs), squeeze=False, sharey="row")
    for row, metric in enumerate(metrics):
        for col, (run, colour) in enumerate(zip(runs, colours, strict=True)):
            ax = grid[row, col]
            if metric == "consensus":
                _consensus_panel(ax, [run], [colour], x, per_node)
            elif metric == "bytes":
                _bytes_panel(ax, [run], [colour], x)
            else:
                _node_metric_panel(ax, [run], [colour], metric, x, per_node)
            ax.grid(True, alpha=0.3, linewidth=0.6)
            if row == 0:
                ax.set_title(f"{run_label(run)}\n{ax.get_title()}", fontsize=10)
            if col > 0:
                ax.set_ylabel("")
    _legend(grid[0, 0], runs, colours, per_node)
    fig.suptitle(title or _default_title(runs), fontsize=12)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


# ---------------------------------------------------------------------- panels


def _node_metric_panel(
    ax: Axes, runs: Sequence[Run], colours: list[Any], metric: str, x: str, per_node: bool
) -> None:
    drawn = False
    for run, colour in zip(runs, colours, strict=True):
        series = run.series(metric, x)
        if per_node:
            alpha = _node_alpha(len(series))
            for xs, ys in series.values():
                ax.plot(xs, ys, color=colour, linewidth=0.8, alpha=alpha)
        mx, my = run.mean_series(metric, x)
        if len(mx):
            ax.plot(mx, my, color=colour, linewidth=2.2, label=run_label(run))
        drawn = drawn or bool(series)
    ax.set_title(_TITLES.get(metric, metric.replace("_", " ")))
    ax.set_ylabel(_YLABELS.get(metric, metric.replace("_", " ")))
    _x_axis(ax, x)
    if not drawn:
        _no_data(ax, metric)


def _consensus_panel(
    ax: Axes, runs: Sequence[Run], colours: list[Any], x: str, per_node: bool
) -> None:
    sources: set[str] = set()
    positive = False
    for run, colour in zip(runs, colours, strict=True):
        if run.has_consensus():
            sources.add("observer")
            mx, my = run.cluster_series("consensus_distance", x)
            label = f"{run_label(run)}: observer"
        else:
            if per_node:
                node_series = run.series("neighbour_distance", x).values()
                alpha = _node_alpha(len(node_series))
                for xs, ys in node_series:
                    keep = ys > 0
                    ax.plot(xs[keep], ys[keep], color=colour, linewidth=0.8, alpha=alpha)
            mx, my = run.mean_series("neighbour_distance", x)
            label = f"{run_label(run)}: mean neighbour distance"
            if len(mx):
                sources.add("neighbours")
        keep = my > 0  # a log axis cannot show zero (identical models)
        if keep.any():
            positive = True
            ax.plot(mx[keep], my[keep], color=colour, linewidth=2.2, label=label)
    if sources == {"observer"}:
        ax.set_title("Consensus distance (observer, cluster.jsonl)")
        ax.set_ylabel(_CONSENSUS_LABEL)
    elif sources == {"neighbours"}:
        ax.set_title("Mean neighbour distance (node records; no observer)")
        ax.set_ylabel(_NEIGHBOUR_LABEL)
    else:
        ax.set_title("Model disagreement (source per run in legend)")
        ax.set_ylabel("distance (see legend)")
    _x_axis(ax, x)
    if positive:
        ax.set_yscale("log")
        if len(sources) > 1 or len(runs) > 1:
            ax.legend(fontsize=7, loc="best")
    else:
        _no_data(ax, "consensus")


def _bytes_panel(ax: Axes, runs: Sequence[Run], colours: list[Any], x: str) -> None:
    from matplotlib.ticker import EngFormatter

    x_used = "time" if x == "bytes" else x
    drawn = False
    for run, colour in zip(runs, colours, strict=True):
        bx, by = run.total_bytes_series(x_used)
        if len(bx):
            ax.plot(bx, by, color=colour, linewidth=2.2, label=run_label(run))
            drawn = True
    ax.set_title("Cumulative traffic, all nodes")
    ax.set_ylabel("bytes in + out (all nodes)")
    ax.yaxis.set_major_formatter(EngFormatter(unit="B"))
    _x_axis(ax, x_used)
    if not drawn:
        _no_data(ax, "bytes")


# ---------------------------------------------------------------------- helpers


def _x_axis(ax: Axes, x: str) -> None:
    ax.set_xlabel(_XLABELS[x])
    if x == "bytes":
        from matplotlib.ticker import EngFormatter

        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))


def _no_data(ax: Axes, metric: str) -> None:
    ax.text(
        0.5,
        0.5,
        f"no {metric} data",
        transform=ax.transAxes,
        ha="center",
        va="center",
        color="0.5",
    )


def _node_alpha(n_nodes: int) -> float:
    return float(np.clip(3.0 / max(1, n_nodes), 0.08, 0.35))


def _colours(n: int) -> list[Any]:
    from matplotlib import colormaps

    if n <= 10:
        cmap = colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(i / (n - 1)) for i in range(n)]


def _legend(ax: Axes, runs: Sequence[Run], colours: list[Any], per_node: bool) -> None:
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], color=c, linewidth=2.2, label=f"{run_label(r)}, {len(r.nodes)} nodes")
        for r, c in zip(runs, colours, strict=True)
    ]
    if per_node:
        handles += [
            Line2D([], [], color="0.3", linewidth=2.2, label="mean over nodes"),
            Line2D([], [], color="0.3", linewidth=0.8, alpha=0.4, label="individual nodes"),
        ]
    ax.legend(handles=handles, fontsize=7, loc="best")


def _default_title(runs: Sequence[Run]) -> str:
    if len(runs) == 1:
        run = runs[0]
        return f"{run_label(run)}: {len(run.nodes)} nodes"
    names = ", ".join(r.name for r in runs[:4])
    more = f" and {len(runs) - 4} more" if len(runs) > 4 else ""
    return f"Comparison: {names}{more}"


# ---------------------------------------------------------------------- topology pictures

LAYOUTS: tuple[str, ...] = ("auto", "spring", "circular", "kamada-kawai", "spectral", "shell")


def draw_topology(
    G: Any,
    out: str | Path,
    values: dict[Any, float | None] | None = None,
    value_label: str = "",
    title: str | None = None,
    layout: str = "auto",
    seed: int = 0,
    down_edges: Sequence[tuple[Any, Any]] = (),
    dpi: int = DPI,
) -> Path:
    """Write a PNG of graph ``G`` to ``out``; nodes coloured by ``values`` when given.

    ``values`` maps node to a number (accuracy, round, loss ...); nodes without one are grey
    and a colour bar labelled ``value_label`` explains the rest. ``down_edges`` are drawn
    dashed red (a link one end believes down). ``layout="auto"`` picks a circle for rings
    and small graphs where every node has degree 2, Kamada-Kawai otherwise (spring layout
    beyond 200 nodes, where Kamada-Kawai gets slow).
    """
    import networkx as nx
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize, to_rgb
    from matplotlib.figure import Figure

    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    n = G.number_of_nodes()
    if n == 0:
        raise ValueError("cannot draw an empty graph")
    pos = _layout(G, layout, seed)
    side = float(np.clip(2.0 + 0.35 * math.sqrt(n) * 2, 5.0, 12.0))
    fig = Figure(figsize=(side + (1.2 if values else 0.0), side), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_axis_off()

    down = {frozenset(e) for e in down_edges}
    up_edges = [e for e in G.edges if frozenset(e) not in down]
    bad_edges = [e for e in G.edges if frozenset(e) in down]
    width = 1.6 if n <= 50 else 0.8
    nx.draw_networkx_edges(G, pos, edgelist=up_edges, ax=ax, width=width, edge_color="0.55")
    if bad_edges:
        nx.draw_networkx_edges(
            G, pos, edgelist=bad_edges, ax=ax, width=width, edge_color="tab:red", style="dashed"
        )

    nodes = list(G.nodes)
    size = float(np.clip(9000 / n, 40, 900))
    known = {v: x for v, x in (values or {}).items() if x is not None and math.isfinite(x)}
    if values:
        cmap = colormaps["viridis"]
        lo, hi = (min(known.values()), max(known.values())) if known else (0.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        norm = Normalize(lo, hi)
        colours = [cmap(norm(known[v])) if v in known else (0.8, 0.8, 0.8, 1.0) for v in nodes]
        from matplotlib.cm import ScalarMappable

        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.7)
        bar.set_label(value_label)
    else:
        colours = ["tab:blue"] * n
    nx.draw_networkx_nodes(
        G, pos, nodelist=nodes, ax=ax, node_color=colours, node_size=size, edgecolors="0.2"
    )
    if n <= 40:
        for v, colour in zip(nodes, colours, strict=True):
            r, g, b = to_rgb(colour)
            ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"
            x, y = pos[v]
            label = str(v).removeprefix("node-")
            ax.text(x, y, label, ha="center", va="center", fontsize=8, color=ink)
    ax.set_title(title or f"{n} nodes, {G.number_of_edges()} edges", fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, format="png")
    return out


def _layout(G: Any, layout: str, seed: int) -> dict[Any, Any]:
    import networkx as nx

    if layout == "auto":
        degrees = {d for _, d in G.degree}
        if degrees == {2} and nx.is_connected(G):
            layout = "circular"
        elif G.number_of_nodes() > 200 or not nx.is_connected(G):
            layout = "spring"
        else:
            layout = "kamada-kawai"
    if layout == "circular":
        # A ring drawn in ring order, not in the order the nodes were added.
        order = _cycle_order(G)
        return nx.circular_layout(G if order is None else _ordered(G, order))
    if layout == "kamada-kawai":
        return nx.kamada_kawai_layout(G)
    if layout == "spectral":
        return nx.spectral_layout(G)
    if layout == "shell":
        return nx.shell_layout(G)
    return nx.spring_layout(G, seed=seed)


def _cycle_order(G: Any) -> list[Any] | None:
    import networkx as nx

    try:
        return (
            [u for u, _ in nx.find_cycle(G)] if G.number_of_edges() == G.number_of_nodes() else None
        )
    except nx.NetworkXNoCycle:
        return None


def _ordered(G: Any, order: list[Any]) -> Any:
    import networkx as nx

    H = nx.Graph()
    H.add_nodes_from(order)
    H.add_nodes_from(G.nodes)
    H.add_edges_from(G.edges)
    return H
