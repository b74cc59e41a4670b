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
) -> Path:
    """Write a PNG with one panel per metric for ``runs`` to ``out`` and return its path.

    ``metrics`` are round-record fields (``loss``, ``accuracy``, ``test_loss``, ...) plus
    ``"consensus"`` and ``"bytes"``; ``x`` is one of ``time``, ``elapsed``, ``round``,
    ``bytes``. ``per_node=False`` draws only the means.
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
