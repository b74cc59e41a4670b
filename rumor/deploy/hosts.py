"""Per-machine launches: the command each machine runs, its node configs and systemd units.

Each machine gets one folder (``<out>/<host>/``) holding exactly what belongs in its config
directory (``/etc/rumor`` by default): one ``<node>.toml`` per node it runs, the cluster CA
and each of its nodes' certificate and key under ``tls/`` (``ca.crt``, ``<node>.crt``,
``<node>.key``) when the spec has a ``[tls]`` table, the cluster token as ``token`` when it
has a ``token_file``, and one ``rumor-<node>.service`` systemd unit per node. Metrics and
checkpoints go to the spec's ``state_dir`` on the machine. The printed commands refer to those
files where the machine will have them (``--config-dir``; ``{host}`` in it is replaced by the
machine's name, handy when every machine's folder sits on one shared disk).

This module writes files and text; it never contacts a machine.
"""

from __future__ import annotations

import os
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

from rumor import config as config_io
from rumor.config import NodeConfig
from rumor.deploy.spec import ClusterSpec, Layout, join_host_port

DEFAULT_CONFIG_DIR = "/etc/rumor"
DEFAULT_USER = "rumor"


@dataclass(frozen=True)
class Launch:
    """One node on one machine: its config and the command that starts it there."""

    host: str
    address: str
    config: NodeConfig
    config_path: str
    command: list[str]

    @property
    def node_id(self) -> str:
        return self.config.node_id

    @property
    def unit_name(self) -> str:
        return f"rumor-{self.node_id}.service"

    def shell(self) -> str:
        return shlex.join(self.command)


def plan(
    spec: ClusterSpec, config_dir: str = DEFAULT_CONFIG_DIR, rumor_bin: str = "rumor"
) -> list[Launch]:
    """The launches of a spec with [hosts] and [nodes], in node order."""
    placements = {p.index: p for p in spec.require_placements()}

    def dir_of(node_id: str) -> str:
        return config_dir.replace("{host}", placements[int(node_id.split("-")[1])].host)

    state = spec.state_dir.rstrip("/") or "/"
    layout = Layout(
        address_of=lambda i: join_host_port(placements[i].address, placements[i].port),
        listen_of=lambda i: join_host_port(spec.listen_host, placements[i].port),
        metrics_of=lambda nid: f"{state}/{nid}.metrics.jsonl",
        checkpoints_of=lambda nid: f"{state}/{nid}.checkpoints",
        tls_of=lambda nid: {
            "tls_ca": f"{dir_of(nid)}/tls/ca.crt",
            "tls_cert": f"{dir_of(nid)}/tls/{nid}.crt",
            "tls_key": f"{dir_of(nid)}/tls/{nid}.key",
        },
        token_of=lambda nid: f"{dir_of(nid)}/token",
    )
    launches = []
    for cfg in spec.configs(layout):
        where = placements[cfg.index]
        path = f"{dir_of(cfg.node_id)}/{cfg.node_id}.toml"
        launches.append(
            Launch(
                host=where.host,
                address=where.address,
                config=cfg,
                config_path=path,
                command=[rumor_bin, "node", "--config", path],
            )
        )
    return launches


def render(launches: list[Launch]) -> str:
    """The commands grouped by machine, as a shell script a person can follow."""
    lines: list[str] = []
    host = None
    for launch in launches:
        if launch.host != host:
            host = launch.host
            if lines:
                lines.append("")
            lines.append(f"# on {host} ({launch.address})")
        lines.append(launch.shell())
    return "\n".join(lines) + "\n"


def systemd_unit(launch: Launch, user: str = DEFAULT_USER) -> str:
    """A unit that runs one node (modelled on deploy/systemd/rumor-node.service)."""
    state = launch.config.metrics
    state_dir = os.path.dirname(state) if state else None
    directives = []
    if state_dir == "/var/lib/rumor":
        directives.append("StateDirectory=rumor")
    elif state_dir:
        directives.append(f"ReadWritePaths={state_dir}")
    exec_start = " ".join(_systemd_quote(a) for a in launch.command)
    return "\n".join(
        [
            f"# rumor node {launch.node_id} on {launch.host}. Copy to /etc/systemd/system/, then",
            f"#   systemctl daemon-reload && systemctl enable --now {launch.unit_name}",
            "# SIGTERM (systemctl stop) is a clean shutdown: the node finishes its step, tells",
            "# its neighbours it leaves and exits 0.",
            "[Unit]",
            f"Description=rumor gossip-learning node {launch.node_id}",
            "After=network-online.target",
            "Wants=network-online.target",
            "",
            "[Service]",
            "Type=simple",
            f"User={user}",
            "Environment=RUMOR_LOG_LEVEL=INFO OMP_NUM_THREADS=1 MALLOC_ARENA_MAX=2",
            "NoNewPrivileges=true",
            "ProtectSystem=strict",
            "PrivateTmp=true",
            *directives,
            f"ExecStart={exec_start}",
            "KillSignal=SIGTERM",
            "TimeoutStopSec=30",
            "Restart=on-failure",
            "RestartSec=2",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def _systemd_quote(arg: str) -> str:
    if arg and all(c.isalnum() or c in "-_./:=@+,{}" for c in arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write(
    spec: ClusterSpec, launches: list[Launch], out: Path, user: str = DEFAULT_USER
) -> list[Path]:
    """Write each machine's folder under ``out``; returns the files written."""
    written: list[Path] = []
    for launch in launches:
        folder = out / launch.host
        folder.mkdir(parents=True, exist_ok=True)
        cfg_file = folder / f"{launch.node_id}.toml"
        cfg_file.write_text(config_io.dumps(launch.config))
        unit = folder / launch.unit_name
        unit.write_text(systemd_unit(launch, user))
        written += [cfg_file, unit]
        if spec.tls is not None:
            written += _copy_tls(spec, launch.node_id, folder / "tls")
        if spec.token_file is not None:
            written.append(_copy_secret(spec.token_file, folder / "token"))
    return written


def _copy_tls(spec: ClusterSpec, node_id: str, folder: Path) -> list[Path]:
    assert spec.tls is not None
    missing = spec.tls.missing([node_id])
    if missing:
        raise FileNotFoundError(
            "certificates not found: "
            + ", ".join(str(p) for p in missing)
            + " (make them with `rumor keys`, or fix [tls] in the spec)"
        )
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(spec.tls.ca, folder / "ca.crt")
    shutil.copyfile(spec.tls.cert_of(node_id), folder / f"{node_id}.crt")
    key = _copy_secret(spec.tls.key_of(node_id), folder / f"{node_id}.key")
    return [folder / "ca.crt", folder / f"{node_id}.crt", key]


def _copy_secret(source: Path, target: Path) -> Path:
    """Copy a private file so that only its owner can read it, at no moment anyone else."""
    if not source.is_file():
        raise FileNotFoundError(f"{source} not found")
    target.unlink(missing_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(source.read_bytes())
    return target
