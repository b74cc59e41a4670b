"""The transport interface: carry a :class:`Message` to a peer and bring back its answer.

Two implementations share it: :mod:`rumor.protocol.grpc_transport` (grpc.aio between
processes and machines) and :mod:`rumor.protocol.inproc` (one process, for simulation and
tests). Both raise the same errors: :class:`~rumor.protocol.errors.Rejected` when the peer
refused the input, :class:`~rumor.protocol.errors.PeerUnavailable` when it could not be
reached in time. A transport knows nothing of algorithms: it calls a :class:`NodeService`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from rumor.protocol.bundle import Message
from rumor.protocol.v1 import node_pb2


class NodeService(Protocol):
    """What a transport's server side calls into: the node."""

    async def handle_message(self, msg: Message) -> Message | None:
        """Answer one algorithm message; ``None`` means a bare acknowledgement."""
        ...

    async def handle_ping(self, ping: node_pb2.Ping) -> node_pb2.Pong: ...

    def status(self) -> node_pb2.StatusReply: ...


@dataclass
class TransportStats:
    """Payload and message counters, kept by every transport the same way."""

    bytes_out: int = 0
    bytes_in: int = 0
    messages_out: int = 0
    messages_in: int = 0
    failures: int = 0
    rejected_in: int = 0


class Transport(ABC):
    """Moves messages between nodes. One instance per node.

    ``address`` is what peers use to reach this node (``host:port`` for gRPC, a name for the
    in-process network).
    """

    def __init__(self) -> None:
        self.stats = TransportStats()

    @property
    @abstractmethod
    def address(self) -> str: ...

    @abstractmethod
    async def start(self, service: NodeService) -> str:
        """Start serving ``service``; return the bound address."""

    @abstractmethod
    async def request(self, peer: str, msg: Message, timeout: float) -> Message | None:
        """Send ``msg`` to ``peer`` and return its answer (``None`` for a bare ack)."""

    @abstractmethod
    async def ping(self, peer: str, ping: node_pb2.Ping, timeout: float) -> node_pb2.Pong: ...

    @abstractmethod
    async def status(self, peer: str, timeout: float) -> node_pb2.StatusReply: ...

    @abstractmethod
    async def stop(self, grace: float = 1.0) -> None:
        """Stop serving and close every client connection."""

    def reconnect(self, peer: str) -> None:
        """Forget any failed-connection state towards ``peer``: it is back (it called us), so
        the next call should dial it at once rather than after a backoff. The default has
        nothing to forget."""
        return None
