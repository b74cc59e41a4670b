"""docker-compose clusters: one service per node, named by its node id.

``rumor deploy compose SPEC --out DIR`` writes ``DIR/docker-compose.yml`` and one
``DIR/<node>.toml`` per node. Each service runs the image's ``rumor`` entrypoint with
``node --config /etc/rumor/<node>.toml``, its config (and, with ``[tls]``, the CA and its own
certificate and key as ``/etc/rumor/tls/{ca.crt,node.crt,node.key}``; with ``token_file``, the
token) bind-mounted read-only, and a named volume at ``/var/lib/rumor`` for its metrics and
checkpoints. Peers reach each other by service name on compose's network, so node ``node-2``
advertises ``node-2:<port>``. The image is built from ``deploy/docker/Dockerfile`` when the
generator knows where the rumor source tree is (``build:``), and is otherwise expected under
its tag.

Paths in the file are relative to the file, so the folder can move as a whole.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rumor import config as config_io
from rumor.config import NodeConfig
from rumor.deploy import container, yamltext
from rumor.deploy.spec import ClusterSpec

COMPOSE_FILE = "docker-compose.yml"
COMPOSE_VERSION = "3.8"


def configs(spec: ClusterSpec) -> list[NodeConfig]:
    """Node configs as the containers see them: peers by service name."""
    tls = container.tls_paths("node.crt", "node.key")
    return spec.configs(
        container.layout(spec, host_of=lambda i: spec.node_ids[i], tls_of=lambda nid: tls)
    )


def compose_file(
    spec: ClusterSpec,
    out: Path,
    image: str = container.DEFAULT_IMAGE,
    context: Path | None = None,
    torch_spec: str = container.DEFAULT_TORCH_SPEC,
) -> dict[str, Any]:
    """The compose document for ``spec`` written into folder ``out`` (not yet written)."""
    services: dict[str, Any] = {}
    volumes: dict[str, Any] = {}
    for node_id in spec.node_ids:
        service: dict[str, Any] = {"image": image}
        if context is not None:
            service["build"] = {
                "context": _rel(context, out),
                "dockerfile": "deploy/docker/Dockerfile",
                "args": {"TORCH_SPEC": torch_spec},
            }
        state = f"{node_id}-state"
        mounts = [_bind(Path(out) / f"{node_id}.toml", container.config_path(node_id), out)]
        if spec.tls is not None:
            targets = container.tls_paths("node.crt", "node.key")
            for key, source in spec.tls.files_of(node_id).items():
                mounts.append(_bind(source, targets[key], out))
        if spec.token_file is not None:
            mounts.append(_bind(spec.token_file, container.TOKEN_FILE, out))
        mounts.append({"type": "volume", "source": state, "target": container.STATE_DIR})
        service.update(
            {
                "command": container.node_command(node_id),
                "hostname": node_id,
                "environment": dict(container.NODE_ENV),
                "volumes": mounts,
                "expose": [str(spec.port)],
                "stop_signal": "SIGTERM",
                "stop_grace_period": "30s",
                "restart": "on-failure",
            }
        )
        services[node_id] = service
        volumes[state] = {}
    return {"version": COMPOSE_VERSION, "services": services, "volumes": volumes}


def write(
    spec: ClusterSpec,
    out: Path,
    image: str = container.DEFAULT_IMAGE,
    context: Path | None = None,
    torch_spec: str = container.DEFAULT_TORCH_SPEC,
) -> list[Path]:
    """Write the compose file and the node configs into ``out``; returns the files."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for cfg in configs(spec):
        path = out / f"{cfg.node_id}.toml"
        path.write_text(config_io.dumps(cfg))
        written.append(path)
    doc = compose_file(spec, out, image=image, context=context, torch_spec=torch_spec)
    compose = out / COMPOSE_FILE
    compose.write_text(
        f"# rumor cluster {spec.name!r}: {spec.n_nodes} nodes. Start with\n"
        f"#   docker-compose -p {spec.name} up --build\n" + yamltext.dumps(doc)
    )
    return [compose, *written]


def _bind(source: Path, target: str, out: Path) -> dict[str, Any]:
    return {"type": "bind", "source": _rel(source, out), "target": target, "read_only": True}


def _rel(path: Path, out: Path) -> str:
    """``path`` relative to the compose folder (./ or ../), or absolute when they share
    nothing but the root."""
    path, out = Path(path).resolve(), Path(out).resolve()
    if os.path.commonpath([path, out]) == path.anchor:
        return str(path)
    rel = os.path.relpath(path, out)
    return rel if rel.startswith("..") else f"./{rel}"
