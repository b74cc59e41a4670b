"""``rumor simulate``: the same nodes and rules in one process, on a virtual clock."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import typer

from rumor.cli import options
from rumor.cli.options import FormatOpt, OutputFormat


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)


def simulate(
    nodes: int = typer.Option(16, "--nodes", "-n", help="Number of nodes."),
    topology: str = typer.Option("ring", help="Topology spec (see `rumor topology analyze`)."),
    algorithm: str = typer.Option("dpsgd"),
    param: list[str] = typer.Option(None, "--param", "-p", help="Rule parameter key=value."),
    rounds: int = typer.Option(20),
    dataset: str = typer.Option("digits"),
    partition: str = typer.Option("iid"),
    model: str = typer.Option("logreg"),
    lr: float = typer.Option(0.1),
    momentum: float = typer.Option(0.0, help="SGD momentum (local optimizer state)."),
    batch_size: int = typer.Option(32, "--batch-size"),
    seed: int = typer.Option(0),
    init: str = typer.Option("shared", help="shared or independent initial weights."),
    eval_every: int = typer.Option(0, "--eval-every", help="0: evaluate after the last round."),
    step_cost: float = typer.Option(0.01, "--step-cost", help="Modelled seconds per compute."),
    latency: float = typer.Option(0.0005, help="Modelled one-way latency (s)."),
    bandwidth: float = typer.Option(1e9, help="Modelled link bandwidth (bytes/s)."),
    wire: bool = typer.Option(False, help="Send every message through the real codec."),
    sybils: int = typer.Option(0, "--sybils", help="Sybil identities of one attacker."),
    attack: str = typer.Option("label-flip", "--attack", help="label-flip or backdoor."),
    attack_edges: int = typer.Option(
        None, "--attack-edges", help="Honest nodes linked to a Sybil (default: one per Sybil)."
    ),
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Simulate a cluster; the same seed gives the same result, bit for bit.

    With ``--sybils K`` the topology is the honest graph and K attacker identities join it
    through ``--attack-edges`` edges; the report adds the honest nodes' accuracy and the
    attack's success rate.
    """
    import torch

    from rumor.algorithms.attacks import attacked_configs, honest_report
    from rumor.cluster import build_graph, node_name
    from rumor.config import NodeConfig
    from rumor.node.simulation import simulate as run_simulation

    torch.set_num_threads(1)
    base = options.apply(
        NodeConfig(),
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
    try:
        configs = attacked_configs(graph, base, node_name, sybils, attack, attack_edges, seed)
    except ValueError as exc:
        typer.echo(f"rumor simulate: {exc}", err=True)
        raise typer.Exit(2) from exc
    by_id: dict[str, Any] = {}

    async def capture(network: Any, nodes_by_id: dict[str, Any]) -> None:
        by_id.update(nodes_by_id)

    started = time.perf_counter()
    result = run_simulation(
        configs,
        latency_s=latency,
        bandwidth_bps=bandwidth,
        step_cost_s=step_cost,
        wire=wire,
        scenario=capture,
    )
    wall = time.perf_counter() - started
    digest = hashlib.sha256(json.dumps(result.digests, sort_keys=True).encode()).hexdigest()
    report = {
        "nodes": nodes,
        "topology": topology,
        "algorithm": algorithm,
        "rounds": rounds,
        "mean_accuracy": result.mean_accuracy,
        "consensus_distance": result.consensus_distance,
        "virtual_time_s": result.virtual_time_s,
        "wall_time_s": wall,
        "cluster_digest": digest,
    }
    if sybils:
        report.update(sybils=sybils, attack=attack, **honest_report(by_id, configs, attack))
    if fmt == OutputFormat.json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"simulation: {nodes} nodes, {topology}, {algorithm}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report.items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    Console().print(table)
