"""``rumor deploy``: turn one cluster spec into docker-compose, Kubernetes or per-machine launches.

``check`` validates a spec (and that its machines' host names resolve) and shows what it
describes; ``compose`` writes a compose file and
node configs; ``k8s`` writes a StatefulSet, a headless Service and a ConfigMap; ``hosts``
prints the command each machine runs (and with ``--out`` writes each machine's configs,
certificates and systemd units). A spec that cannot be deployed exits 2 with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer

from rumor.cli.options import FormatOpt, OutputFormat

if TYPE_CHECKING:
    from rumor.deploy.spec import ClusterSpec

EXIT_SPEC = 2

deploy_app = typer.Typer(
    name="deploy",
    help="Deploy a cluster spec: docker-compose, Kubernetes, or one command per machine.",
    no_args_is_help=True,
)

_SPEC_ARG = typer.Argument(..., help="Cluster spec (TOML), e.g. examples/cluster.toml.")
_IMAGE_HELP = "Container image tag."


def register(app: typer.Typer) -> None:
    app.add_typer(deploy_app, name="deploy")


def _load(path: Path) -> ClusterSpec:
    from rumor.deploy.spec import SpecError, load

    try:
        return load(path)
    except SpecError as exc:
        _fail(str(exc))


def _fail(message: str) -> NoReturn:
    typer.echo(f"rumor deploy: {message}", err=True)
    raise typer.Exit(EXIT_SPEC)


def _warn_missing_tls(spec: ClusterSpec) -> None:
    if spec.tls is None:
        return
    missing = spec.tls.missing(spec.node_ids)
    if missing:
        typer.echo(
            "rumor deploy: warning: certificates not there yet: "
            + ", ".join(str(p) for p in missing)
            + " (make them with `rumor keys`)",
            err=True,
        )


@deploy_app.command("check")
def check_cmd(
    spec_path: Path = _SPEC_ARG,
    fmt: OutputFormat = FormatOpt,
    resolve: bool = typer.Option(
        True,
        "--resolve/--no-resolve",
        help="Check that every machine address in the spec's hosts table resolves here "
        "(all looked up at once, a few seconds at most). --no-resolve: checking a spec "
        "outside the cluster's network. Compose service names and Kubernetes pod names "
        "resolve only inside their own network, so they are never looked up here.",
    ),
) -> None:
    """Validate a spec and show its nodes, edges and placement."""
    spec = _load(spec_path)
    if resolve:
        problems = spec.unresolved_hosts()
        if problems:
            for problem in problems[:-1]:
                typer.echo(f"rumor deploy: {problem}", err=True)
            _fail(problems[-1] + " (--no-resolve skips this check)")
    where = {p.node_id: f"{p.host} ({p.address}:{p.port})" for p in spec.placements}
    report = {
        "name": spec.name,
        "nodes": spec.n_nodes,
        "edges": sorted([int(u), int(v)] for u, v in spec.graph.edges),
        "algorithm": spec.base_config().algorithm,
        "rounds": spec.base_config().rounds,
        "security": "tls" if spec.tls is not None else "insecure",
        "placement": where,
    }
    if fmt == OutputFormat.json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(
        f"{spec.name}: {spec.n_nodes} nodes, {spec.graph.number_of_edges()} edges, "
        f"{report['algorithm']} for {report['rounds']} rounds, {report['security']}"
    )
    for node_id in spec.node_ids:
        typer.echo(f"  {node_id}: {where.get(node_id, '-')}")


@deploy_app.command("compose")
def compose_cmd(
    spec_path: Path = _SPEC_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for docker-compose.yml and configs."),
    image: str = typer.Option(None, "--image", help=_IMAGE_HELP),
    context: Path = typer.Option(
        None, "--context", help="rumor source tree to build the image from (default: this one)."
    ),
    build: bool = typer.Option(True, help="Add a build: section (else: pull --image)."),
    torch_spec: str = typer.Option(None, "--torch-spec", help="TORCH_SPEC build argument."),
) -> None:
    """Write a docker-compose cluster: one service per node."""
    from rumor.deploy import compose, container

    spec = _load(spec_path)
    source = (context or container.source_tree()) if build else None
    if build and source is None:
        _fail("no rumor source tree with deploy/docker/Dockerfile: pass --context or --no-build")
    written = compose.write(
        spec,
        out,
        image=image or container.DEFAULT_IMAGE,
        context=source,
        torch_spec=torch_spec or container.DEFAULT_TORCH_SPEC,
    )
    _warn_missing_tls(spec)
    typer.echo(f"wrote {len(written)} files to {out}; start with:")
    typer.echo(f"  cd {out} && docker-compose -p {spec.name} up{' --build' if source else ''}")


@deploy_app.command("k8s")
def k8s_cmd(
    spec_path: Path = _SPEC_ARG,
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the manifests."),
    image: str = typer.Option(None, "--image", help=_IMAGE_HELP),
    namespace: str = typer.Option(None, "--namespace", "-n", help="Kubernetes namespace."),
    storage: str = typer.Option("1Gi", help="Volume size per node (metrics, checkpoints)."),
) -> None:
    """Write a StatefulSet, a headless Service and a ConfigMap."""
    from rumor.deploy import container, k8s

    spec = _load(spec_path)
    written = k8s.write(
        spec, out, image=image or container.DEFAULT_IMAGE, namespace=namespace, storage=storage
    )
    _warn_missing_tls(spec)
    typer.echo(f"wrote {', '.join(p.name for p in written)} to {out}; start with:")
    secret = k8s.secret_command(spec, namespace)
    if secret:
        typer.echo(f"  {secret}")
    typer.echo(f"  kubectl apply -f {out}")


@deploy_app.command("hosts")
def hosts_cmd(
    spec_path: Path = _SPEC_ARG,
    out: Path = typer.Option(
        None, "--out", "-o", help="Write each machine's configs, certificates and units here."
    ),
    config_dir: str = typer.Option(
        "/etc/rumor", "--config-dir", help="Config folder on each machine ({host}: its name)."
    ),
    rumor_bin: str = typer.Option("rumor", "--rumor-bin", help="The rumor executable there."),
    user: str = typer.Option("rumor", help="User the systemd units run nodes as."),
    fmt: OutputFormat = FormatOpt,
) -> None:
    """Print the command that starts each node on its machine."""
    from rumor.deploy import hosts
    from rumor.deploy.spec import SpecError

    spec = _load(spec_path)
    try:
        launches = hosts.plan(spec, config_dir=config_dir, rumor_bin=rumor_bin)
        if out is not None:
            hosts.write(spec, launches, out, user=user)
    except (SpecError, FileNotFoundError) as exc:
        _fail(str(exc))
    if fmt == OutputFormat.json:
        rows = [
            {
                "host": launch.host,
                "address": launch.address,
                "node_id": launch.node_id,
                "config": launch.config_path,
                "command": launch.command,
                "unit": launch.unit_name,
            }
            for launch in launches
        ]
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(hosts.render(launches), nl=False)
    if out is None:
        typer.echo(
            f"# each command reads {config_dir}/<node>.toml: write them with --out", err=True
        )
