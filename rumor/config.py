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

    node_id: str = "node-0"
    #: This node's shard of the partitioned dataset, and how many shards there are.
    index: int = 0
    n_nodes: int = 1
    listen: str = "127.0.0.1:0"
    advertise: str | None = None
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
    eval_every: int = 1
    metrics: str | None = None
    heartbeat_period: float = 1.0
    heartbeat_misses: int = 3
    request_timeout: float = 30.0
    startup_wait: float = 30.0
    linger: float = 0.0
    torch_threads: int = 1
    log_level: str = "INFO"

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
