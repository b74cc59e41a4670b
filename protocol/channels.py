"""Every gRPC channel and server is built here, so limits, keepalives and credentials are set
in exactly one place.

Options worth knowing: SO_REUSEPORT is off, so two nodes can never silently share a port;
the HTTP proxy from the environment is ignored, so node traffic goes straight to the peer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from rumor.protocol.constants import (
    GRPC_MAX_MESSAGE_BYTES,
    KEEPALIVE_TIME_MS,
    KEEPALIVE_TIMEOUT_MS,
)


def channel_options(max_message_bytes: int = GRPC_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_http_proxy", 0),
        ("grpc.enable_retries", 0),
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
) -> grpc.aio.Channel:
    """A client channel to one peer; plaintext when ``credentials`` is None.

    ``extra_options`` and ``interceptors`` come from :mod:`rumor.protocol.security` (the
    expected peer's TLS name, the cluster token).
    """
    options = [*channel_options(), *extra_options]
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
