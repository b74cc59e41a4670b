"""Reading a finished (or still running) run back from its metrics files, for plots and reports.

A run directory holds one ``node-<i>.metrics.jsonl`` per node (see :mod:`rumor.node.metrics`)
and, when an observer watched the cluster, a ``cluster.jsonl`` of ``observe`` lines carrying the
consensus distance. :func:`load_run` turns either into a :class:`Run`: round records per node,
cluster observations, and helpers that put the numbers on a common x axis:

* ``"time"``: wall-clock seconds since the run's first record (field ``t``), so nodes started at
  different moments line up;
* ``"elapsed"``: each node's own clock (field ``elapsed``; virtual time in simulations);
* ``"round"``: the node's round number;
* ``"bytes"``: the node's cumulative traffic, ``bytes_in + bytes_out``.

Files may be incomplete: torn last lines, undecodable bytes, missing or null fields and nodes
that never finished a round are all tolerated. This module needs numpy but not matplotlib.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

XAxis = Literal["time", "elapsed", "round", "bytes"]
X_AXES: tuple[str, ...] = ("time", "elapsed", "round", "bytes")

METRICS_SUFFIX = ".metrics.jsonl"
CLUSTER_FILE = "cluster.jsonl"

Series = tuple[np.ndarray, np.ndarray]


class RunLoadError(ValueError):
    """The path holds no metrics files (or does not exist)."""


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of one JSON-lines file; torn, undecodable or non-object lines are skipped."""
    out: list[dict[str, Any]] = []
    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
    return out


def number(record: dict[str, Any], key: str) -> float | None:
    """``record[key]`` as a finite float, or None (missing, null, NaN, not a number).

    ``"bytes"`` is derived as ``bytes_in + bytes_out`` (a missing side counts as 0, both missing
    gives None).
    """
    if key == "bytes":
        bin_, bout = number(record, "bytes_in"), number(record, "bytes_out")
        if bin_ is None and bout is None:
            return None
        return (bin_ or 0.0) + (bout or 0.0)
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _check_x(x: str) -> None:
    if x not in X_AXES:
        raise ValueError(f"unknown x axis {x!r}; expected one of {', '.join(X_AXES)}")


def _interp(xs: np.ndarray, ys: np.ndarray, grid: np.ndarray, before: float) -> np.ndarray:
    """Linear interpolation inside ``xs``' range, the last value after it, ``before`` before it."""
    out = np.interp(grid, xs, ys)
    out[grid < xs[0]] = before
    return out


def _sorted_by_x(xs: np.ndarray, ys: np.ndarray) -> Series:
    order = np.argsort(xs, kind="stable")
    return xs[order], ys[order]


