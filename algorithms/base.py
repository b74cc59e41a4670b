"""The mixing-rule interface and the context a rule sees.

A rule owns its control loop (``run``) and answers incoming messages (``on_message``). It
sees the world only through :class:`Context`: its id, the clock, its live neighbours, the
trainer and model, and ``request``/``send`` to peers. It never imports grpc or protobuf
transport code, which is what lets the same rule run between machines and in a simulation.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import torch

from rumor.protocol.bundle import Bundle, Message

T = TypeVar("T")


@dataclass(frozen=True)
class PulledModel:
    """A neighbour's current model as :meth:`Context.pull_model` returns it: the tensors, the
    round the neighbour is at (rounds it has finished), and whether it finished its budget."""

    peer: str
    round: int
    finished: bool
    tensors: dict[str, torch.Tensor]


class Context(Protocol):
    """Everything a rule may touch. Implemented by :class:`rumor.node.runtime.NodeContext`."""

    node_id: str
    rng: random.Random
    clock: Any  # rumor.node.clock.Clock
    trainer: Any  # rumor.node.trainer.Trainer
    model: torch.nn.Module
    lock: Any  # asyncio.Lock that owns the model's tensors
    max_rounds: int | None
    params: Mapping[str, Any]
    #: Rounds finished: 0 at a fresh start, the checkpoint's round after a resume. A rule's
    #: round loop starts here.
    round: int

    def neighbors(self) -> list[str]:
        """Neighbours currently believed alive and still running rounds, sorted: those to
        gossip with and wait for."""
        ...

    def all_neighbors(self) -> list[str]:
        """Every neighbour from the topology, alive or not, sorted."""
        ...

    def present_neighbors(self) -> list[str]:
        """Neighbours that have not left: alive, or unreachable for now."""
        ...

    def serving_neighbors(self) -> list[str]:
        """Alive neighbours, including those that finished their rounds but still serve (they
        linger while a neighbour trains): they answer exchanges and pulls, sorted."""
        ...

    def on_membership_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever a neighbour dies, comes back, leaves, finishes or
        reports a new round (idempotent per callback): a round waiting on its neighbours
        re-checks whom it still waits for."""
        ...

    @property
    def degree(self) -> int:
        """Degree in the topology (static; what Metropolis-Hastings weights use)."""
        ...

    def peer_round(self, peer: str) -> int | None:
        """The last round ``peer`` reported, if known."""
        ...

    # Rules that talk beyond the graph (MoDeST samples the whole population) learn where
    # other nodes listen, address them like neighbours, and run their own timers.
    @property
    def address(self) -> str:
        """Where this node listens, as peers should dial it."""
        ...

    def address_of(self, peer: str) -> str | None:
        """Where ``peer`` listens, if known (a neighbour, or an address learned before)."""
        ...

    def learn_address(self, peer: str, address: str) -> None:
        """Make ``peer`` reachable by ``request``/``send`` without making it a neighbour
        (it is not heartbeated, and ``neighbors()`` does not list it)."""
        ...

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Run ``coro`` beside the rule: timers (``await ctx.clock.sleep(t)`` inside),
        background sends. Cancelled when ``run`` returns or the node stops; a failure is
        logged."""
        ...

    async def pull(self, peer: str, timeout: float | None = None) -> dict[str, torch.Tensor] | None:
        """A copy of ``peer``'s current model, or None if it could not be had."""
        ...

    async def pull_model(self, peer: str, timeout: float | None = None) -> PulledModel | None:
        """``peer``'s current model and the round it is at, or None if it could not be had."""
        ...

    def should_stop(self, round: int) -> bool:
        """True once ``round`` is past the budget or the node is shutting down."""
        ...

    async def compute(self, fn: Callable[..., T], *args: Any, cost_s: float | None = None) -> T:
        """Run CPU work off the event loop (a worker thread; inline in simulation)."""
        ...

    def new_exchange_id(self) -> str:
        """A fresh idempotency key for an exactly-once exchange."""
        ...

    def message(
        self, kind: str, *, round: int = 0, bundle: Bundle | None = None, **fields: Any
    ) -> Message: ...

    async def request(
        self, peer: str, msg: Message, timeout: float | None = None
    ) -> Message | None:
        """Send and await the answer; raises PeerUnavailable or Rejected."""
        ...

    async def send(self, peer: str, msg: Message, timeout: float | None = None) -> bool:
        """Send, ignore the answer; False (logged) when the peer could not take it."""
        ...

    def end_round(self, round: int, **fields: Any) -> None:
        """Record a finished round (metrics line, status, optional evaluation)."""
        ...

    async def maybe_evaluate(self, round: int) -> dict[str, Any] | None: ...

    def note(self, event: str, **fields: Any) -> None:
        """Write a metrics line of ``event`` (e.g. ``catch_up``) with ``fields``."""
        ...

    def log(self, msg: str, *args: Any, level: int = ...) -> None: ...


class MixingRule(ABC):
    """One decentralized learning algorithm.

    Subclasses set ``name``, take their paper's parameters in ``__init__`` (with the paper's
    defaults) and implement ``run`` and ``on_message``.
    """

    name: ClassVar[str] = ""
    #: True when :meth:`state_dict` plus the model and round (saved by the node) are all
    #: the rule needs to resume, and its loops start at ``ctx.round``. A node with a
    #: ``checkpoint_dir`` refuses to start a rule that is not.
    checkpointable: ClassVar[bool] = False

    @classmethod
    def prepare(cls, graph: Any, configs: list[Any]) -> list[Any]:
        """Fill in parameters that need the whole cluster, before any node starts.

        Launchers (``rumor cluster up``, ``rumor simulate``, deploy tools) call this with
        the topology (a networkx graph whose node ``i`` is ``configs[i]``) and the node
        configs (:class:`rumor.config.NodeConfig`), and start the configs it returns. A rule
        whose constants depend on the graph (chi_1, edge rates) or the data (L, mu) sets
        them here; a node started by hand gets them as ordinary ``params``. The default
        changes nothing.
        """
        return configs

    @abstractmethod
    async def run(self, ctx: Context) -> None:
        """The rule's control loop; returns when ``ctx.should_stop`` says so."""

    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        """Answer a message addressed to this rule. ``None`` acknowledges it."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """The rule's own state for a checkpoint (rumor.node.checkpoint), beyond the model.

        Tensors, numbers, strings, lists and dicts. The default is empty: right for a rule
        whose only state is the model and the round (which the node saves itself).
        """
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; called before :meth:`run` on a resume."""
        if state:
            raise ValueError(f"{self.name} keeps no checkpoint state, got {sorted(state)}")

    def describe(self) -> dict[str, Any]:
        """Parameters, for logs and status."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}
