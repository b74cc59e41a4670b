"""``rumor cluster up``: N real node processes on this machine from one topology spec.

Shows a live table while the cluster runs, survives nodes that crash (they are shown as
down; the rest go on), and tears every process down on completion, Ctrl-C, SIGTERM or
SIGHUP. The run folder keeps each node's config, log and metrics, the observer's
``cluster.jsonl`` and a convergence plot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Coroutine
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import typer

from rumor.cli import options
from rumor.cli.options import FormatOpt, OutputFormat

cluster_app = typer.Typer(help="Local clusters of real node processes.", no_args_is_help=True)

T = TypeVar("T")

#: What stops ``cluster up`` in order: Ctrl-C, ``kill``/``timeout``/CI, a closed terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def register(app: typer.Typer) -> None:
    app.add_typer(cluster_app, name="cluster")


@cluster_app.command("up")
def up(
    nodes: int = typer.Option(8, "--nodes", "-n"),
    topology: str = typer.Option("ring"),
    algorithm: str = typer.Option("dpsgd"),
    param: list[str] = typer.Option(None, "--param", "-p", help="Rule parameter key=value."),
    rounds: int = typer.Option(30),
    dataset: str = typer.Option("digits"),
    partition: str = typer.Option(
        None,
        help="iid, dirichlet:ALPHA[:MIN], shards:K. Default: dirichlet:0.5 for a labelled "
        "dataset, iid for regression (label skew needs class labels).",
    ),
    model: str = typer.Option("mlp"),
    lr: float = typer.Option(0.05),
    momentum: float = typer.Option(0.9, help="SGD momentum (local optimizer state)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    seed: int = typer.Option(0),
    init: str = typer.Option("shared", help="shared or independent initial weights."),
    eval_every: int = typer.Option(1, "--eval-every"),
    host: str = typer.Option("127.0.0.1", help="Address every node listens on."),
    run_dir: Path = typer.Option(None, "--run-dir", help="Default: runs/<timestamp>."),
    refresh: float = typer.Option(0.5, help="Seconds between table refreshes."),
    observe_every: float = typer.Option(0.5, "--observe-every", help="Consensus pulls (s)."),
    timeout: float = typer.Option(900.0, help="Stop the cluster after this many seconds."),
    plot: bool = typer.Option(True, help="Write convergence.png at the end."),
    sybils: int = typer.Option(0, "--sybils", help="Sybil identities of one attacker."),
    attack: str = typer.Option("label-flip", "--attack", help="label-flip or backdoor."),
    attack_edges: int = typer.Option(
        None, "--attack-edges", help="Honest nodes linked to a Sybil (default: one per Sybil)."
    ),
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Start a local cluster, watch it converge, tear it down.

    With ``--sybils K``, K more processes run one attacker's identities (``--attack``),
    attached to the honest ``--topology`` through ``--attack-edges`` edges.

    Ctrl-C, SIGTERM (kill, timeout, CI) and SIGHUP (a closed terminal) stop every node
    (SIGTERM, then SIGKILL after 10 s), write summary.json without the plot and exit with
    128 + the signal number: 130, 143, 129. Nodes also stop by themselves when this
    command dies any other way, even by SIGKILL. Other exit codes: 0 done, 1 every node
    failed, 2 bad options.
    """
    from rumor.algorithms.attacks import attacked_configs
    from rumor.cluster import build_graph, free_ports
    from rumor.config import NodeConfig
    from rumor.local_cluster import LocalCluster

    try:
        partition = check_partition(dataset, partition, nodes + (1 if sybils else 0), seed)
    except (ValueError, OSError) as exc:
        typer.echo(f"rumor cluster up: {exc}", err=True)
        raise typer.Exit(2) from exc
    base = options.apply(
        NodeConfig(linger=timeout),
        options.training_overrides(
            algorithm=algorithm,
            param=param,
            rounds=rounds,
            dataset=dataset,
            partition=partition,
            model=model,
            lr=lr,
            momentum=momentum,
            batch_size=batch_size,
            seed=seed,
            init=init,
            eval_every=eval_every,
        ),
    )
    graph = build_graph(topology, nodes, seed)
    ports = free_ports(nodes + max(sybils, 0), host)
    try:
        # the rule's prepare hook derives cluster-wide constants (DADAO: L, mu from the data)
        configs = attacked_configs(
            graph, base, lambda i: f"{host}:{ports[i]}", sybils, attack, attack_edges, seed
        )
    except ValueError as exc:
        what = "--sybils/--attack" if sybils else f"--algorithm {algorithm}"
        typer.echo(f"rumor cluster up: {what}: {exc}", err=True)
        raise typer.Exit(2) from exc
    run_dir = run_dir or Path("runs") / time.strftime("%Y-%m-%dT%H-%M-%S")
    cluster = LocalCluster(configs, run_dir)
    initial_cd = _initial_consensus(configs)
    progress: dict[str, Any] = {}
    with StopSignals() as signals:
        try:
            run = drive(
                cluster, refresh, observe_every, timeout, fmt == OutputFormat.table, progress
            )
            report = asyncio.run(signals.guard(run))
        finally:
            codes = cluster.stop()
    if signals.received is not None:
        raise typer.Exit(_stopped(signals.received, report or progress, codes, run_dir, initial_cd))
    assert report is not None
    report["initial_consensus_distance"] = initial_cd
    report["exit_codes"] = codes
    report["run_dir"] = str(run_dir)
    if plot:
        report["plot"] = str(_plot(run_dir))
    (run_dir / "summary.json").write_text(json.dumps(report, indent=2))
    if fmt == OutputFormat.json:
        typer.echo(json.dumps(report, indent=2))
    else:
        typer.echo(
            f"mean accuracy {_f(report['mean_accuracy'])}, consensus distance "
            f"{_f(report['consensus_distance'])} -> run folder {run_dir}"
        )
    if codes and all(code != 0 for code in codes.values()):
        # nothing ran: a crash at start-up in every node (their logs say why)
        typer.echo(
            f"rumor cluster up: every node failed (exit codes {set(codes.values())}); see "
            f"{run_dir}/node-*.log",
            err=True,
        )
        raise typer.Exit(1)