@dataclass
class Run:
    """The records of one run.

    ``nodes`` maps node id to its ``round`` records in file order (an empty list for a node that
    never finished a round); ``events`` keeps every record of each node (``start``, ``finished``,
    ``stop``, ...); ``cluster`` holds the observer's ``observe`` lines.
    """

    name: str
    nodes: dict[str, list[dict[str, Any]]]
    cluster: list[dict[str, Any]] = field(default_factory=list)
    events: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    path: Path | None = None

    # ------------------------------------------------------------------ basics

    @property
    def t0(self) -> float | None:
        """Wall time of the run's first record (any node event or observation), if any has ``t``."""
        times = [t for rec in self._all_records() if (t := number(rec, "t")) is not None]
        return min(times) if times else None

    @property
    def algorithm(self) -> str | None:
        """The mixing rule named in the nodes' ``start`` records (comma-joined if they differ)."""
        names = sorted(
            {
                str(rec["algorithm"])
                for recs in self.events.values()
                for rec in recs
                if rec.get("event") == "start" and rec.get("algorithm")
            }
        )
        return ",".join(names) if names else None

    @property
    def rounds_max(self) -> int | None:
        """The highest round any node logged, or None if no node finished a round."""
        rounds = [
            r
            for recs in self.nodes.values()
            for rec in recs
            if (r := number(rec, "round")) is not None
        ]
        return int(max(rounds)) if rounds else None

    def has_consensus(self) -> bool:
        """Whether an observer recorded at least one consensus distance."""
        return any(number(rec, "consensus_distance") is not None for rec in self.cluster)

    def _all_records(self) -> Iterable[dict[str, Any]]:
        for recs in self.events.values():
            yield from recs
        for recs in self.nodes.values():
            yield from recs
        yield from self.cluster

    # ------------------------------------------------------------------ summaries

    def final(self) -> dict[str, Any]:
        """Where the run ended.

        Per node (``"nodes"``): last round, last non-null accuracy and loss, total bytes (the
        largest ``bytes_in + bytes_out`` in its round or ``stop`` records). For the cluster:
        ``mean_accuracy`` (mean of the nodes' last accuracies), ``mean_loss``, ``total_bytes``,
        ``rounds_max``, ``consensus_distance`` (the observer's last value, None if not observed)
        and ``neighbour_distance`` (mean of the nodes' last neighbour distances, if logged).
        """
        per_node: dict[str, dict[str, Any]] = {}
        for node, rounds in self.nodes.items():
            extra = [
                rec for rec in self.events.get(node, []) if rec.get("event") in ("finished", "stop")
            ]
            last_round = next(
                (int(r) for rec in reversed(rounds) if (r := number(rec, "round")) is not None),
                None,
            )
            byte_counts = [
                b for rec in [*rounds, *extra] if (b := number(rec, "bytes")) is not None
            ]
            per_node[node] = {
                "round": last_round,
                "accuracy": _last(rounds, "accuracy", fallback=extra),
                "loss": _last(rounds, "loss"),
                "test_loss": _last(rounds, "test_loss", fallback=extra),
                "neighbour_distance": _last(rounds, "neighbour_distance"),
                "bytes": int(max(byte_counts)) if byte_counts else None,
            }

        def mean_of(key: str) -> float | None:
            values = [v[key] for v in per_node.values() if v[key] is not None]
            return sum(values) / len(values) if values else None

        byte_totals = [v["bytes"] for v in per_node.values() if v["bytes"] is not None]
        return {
            "name": self.name,
            "nodes": per_node,
            "n_nodes": len(self.nodes),
            "rounds_max": self.rounds_max,
            "mean_accuracy": mean_of("accuracy"),
            "mean_loss": mean_of("loss"),
            "neighbour_distance": mean_of("neighbour_distance"),
            "total_bytes": sum(byte_totals) if byte_totals else None,
            "consensus_distance": _last(self.cluster, "consensus_distance"),
            "observed_mean_accuracy": _last(self.cluster, "mean_accuracy"),
        }

    # ------------------------------------------------------------------ series

    def _x_of(self, record: dict[str, Any], x: str, t0: float | None) -> float | None:
        if x == "time":
            t = number(record, "t")
            return None if t is None or t0 is None else t - t0
        return number(record, x)

    def series(self, metric: str, x: XAxis | str = "time") -> dict[str, Series]:
        """Per node, ``(xs, ys)`` of a round-record field (or ``"bytes"``) against ``x``.

        Records where either value is missing are dropped, points are sorted by x, and nodes
        without any point are left out.
        """
        _check_x(x)
        t0 = self.t0
        out: dict[str, Series] = {}
        for node, rounds in self.nodes.items():
            pairs = [
                (xv, yv)
                for rec in rounds
                if (xv := self._x_of(rec, x, t0)) is not None
                and (yv := number(rec, metric)) is not None
            ]
            if pairs:
                arr = np.asarray(pairs, dtype=float)
                out[node] = _sorted_by_x(arr[:, 0], arr[:, 1])
        return out

    def mean_series(self, metric: str, x: XAxis | str = "time", points: int = 200) -> Series:
        """The mean over nodes of ``metric`` against ``x``.

        For ``x="round"`` nodes are aligned on round numbers (each round averages the nodes that
        logged it). Otherwise every node is interpolated linearly onto a common grid of
        ``points`` values spanning all nodes; a node counts from its first point on and keeps
        its last value after its last point (a finished node keeps its model).
        """
        per_node = self.series(metric, x)
        if not per_node:
            return np.empty(0), np.empty(0)
        if x == "round":
            sums: dict[float, list[float]] = {}
            for xs, ys in per_node.values():
                for r, y in zip(xs, ys, strict=True):
                    sums.setdefault(float(r), []).append(float(y))
            rounds = np.asarray(sorted(sums), dtype=float)
            return rounds, np.asarray([np.mean(sums[r]) for r in rounds], dtype=float)
        grid = _grid(per_node.values(), points)
        stacked = np.vstack([_interp(xs, ys, grid, np.nan) for xs, ys in per_node.values()])
        counts = np.sum(~np.isnan(stacked), axis=0)
        keep = counts > 0
        means = np.nansum(stacked[:, keep], axis=0) / counts[keep]
        return grid[keep], means

    def total_bytes_series(self, x: XAxis | str = "time", points: int = 200) -> Series:
        """Cumulative ``bytes_in + bytes_out`` summed over all nodes, against ``x``.

        Each node contributes 0 before its first record and its last count after its last one.
        For ``x="round"`` the grid is the rounds any node logged; ``x="bytes"`` is not meaningful
        here and falls back to ``"time"``.
        """
        if x == "bytes":
            x = "time"
        per_node = self.series("bytes", x)
        if not per_node:
            return np.empty(0), np.empty(0)
        if x == "round":
            grid = np.unique(np.concatenate([xs for xs, _ in per_node.values()]))
            total = np.zeros_like(grid)
            for xs, ys in per_node.values():
                # step: the count at the latest round <= r
                idx = np.searchsorted(xs, grid, side="right") - 1
                total += np.where(idx >= 0, ys[np.clip(idx, 0, None)], 0.0)
            return grid, total
        grid = _grid(per_node.values(), points)
        total = np.sum([_interp(xs, ys, grid, 0.0) for xs, ys in per_node.values()], axis=0)
        return grid, np.asarray(total, dtype=float)

    def cluster_series(self, metric: str = "consensus_distance", x: XAxis | str = "time") -> Series:
        """An observer field (default ``consensus_distance``) against ``x``.

        ``"time"`` uses the observation's wall time relative to :attr:`t0`, ``"elapsed"`` the
        observer's own clock, ``"round"`` the midpoint of ``round_min`` and ``round_max``, and
        ``"bytes"`` the cluster's total traffic at that moment (interpolated from the nodes).
        """
        _check_x(x)
        t0 = self.t0
        xs: list[float] = []
        ys: list[float] = []
        for rec in self.cluster:
            y = number(rec, metric)
            if y is None:
                continue
            if x == "round":
                lo, hi = number(rec, "round_min"), number(rec, "round_max")
                known = [v for v in (lo, hi) if v is not None]
                xv = sum(known) / len(known) if known else None
            elif x in ("time", "bytes"):
                xv = self._x_of(rec, "time", t0)
            else:
                xv = number(rec, "elapsed")
            if xv is not None:
                xs.append(xv)
                ys.append(y)
        xa, ya = _sorted_by_x(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float))
        if x == "bytes" and len(xa):
            bx, by = self.total_bytes_series("time", points=max(200, 4 * len(xa)))
            if not len(bx):
                return np.empty(0), np.empty(0)
            xa = _interp(bx, by, xa, 0.0)
        return xa, ya


