"""Cluster specs: one TOML file that describes a whole deployment, and the node configs it gives.

A spec names the topology, the mixing rule and its parameters, the data partition, the
rounds, and which machine hosts which node (``examples/cluster.toml`` is a commented one)::

    name = "digits"              # names the compose project, the StatefulSet and its Service
    topology = "ring"            # a topology spec as `rumor topology analyze` takes it, or
    # edges = [[0, 1], [1, 2], [2, 3], [3, 0]]    an explicit edge list of node indices
    port = 50051                 # every node's port unless its [nodes] entry says otherwise
    algorithm = "dpsgd"          # any other key is a NodeConfig field, the same for every node
    rounds = 200
    partition = "dirichlet:0.5"
    [params]
    local_steps = 2
    [hosts]                      # machine -> the address its peers reach it at
    alpha = "10.0.0.10"
    beta = "10.0.0.11"
    [nodes]                      # node id -> machine (and port); node-i is graph node i
    node-0 = "alpha"
    node-1 = { host = "alpha", port = 50052 }
    node-2 = "beta"
    node-3 = { host = "beta", port = 50052 }
    [tls]                        # the cluster CA and node certificates from `rumor keys`
    dir = "certs"                # certs/ca.crt, certs/node-i/node.crt, certs/node-i/node.key

``[hosts]`` and ``[nodes]`` are needed only by ``rumor deploy hosts``: compose and Kubernetes
place the nodes themselves. Node ``i`` of the graph is always ``node-i`` (as in ``rumor
cluster up``), owns shard ``i`` of the partition, and in Kubernetes is pod ``<name>-i``.

``token_file`` names a file holding a shared cluster token (read on this machine and
shipped like the certificates). Nodes whose rule can resume (``checkpointable``) keep
periodic checkpoints, so that a restarted node resumes; ``checkpoints = false`` turns them
off.

Everything a node needs that depends on where it runs (its listen and advertised addresses,
its peers' addresses, the paths of its metrics, checkpoints, certificates and token) comes
from a
:class:`Layout` that each generator supplies; :meth:`ClusterSpec.configs` combines the two
through :func:`rumor.cluster.cluster_configs`, so the rule's ``prepare`` fills the constants
that need the whole graph. This module validates and derives; it writes no files.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import sys
import threading
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx

from rumor.config import NodeConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: Port a node listens on when neither the spec nor its [nodes] entry names one.
DEFAULT_PORT = 50051
#: Where nodes keep metrics (and checkpoints) on a machine, unless the spec says otherwise.
DEFAULT_STATE_DIR = "/var/lib/rumor"
#: Where `rumor keys` (rumor.keys) writes, relative to its output folder; ``{node}``: node id.
TLS_DEFAULT_FILES = {"ca": "ca.crt", "cert": "{node}/node.crt", "key": "{node}/node.key"}

#: How long `rumor deploy check` waits for the host-name lookups (all run at once).
RESOLVE_TIMEOUT_S = 3.0

#: Keys of the spec itself; every other top-level key is a NodeConfig field.
SPEC_KEYS = (
    "name",
    "topology",
    "edges",
    "n_nodes",
    "port",
    "listen_host",
    "state_dir",
    "hosts",
    "nodes",
    "tls",
    "token_file",
    "checkpoints",
)
#: NodeConfig fields that differ per node: the generators set them, a spec may not.
PER_NODE_FIELDS = frozenset(
    {
        "node_id",
        "index",
        "listen",
        "advertise",
        "peers",
        "metrics",
        "tls_cert",
        "tls_key",
        "tls_ca",
        "token_file",
        "checkpoint_dir",
        "trace",
    }
)

_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_NODE_ID = re.compile(r"^node-(0|[1-9][0-9]*)$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*$")


class SpecError(ValueError):
    """A cluster spec that cannot be deployed; the message says where and why."""


def node_fields() -> set[str]:
    """Names of the fields this rumor's NodeConfig has."""
    return {f.name for f in dataclasses.fields(NodeConfig)}


@dataclass(frozen=True)
class Placement:
    """Where one node runs, for per-machine launches."""

    node_id: str
    index: int
    host: str
    address: str
    port: int


