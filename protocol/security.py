"""Who may talk to a node: mutual TLS, an optional cluster token, an allowlist of node ids.

One :class:`Security` per node decides the mode from its settings and addresses, and makes
everything gRPC needs: server credentials (a certificate and key, client certificates
required and verified against the cluster CA), channel credentials (the same certificate as
a client, the CA to verify the server), per-peer channel options (the expected peer id as
the TLS target name, so a client only accepts the server it meant to reach), and the server
interceptor that checks the token and the allowlist. :mod:`rumor.protocol.channels` builds
the channels and servers with them; nothing else in rumor creates credentials.

Rules:

- With ``tls_cert``, ``tls_key`` and ``tls_ca`` set, every connection is mutual TLS. A
  client without a certificate, or with one from another CA, never completes the handshake;
  gRPC's TLS layer logs the refusal on the refusing node's stderr
  (``Handshake failed ... CERTIFICATE_VERIFY_FAILED`` or ``PEER_DID_NOT_RETURN_A_CERTIFICATE``).
- Without them, plain text is allowed only when every address (listen, advertise, peers)
  is on loopback, or with an explicit ``insecure = true`` (``--insecure``), which is logged
  as a WARNING naming the node and the addresses. Anything else refuses to start.
- ``token`` (or ``token_file``): callers send it in the ``rumor-token`` metadata header;
  a server compares it in constant time and refuses a wrong or missing one with
  UNAUTHENTICATED. Over plain text the token travels in clear: use it with TLS.
- ``allow_ids``: a server reads the caller's node id from its verified certificate (the
  ``rumor://node/<id>`` URI, else the common name) and refuses ids not listed with
  PERMISSION_DENIED. Needs TLS, since without a certificate there is no id to check.

Refusals by the interceptor are logged on the refusing side as one WARNING line naming this
node, the caller's address and id, and the reason (at most one line per caller and reason
every :data:`REFUSAL_LOG_PERIOD_S` seconds, so a retrying peer cannot flood the log).
This module must not know about models, rules or configs beyond the fields it reads.
"""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from rumor.protocol import channels

log = logging.getLogger("rumor.security")

#: Metadata header that carries the cluster token.
TOKEN_HEADER = "rumor-token"
#: The URI subject alternative name prefix that carries a node id (see rumor.keys).
NODE_URI_PREFIX = "rumor://node/"
#: Shortest interval between two log lines about the same refused caller and reason (s).
REFUSAL_LOG_PERIOD_S = 10.0

MODE_MTLS = "mtls"
MODE_PLAINTEXT = "plaintext"


class SecurityError(ValueError):
    """The security settings cannot be used (missing files, plain text off loopback, ...)."""


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of a node's certificate chain, private key, and the cluster CA."""

    cert: bytes
    key: bytes
    ca: bytes

    @classmethod
    def load(cls, cert: str | Path, key: str | Path, ca: str | Path) -> TlsMaterial:
        parts = {}
        for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)):
            try:
                parts[name] = Path(path).read_bytes()
            except OSError as exc:
                raise SecurityError(f"cannot read {name} {path}: {exc.strerror or exc}") from exc
            if b"-----BEGIN" not in parts[name]:
                raise SecurityError(f"{name} {path} is not a PEM file")
        return cls(parts["tls_cert"], parts["tls_key"], parts["tls_ca"])


