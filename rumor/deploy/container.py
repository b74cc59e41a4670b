"""What a node sees inside a container, the same under docker-compose and Kubernetes.

The image (``deploy/docker/Dockerfile``) runs ``rumor`` as a non-root user; a node reads its
config from ``/etc/rumor/<node>.toml``, its certificates from ``/etc/rumor/tls/`` and the
cluster token from ``/etc/rumor/token``, and keeps metrics and checkpoints in
``/var/lib/rumor``, a volume that outlives the container. Every node listens on the same
port, each in its own network namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import rumor
from rumor.deploy.spec import ClusterSpec, Layout, join_host_port

CONFIG_DIR = "/etc/rumor"
TLS_DIR = "/etc/rumor/tls"
TOKEN_FILE = "/etc/rumor/token"
STATE_DIR = "/var/lib/rumor"
#: The image tag the generators name unless told otherwise.
DEFAULT_IMAGE = f"rumor:{rumor.__version__}"
#: The CPU build of torch the image installs (the Dockerfile's TORCH_SPEC build argument).
DEFAULT_TORCH_SPEC = "torch==2.13.0"
#: Environment of every node container: one torch thread and two malloc arenas per node,
#: as `rumor cluster up` sets for local processes.
NODE_ENV = {
    "RUMOR_LOG_LEVEL": "INFO",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
    "PYTHONUNBUFFERED": "1",
}


def config_path(node_id: str) -> str:
    return f"{CONFIG_DIR}/{node_id}.toml"


def node_command(node_id: str) -> list[str]:
    """The container command (the image's entrypoint is ``rumor``)."""
    return ["node", "--config", config_path(node_id)]


def tls_paths(cert: str, key: str) -> dict[str, str]:
    """Config fields for certificate files named ``cert`` and ``key`` in the TLS folder."""
    return {
        "tls_ca": f"{TLS_DIR}/ca.crt",
        "tls_cert": f"{TLS_DIR}/{cert}",
        "tls_key": f"{TLS_DIR}/{key}",
    }


def layout(
    spec: ClusterSpec, host_of: Callable[[int], str], tls_of: Callable[[str], dict[str, str]]
) -> Layout:
    """Nodes in containers reached at ``host_of(i)`` on the spec's port."""
    return Layout(
        address_of=lambda i: join_host_port(host_of(i), spec.port),
        listen_of=lambda i: join_host_port("0.0.0.0", spec.port),
        metrics_of=lambda nid: f"{STATE_DIR}/{nid}.metrics.jsonl",
        checkpoints_of=lambda nid: f"{STATE_DIR}/checkpoints",
        tls_of=tls_of,
        token_of=lambda nid: TOKEN_FILE,
    )


def source_tree() -> Path | None:
    """The rumor checkout this package runs from, when it has the Dockerfile; else None."""
    root = Path(rumor.__file__).resolve().parent.parent
    return root if (root / "deploy" / "docker" / "Dockerfile").is_file() else None