class StopSignals:
    """Turns SIGINT, SIGTERM and SIGHUP into an orderly stop of the run, while in effect.

    The first signal cancels the coroutine given to :meth:`guard` from inside its event loop,
    so the run stops at an ``await``, never halfway through starting a node; the caller's
    ``finally`` then stops the nodes. Later signals (a second Ctrl-C) are ignored: the
    teardown must finish to leave no node behind, and it is bounded by its grace period.
    The previous handlers come back on exit.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._old: dict[int, Any] = {}
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    async def guard(self, coro: Coroutine[Any, Any, T]) -> T | None:
        """``await coro``, or None once a stop signal has cancelled it."""
        if self.received is not None:
            coro.close()
            return None
        self._loop, self._task = asyncio.get_running_loop(), asyncio.current_task()
        try:
            return await coro
        except asyncio.CancelledError:
            if self.received is None:
                raise
            return None
        finally:
            self._task = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            return
        self.received = signum
        if self._task is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self._task.cancel)


def _stopped(
    signum: int,
    report: dict[str, Any],
    codes: dict[str, int | None],
    run_dir: Path,
    initial_cd: float,
) -> int:
    """Write what is known after a stop signal, say so on stderr; the exit code, 128+signum.

    No plot (the caller of ``timeout`` or a CI runner waits, then kills: be quick; ``rumor
    plot`` draws it later) and nothing on stdout; the line goes straight to file descriptor
    2, so a closed terminal (SIGHUP) cannot turn the exit into a traceback.
    """
    name = signal.Signals(signum).name
    report = {
        **report,
        "stopped_by": name,
        "initial_consensus_distance": initial_cd,
        "exit_codes": codes,
        "run_dir": str(run_dir),
    }
    with contextlib.suppress(OSError):
        (run_dir / "summary.json").write_text(json.dumps(report, indent=2))
    stopped = sum(code is not None for code in codes.values())
    left = [nid for nid, code in codes.items() if code is None]
    line = f"rumor cluster up: stopped by {name}; {stopped} nodes stopped"
    if left:
        line += f"; still running: {', '.join(left)}"
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())
    return 128 + signum


def check_partition(dataset: str, partition: str | None, nodes: int, seed: int) -> str:
    """The partition spec to run with: ``partition`` once it is known to split ``dataset``
    over ``nodes`` nodes, or the default that fits the dataset when it is None.

    Label skew (``dirichlet``, ``shards``) needs class labels, so a regression dataset (the
    least-squares problems of ``dadao`` and ``diging``) defaults to ``iid``. Raises
    ValueError with what to pass instead, before any process starts.
    """
    from rumor.node.data import get_dataset
    from rumor.node.data import partition as split

    data = get_dataset(dataset, seed=seed)
    labelled = data.num_classes is not None
    spec = partition or ("dirichlet:0.5" if labelled else "iid")
    try:
        split(spec, data.y_train, nodes, seed=seed)
    except ValueError as exc:
        hint = "" if labelled else f" ({dataset!r} has no class labels: use --partition iid)"
        raise ValueError(f"{exc}{hint}") from None
    return spec


def _initial_consensus(configs: list[Any]) -> float:
    """Consensus distance of the nodes' initial models, rebuilt here from their configs."""
    from rumor.api import make_trainer
    from rumor.node.data import get_dataset, partition
    from rumor.node.observe import consensus_distance

    first = configs[0]
    dataset = get_dataset(first.dataset, seed=first.seed)
    parts = partition(first.partition, dataset.y_train, first.n_nodes, seed=first.seed)
    return consensus_distance([make_trainer(c, dataset, parts).model.state_dict() for c in configs])


