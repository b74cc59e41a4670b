"""``rumor watch``: a live table of a running cluster (or one JSON snapshot with ``--once``).

The table refreshes in place (rich's ``Live``, no flicker): per node its round, exchanges,
loss, accuracy, distance to its neighbourhood average, bytes/s in and out, neighbours up and
down and staleness; under it a cluster line with the consensus distance and progress toward
``--target-accuracy`` or ``--target-consensus``. What the numbers mean is in
:mod:`rumor.watch`. Ctrl-C exits cleanly (code 0); so does ``--duration`` running out, or
every node having finished (unless ``--no-exit-when-done``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from rumor.cli.options import (
    FormatOpt,
    OutputFormat,
    TlsDirOpt,
    TokenFileOpt,
    client_security,
)

if TYPE_CHECKING:
    from rich.console import RenderableType

    from rumor.watch import Target


def register(app: typer.Typer) -> None:
    app.command("watch")(watch)


def watch(
    address: list[str] = typer.Argument(None, help="host:port of nodes to watch."),
    run_dir: Path = typer.Option(None, "--run-dir", help="A `rumor cluster up` run folder."),
    interval: float = typer.Option(1.0, "--interval", help="Seconds between refreshes."),
    duration: float = typer.Option(
        None, "--duration", help="Stop after this many seconds (default: until Ctrl-C)."
    ),
    once: bool = typer.Option(False, "--once", help="One snapshot, then exit."),
    models: bool = typer.Option(
        True, "--models/--no-models", help="Pull models for distances (costs one model per node)."
    ),
    target_accuracy: float = typer.Option(
        None, "--target-accuracy", help="Progress toward this mean test accuracy."
    ),
    target_consensus: float = typer.Option(
        None, "--target-consensus", help="Progress toward this consensus distance."
    ),
    exit_when_done: bool = typer.Option(
        True, "--exit-when-done/--no-exit-when-done", help="Stop once every node has finished."
    ),
    timeout: float = typer.Option(2.0, help="Seconds to wait for each node's status."),
    tls_dir: Path = TlsDirOpt,
    token_file: Path = TokenFileOpt,
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Watch a running cluster converge: a live table, or JSON (one line per refresh)."""
    from rumor.watch import Target

    targets = list(address or [])
    if run_dir is not None:
        try:
            targets += list(json.loads((run_dir / "addresses.json").read_text()).values())
        except (OSError, ValueError) as exc:
            _fail(f"cannot read {run_dir / 'addresses.json'}: {exc}")
    if not targets:
        _fail("give node addresses or --run-dir")
    if interval <= 0:
        _fail("--interval must be > 0")
    if duration is not None and duration <= 0:
        _fail("--duration must be > 0")
    try:
        target = Target(accuracy=target_accuracy, consensus=target_consensus)
    except ValueError as exc:
        _fail(str(exc))
    if target.accuracy is not None and target.consensus is not None:
        _fail("give --target-accuracy or --target-consensus, not both")
    security = client_security(tls_dir, token_file, "watch")
    # Ctrl-C: the table stays on screen as it was last drawn, and the exit code is 0.
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(
            _run(
                targets,
                interval,
                duration,
                once,
                models,
                target,
                exit_when_done,
                timeout,
                fmt,
                security,
            )
        )


async def _run(
    targets: list[str],
    interval: float,
    duration: float | None,
    once: bool,
    models: bool,
    target: Target,
    exit_when_done: bool,
    timeout: float,
    fmt: OutputFormat,
    security: Any = None,
) -> None:
    from rumor.watch import Watcher

    async with Watcher(
        targets, timeout=timeout, models=models, target=target, security=security
    ) as watcher:
        if once:
            # Two looks `interval` apart, so that the rates cover a real window.
            await watcher.snapshot()
            await asyncio.sleep(interval)
            snap = await watcher.snapshot()
            if fmt == OutputFormat.json:
                typer.echo(json.dumps(snap, indent=2))
            else:
                from rich.console import Console

                Console().print(render(snap))
            return
        end = None if duration is None else time.monotonic() + duration
        if fmt == OutputFormat.json:
            await _loop(watcher, interval, end, exit_when_done, lambda s: typer.echo(json.dumps(s)))
            return
        from rich.live import Live

        with Live(render(None), auto_refresh=False, transient=False) as live:

            def draw(snap: dict[str, Any]) -> None:
                live.update(render(snap), refresh=True)

            await _loop(watcher, interval, end, exit_when_done, draw)


