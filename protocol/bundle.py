"""Bundles and messages: what travels between nodes, independent of any transport.

A :class:`Bundle` is a set of named tensors (a ``state_dict`` plus whatever extra tensors a
rule needs) and scalar metadata. A :class:`Message` is one algorithm message: a kind, the
sender, a round or event time, an optional bundle and an optional typed protobuf payload.
Mixing rules build and read these; only the transports know how they look on the wire.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

Scalar = float | int | str | bool


@dataclass
class Bundle:
    """Named tensors plus scalar metadata.

    Tensors are sent as they are (dtype, shape); a receiver gets fresh CPU tensors that it
    owns. ``meta`` holds small scalars such as a sender's degree or sample count.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Scalar] = field(default_factory=dict)

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, torch.Tensor], meta: Mapping[str, Scalar] | None = None
    ) -> Bundle:
        """Wrap a state dict (detached; no copy is made here)."""
        return cls({k: v.detach() for k, v in state.items()}, dict(meta or {}))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class Message:
    """One algorithm message between two nodes.

    ``kind`` is namespaced by the rule that owns it (``"gossip.model"``). ``payload`` is an
    optional protobuf message (typed, never pickled) packed into ``google.protobuf.Any`` on
    the wire; receivers get the ``Any`` back and unpack the type they expect.
    """

    kind: str
    sender: str = ""
    round: int = 0
    time: float = 0.0
    exchange_id: str = ""
    bundle: Bundle | None = None
    payload: Any = None
    algorithm: str = ""

    @property
    def nbytes(self) -> int:
        return self.bundle.nbytes if self.bundle is not None else 0