def _last(
    records: Sequence[dict[str, Any]],
    key: str,
    fallback: Sequence[dict[str, Any]] = (),
) -> float | None:
    """The last non-null ``key`` in ``records``, else in ``fallback``."""
    for recs in (records, fallback):
        for rec in reversed(recs):
            value = number(rec, key)
            if value is not None:
                return value
    return None


def _grid(series: Iterable[Series], points: int) -> np.ndarray:
    series = list(series)
    lo = min(float(xs[0]) for xs, _ in series)
    hi = max(float(xs[-1]) for xs, _ in series)
    if hi <= lo:
        return np.asarray([lo], dtype=float)
    return np.linspace(lo, hi, max(2, points))


def _node_id(path: Path, records: Sequence[dict[str, Any]]) -> str:
    for rec in records:
        node = rec.get("node")
        if isinstance(node, str) and node:
            return node
    name = path.name
    return name[: -len(METRICS_SUFFIX)] if name.endswith(METRICS_SUFFIX) else path.stem


def _is_cluster_file(path: Path) -> bool:
    return path.name == CLUSTER_FILE or path.name.endswith("." + CLUSTER_FILE)


def load_run(path: str | Path | Sequence[str | Path], name: str | None = None) -> Run:
    """Load a run directory, one metrics file, or a list of files (``cluster.jsonl`` included).

    A directory contributes every ``*.metrics.jsonl`` in it and its ``cluster.jsonl`` if any.
    The run's name defaults to the directory's name (for files, their parent directory's).
    Raises :class:`RunLoadError` if no node metrics file is found.
    """
    if isinstance(path, (str, Path)):
        root = Path(path)
        if root.is_dir():
            files = sorted(root.glob("*" + METRICS_SUFFIX), key=lambda p: _natural_key(p.name))
            cluster_file = root / CLUSTER_FILE
            if cluster_file.is_file():
                files.append(cluster_file)
            default_name = root.resolve().name
            where: Path | None = root
        elif root.is_file():
            files, default_name, where = [root], root.resolve().parent.name, root
        else:
            raise RunLoadError(f"{root}: no such file or directory")
    else:
        files = [Path(p) for p in path]
        default_name = files[0].resolve().parent.name if files else "run"
        where = files[0].parent if files else None

    nodes: dict[str, list[dict[str, Any]]] = {}
    events: dict[str, list[dict[str, Any]]] = {}
    cluster: list[dict[str, Any]] = []
    for file in files:
        records = read_jsonl(file)
        if _is_cluster_file(file):
            cluster.extend(rec for rec in records if rec.get("event", "observe") == "observe")
            continue
        node = _node_id(file, records)
        events.setdefault(node, []).extend(records)
        nodes.setdefault(node, []).extend(rec for rec in records if rec.get("event") == "round")
    if not nodes:
        raise RunLoadError(f"{where or 'run'}: no node metrics files (*{METRICS_SUFFIX})")
    ordered = {k: nodes[k] for k in sorted(nodes, key=_natural_key)}
    return Run(
        name=name or default_name,
        nodes=ordered,
        cluster=cluster,
        events={k: events[k] for k in ordered},
        path=where,
    )
