"""``rumor bench claims NAME``: re-run an algorithm's claim and print its table."""

from __future__ import annotations

import json

import typer

from rumor.cli.options import FormatOpt, OutputFormat

bench_app = typer.Typer(help="Reproduce the algorithms' claims.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


@bench_app.command("claims")
def claims(
    name: str = typer.Argument(None, help="Claim to reproduce; omit to list them."),
    quick: bool = typer.Option(False, help="Smaller run, for a first look."),
    seeds: int = typer.Option(None, help="Number of seeds (default: the claim's own)."),
    grpc: bool = typer.Option(
        False, "--grpc", help="modest only: the comparison over real gRPC processes."
    ),
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Run the experiment behind an algorithm's claim and print the measured table."""
    from rumor import claims as registry

    if name is None:
        for key, module in sorted(registry.available().items()):
            typer.echo(f"{key:20s} {module}")
        return
    if grpc and name != "modest":
        typer.echo("rumor bench claims: --grpc exists for modest only", err=True)
        raise typer.Exit(2)
    try:
        if grpc:
            from rumor.claims import modest_grpc

            claim = modest_grpc.run(quick=quick, seeds=seeds)
        else:
            claim = registry.run(name, quick=quick, seeds=seeds)
    except KeyError as exc:
        typer.echo(f"rumor bench claims: {exc.args[0]}", err=True)
        raise typer.Exit(2) from exc
    if fmt == OutputFormat.json:
        typer.echo(json.dumps(claim.to_dict(), indent=2, default=float))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=claim.title, caption=claim.claim)
    for col in claim.columns:
        table.add_column(col)
    for row in claim.rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console = Console()
    console.print(table)
    for note in claim.notes:
        console.print(f"- {note}")
    if claim.holds is not None:
        console.print("claim holds" if claim.holds else "[red]claim does not hold")
