"""Every wire-level constant in one place: versions, sizes, timeouts, environment names."""

from __future__ import annotations

#: Version of the Envelope/Frame protocol; a receiver refuses envelopes of another version.
#: 2: a bundle's digest may follow its last chunk in a ``Frame.digest``.
PROTOCOL_VERSION = 2
#: Version of the bundle codec (header layout, alignment, digest).
CODEC_VERSION = 1
#: The only payload encoding so far: raw little-endian bytes.
ENCODING_RAW_LE = "raw-le"
#: Tensor offsets inside a payload are aligned to this many bytes so views of any dtype work.
ALIGNMENT = 64
#: Payload chunk size, chosen by measurement (``bench/bench_exchange.py --chunks``): on the
#: 2-core Intel host 2 MiB moved 100 MB at 31-32 % of TCP where 1 MiB gave 27-30 % and 4 MiB
#: 28-32 %, with 10 % less CPU per MB than 1 MiB; D-PSGD rounds were unchanged. Each frame
#: then fits the 2 MiB L2 cache a core has there while it is copied, hashed and written.
CHUNK_SIZE = 2 << 20
#: Largest bundle payload a node accepts by default (bytes). Overridable per node.
MAX_BUNDLE_BYTES = 2 << 30
#: Largest envelope (header) frame accepted, bytes: headers of models with many tensors fit.
MAX_ENVELOPE_BYTES = 16 << 20
#: After refusing a message, read at most this much of the rest of it, for this long, so the
#: sender sees the refusal's status (see grpc_transport._drain).
DRAIN_LIMIT_BYTES = 256 << 20
DRAIN_LIMIT_S = 5.0
#: Most tensors one bundle may name.
MAX_TENSORS = 100_000
#: Most dimensions of one tensor.
MAX_NDIM = 32
#: gRPC message-size limit: one frame is at most one chunk or one envelope plus framing.
GRPC_MAX_MESSAGE_BYTES = MAX_ENVELOPE_BYTES + 1024

#: Keepalive: ping an idle connection every 20 s, give it 10 s to answer. On a LAN this spots
#: a dead peer within half a minute without flooding; raise both for the Internet.
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000

#: Reconnect backoff of a channel whose peer went away (s): the first retry after
#: ``RECONNECT_INITIAL_S``, growing (gRPC's factor 1.6, with jitter) to ``RECONNECT_MAX_S``;
#: one connection attempt (TCP and TLS handshakes) may take ``CONNECT_TIMEOUT_S``. gRPC's
#: own defaults (1 s growing to 120 s, 20 s attempts) keep a healed link unused for up to two
#: minutes; on a LAN a peer is back within a second of its link. WAN values are in
#: ``rumor.protocol.channels.WAN``.
RECONNECT_INITIAL_S = 0.1
RECONNECT_MAX_S = 1.0
CONNECT_TIMEOUT_S = 2.0

#: Default per-call deadline for heartbeats and small requests (s).
SMALL_CALL_TIMEOUT_S = 2.0
#: Default deadline for an exchange carrying a model (s); large models need more.
EXCHANGE_TIMEOUT_S = 30.0

#: Retry policy for reaching a peer: attempts and backoff (full jitter) bounds (s).
RETRY_ATTEMPTS = 3
RETRY_BASE_S = 0.05
RETRY_MAX_S = 2.0

#: Membership: heartbeat period (s) and missed beats before a neighbour counts as dead.
HEARTBEAT_PERIOD_S = 1.0
HEARTBEAT_MISSES = 3

#: Metadata keys used by the service.
GRPC_SERVICE = "rumor.v1.Node"
ENV_LOG_LEVEL = "RUMOR_LOG_LEVEL"
ENV_TORCH_THREADS = "RUMOR_TORCH_THREADS"
