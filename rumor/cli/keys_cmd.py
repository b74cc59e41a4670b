"""``rumor keys``: a cluster CA and per-node certificates for mutual TLS (rumor.keys).

Examples::

    rumor keys ca --out certs
    rumor keys node --ca certs --id node-3 --host 10.0.0.5 --host node-3 --out certs/node-3
    rumor keys cluster --nodes node-0,node-1,node-2 --host node-0=10.0.0.5 --out certs
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from rumor.cli.options import FormatOpt, OutputFormat

keys_app = typer.Typer(
    help="Make a cluster CA and node certificates for mutual TLS.", no_args_is_help=True
)


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app, name="keys")


@keys_app.command("ca")
def ca(
    out: Path = typer.Option(..., "--out", help="Folder for ca.crt and ca.key."),
    name: str = typer.Option("rumor cluster CA", help="The CA's common name."),
) -> None:
    """Make a new cluster certificate authority (refuses to overwrite one)."""
    from rumor import keys

    try:
        folder = keys.make_ca(out, name)
    except (OSError, ValueError) as exc:
        typer.echo(f"rumor keys ca: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"CA written to {folder / keys.CA_CERT} (keep {folder / keys.CA_KEY} private)")


@keys_app.command("node")
def node(
    ca_dir: Path = typer.Option(..., "--ca", help="Folder holding ca.crt and ca.key."),
    node_id: str = typer.Option(..., "--id", help="The node's id (its certificate's name)."),
    host: list[str] = typer.Option(
        None, "--host", help="Host name or IP peers use to reach the node; repeat."
    ),
    out: Path = typer.Option(..., "--out", help="Folder for node.crt, node.key and ca.crt."),
) -> None:
    """Issue a certificate for one node, signed by the cluster CA."""
    from rumor import keys

    try:
        files = keys.issue_node(ca_dir, node_id, out, host or ())
    except (OSError, ValueError) as exc:
        typer.echo(f"rumor keys node: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"{node_id}: {files.cert}, {files.key}, {files.ca}")


@keys_app.command("cluster")
def cluster(
    nodes: str = typer.Option(..., "--nodes", help="Comma-separated node ids."),
    out: Path = typer.Option(..., "--out", help="Folder for the CA and one folder per node."),
    host: list[str] = typer.Option(
        None, "--host", help="id=host (name or IP) to add to that node's certificate; repeat."
    ),
    fmt: OutputFormat = FormatOpt,
) -> None:
    """A CA (made unless ``--out`` has one) and a certificate folder per node."""
    from rumor import keys

    try:
        ids = [n.strip() for n in nodes.split(",") if n.strip()]
        if not ids:
            raise ValueError("--nodes names no node")
        hosts: dict[str, list[str]] = {}
        for item in host or ():
            nid, sep, name = item.partition("=")
            if not sep or not nid or not name:
                raise ValueError(f"--host expects id=host, got {item!r}")
            hosts.setdefault(nid, []).append(name)
        files = keys.make_cluster(ids, out, hosts)
    except (OSError, ValueError) as exc:
        typer.echo(f"rumor keys cluster: {exc}", err=True)
        raise typer.Exit(2) from exc
    table = {
        nid: {"cert": str(f.cert), "key": str(f.key), "ca": str(f.ca)} for nid, f in files.items()
    }
    if fmt == OutputFormat.json:
        typer.echo(json.dumps({"ca": str(Path(out) / keys.CA_CERT), "nodes": table}, indent=2))
        return
    typer.echo(f"CA: {Path(out) / keys.CA_CERT}")
    for nid, f in table.items():
        typer.echo(f"{nid}: {f['cert']}, {f['key']}")
