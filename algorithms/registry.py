"""Find mixing rules by name: the built-in ones and third-party ones from entry points.

A package adds a rule by declaring, in its own pyproject::

    [project.entry-points."rumor.algorithms"]
    my-rule = "my_package.my_module:MyRule"
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from rumor.algorithms.base import MixingRule

ENTRY_POINT_GROUP = "rumor.algorithms"

_BUILTIN: dict[str, str] = {
    "dpsgd": "rumor.algorithms.gossip:DPSGD",
    "async-gossip": "rumor.algorithms.async_gossip:AsyncGossip",
    "dadao": "rumor.algorithms.dadao:DADAO",
    "acid": "rumor.algorithms.acid:ACiD",
    "diging": "rumor.algorithms.diging:DIGing",
    "dfedsam": "rumor.algorithms.dfedsam:DFedSAM",
    "dfedsam-mgs": "rumor.algorithms.dfedsam:DFedSAMMGS",
    "variance-corrected": "rumor.algorithms.variance_corrected:VarianceCorrected",
    "modest": "rumor.algorithms.modest:MoDeST",
    "median": "rumor.algorithms.robust_gossip:Median",
    "trimmed-mean": "rumor.algorithms.robust_gossip:TrimmedMean",
    "krum": "rumor.algorithms.robust_gossip:Krum",
    "multi-krum": "rumor.algorithms.robust_gossip:MultiKrum",
    "foolsgold": "rumor.algorithms.robust_gossip:FoolsGold",
    "sybilwall": "rumor.algorithms.sybilwall:SybilWall",
}


def _load(target: str) -> type[MixingRule]:
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    if not (isinstance(cls, type) and issubclass(cls, MixingRule)):
        raise TypeError(f"{target} is not a MixingRule subclass")
    return cls


def available() -> dict[str, str]:
    """Every rule name mapped to where it lives (built-ins, then entry points)."""
    found = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name, ep.value)
    return found


def get(name: str) -> type[MixingRule]:
    """The rule class registered under ``name``."""
    rules = available()
    if name not in rules:
        raise KeyError(f"unknown algorithm {name!r}; known: {', '.join(sorted(rules))}")
    return _load(rules[name])


def create(name: str, params: dict[str, Any] | None = None) -> MixingRule:
    """Instantiate rule ``name`` with ``params`` (unknown parameters are an error)."""
    cls = get(name)
    try:
        return cls(**(params or {}))
    except TypeError as exc:
        raise ValueError(f"bad parameters for {name!r}: {exc}") from exc
