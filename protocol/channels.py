"""Every gRPC channel and server is built here, so limits, keepalives and credentials are set
in exactly one place.

Options worth knowing: SO_REUSEPORT is off, so two nodes can never silently share a port;
the HTTP proxy from the environment is ignored, so node traffic goes straight to the peer;
reconnect backoff is explicit (:class:`Reconnect`), because gRPC's default lets a channel
wait up to two minutes before it tries a peer that came back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from rumor.protocol.constants import (
    CONNECT_TIMEOUT_S,
    GRPC_MAX_MESSAGE_BYTES,
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
    RECONNECT_INITIAL_S,
    RECONNECT_MAX_S,
)


@dataclass(frozen=True)
class Reconnect:
    """How a channel retries a peer it lost (seconds).

    ``initial_s``: wait before the first retry; the wait grows by gRPC's factor 1.6 (with
    20 % jitter) up to ``max_s``. ``connect_timeout_s``: the longest one connection attempt
    (TCP and TLS handshakes) may take. :data:`LAN` is the default; :data:`WAN` suits peers
    across the Internet, where a handshake takes a few round trips of 100 ms or more and a
    flood of retries helps nobody.
    """

    initial_s: float = RECONNECT_INITIAL_S
    max_s: float = RECONNECT_MAX_S
    connect_timeout_s: float = CONNECT_TIMEOUT_S

    def __post_init__(self) -> None:
        if not 0 < self.initial_s <= self.max_s:
            raise ValueError(f"reconnect backoff needs 0 < initial <= max, got {self}")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"connect timeout must be > 0, got {self.connect_timeout_s}")

    def options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.initial_reconnect_backoff_ms", _ms(self.initial_s)),
            ("grpc.max_reconnect_backoff_ms", _ms(self.max_s)),
            # gRPC names the per-attempt connect deadline "min reconnect backoff"
            ("grpc.min_reconnect_backoff_ms", _ms(self.connect_timeout_s)),
        ]


LAN = Reconnect()
WAN = Reconnect(initial_s=1.0, max_s=10.0, connect_timeout_s=10.0)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def channel_options(
    max_message_bytes: int = GRPC_MAX_MESSAGE_BYTES, reconnect: Reconnect = LAN
) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_http_proxy", 0),
        ("grpc.enable_retries", 0),
        # Subchannels of its own: gRPC shares them across channels to one address by default,
        # so a channel made afresh for a peer that came back would inherit the old one's
        # backoff (GrpcTransport.reconnect relies on a fresh channel dialling at once).
        ("grpc.use_local_subchannel_pool", 1),
        *reconnect.options(),
    ]


def server_options(max_message_bytes: int = GRPC_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.so_reuseport", 0),
    ]


def make_channel(
    target: str,
    credentials: grpc.ChannelCredentials | None = None,
    extra_options: Sequence[tuple[str, Any]] = (),
    interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    reconnect: Reconnect = LAN,
) -> grpc.aio.Channel:
    """A client channel to one peer; plaintext when ``credentials`` is None.

    ``extra_options`` and ``interceptors`` come from :mod:`rumor.protocol.security` (the
    expected peer's TLS name, the cluster token).
    """
    options = [*channel_options(reconnect=reconnect), *extra_options]
    if credentials is None:
        return grpc.aio.insecure_channel(
            target, options=options, interceptors=list(interceptors) or None
        )
    return grpc.aio.secure_channel(
        target, credentials, options=options, interceptors=list(interceptors) or None
    )


def make_server(interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    return grpc.aio.server(options=server_options(), interceptors=list(interceptors) or None)


def bind(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None
) -> int:
    """Bind ``address`` (``host:port``, port 0 picks a free one) and return the port."""
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind {address}")
    return port