def _plot(run_dir: Path) -> Path:
    from rumor.plotting import plot_runs
    from rumor.runlog import load_run

    return plot_runs([load_run(run_dir)], run_dir / "convergence.png", x="time")


async def drive(
    cluster: Any,
    refresh: float,
    observe_every: float,
    timeout: float,
    live: bool,
    progress: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run the cluster to completion while showing progress; returns the final report.

    ``progress``, if given, holds the report so far after every observation: what is left
    to write when a signal cuts the run short.
    """
    from rich.console import Console
    from rich.live import Live

    from rumor.local_cluster import Observer

    cluster.start()
    observer = Observer(cluster.addresses(), cluster.run_dir / "cluster.jsonl")
    console = Console(stderr=True)
    started = time.monotonic()
    last_models = 0.0
    obs = None
    first_cd = None
    try:
        live_ctx = Live(console=console, refresh_per_second=4, transient=False) if live else None
        if live_ctx is not None:
            live_ctx.start()
        try:
            while time.monotonic() - started < timeout:
                now = time.monotonic()
                pull = now - last_models >= observe_every
                obs = await observer.observe(with_models=pull)
                if pull:
                    last_models = now
                    if first_cd is None and obs.consensus_distance is not None:
                        first_cd = obs.consensus_distance
                codes = cluster.returncodes()
                if progress is not None:
                    progress.update(_report(cluster, obs, first_cd, started))
                view = _render(obs, codes, cluster.restarts)
                if live_ctx is not None:
                    live_ctx.update(view)
                elif pull:
                    console.print(_line(obs, codes))
                reachable = [r for r in obs.statuses if "error" not in r]
                if not cluster.running():
                    break
                if reachable and all(r.get("finished") for r in reachable):
                    obs = await observer.observe(with_models=True)
                    if live_ctx is not None:
                        live_ctx.update(_render(obs, cluster.returncodes(), cluster.restarts))
                    break
                await asyncio.sleep(refresh)
        finally:
            if live_ctx is not None:
                live_ctx.stop()
    finally:
        await observer.close()
    return _report(cluster, obs, first_cd, started)


def _report(cluster: Any, obs: Any, first_cd: float | None, started: float) -> dict[str, Any]:
    rows = [r for r in (obs.statuses if obs else []) if "error" not in r]
    return {
        "nodes": len(cluster.configs),
        "mean_accuracy": obs.mean_accuracy if obs else None,
        "consensus_distance": obs.consensus_distance if obs else None,
        "first_consensus_distance": first_cd,
        "rounds": {r["node_id"]: r["round"] for r in rows},
        "elapsed_s": time.monotonic() - started,
    }


def _render(obs: Any, codes: dict[str, int | None], restarts: dict[str, int]) -> Any:
    from rich.table import Table

    table = Table(
        title=f"rumor cluster — {obs.elapsed:5.1f} s",
        caption=(
            f"mean accuracy {_f(obs.mean_accuracy)}   "
            f"consensus distance {_f(obs.consensus_distance)}"
        ),
    )
    for col in ("node", "state", "round", "loss", "accuracy", "in MB", "out MB", "peers up"):
        table.add_column(col, justify="left" if col in {"node", "state"} else "right")
    by_addr = {r["address"]: r for r in obs.statuses}
    for (nid, code), row in zip(codes.items(), by_addr.values(), strict=False):
        if "error" in row:
            state = "[red]down" if code is not None else "[yellow]unreachable"
            if code is not None:
                state += f" (exit {code})"
            table.add_row(nid, state, "-", "-", "-", "-", "-", "-")
            continue
        peers = row.get("peers", [])
        state = "done" if row.get("finished") else "[green]running"
        if restarts.get(nid):
            state += f" (restarted {restarts[nid]}x)"
        table.add_row(
            row.get("node_id", nid),
            state,
            str(row["round"]),
            _f(row.get("loss")),
            _f(row.get("accuracy")),
            f"{row['bytes_in'] / 1e6:.1f}",
            f"{row['bytes_out'] / 1e6:.1f}",
            f"{sum(1 for p in peers if p.get('alive'))}/{len(peers)}",
        )
    return table


def _line(obs: Any, codes: dict[str, int | None]) -> str:
    rows = [r for r in obs.statuses if "error" not in r]
    rounds = [r["round"] for r in rows]
    return (
        f"[{obs.elapsed:6.1f} s] nodes up {len(rows)}/{len(codes)}  "
        f"rounds {min(rounds, default=0)}-{max(rounds, default=0)}  "
        f"mean accuracy {_f(obs.mean_accuracy)}  consensus {_f(obs.consensus_distance)}"
    )


def _f(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}"
