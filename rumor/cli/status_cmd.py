"""``rumor status``: ask live nodes for their state (round, loss, accuracy, bytes, peers)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path
from typing import Any

import typer

from rumor.cli.options import FormatOpt, OutputFormat, TlsDirOpt, TokenFileOpt, client_security


def register(app: typer.Typer) -> None:
    app.command("status")(status)


def status(
    address: list[str] = typer.Argument(None, help="host:port of nodes to ask."),
    run_dir: Path = typer.Option(None, "--run-dir", help="A `rumor cluster up` run folder."),
    timeout: float = typer.Option(2.0, help="Seconds to wait for each node."),
    tls_dir: Path = TlsDirOpt,
    token_file: Path = TokenFileOpt,
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Query nodes' Status RPC; unreachable nodes are listed as such."""
    targets = list(address or [])
    if run_dir is not None:
        targets += list(json.loads((run_dir / "addresses.json").read_text()).values())
    if not targets:
        typer.echo("rumor status: give node addresses or --run-dir", err=True)
        raise typer.Exit(2)
    security = client_security(tls_dir, token_file, "status")
    rows = asyncio.run(query(targets, timeout, security))
    if fmt == OutputFormat.json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(rows)


async def query(addresses: list[str], timeout: float, security: Any = None) -> list[dict[str, Any]]:
    """One dict per address: the node's status, or ``{"address", "error"}``."""
    from google.protobuf.json_format import MessageToDict

    from rumor.protocol.errors import PeerUnavailable, Rejected
    from rumor.protocol.grpc_transport import GrpcTransport

    client = GrpcTransport(node_id="status", security=security)

    async def one(addr: str) -> dict[str, Any]:
        try:
            reply = await client.status(addr, timeout)
        except (PeerUnavailable, Rejected) as exc:
            return {"address": addr, "error": str(exc)}
        row = MessageToDict(
            reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        for key in ("loss", "accuracy"):
            value = row.get(key)
            if isinstance(value, str) or (isinstance(value, float) and math.isnan(value)):
                row[key] = None
        for key in ("round", "bytes_in", "bytes_out", "exchanges", "rejected"):
            row[key] = int(row.get(key, 0))
        row["address"] = row.get("address") or addr
        return row

    try:
        return list(await asyncio.gather(*(one(a) for a in addresses)))
    finally:
        await client.stop()


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rumor nodes")
    for col in ("node", "address", "round", "loss", "accuracy", "in MB", "out MB", "peers"):
        table.add_column(col, justify="right" if col not in {"node", "address"} else "left")
    for row in rows:
        if "error" in row:
            table.add_row("?", row["address"], "-", "-", "-", "-", "-", f"[red]{row['error']}")
            continue
        peers = row.get("peers", [])
        alive = sum(1 for p in peers if p.get("alive"))
        table.add_row(
            row.get("node_id", "?"),
            row["address"],
            str(row["round"]),
            _fmt(row.get("loss")),
            _fmt(row.get("accuracy")),
            f"{row['bytes_in'] / 1e6:.1f}",
            f"{row['bytes_out'] / 1e6:.1f}",
            f"{alive}/{len(peers)}",
        )
    Console().print(table)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}"
