"""Errors that cross the transport boundary without importing grpc.

A rule or the codec raises :class:`Rejected` for input it refuses; the gRPC transport maps
``Rejected.code`` onto a gRPC status code (same names) and the in-process transport raises
it at the caller, so both transports report bad input the same way.
"""

from __future__ import annotations

from enum import Enum


class Code(str, Enum):
    """Subset of gRPC status codes that rumor uses, by name."""

    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    FAILED_PRECONDITION = "FAILED_PRECONDITION"
    DATA_LOSS = "DATA_LOSS"
    UNAVAILABLE = "UNAVAILABLE"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    INTERNAL = "INTERNAL"
    CANCELLED = "CANCELLED"


class Rejected(Exception):
    """Input refused by a receiver; ``str(e)`` names the problem for the log and the peer."""

    def __init__(self, code: Code, detail: str) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code.value}: {self.detail}"


class PeerUnavailable(Exception):
    """A peer could not be reached (after retries) or did not answer within its deadline."""

    def __init__(self, peer: str, detail: str, code: Code = Code.UNAVAILABLE) -> None:
        super().__init__(f"{peer}: {detail}")
        self.peer = peer
        self.code = code