@dataclass(frozen=True)
class TlsFiles:
    """The CA certificate and per-node certificate/key files, as paths on this machine."""

    ca: Path
    cert: str
    key: str

    def cert_of(self, node_id: str) -> Path:
        return Path(self.cert.format(node=node_id))

    def key_of(self, node_id: str) -> Path:
        return Path(self.key.format(node=node_id))

    def files_of(self, node_id: str) -> dict[str, Path]:
        """``tls_ca``/``tls_cert``/``tls_key`` -> the file on this machine."""
        return {
            "tls_ca": self.ca,
            "tls_cert": self.cert_of(node_id),
            "tls_key": self.key_of(node_id),
        }

    def missing(self, node_ids: list[str]) -> list[Path]:
        files = {self.ca} | {p for n in node_ids for p in (self.cert_of(n), self.key_of(n))}
        return sorted(p for p in files if not p.is_file())


@dataclass(frozen=True)
class Layout:
    """How one deployment target places nodes: addresses, and paths as the node sees them.

    ``address_of(i)`` is where peers reach node ``i``; ``listen_of(i)`` what it binds;
    ``metrics_of(node_id)`` its metrics file; ``checkpoints_of(node_id)`` its checkpoint
    folder; ``tls_of(node_id)`` the ``tls_ca``, ``tls_cert`` and ``tls_key`` paths it reads
    (used only with a ``[tls]`` table) and ``token_of(node_id)`` its token file (only with
    ``token_file``).
    """

    address_of: Callable[[int], str]
    listen_of: Callable[[int], str]
    metrics_of: Callable[[str], str]
    checkpoints_of: Callable[[str], str]
    tls_of: Callable[[str], dict[str, str]]
    token_of: Callable[[str], str]


@dataclass
class ClusterSpec:
    """A validated cluster spec. Build one with :func:`load` or :func:`from_dict`."""

    name: str
    graph: nx.Graph
    settings: dict[str, Any]
    port: int = DEFAULT_PORT
    listen_host: str = "0.0.0.0"
    state_dir: str = DEFAULT_STATE_DIR
    hosts: dict[str, str] = field(default_factory=dict)
    placements: list[Placement] = field(default_factory=list)
    tls: TlsFiles | None = None
    token_file: Path | None = None
    #: Give nodes a checkpoint folder (the rule can resume); see :func:`from_dict`.
    checkpoints: bool = True
    source: Path | None = None

    @property
    def n_nodes(self) -> int:
        return self.graph.number_of_nodes()

    @property
    def node_ids(self) -> list[str]:
        from rumor.cluster import node_name

        return [node_name(i) for i in range(self.n_nodes)]

    @property
    def insecure(self) -> bool:
        return bool(self.settings.get("insecure", False))

    def base_config(self) -> NodeConfig:
        return NodeConfig(**self.settings)

    def configs(self, layout: Layout) -> list[NodeConfig]:
        """One NodeConfig per node, peers wired along the graph, rule constants filled."""
        from rumor.cluster import cluster_configs

        configs = cluster_configs(
            self.graph, self.base_config(), layout.address_of, layout.listen_of
        )
        out = []
        for cfg in configs:
            changes: dict[str, Any] = {"metrics": layout.metrics_of(cfg.node_id)}
            if self.checkpoints:
                changes["checkpoint_dir"] = layout.checkpoints_of(cfg.node_id)
            if self.tls is not None:
                changes.update(layout.tls_of(cfg.node_id))
            if self.token_file is not None:
                changes["token_file"] = layout.token_of(cfg.node_id)
            out.append(cfg.replace(**changes))
        return out

    def require_placements(self) -> list[Placement]:
        if not self.placements:
            raise SpecError(
                f"{self._where()}: per-machine launches need [hosts] and [nodes] tables "
                "(node id -> host) naming where each node runs"
            )
        return self.placements

    def _where(self) -> str:
        return str(self.source) if self.source else "cluster spec"

    def unresolved_hosts(self, timeout_s: float = RESOLVE_TIMEOUT_S) -> list[str]:
        """Problems with the ``[hosts]`` names that nodes dial: one per name that does not
        resolve on this machine, naming the machine and the nodes on it.

        Only ``[hosts]`` is looked at: it is what ``rumor deploy hosts`` writes into the
        peers' configs. Compose and Kubernetes give nodes service names that resolve only
        inside their own network, so they are never resolved here. A name that does not
        resolve makes the nodes on that machine unreachable, which the nodes alone would
        only report at start-up, one machine at a time.
        """
        on: dict[str, list[str]] = {}
        for placement in self.placements:
            on.setdefault(placement.host, []).append(placement.node_id)
        names = {host: self.hosts[host] for host in on if _needs_lookup(self.hosts[host])}
        failed = resolve(set(names.values()), timeout_s)
        return [
            f"{self._where()}: hosts.{host} = {name!r} ({', '.join(on[host])}) does not "
            f"resolve: {failed[name]}"
            for host, name in names.items()
            if failed.get(name)
        ]