async def _loop(
    watcher: Any, interval: float, end: float | None, exit_when_done: bool, show: Any
) -> None:
    while True:
        started = time.monotonic()
        snap = await watcher.snapshot()
        show(snap)
        cluster = snap["cluster"]
        if exit_when_done and cluster["reachable"] and cluster["finished"] == cluster["reachable"]:
            return
        if end is not None and time.monotonic() >= end:
            return
        pause = max(0.0, interval - (time.monotonic() - started))
        if end is not None:
            pause = min(pause, max(0.0, end - time.monotonic()))
        await asyncio.sleep(pause)


def render(snap: dict[str, Any] | None) -> RenderableType:
    """The table of one snapshot, with the cluster line as its caption."""
    from rich.table import Table

    table = Table(title="rumor watch", caption_justify="left")
    columns = (
        "node",
        "round",
        "exch",
        "loss",
        "acc",
        "dist→nbhd",
        "in/s",
        "out/s",
        "peers",
        "stale s",
        "",
    )
    for col in columns:
        table.add_column(
            col, justify="left" if col in {"node", ""} else "right", no_wrap=col == "node"
        )
    if snap is None:
        table.caption = "waiting for the first status..."
        return table
    for node in snap["nodes"]:
        if "error" in node:
            table.add_row(node["address"], *["-"] * 9, "[red]unreachable")
            continue
        down = node["peers_down"]
        peers = f"{node['peers_up']}↑ {down}↓" if down else f"{node['peers_up']}↑"
        state = "[green]finished" if node["finished"] else ""
        stale = node["staleness_s"]
        table.add_row(
            node["node_id"],
            str(node["round"]),
            str(node["exchanges"]),
            _num(node["loss"], ".4f"),
            _num(node["accuracy"], ".3f"),
            _num(node["neighbour_distance"], ".3g"),
            _rate(node["in_bps"]),
            _rate(node["out_bps"]),
            f"[red]{peers}" if down else peers,
            f"[yellow]{stale:.1f}" if stale is not None and stale > 10 else _num(stale, ".1f"),
            state,
        )
    table.caption = _cluster_line(snap["cluster"], snap["elapsed"])
    return table


def _cluster_line(c: dict[str, Any], elapsed: float) -> str:
    parts = [
        f"cluster: {c['reachable']}/{c['nodes']} reachable, {c['finished']} finished",
        f"rounds {c['round_min']}–{c['round_max']}" if c["round_min"] is not None else "",
        f"mean acc {_num(c['mean_accuracy'], '.3f')}",
        f"consensus distance {_num(c['consensus_distance'], '.3g')}",
        f"traffic {_rate(c['bytes_per_s'])}",
        f"{elapsed:.0f} s",
    ]
    line = " | ".join(p for p in parts if p)
    t = c.get("target")
    if t:
        frac = t["progress"]
        bar = _bar(frac)
        goal = f"{t['metric']} {'≥' if t['metric'] == 'accuracy' else '≤'} {t['goal']:g}"
        status = "[green]reached" if t["reached"] else f"{_num(frac, '.0%')}"
        line += f"\ntarget {goal}: {bar} {status}"
    return line


def _bar(fraction: float | None, width: int = 20) -> str:
    if fraction is None:
        return "·" * width
    full = round(fraction * width)
    return "█" * full + "·" * (width - full)


def _rate(bps: float | None) -> str:
    if bps is None:
        return "-"
    for unit, scale in (("MB/s", 1e6), ("kB/s", 1e3)):
        if bps >= scale:
            return f"{bps / scale:.1f} {unit}"
    return f"{bps:.0f} B/s"


def _num(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _fail(message: str) -> Any:
    typer.echo(f"rumor watch: {message}", err=True)
    raise typer.Exit(2)
