"""Per-node metrics as JSON lines: one object per line, appended and flushed as it happens.

Schema (every line): ``t`` (wall-clock Unix time), ``elapsed`` (seconds on the node's clock,
virtual in simulation), ``node``, ``event`` (``start``, ``round``, ``stop``, ...), then the
event's fields. Round lines carry ``round``, ``loss``, ``accuracy`` and ``test_loss`` (when
evaluated), cumulative ``bytes_in``/``bytes_out``/``exchanges``/``rejected``, ``digest``
(model digest), ``neighbour_distance`` (||x - neighbourhood average|| before mixing, when the
rule knows it) and ``alive`` (neighbours believed alive). Readers must ignore unknown fields.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import IO, Any

from rumor.node.clock import Clock


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Appends metric records for one node; with ``path=None`` it only keeps the last ones."""

    def __init__(
        self,
        node_id: str,
        clock: Clock,
        path: str | Path | None = None,
        keep_in_memory: bool | None = None,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", buffering=1, encoding="utf-8")
        self.records: list[dict[str, Any]] = []
        self.keep_in_memory = self.path is None if keep_in_memory is None else keep_in_memory
        self.last: dict[str, Any] = {}

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {
            "t": time.time(),
            "elapsed": round(self.clock.now(), 6),
            "node": self.node_id,
            "event": event,
        }
        record.update({k: _clean(v) for k, v in fields.items()})
        self.last = record
        if self.keep_in_memory:
            self.records.append(record)
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of one JSON-lines file; a torn last line (crash mid-write) is skipped."""
    out = []
    with Path(path).open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out