def resolve(names: set[str], timeout_s: float = RESOLVE_TIMEOUT_S) -> dict[str, str | None]:
    """Look ``names`` up all at once: name -> None when it resolves, else the reason.

    One daemon thread per name, because ``socket.getaddrinfo`` takes no timeout and a
    resolver that does not answer must neither add up over many names nor keep the process
    from exiting.
    """
    results: dict[str, str | None] = {}

    def lookup(name: str) -> None:
        try:
            socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
            results[name] = None
        except socket.gaierror as exc:
            results[name] = exc.strerror or str(exc)
        except (OSError, UnicodeError) as exc:  # e.g. a label too long for IDNA
            results[name] = str(exc) or type(exc).__name__

    threads = [
        threading.Thread(target=lookup, args=(n,), name=f"resolve-{n}", daemon=True)
        for n in sorted(names)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    late = f"no answer from the resolver within {timeout_s:g} s"
    return {n: results.get(n, late) for n in sorted(names)}


def _needs_lookup(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return True
    return False


def join_host_port(host: str, port: int) -> str:
    """``host:port``, with IPv6 literals in brackets."""
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def load(path: str | Path) -> ClusterSpec:
    """Read and validate a spec file; relative paths in it are relative to the file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SpecError(f"cannot read cluster spec {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from exc
    return from_dict(data, source=path)


def from_dict(data: dict[str, Any], source: Path | None = None) -> ClusterSpec:
    """Validate a parsed spec; every error names the key at fault."""
    where = str(source) if source else "cluster spec"
    root = source.parent if source else Path.cwd()

    def fail(message: str) -> typing.NoReturn:
        raise SpecError(f"{where}: {message}")

    name = data.get("name", "rumor")
    if not isinstance(name, str) or not _NAME.match(name) or len(name) > 40:
        fail(
            f"name = {name!r}: use 1-40 lowercase letters, digits and '-', starting with a "
            "letter (it names containers, pods and a Kubernetes Service)"
        )
    settings = _settings(data, fail)
    port = _port(data.get("port", DEFAULT_PORT), "port", fail)
    listen_host = data.get("listen_host", "0.0.0.0")
    if not isinstance(listen_host, str) or not _valid_host(listen_host):
        fail(f"listen_host = {listen_host!r} is not an address")
    state_dir = data.get("state_dir", DEFAULT_STATE_DIR)
    if not isinstance(state_dir, str) or not state_dir:
        fail("state_dir must be a directory path")

    hosts = _hosts(data.get("hosts", {}), fail)
    nodes_table = data.get("nodes", {})
    if not isinstance(nodes_table, dict):
        fail("[nodes] must be a table of node id -> host or { host, port }")
    if bool(hosts) != bool(nodes_table):
        fail("[hosts] and [nodes] go together: name the machines and which node runs where")

    n_given = data.get("n_nodes")
    if n_given is not None and (isinstance(n_given, bool) or not isinstance(n_given, int)):
        fail(f"n_nodes = {n_given!r} must be an integer")
    if n_given is not None and nodes_table and n_given != len(nodes_table):
        fail(f"n_nodes = {n_given} but [nodes] lists {len(nodes_table)} nodes")
    n = n_given if n_given is not None else (len(nodes_table) or None)
    graph = _graph(data, n, int(settings.get("seed", 0)), root, fail)
    if n is not None and graph.number_of_nodes() != n:
        said = f"n_nodes = {n}" if n_given is not None else f"[nodes] lists {n}"
        fail(f"the topology has {graph.number_of_nodes()} nodes, but {said}")
    lowest = min(degree for _, degree in graph.degree)
    min_peers = settings.get("min_peers", 0)
    if not 0 <= min_peers <= lowest:
        fail(
            f"min_peers = {min_peers} must be between 0 and the topology's lowest degree "
            f"({lowest}): a node with fewer neighbours could never start"
        )

    placements = _placements(nodes_table, hosts, graph.number_of_nodes(), port, fail)
    tls = _tls(data.get("tls"), root, fail)
    token_file = data.get("token_file")
    if token_file is not None:
        if not isinstance(token_file, str) or not token_file:
            fail("token_file must be the path of a file holding the cluster token")
        if "token" in settings:
            fail("give token or token_file, not both")
        token_file = root / token_file
    checkpoints = _checkpoints(data.get("checkpoints"), settings, fail)
    if tls is not None and settings.get("insecure"):
        fail("[tls] and insecure = true contradict each other; keep one")
    if tls is None and not settings.get("insecure"):
        fail(
            "nodes outside loopback talk mutual TLS: add a [tls] table naming the certificates "
            "`rumor keys` made, or set insecure = true on a network you trust"
        )
    return ClusterSpec(
        name=name,
        graph=graph,
        settings=settings,
        port=port,
        listen_host=listen_host,
        state_dir=state_dir,
        hosts=hosts,
        placements=placements,
        tls=tls,
        token_file=token_file,
        checkpoints=checkpoints,
        source=source,
    )


# ----------------------------------------------------------------------------- parts


def _settings(data: dict[str, Any], fail: Callable[[str], typing.NoReturn]) -> dict[str, Any]:
    """The NodeConfig fields every node shares, type-checked against NodeConfig."""
    hints = typing.get_type_hints(NodeConfig)
    known = node_fields()
    settings: dict[str, Any] = {}
    for key, value in data.items():
        if key in SPEC_KEYS:
            continue
        if key in PER_NODE_FIELDS:
            fail(f"{key!r} differs per node: the deploy generators set it, leave it out")
        if key not in known:
            allowed = sorted((known - PER_NODE_FIELDS) | set(SPEC_KEYS))
            fail(f"unknown key {key!r}; known keys: {', '.join(allowed)}")
        if not _type_ok(value, hints[key]):
            fail(f"{key} = {value!r} is not a {_type_name(hints[key])}")
        settings[key] = float(value) if hints[key] is float else value
    return settings


def _checkpoints(
    value: Any, settings: dict[str, Any], fail: Callable[[str], typing.NoReturn]
) -> bool:
    """Whether nodes checkpoint: as asked, or by default when their rule can resume."""
    if value is not None and not isinstance(value, bool):
        fail(f"checkpoints = {value!r} must be true or false")
    if value is False:
        return False
    from rumor.algorithms import registry

    algorithm = settings.get("algorithm", NodeConfig.algorithm)
    try:
        rule = registry.get(algorithm)
    except KeyError as exc:
        fail(f"algorithm = {algorithm!r}: {exc.args[0]}")
    resumable = bool(getattr(rule, "checkpointable", False))
    if value and not resumable:
        fail(f"algorithm {algorithm!r} cannot resume from checkpoints: set checkpoints = false")
    return resumable


def _type_ok(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is not None and isinstance(origin, type):
        return isinstance(value, origin)
    return isinstance(hint, type) and isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _port(value: Any, key: str, fail: Callable[[str], typing.NoReturn]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        fail(f"{key} = {value!r} is not a port (1-65535)")
    return value


def _valid_host(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return bool(_HOSTNAME.match(text))


def _hosts(table: Any, fail: Callable[[str], typing.NoReturn]) -> dict[str, str]:
    if not isinstance(table, dict):
        fail("[hosts] must be a table of machine name -> address")
    out = {}
    for host, address in table.items():
        if not isinstance(address, str) or not _valid_host(address):
            fail(f"hosts.{host} = {address!r} is not an IP address or DNS name")
        out[str(host)] = address
    return out


def _graph(
    data: dict[str, Any],
    n: int | None,
    seed: int,
    root: Path,
    fail: Callable[[str], typing.NoReturn],
) -> nx.Graph:
    topology, edges = data.get("topology"), data.get("edges")
    if (topology is None) == (edges is None):
        fail("give exactly one of topology (a spec such as ring:8) or edges (a list of pairs)")
    if topology is not None:
        if not isinstance(topology, str) or not topology.strip():
            fail(f"topology = {topology!r} must be a topology spec string")
        from rumor.cluster import build_graph
        from rumor.topology.io import FORMATS

        spec = topology
        if Path(topology).suffix.lower() in FORMATS and not Path(topology).is_absolute():
            spec = str(root / topology)
        try:
            try:  # a size in the spec string wins; a disagreeing count is reported below
                graph = build_graph(spec, None, seed)  # type: ignore[arg-type]
            except ValueError:
                if n is None:
                    raise
                graph = build_graph(spec, n, seed)
        except (ValueError, OSError) as exc:
            hint = "" if n is not None else "; without [nodes], give the size (ring:8) or n_nodes"
            fail(f"topology = {topology!r}: {exc}{hint}")
    else:
        graph = _edge_graph(edges, n, fail)
    if graph.number_of_nodes() < 1:
        fail("the topology has no nodes")
    if not nx.is_connected(graph):
        parts = sorted(sorted(c) for c in nx.connected_components(graph))
        fail(f"the topology is not connected (components {parts}): the nodes could not agree")
    return graph


def _edge_graph(edges: Any, n: int | None, fail: Callable[[str], typing.NoReturn]) -> nx.Graph:
    if not isinstance(edges, list) or not edges:
        fail("edges must be a non-empty list of [u, v] pairs")
    pairs = []
    for k, edge in enumerate(edges):
        if not isinstance(edge, list) or len(edge) != 2:
            fail(f"edges[{k}] = {edge!r} is not a pair [u, v]")
        u, v = (_node_index(x, f"edges[{k}]", fail) for x in edge)
        if u == v:
            fail(f"edges[{k}] = {edge!r} joins a node to itself")
        pairs.append((u, v))
    top = max(max(p) for p in pairs) + 1
    count = n if n is not None else top
    if top > count:
        fail(f"edges name node {top - 1}, but the cluster has {count} nodes (0..{count - 1})")
    graph = nx.Graph()
    graph.add_nodes_from(range(count))
    graph.add_edges_from(pairs)
    return graph


def _node_index(value: Any, key: str, fail: Callable[[str], typing.NoReturn]) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and _NODE_ID.match(value):
        return int(value.split("-", 1)[1])
    fail(f"{key}: {value!r} is not a node index (0, 1, ...) or node id (node-0, node-1, ...)")


def _placements(
    table: dict[str, Any],
    hosts: dict[str, str],
    n: int,
    default_port: int,
    fail: Callable[[str], typing.NoReturn],
) -> list[Placement]:
    if not table:
        return []
    # the caller checked that [nodes] has n entries: with no unknown id, none is missing
    unknown = sorted(set(table) - {f"node-{i}" for i in range(n)})
    if unknown:
        fail(
            f"[nodes] names {', '.join(unknown)}: node ids are node-0..node-{n - 1}, node-i "
            "being node i of the topology"
        )
    out = []
    seen: dict[tuple[str, int], str] = {}
    for node_id in sorted(table, key=lambda s: int(s.split("-")[1])):
        entry = table[node_id]
        if isinstance(entry, str):
            entry = {"host": entry}
        if not isinstance(entry, dict):
            fail(f"nodes.{node_id} = {entry!r}: expected a host name or {{ host, port }}")
        extra = sorted(set(entry) - {"host", "port"})
        if extra:
            fail(f"nodes.{node_id}: unknown keys {', '.join(extra)} (expected host, port)")
        host = entry.get("host")
        if host not in hosts:
            fail(f"nodes.{node_id}: host {host!r} is not in [hosts] ({', '.join(hosts)})")
        port = _port(entry.get("port", default_port), f"nodes.{node_id}.port", fail)
        if (host, port) in seen:
            fail(f"nodes.{node_id} and nodes.{seen[host, port]} both use {host} port {port}")
        seen[host, port] = node_id
        index = int(node_id.split("-")[1])
        out.append(Placement(node_id, index, host, hosts[host], port))
    return out


def _tls(table: Any, root: Path, fail: Callable[[str], typing.NoReturn]) -> TlsFiles | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        fail("[tls] must be a table: dir, or ca / cert / key")
    extra = sorted(set(table) - {"dir", *TLS_DEFAULT_FILES})
    if extra:
        fail(f"[tls]: unknown keys {', '.join(extra)} (expected dir, ca, cert, key)")
    base = root
    if "dir" in table:
        if not isinstance(table["dir"], str):
            fail("tls.dir must be a path")
        base = root / table["dir"]
    elif set(TLS_DEFAULT_FILES) - set(table):
        fail("[tls] needs dir (where `rumor keys` wrote), or all of ca, cert and key")
    files = {}
    for key, default in TLS_DEFAULT_FILES.items():
        value = table.get(key, default)
        if not isinstance(value, str):
            fail(f"tls.{key} must be a path")
        if key != "ca" and "{node}" not in value:
            fail(f"tls.{key} = {value!r} must contain {{node}} (each node has its own)")
        files[key] = str(base / value)
    if "{node}" in files["ca"]:
        fail("tls.ca is the one cluster CA certificate; it cannot depend on {node}")
    return TlsFiles(ca=Path(files["ca"]), cert=files["cert"], key=files["key"])
