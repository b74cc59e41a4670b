"""gRPC transport: grpc.aio between processes and machines.

Exchange is a bidirectional stream of :mod:`~rumor.protocol.framing` frames with identity
(de)serializers: the envelope is protobuf, tensor chunks are raw bytes that are copied once
on each side. Heartbeat and Status are plain unary protobuf calls; the standard gRPC health
service is served beside them. Channels are reused per peer; calls have deadlines; a peer
that cannot be reached is retried with backoff and jitter inside the caller's deadline.
Bad input is answered with a gRPC status that names the problem (never ``UNKNOWN``), counted in
``TransportStats.rejected_in``, and logged without a traceback: one WARNING per peer and
status code per :data:`REFUSAL_LOG_PERIOD_S` at most (:mod:`rumor.protocol.ratelimit`), so a
peer that keeps sending garbage cannot flood the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from rumor.protocol import channels, framing
from rumor.protocol.bundle import Message
from rumor.protocol.constants import (
    CHUNK_SIZE,
    DRAIN_LIMIT_BYTES,
    DRAIN_LIMIT_S,
    GRPC_SERVICE,
    MAX_BUNDLE_BYTES,
    PROTOCOL_VERSION,
)
from rumor.protocol.errors import Code, PeerUnavailable, Rejected
from rumor.protocol.ratelimit import RateLimiter
from rumor.protocol.retry import Retry
from rumor.protocol.transport import NodeService, Transport
from rumor.protocol.v1 import node_pb2

if TYPE_CHECKING:
    from rumor.protocol.security import Security

log = logging.getLogger("rumor.transport")
_P = TypeVar("_P", node_pb2.Ping, node_pb2.StatusRequest)

ACK_KIND = "rumor.ack"
_EXCHANGE = f"/{GRPC_SERVICE}/Exchange"
_HEARTBEAT = f"/{GRPC_SERVICE}/Heartbeat"
_STATUS = f"/{GRPC_SERVICE}/Status"
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
#: Seconds calls on a replaced channel may still run (GrpcTransport.reconnect).
RECONNECT_GRACE_S = 5.0
#: Largest Heartbeat or Status request accepted (bytes). An honest Ping is under 300 bytes;
#: without a bound a caller could make the node parse a 16 MiB message per heartbeat.
MAX_SMALL_REQUEST_BYTES = 64 << 10
#: Longest ``Ping.sender`` and ``Ping.address`` accepted (characters).
MAX_PING_ID_CHARS = 256
MAX_PING_ADDRESS_CHARS = 1024
#: Shortest interval between two log lines about refusals of one peer with one code (s).
REFUSAL_LOG_PERIOD_S = 10.0


def _error_from_rpc(peer: str, err: grpc.aio.AioRpcError) -> Exception:
    """Map a failed call onto the transport-neutral errors."""
    code = err.code()
    detail = err.details() or code.name
    if code in _UNREACHABLE or code == grpc.StatusCode.CANCELLED:
        return PeerUnavailable(peer, detail, Code(code.name))
    try:
        return Rejected(Code(code.name), detail)
    except ValueError:
        return Rejected(Code.INTERNAL, f"{code.name}: {detail}")


class GrpcTransport(Transport):
    """A node's gRPC endpoint: one server, and one reused channel per peer."""

    def __init__(
        self,
        listen: str = "127.0.0.1:0",
        advertise: str | None = None,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
        check_finite: bool = True,
        chunk_size: int = CHUNK_SIZE,
        retry: Retry | None = None,
        server_credentials: grpc.ServerCredentials | None = None,
        channel_credentials: grpc.ChannelCredentials | None = None,
        node_id: str = "",
        security: Security | None = None,
        reconnect: channels.Reconnect = channels.LAN,
    ) -> None:
        super().__init__()
        self._reconnect = reconnect
        self._listen = listen
        self._advertise = advertise
        self._max_bytes = max_bundle_bytes
        self._check_finite = check_finite
        self._chunk_size = chunk_size
        self._retry = retry or Retry()
        self._server_credentials = server_credentials
        self._channel_credentials = channel_credentials
        #: When given, mTLS, the token and the allowlist come from it (rumor.protocol.security).
        self._security = security
        if security is not None:
            self._server_credentials = security.server_credentials()
        self._node_id = node_id
        self._server: grpc.aio.Server | None = None
        self._service: NodeService | None = None
        self._health: health_aio.HealthServicer | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        #: old channels being closed after a reconnect (kept so the tasks are not collected)
        self._closing: set[asyncio.Task[None]] = set()
        #: id(message) -> (message, its shared frames) while requests carrying it run
        self._sending: dict[int, tuple[Message, framing.SharedFrames]] = {}
        self._bound = ""
        #: Which refusals get a log line (one per peer and code per period).
        self._refusal_log = RateLimiter(REFUSAL_LOG_PERIOD_S)

    @property
    def address(self) -> str:
        return self._advertise or self._bound

    # ----------------------------------------------------------------- server side
    async def start(self, service: NodeService) -> str:
        self._service = service
        server = self._security.make_server() if self._security else channels.make_server()
        handlers = {
            "Exchange": grpc.stream_stream_rpc_method_handler(self._serve_exchange),
            # Requests arrive as bytes and are parsed in the handler: a deserializer that
            # raises inside grpc answers UNKNOWN and logs a traceback per malformed call.
            "Heartbeat": grpc.unary_unary_rpc_method_handler(
                self._serve_heartbeat,
                response_serializer=node_pb2.Pong.SerializeToString,
            ),
            "Status": grpc.unary_unary_rpc_method_handler(
                self._serve_status,
                response_serializer=node_pb2.StatusReply.SerializeToString,
            ),
        }
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(GRPC_SERVICE, handlers),)
        )
        self._health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        port = channels.bind(server, self._listen, self._server_credentials)
        host = self._listen.rsplit(":", 1)[0]
        self._bound = f"{host}:{port}"
        await server.start()
        for name in ("", GRPC_SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        return self.address

    async def stop(self, grace: float = 1.0) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def _serve_exchange(
        self, frames: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        assert self._service is not None
        assembler = framing.MessageAssembler(
            max_bytes=self._max_bytes, check_finite=self._check_finite
        )
        msg: Message | None = None
        try:
            async for frame in frames:
                assembler.feed(frame)
            msg = assembler.finish()
            self.stats.messages_in += 1
            self.stats.bytes_in += msg.nbytes
            reply = await self._service.handle_message(msg)
        except Rejected as exc:
            sender = msg.sender if msg else ""
            self._log_refusal("a message", sender, context, exc)
            await _drain(frames)
            await context.abort(grpc.StatusCode[exc.code.value], exc.detail)
            return
        if reply is None:
            # An answer of no frames acknowledges: one write and one read fewer per call
            # than an envelope would cost, which matters at a few calls per round.
            return
        self.stats.messages_out += 1
        self.stats.bytes_out += reply.nbytes
        for frame in framing.message_to_frames(reply, chunk_size=self._chunk_size):
            yield frame

    async def _serve_heartbeat(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> node_pb2.Pong:
        assert self._service is not None
        try:
            ping = _parse_ping(request)
            return await self._service.handle_ping(ping)
        except Rejected as exc:
            self._log_refusal("a Heartbeat", "", context, exc)
            await context.abort(grpc.StatusCode[exc.code.value], exc.detail)

    async def _serve_status(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> node_pb2.StatusReply:
        assert self._service is not None
        try:
            _parse_small(node_pb2.StatusRequest, request)
        except Rejected as exc:
            self._log_refusal("a Status request", "", context, exc)
            await context.abort(grpc.StatusCode[exc.code.value], exc.detail)
        return self._service.status()

    def _log_refusal(
        self, what: str, sender: str, context: grpc.aio.ServicerContext, exc: Rejected
    ) -> None:
        """Count a refusal and log it, at most once per peer and code per period.

        The key is the sender's claimed id when the message got that far, else the caller's
        host (its port changes with every connection, so it would not limit anything).
        """
        self.stats.rejected_in += 1
        peer = context.peer() or "unknown"
        held = self._refusal_log.allow((sender or _host_of(peer), exc.code.value))
        if held is None:
            return
        log.warning(
            "%s rejected %s from %s (%s): %s%s",
            self._node_id or self.address,
            what,
            sender or peer,
            exc.code.value,
            exc.detail,
            f" [{held} more refusals of this peer and code not logged]" if held else "",
        )

    # ----------------------------------------------------------------- client side
    def channel(self, peer: str) -> grpc.aio.Channel:
        channel = self._channels.get(peer)
        if channel is None:
            if self._security is not None:
                channel = self._security.make_channel(peer, self._reconnect)
            else:
                channel = channels.make_channel(
                    peer, self._channel_credentials, reconnect=self._reconnect
                )
            self._channels[peer] = channel
        return channel

    def reconnect(self, peer: str) -> None:
        """Replace the channel to ``peer`` by a fresh one, which dials at once.

        grpc.aio offers no way to reset a channel's reconnect backoff; a new channel has none.
        Calls still running on the old channel get ``RECONNECT_GRACE_S`` to finish before it
        is closed.
        """
        old = self._channels.pop(peer, None)
        if old is not None:
            task = asyncio.ensure_future(old.close(RECONNECT_GRACE_S))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _outgoing(self, msg: Message) -> framing.SharedFrames:
        """The shared encoding of ``msg`` while requests carrying it are in flight: a model
        sent to every neighbour at once is digested and framed once, not once per peer."""
        entry = self._sending.get(id(msg))
        if entry is None or entry[0] is not msg:
            entry = (msg, framing.SharedFrames(msg, chunk_size=self._chunk_size))
            self._sending[id(msg)] = entry
        return entry[1]

    def _done_with(self, msg: Message, frames: framing.SharedFrames) -> None:
        entry = self._sending.get(id(msg))
        if entry is not None and entry[1] is frames and frames.open_readers == 0:
            del self._sending[id(msg)]

    async def request(self, peer: str, msg: Message, timeout: float) -> Message | None:
        call = self.channel(peer).stream_stream(_EXCHANGE)

        async def attempt(remaining: float | None) -> Message | None:
            assembler = framing.MessageAssembler(
                max_bytes=self._max_bytes, check_finite=self._check_finite
            )
            shared = self._outgoing(msg)
            frames = shared.reader()
            stream = call(timeout=remaining)
            try:
                await _write_all(stream, frames)
                async for frame in stream:
                    assembler.feed(frame)
            except grpc.aio.AioRpcError as err:
                raise _error_from_rpc(peer, err) from None
            finally:
                frames.close()
                self._done_with(msg, shared)
            if assembler.wire_bytes == 0:
                return None  # the call ended OK with no answer frames: acknowledged
            return assembler.finish()

        try:
            reply = await self._retry.run(attempt, _retryable, timeout)
        except PeerUnavailable:
            self.stats.failures += 1
            raise
        self.stats.messages_out += 1
        self.stats.bytes_out += msg.nbytes
        if reply is None or (reply.kind == ACK_KIND and reply.bundle is None):
            return None  # (an envelope of ACK_KIND is how earlier nodes acknowledged)
        self.stats.messages_in += 1
        self.stats.bytes_in += reply.nbytes
        return reply

    async def ping(self, peer: str, ping: node_pb2.Ping, timeout: float) -> node_pb2.Pong:
        call = self.channel(peer).unary_unary(
            _HEARTBEAT,
            request_serializer=node_pb2.Ping.SerializeToString,
            response_deserializer=node_pb2.Pong.FromString,
        )
        try:
            return await call(ping, timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise _error_from_rpc(peer, err) from None

    async def status(self, peer: str, timeout: float) -> node_pb2.StatusReply:
        call = self.channel(peer).unary_unary(
            _STATUS,
            request_serializer=node_pb2.StatusRequest.SerializeToString,
            response_deserializer=node_pb2.StatusReply.FromString,
        )
        try:
            return await call(node_pb2.StatusRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise _error_from_rpc(peer, err) from None


def _parse_small(cls: type[_P], request: bytes) -> _P:
    """``request`` parsed as ``cls`` (a unary request); Rejected when too large or malformed."""
    if len(request) > MAX_SMALL_REQUEST_BYTES:
        raise Rejected(
            Code.RESOURCE_EXHAUSTED,
            f"{cls.__name__} of {len(request)} bytes exceeds the limit of "
            f"{MAX_SMALL_REQUEST_BYTES}",
        )
    message = cls()
    try:
        message.ParseFromString(request)
    except DecodeError as exc:
        raise Rejected(Code.INVALID_ARGUMENT, f"malformed {cls.__name__}: {exc}") from None
    return message


def _parse_ping(request: bytes) -> node_pb2.Ping:
    """A Heartbeat's Ping, checked: a version this node speaks (0: not set), sane sizes."""
    ping = _parse_small(node_pb2.Ping, request)
    if ping.protocol_version not in (0, PROTOCOL_VERSION):
        raise Rejected(
            Code.FAILED_PRECONDITION,
            f"protocol version {ping.protocol_version} not supported (this node speaks "
            f"{PROTOCOL_VERSION})",
        )
    if len(ping.sender) > MAX_PING_ID_CHARS:
        raise Rejected(
            Code.INVALID_ARGUMENT,
            f"Ping sender of {len(ping.sender)} characters; the limit is {MAX_PING_ID_CHARS}",
        )
    if len(ping.address) > MAX_PING_ADDRESS_CHARS:
        raise Rejected(
            Code.INVALID_ARGUMENT,
            f"Ping address of {len(ping.address)} characters; the limit is "
            f"{MAX_PING_ADDRESS_CHARS}",
        )
    if ping.round < 0:
        raise Rejected(Code.INVALID_ARGUMENT, f"Ping round {ping.round} is negative")
    return ping


def _host_of(peer: str) -> str:
    """The host part of a gRPC peer string (``ipv4:10.0.0.2:5555`` -> ``10.0.0.2``)."""
    kind, sep, rest = peer.partition(":")
    if not sep or kind not in ("ipv4", "ipv6"):
        return peer
    host, sep, port = rest.rpartition(":")
    return host if sep and port.isdigit() else rest


async def _drain(frames: AsyncIterator[bytes]) -> None:
    """Read and drop what the client still sends before refusing its call (bounded).

    grpc.aio clients report ``INTERNAL`` instead of the server's status when the server ends
    a call while they are still writing (grpc/grpc#36066). Draining up to
    ``DRAIN_LIMIT_BYTES`` within ``DRAIN_LIMIT_S`` lets an honest sender see the real reason;
    past either bound the call is refused at once.
    """

    async def consume() -> None:
        received = 0
        async for frame in frames:
            received += len(frame)
            if received > DRAIN_LIMIT_BYTES:
                return

    with contextlib.suppress(asyncio.TimeoutError, grpc.aio.AioRpcError):
        await asyncio.wait_for(consume(), DRAIN_LIMIT_S)


async def _write_all(stream: grpc.aio.StreamStreamCall, frames: Iterator[bytes]) -> None:
    """Write every frame, then half-close; stop quietly when the peer already answered.

    A receiver may refuse a message after its first frame (an oversize header, say) and end
    the call while frames are still on their way. Writing then fails; the peer's status is
    what the caller must see, and reading the stream raises it.
    """
    try:
        for frame in frames:
            await stream.write(frame)
        await stream.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, PeerUnavailable) and exc.code == Code.UNAVAILABLE
