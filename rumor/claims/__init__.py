"""Reproducible claims: one module per algorithm, each re-running the experiment behind its
paper's claim at a size this machine can afford and returning the table.

A claim module exposes ``TITLE`` (one line) and
``run(quick: bool = False, seeds: int | None = None) -> Claim``. ``rumor bench claims NAME``
prints the table (``--format json`` for scripts); ``docs/algorithms.md`` quotes the tables.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any

#: claim name -> module that reproduces it
CLAIMS: dict[str, str] = {
    "dadao": "rumor.claims.dadao",
    "dfedsam": "rumor.claims.dfedsam",
    "variance-corrected": "rumor.claims.variance_corrected",
    "modest": "rumor.claims.modest",
    "sybilwall": "rumor.claims.sybilwall",
}


@dataclass(frozen=True)
class Arm:
    """One method of a claim's table: a label, the rule and its parameters."""

    label: str
    algorithm: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Claim:
    """A reproduced claim: the statement, the measured table, and whether it held."""

    name: str
    title: str
    claim: str
    columns: list[str]
    rows: list[list[Any]]
    holds: bool | None = None
    notes: list[str] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def available() -> dict[str, str]:
    return dict(CLAIMS)


def run(name: str, quick: bool = False, seeds: int | None = None) -> Claim:
    if name not in CLAIMS:
        known = ", ".join(sorted(CLAIMS)) or "none yet"
        raise KeyError(f"unknown claim {name!r}; known: {known}")
    module = importlib.import_module(CLAIMS[name])
    return module.run(quick=quick, seeds=seeds)
