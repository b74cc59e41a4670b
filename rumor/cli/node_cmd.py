"""``rumor node``: run one node daemon from a TOML file and/or flags.

Exit codes are :class:`rumor.exit_codes.ExitCode` (listed in ``rumor node --help``): 0 when
the node finished its rounds or stopped cleanly on SIGTERM/SIGINT; 1 for an unexpected
failure; 2 for a bad configuration; 3 for unusable security settings; 4 for a checkpoint
made with another configuration; 5 when the listen address cannot be bound; 6 when fewer than
``min_peers`` neighbours answered within the start-up wait.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from rumor.cli import options
from rumor.config import NodeConfig, check_address, load
from rumor.exit_codes import ExitCode, epilog

EXIT_OK = ExitCode.OK
EXIT_FAILURE = ExitCode.FAILURE
EXIT_CONFIG = ExitCode.CONFIG


def register(app: typer.Typer) -> None:
    app.command("node", epilog=epilog())(node)


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
    min_peers: int = typer.Option(
        None,
        "--min-peers",
        help="Exit with code 6 instead of training when fewer neighbours answer within "
        "startup_wait (default 0: train with whoever answers).",
    ),
    metrics_port: int = typer.Option(
        None, "--metrics-port", help="Serve Prometheus /metrics on this port (0: any free)."
    ),
    trace: Path = typer.Option(None, "--trace", help="Write a Chrome trace of the node's work."),
    torch_threads: int = typer.Option(None, "--torch-threads"),
    tls_cert: Path = typer.Option(None, "--tls-cert", help="This node's certificate (PEM)."),
    tls_key: Path = typer.Option(None, "--tls-key", help="This node's private key (PEM)."),
    tls_ca: Path = typer.Option(None, "--tls-ca", help="The cluster CA certificate (PEM)."),
    insecure: bool = typer.Option(
        False, "--insecure", help="Allow plain text off loopback (logged as a WARNING)."
    ),
    token_file: Path = typer.Option(None, "--token-file", help="File holding the cluster token."),
    allow_id: list[str] = typer.Option(
        None, "--allow-id", help="Node id allowed to call this node; repeat."
    ),
    checkpoint_dir: Path = typer.Option(
        None, "--checkpoint-dir", help="Save checkpoints here and resume from the latest."
    ),
    checkpoint_every: int = typer.Option(
        None, "--checkpoint-every", help="Rounds between checkpoints."
    ),
    resume: bool = typer.Option(
        None, "--resume/--no-resume", help="Resume from the latest checkpoint (default: yes)."
    ),
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
            "min_peers": min_peers,
            "metrics_port": metrics_port,
            "trace": str(trace) if trace else None,
            "torch_threads": torch_threads,
        }
        overrides.update({k: v for k, v in extra.items() if v is not None})
        if peer:
            overrides["peers"] = dict(_parse_peer(p) for p in peer)
        security = {
            "tls_cert": str(tls_cert) if tls_cert else None,
            "tls_key": str(tls_key) if tls_key else None,
            "tls_ca": str(tls_ca) if tls_ca else None,
            "token_file": str(token_file) if token_file else None,
            "allow_ids": list(allow_id) if allow_id else None,
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
            "checkpoint_every": checkpoint_every,
            "resume": resume,
        }
        overrides.update({k: v for k, v in security.items() if v is not None})
        if insecure:
            overrides["insecure"] = True
        cfg = options.apply(cfg, overrides)
        for address in [cfg.listen, cfg.advertise, *cfg.peers.values()]:
            if address is not None:
                check_address(address)
        if not 0 <= cfg.min_peers <= len(cfg.peers):
            raise ValueError(
                f"min_peers = {cfg.min_peers}: must be between 0 and the number of peers "
                f"({len(cfg.peers)})"
            )
    except (ValueError, OSError) as exc:
        typer.echo(f"rumor node: bad configuration: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from exc

    import torch

    from rumor import api
    from rumor.node.checkpoint import CheckpointError
    from rumor.node.runtime import NotEnoughPeers
    from rumor.protocol.security import SecurityError

    torch.set_num_threads(max(1, cfg.torch_threads))
    api.setup_logging(cfg.log_level, cfg.node_id)
    try:
        summary = api.run(api.run_node(cfg))
    except SecurityError as exc:
        _fail(cfg.node_id, f"insecure or incomplete security settings: {exc}", ExitCode.SECURITY)
    except CheckpointError as exc:
        _fail(cfg.node_id, f"checkpoint refused: {exc}", ExitCode.CHECKPOINT)
    except NotEnoughPeers as exc:
        _fail(cfg.node_id, f"too few neighbours, not training: {exc}", ExitCode.PEERS)
    except (ValueError, KeyError) as exc:
        _fail(cfg.node_id, str(exc), ExitCode.CONFIG)
    except (OSError, RuntimeError) as exc:  # grpc reports a failed bind as RuntimeError
        if "bind" not in str(exc).lower():
            raise
        _fail(cfg.node_id, f"cannot listen on {cfg.listen}: {exc}", ExitCode.BIND)
    sys.stdout.write(json.dumps(summary) + "\n")
    sys.stdout.flush()


def _fail(node_id: str, message: str, code: ExitCode) -> None:
    typer.echo(
        f"rumor node {node_id}: {message} (exit {code.value}: {code.name.lower()})", err=True
    )
    raise typer.Exit(code)


def _parse_peer(text: str) -> tuple[str, str]:
    node_id, sep, address = text.partition("=")
    if not sep or not node_id:
        raise ValueError(f"--peer expects id=host:port, got {text!r}")
    return node_id, check_address(address)
