"""In-process transport: many nodes in one event loop, for simulation and tests.

Messages are handed to the peer's service directly, after a modelled network delay
(``latency_s`` plus bytes over ``bandwidth_bps``) slept on the loop's clock, so on a virtual
time loop the delay is simulated time. The receiver always gets its own copy of every
tensor. With ``wire=True`` each message goes through the real framing and codec (header,
chunks, digest, validation) exactly as over gRPC, which the conformance tests use.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from rumor.protocol import framing
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.constants import CHUNK_SIZE, MAX_BUNDLE_BYTES
from rumor.protocol.errors import Code, PeerUnavailable, Rejected
from rumor.protocol.transport import NodeService, Transport
from rumor.protocol.v1 import node_pb2

#: How often a call held by a silent node looks again whether it may pass (s, virtual time).
SILENT_POLL_S = 0.05


@dataclass
class InProcNetwork:
    """The shared medium: who is reachable at which name, and how slow the links are."""

    latency_s: float = 0.0005
    bandwidth_bps: float = 1e9
    wire: bool = False
    _nodes: dict[str, InProcTransport] = field(default_factory=dict)
    _down: set[str] = field(default_factory=set)
    _cut: set[frozenset[str]] = field(default_factory=set)
    _silent: set[str] = field(default_factory=set)

    def attach(self, transport: InProcTransport) -> None:
        if transport.address in self._nodes:
            raise ValueError(f"address {transport.address!r} is taken")
        self._nodes[transport.address] = transport

    def detach(self, address: str) -> None:
        self._nodes.pop(address, None)

    def set_down(self, address: str, down: bool = True) -> None:
        """Make a node unreachable (a crash or a cable pulled) or reachable again."""
        (self._down.add if down else self._down.discard)(address)

    def cut(self, a: str, b: str, cut: bool = True) -> None:
        """Cut or restore the link between two nodes."""
        (self._cut.add if cut else self._cut.discard)(frozenset((a, b)))

    def set_silent(self, address: str, silent: bool = True) -> None:
        """Drop everything to and from a node without an answer, as a dead link does:
        calls hang until their deadline instead of failing at once (unlike set_down, which
        is a refused connection)."""
        (self._silent.add if silent else self._silent.discard)(address)

    async def carry(self, src: str, dst: str) -> None:
        """Return when a packet from ``src`` gets through to ``dst``: at once, unless one of
        them is silent, then only once neither is (a call's deadline usually ends it first)."""
        while src in self._silent or dst in self._silent:
            await asyncio.sleep(SILENT_POLL_S)

    def route(self, src: str, dst: str, serving: bool = True) -> InProcTransport:
        """The endpoint at ``dst`` if ``src`` can reach it (and it serves, if ``serving``)."""
        node = self._nodes.get(dst)
        if node is None or (serving and node.service is None):
            raise PeerUnavailable(dst, "no node listens at this address")
        if dst in self._down or src in self._down or frozenset((src, dst)) in self._cut:
            raise PeerUnavailable(dst, "unreachable")
        return node

    def delay(self, nbytes: int) -> float:
        return self.latency_s + nbytes / self.bandwidth_bps


class InProcTransport(Transport):
    """A node's endpoint on an :class:`InProcNetwork`."""

    def __init__(
        self,
        network: InProcNetwork,
        address: str,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        self._network = network
        self._address = address
        self._max_bytes = max_bundle_bytes
        self._check_finite = check_finite
        self.service: NodeService | None = None
        network.attach(self)

    @property
    def address(self) -> str:
        return self._address

    async def start(self, service: NodeService) -> str:
        self.service = service
        return self._address

    async def stop(self, grace: float = 1.0) -> None:
        self.service = None
        self._network.detach(self._address)

    def _deliver(self, msg: Message, receiver: InProcTransport) -> Message:
        """The receiver's own copy of ``msg``, validated as the wire would validate it."""
        if self._network.wire:
            assembler = framing.MessageAssembler(
                max_bytes=receiver._max_bytes, check_finite=receiver._check_finite
            )
            for frame in framing.message_to_frames(msg, chunk_size=CHUNK_SIZE):
                assembler.feed(frame)
            return assembler.finish()
        bundle = None
        if msg.bundle is not None:
            if msg.bundle.nbytes > receiver._max_bytes:
                raise Rejected(
                    Code.RESOURCE_EXHAUSTED,
                    f"bundle of {msg.bundle.nbytes} bytes exceeds the limit of "
                    f"{receiver._max_bytes}",
                )
            tensors = {k: v.detach().to("cpu", copy=True) for k, v in msg.bundle.tensors.items()}
            bundle = Bundle(tensors, dict(msg.bundle.meta))
        return Message(
            kind=msg.kind,
            sender=msg.sender,
            round=msg.round,
            time=msg.time,
            exchange_id=msg.exchange_id,
            bundle=bundle,
            payload=framing.as_any(msg.payload),
            algorithm=msg.algorithm,
        )

    async def request(self, peer: str, msg: Message, timeout: float) -> Message | None:
        try:
            return await asyncio.wait_for(self._request(peer, msg), timeout)
        except asyncio.TimeoutError as exc:
            self.stats.failures += 1
            raise PeerUnavailable(peer, "deadline exceeded", Code.DEADLINE_EXCEEDED) from exc
        except PeerUnavailable:
            self.stats.failures += 1
            raise

    async def _request(self, peer: str, msg: Message) -> Message | None:
        net = self._network
        await net.carry(self._address, peer)
        receiver = net.route(self._address, peer)
        self.stats.messages_out += 1
        self.stats.bytes_out += msg.nbytes
        await asyncio.sleep(net.delay(msg.nbytes))
        receiver = net.route(self._address, peer)
        try:
            delivered = self._deliver(msg, receiver)
        except Rejected:
            receiver.stats.rejected_in += 1
            raise
        receiver.stats.messages_in += 1
        receiver.stats.bytes_in += msg.nbytes
        assert receiver.service is not None
        reply = await receiver.service.handle_message(delivered)
        if reply is None:
            await asyncio.sleep(net.latency_s)
            return None
        receiver.stats.messages_out += 1
        receiver.stats.bytes_out += reply.nbytes
        await asyncio.sleep(net.delay(reply.nbytes))
        net.route(peer, self._address, serving=False)
        out = receiver._deliver(reply, self)
        self.stats.messages_in += 1
        self.stats.bytes_in += reply.nbytes
        return out

    async def ping(self, peer: str, ping: node_pb2.Ping, timeout: float) -> node_pb2.Pong:
        async def call() -> node_pb2.Pong:
            await self._network.carry(self._address, peer)
            receiver = self._network.route(self._address, peer)
            await asyncio.sleep(self._network.latency_s)
            if receiver.service is None:  # it stopped while the ping was in flight
                raise PeerUnavailable(peer, "stopped")
            pong = await receiver.service.handle_ping(ping)
            await asyncio.sleep(self._network.latency_s)
            self._network.route(peer, self._address, serving=False)
            return pong

        try:
            return await asyncio.wait_for(call(), timeout)
        except asyncio.TimeoutError as exc:
            raise PeerUnavailable(peer, "deadline exceeded", Code.DEADLINE_EXCEEDED) from exc

    async def status(self, peer: str, timeout: float) -> node_pb2.StatusReply:
        receiver = self._network.route(self._address, peer)
        assert receiver.service is not None
        return receiver.service.status()
