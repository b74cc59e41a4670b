"""``rumor node``: run one node daemon from a TOML file and/or flags.

Exit codes: 0 when the node finished its rounds or stopped cleanly on SIGTERM/SIGINT;
2 for a bad configuration; 1 for any other failure.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from rumor.cli import options
from rumor.config import NodeConfig, load

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def register(app: typer.Typer) -> None:
    app.command("node")(node)


def node(
    config: Path = typer.Option(None, "--config", "-c", help="TOML config file."),
    node_id: str = typer.Option(None, "--id", help="Stable node id."),
    listen: str = typer.Option(None, help="host:port to listen on (port 0: any)."),
    advertise: str = typer.Option(None, help="host:port peers use to reach this node."),
    peer: list[str] = typer.Option(None, "--peer", help="Neighbour as id=host:port; repeat."),
    index: int = typer.Option(None, help="This node's data shard."),
    n_nodes: int = typer.Option(None, "--n-nodes", help="Number of data shards."),
    algorithm: str = typer.Option(None, help="Mixing rule (see `rumor algorithms`)."),
    param: list[str] = typer.Option(None, "--param", "-p", help="Rule parameter key=value."),
    rounds: int = typer.Option(None, help="Round budget."),
    dataset: str = typer.Option(None, help="digits, lsq:n:d:cond, npz:path, csv:path ..."),
    partition: str = typer.Option(None, help="iid, dirichlet:alpha, shards:k."),
    model: str = typer.Option(None, help="mlp, mlp:128, logreg, linear, cnn-digits."),
    lr: float = typer.Option(None, help="Learning rate."),
    momentum: float = typer.Option(None, help="SGD momentum (local optimizer state)."),
    batch_size: int = typer.Option(None, "--batch-size"),
    seed: int = typer.Option(None),
    init: str = typer.Option(None, help="shared or independent initial weights."),
    eval_every: int = typer.Option(None, "--eval-every"),
    metrics: Path = typer.Option(None, help="Metrics JSON-lines file."),
    linger: float = typer.Option(None, help="Seconds to keep serving after the last round."),
    torch_threads: int = typer.Option(None, "--torch-threads"),
) -> None:
    """Run one rumor node until its rounds are done or it is told to stop."""
    try:
        cfg = load(config) if config else NodeConfig()
        overrides = options.training_overrides(
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
        )
        extra = {
            "node_id": node_id,
            "listen": listen,
            "advertise": advertise,
            "index": index,
            "n_nodes": n_nodes,
            "metrics": str(metrics) if metrics else None,
            "linger": linger,
            "torch_threads": torch_threads,
        }
        overrides.update({k: v for k, v in extra.items() if v is not None})
        if peer:
            overrides["peers"] = dict(_parse_peer(p) for p in peer)
        cfg = options.apply(cfg, overrides)
    except (ValueError, OSError) as exc:
        typer.echo(f"rumor node: bad configuration: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc

    import torch

    from rumor import api

    torch.set_num_threads(max(1, cfg.torch_threads))
    api.setup_logging(cfg.log_level)
    try:
        summary = api.run(api.run_node(cfg))
    except (ValueError, KeyError) as exc:
        typer.echo(f"rumor node: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()


def _parse_peer(text: str) -> tuple[str, str]:
    node_id, sep, address = text.partition("=")
    if not sep or not node_id or ":" not in address:
        raise ValueError(f"--peer expects id=host:port, got {text!r}")
    return node_id, address