def is_loopback(address: str) -> bool:
    """True when ``host:port`` (or a bare host) names this machine's loopback interface.

    Host names other than ``localhost`` count as not loopback: they are not resolved here,
    and a name that resolves elsewhere tomorrow must not downgrade a node to plain text.
    ``0.0.0.0`` and ``[::]`` listen on every interface, so they are not loopback either.
    """
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or "]" in address else address
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Security:
    """A node's security settings, and the gRPC credentials and interceptors they imply."""

    node_id: str
    mode: str = MODE_PLAINTEXT
    tls: TlsMaterial | None = None
    token: bytes | None = None
    allow_ids: frozenset[str] | None = None
    #: ``address -> node id`` of known peers: the TLS target name each channel checks.
    peer_names: dict[str, str] = field(default_factory=dict)
    insecure: bool = False

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_settings(
        cls,
        node_id: str,
        *,
        listen: str,
        advertise: str | None = None,
        peers: Mapping[str, str] | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_ca: str | None = None,
        insecure: bool = False,
        token: str | None = None,
        token_file: str | None = None,
        allow_ids: Iterable[str] | None = None,
    ) -> Security:
        """Decide the mode and load the material; :class:`SecurityError` says what is wrong."""
        peers = dict(peers or {})
        given = {"tls_cert": tls_cert, "tls_key": tls_key, "tls_ca": tls_ca}
        missing = [k for k, v in given.items() if not v]
        if len(missing) not in (0, 3):
            raise SecurityError(f"mutual TLS needs tls_cert, tls_key and tls_ca; missing {missing}")
        if not missing and insecure:
            raise SecurityError("insecure = true contradicts tls_cert/tls_key/tls_ca: pick one")
        outside = [
            a for a in [listen, advertise or "", *peers.values()] if a and not is_loopback(a)
        ]
        secret = _token(token, token_file)
        allowed = None if allow_ids is None else frozenset(str(i) for i in allow_ids)
        if not missing:
            material = TlsMaterial.load(tls_cert, tls_key, tls_ca)  # type: ignore[arg-type]
            return cls(
                node_id,
                MODE_MTLS,
                material,
                secret,
                allowed,
                {addr: pid for pid, addr in peers.items()},
            )
        if outside and not insecure:
            raise SecurityError(
                f"addresses outside loopback ({', '.join(outside)}) need mutual TLS: set "
                "tls_cert, tls_key and tls_ca (make them with `rumor keys`), or accept plain "
                "text explicitly with insecure = true (--insecure)"
            )
        if allowed is not None:
            raise SecurityError("allow_ids needs mutual TLS: node ids come from certificates")
        return cls(node_id, MODE_PLAINTEXT, None, secret, None, {}, insecure=insecure)

    @classmethod
    def from_config(cls, cfg: Any) -> Security:
        """From a :class:`rumor.config.NodeConfig` (or anything with the same fields)."""
        return cls.from_settings(
            cfg.node_id,
            listen=cfg.listen,
            advertise=cfg.advertise,
            peers=cfg.peers,
            tls_cert=cfg.tls_cert,
            tls_key=cfg.tls_key,
            tls_ca=cfg.tls_ca,
            insecure=cfg.insecure,
            token=cfg.token,
            token_file=cfg.token_file,
            allow_ids=cfg.allow_ids,
        )

    def announce(self, addresses: Sequence[str] = ()) -> None:
        """One log line saying how this node is protected (a WARNING when it is not)."""
        extras = []
        if self.token is not None:
            extras.append("cluster token required")
        if self.allow_ids is not None:
            extras.append(f"allowlist of {len(self.allow_ids)} node ids")
        tail = f" ({', '.join(extras)})" if extras else ""
        if self.mode == MODE_MTLS:
            log.info("%s: mutual TLS on every connection%s", self.node_id, tail)
        elif self.insecure:
            log.warning(
                "%s: INSECURE: plain-text gRPC because insecure = true (--insecure); "
                "anyone who can reach %s can read and inject models%s",
                self.node_id,
                ", ".join(a for a in addresses if a) or "this node",
                tail,
            )
        else:
            log.info("%s: plain-text gRPC on loopback only%s", self.node_id, tail)

    # ------------------------------------------------------------------ gRPC pieces
    def server_credentials(self) -> grpc.ServerCredentials | None:
        if self.tls is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls.key, self.tls.cert)],
            root_certificates=self.tls.ca,
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if self.tls is None:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls.ca, private_key=self.tls.key, certificate_chain=self.tls.cert
        )

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.token is None and self.allow_ids is None:
            return []
        return [_GuardInterceptor(self)]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        if self.token is None:
            return []
        metadata = ((TOKEN_HEADER, self.token.decode()),)
        return [_TokenUnary(metadata), _TokenStream(metadata)]

    def make_server(self) -> grpc.aio.Server:
        return channels.make_server(self.server_interceptors())

    def make_channel(
        self, address: str, reconnect: channels.Reconnect = channels.LAN
    ) -> grpc.aio.Channel:
        """A channel to ``address``; with TLS the server must prove it is the expected peer."""
        options: list[tuple[str, Any]] = []
        name = self.peer_names.get(address)
        if self.tls is not None and name:
            options.append(("grpc.ssl_target_name_override", name))
        return channels.make_channel(
            address,
            self._channel_credentials(),
            extra_options=options,
            interceptors=self.client_interceptors(),
            reconnect=reconnect,
        )

    def _channel_credentials(self) -> grpc.ChannelCredentials | None:
        creds = getattr(self, "_cached_channel_credentials", None)
        if creds is None and self.tls is not None:
            creds = self.channel_credentials()
            self._cached_channel_credentials = creds
        return creds

    # ------------------------------------------------------------------ checks
    def caller_id(self, context: grpc.aio.ServicerContext) -> str | None:
        """The node id in the caller's verified certificate, or None (no TLS, no cert)."""
        auth = context.auth_context() or {}
        for uri in auth.get("peer_uri", []):
            text = uri.decode(errors="replace")
            if text.startswith(NODE_URI_PREFIX):
                return text[len(NODE_URI_PREFIX) :]
        names = auth.get("x509_common_name", [])
        return names[0].decode(errors="replace") if names else None

    def refusal(self, context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
        """Why this call must be refused, or None to let it through."""
        if self.token is not None:
            sent = _metadata_value(context.invocation_metadata(), TOKEN_HEADER)
            if sent is None or not hmac.compare_digest(sent, self.token):
                reason = "missing" if sent is None else "wrong"
                return grpc.StatusCode.UNAUTHENTICATED, f"{reason} cluster token"
        if self.allow_ids is not None:
            caller = self.caller_id(context)
            if caller is None or caller not in self.allow_ids:
                return (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"node id {caller!r} is not on {self.node_id}'s allowlist",
                )
        return None


def _token(token: str | None, token_file: str | None) -> bytes | None:
    if token and token_file:
        raise SecurityError("give token or token_file, not both")
    if token_file:
        try:
            text = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SecurityError(f"cannot read token_file {token_file}: {exc}") from exc
        if not text:
            raise SecurityError(f"token_file {token_file} is empty")
        return text.encode()
    if token is not None:
        if not token.strip():
            raise SecurityError("token is empty")
        return token.strip().encode()
    return None


def _metadata_value(metadata: Any, key: str) -> bytes | None:
    for k, v in metadata or ():
        if k == key:
            return v.encode() if isinstance(v, str) else bytes(v)
    return None


# ---------------------------------------------------------------------- server interceptor


class _GuardInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler so it first checks the token and the caller's node id.

    ``grpc.aio`` interceptors do not see the call's auth context, only the handler does; so
    the check runs as the first step of a wrapped handler and aborts the call there.
    """

    def __init__(self, security: Security) -> None:
        self._security = security
        self._last_logged: dict[tuple[str, str], float] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return _wrap(handler, self._check, handler_call_details.method)

    async def _check(self, context: grpc.aio.ServicerContext, method: str) -> None:
        refused = self._security.refusal(context)
        if refused is None:
            return
        code, detail = refused
        caller = self._security.caller_id(context)
        key = (f"{context.peer()}/{caller}", detail)
        now = time.monotonic()
        if now - self._last_logged.get(key, -REFUSAL_LOG_PERIOD_S) >= REFUSAL_LOG_PERIOD_S:
            self._last_logged[key] = now
            if len(self._last_logged) > 1024:
                self._last_logged.clear()
            log.warning(
                "%s refused %s from %s (node id %s): %s: %s",
                self._security.node_id,
                method,
                context.peer(),
                caller or "unknown",
                code.name,
                detail,
            )
        await context.abort(code, detail)


def _wrap(
    handler: grpc.RpcMethodHandler,
    check: Callable[[grpc.aio.ServicerContext, str], Awaitable[None]],
    method: str,
) -> grpc.RpcMethodHandler:
    kw = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context, method)
            return await _maybe_await(inner_uu(request, context))

        return grpc.unary_unary_rpc_method_handler(unary_unary, **kw)
    if handler.stream_unary is not None:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await check(context, method)
            return await _maybe_await(inner_su(requests, context))

        return grpc.stream_unary_rpc_method_handler(stream_unary, **kw)
    inner = handler.unary_stream if handler.unary_stream is not None else handler.stream_stream
    factory = (
        grpc.unary_stream_rpc_method_handler
        if handler.unary_stream is not None
        else grpc.stream_stream_rpc_method_handler
    )

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check(context, method)
        result = inner(request, context)
        if inspect.isasyncgen(result):
            async for item in result:
                yield item
        else:  # a handler that writes with context.write() and returns
            await _maybe_await(result)

    return factory(streaming, **kw)


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


# ---------------------------------------------------------------------- client interceptors


def _with_metadata(details: grpc.aio.ClientCallDetails, extra: tuple[tuple[str, str], ...]) -> Any:
    metadata = grpc.aio.Metadata(*(tuple(details.metadata or ()) + extra))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TokenUnary(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_metadata(details, self._metadata), request)


class _TokenStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_stream_stream(
        self, continuation: Any, details: Any, request_iterator: Any
    ) -> Any:
        return await continuation(_with_metadata(details, self._metadata), request_iterator)
