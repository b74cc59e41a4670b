"""Node configuration: one dataclass, read from flags or a TOML file.

A TOML file holds the same keys as the dataclass at top level, plus two tables::

    node_id = "node-3"
    listen = "0.0.0.0:50051"
    advertise = "10.0.0.3:50051"
    algorithm = "dpsgd"
    rounds = 50
    [params]          # the mixing rule's parameters
    local_steps = 2
    [peers]           # neighbour id -> host:port
    node-2 = "10.0.0.2:50051"
    node-4 = "10.0.0.4:50051"
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class NodeConfig:
    """Everything one node needs to start. Times are seconds."""

    #: Stable node id: names the node in logs, metrics, its certificate and its checkpoints.
    node_id: str = "node-0"
    #: This node's shard of the partitioned dataset, and how many shards there are.
    index: int = 0
    n_nodes: int = 1
    #: host:port the server binds (``0.0.0.0:50051`` for every interface; port 0: any free).
    listen: str = "127.0.0.1:0"
    #: host:port peers use to reach this node, when it differs from ``listen`` (NAT, 0.0.0.0).
    advertise: str | None = None
    #: Neighbours: node id -> host:port.
    peers: dict[str, str] = field(default_factory=dict)
    algorithm: str = "dpsgd"
    params: dict[str, Any] = field(default_factory=dict)
    rounds: int | None = 50
    dataset: str = "digits"
    partition: str = "iid"
    model: str = "mlp"
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss: str | None = None
    seed: int = 0
    #: "shared": every node starts from the same weights x_0 (as D-PSGD assumes);
    #: "independent": each node draws its own (shows consensus forming from scratch).
    init: str = "shared"
    #: "honest", or an attacker identity: "label-flip" or "backdoor" (rumor.algorithms.attacks)
    #: with its options in ``role_params``; such a node trains on poisoned data and never mixes.
    role: str = "honest"
    role_params: dict[str, Any] = field(default_factory=dict)
    eval_every: int = 1
    metrics: str | None = None
    #: Serve Prometheus metrics on this port (same host as ``listen``; 0: any free port).
    metrics_port: int | None = None
    #: Write a Chrome trace of compute/send/mix spans to this file.
    trace: str | None = None
    #: Seconds between heartbeats to each neighbour. 1 s suits a LAN; raise it on the Internet.
    heartbeat_period: float = 1.0
    #: Missed heartbeats before a neighbour counts as dead (detection ~ period x misses).
    heartbeat_misses: int = 3
    #: Deadline of one model exchange (s); a large model over a slow link needs more.
    request_timeout: float = 30.0
    #: How long to wait at start for the neighbours to answer before training anyway (s).
    startup_wait: float = 30.0
    #: Neighbours that must answer within ``startup_wait``, else the node exits with code 6
    #: instead of training: a node that never reaches enough neighbours (a mistyped host, a
    #: closed port) should fail loudly, not train alone and exit 0. 0: start regardless.
    min_peers: int = 0
    #: Seconds to keep serving after the last round (observers can still pull).
    linger: float = 0.0
    #: After its last round, keep serving while a neighbour still trains (until every
    #: neighbour has finished or left), for at most this many seconds: a neighbour that
    #: restarted or ran slow finishes with partners instead of training alone. 0: never.
    linger_for_neighbours: float = 60.0
    #: Reconnect backoff towards a lost peer (s): first retry, largest wait, and the longest
    #: one connection attempt may take. The defaults suit a LAN (a healed link or restarted
    #: peer is used again within a second or two); across the Internet use 1, 10 and 10.
    reconnect_initial: float = 0.1
    reconnect_max: float = 1.0
    connect_timeout: float = 2.0
    torch_threads: int = 1
    log_level: str = "INFO"
    # --- security (rumor.protocol.security; docs/security.md) --------------------------
    #: This node's certificate, private key and the cluster CA (PEM; `rumor keys`). With all
    #: three, every connection is mutual TLS; required when any address is off loopback.
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    #: Allow plain text off loopback. Logged as a WARNING; for trusted test networks only.
    insecure: bool = False
    #: Shared cluster token every call must carry (prefer ``token_file``, kept out of configs).
    token: str | None = None
    token_file: str | None = None
    #: Node ids (from client certificates) allowed to call this node; None: any the CA signed.
    allow_ids: list[str] | None = None
    # --- checkpoints (rumor.node.checkpoint) -------------------------------------------
    #: Folder for this node's checkpoints; None: no checkpoints and no resume.
    checkpoint_dir: str | None = None
    #: Save every this many rounds (and on SIGTERM and at the end).
    checkpoint_every: int = 10
    #: Checkpoints kept; older ones are deleted.
    checkpoint_keep: int = 3
    #: Resume from the latest checkpoint in ``checkpoint_dir`` when there is one.
    resume: bool = True

    @property
    def model_seed(self) -> int:
        return self.seed if self.init == "shared" else self.seed * 100_003 + self.index + 1

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name for f in dataclasses.fields(NodeConfig)}


def from_dict(data: dict[str, Any]) -> NodeConfig:
    """A config from a mapping; unknown keys are an error (a typo must not pass silently)."""
    unknown = sorted(set(data) - _FIELDS)
    if unknown:
        raise ValueError(f"unknown config keys: {', '.join(unknown)}")
    return NodeConfig(**data)


def load(path: str | Path) -> NodeConfig:
    with Path(path).open("rb") as fh:
        return from_dict(tomllib.load(fh))


def dumps(cfg: NodeConfig) -> str:
    """TOML text for ``cfg`` (flat keys, then [params] and [peers])."""
    lines = []
    tables = {}
    for key, value in cfg.to_dict().items():
        if value is None:
            continue
        if isinstance(value, dict):
            tables[key] = value
            continue
        lines.append(f"{key} = {_toml_value(value)}")
    for name, table in tables.items():
        lines.append(f"\n[{name}]")
        lines.extend(f'"{k}" = {_toml_value(v)}' for k, v in table.items())
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def check_address(address: str) -> str:
    """``address`` if it is ``host:port`` (``[v6]:port`` for IPv6, port 0-65535)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected host:port, got {address!r}")
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise ValueError(f"write an IPv6 address in brackets, [{host}]:{port}, got {address!r}")
    return address


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["rate=2", "local_steps=3", "mode=fast"]`` -> typed dict (int, float, bool or str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip()] = _parse_scalar(raw.strip())
    return out


def _parse_scalar(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in {"true", "false"}:
        return lowered == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw
