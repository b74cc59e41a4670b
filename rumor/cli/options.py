"""Options shared by several commands, so that flags are spelled the same everywhere."""

from __future__ import annotations

from enum import Enum
from typing import Any

import typer

from rumor.config import NodeConfig, parse_params


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


FormatOpt = typer.Option(OutputFormat.table, "--format", help="Output as a table or JSON.")


def training_overrides(
    *,
    algorithm: str | None,
    param: list[str] | None,
    rounds: int | None,
    dataset: str | None,
    partition: str | None,
    model: str | None,
    lr: float | None,
    momentum: float | None = None,
    batch_size: int | None,
    seed: int | None,
    init: str | None,
    eval_every: int | None,
) -> dict[str, Any]:
    """The config fields a user set on the command line (None means: not given)."""
    given = {
        "algorithm": algorithm,
        "rounds": rounds,
        "dataset": dataset,
        "partition": partition,
        "model": model,
        "lr": lr,
        "momentum": momentum,
        "batch_size": batch_size,
        "seed": seed,
        "init": init,
        "eval_every": eval_every,
    }
    out = {k: v for k, v in given.items() if v is not None}
    if param:
        out["params"] = parse_params(param)
    return out


def apply(cfg: NodeConfig, overrides: dict[str, Any]) -> NodeConfig:
    if "params" in overrides:
        overrides = {**overrides, "params": {**cfg.params, **overrides["params"]}}
    return cfg.replace(**overrides)


TlsDirOpt = typer.Option(
    None,
    "--tls-dir",
    help="Query an mTLS cluster: a `rumor keys node` folder (node.crt, node.key, ca.crt) "
    "whose certificate the nodes accept.",
)
TokenFileOpt = typer.Option(None, "--token-file", help="File holding the cluster token.")


def client_security(tls_dir: Any, token_file: Any, name: str) -> Any:
    """Security settings for a command-line client (status, watch) of a live cluster.

    A client only dials: plain text is the servers' decision (they refuse it when they run
    mutual TLS), so no ``insecure`` opt-in is asked of the client.
    """
    from rumor.protocol.security import Security, SecurityError

    files = {}
    if tls_dir is not None:
        files = {
            k: str(tls_dir / f)
            for k, f in (("tls_cert", "node.crt"), ("tls_key", "node.key"), ("tls_ca", "ca.crt"))
        }
    try:
        return Security.from_settings(
            name,
            listen="127.0.0.1:0",
            insecure=not files,
            token_file=str(token_file) if token_file is not None else None,
            **files,
        )
    except (SecurityError, OSError) as exc:
        typer.echo(f"rumor {name}: {exc}", err=True)
        raise typer.Exit(2) from None
