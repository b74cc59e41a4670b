"""Signed records: Ed25519 node keys, the digest a record's signature covers, and pinned keys.

SybilWall relays the histories of distant nodes; without signatures a relay could forge a
distant honest node's history (say, a copy of its own model, to make that node look like a
twin and get it down-weighted). Here the origin signs ``(origin, round, mode, tensors)`` and
relays forward the signature unchanged, so an altered or invented record fails verification.

Keys are pinned per node id (:class:`KeyRing`). A key given in the parameters beats one the
node itself presented in a message it sent (first contact), which beats one learned from a
relayed record; a weaker pin is replaced by a stronger one, never the reverse, so a relay that
introduces a node first cannot keep a fake key once the real node is met directly.

What this module must not do: know about rules or the network; keep private keys anywhere
but in a :class:`NodeKey` (and the file it was loaded from).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "KEY_BYTES",
    "SIGNATURE_BYTES",
    "KeyRing",
    "NodeKey",
    "PinSource",
    "record_digest",
    "verify",
]

KEY_BYTES = 32
SIGNATURE_BYTES = 64
_DOMAIN = b"rumor.signed-record.v1\0"


class NodeKey:
    """A node's Ed25519 signing key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    @classmethod
    def generate(cls) -> NodeKey:
        """A fresh key from the operating system's randomness."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load_or_create(cls, path: str | Path) -> NodeKey:
        """The key in ``path`` (PKCS#8 PEM), created with mode 0600 when absent, so a daemon
        keeps its identity across restarts."""
        p = Path(path)
        if p.exists():
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{p}: not an Ed25519 private key")
            return cls(key)
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        p.parent.mkdir(parents=True, exist_ok=True)
        p.touch(mode=0o600)
        p.write_bytes(pem)
        return cls(key)

    def sign(self, digest: bytes) -> bytes:
        return self._key.sign(digest)


def record_digest(origin: str, round: int, mode: str, tensors: Mapping[str, torch.Tensor]) -> bytes:
    """SHA-256 over the domain tag, origin, round, mode and every tensor (sorted by name; name,
    dtype, shape and little-endian bytes each mixed in, lengths prefixed)."""
    h = hashlib.sha256(_DOMAIN)

    def part(data: bytes) -> None:
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)

    part(origin.encode("utf-8"))
    part(int(round).to_bytes(8, "little", signed=True))
    part(mode.encode("utf-8"))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        part(f"{name}\0{t.dtype}\0{list(t.shape)}".encode())
        part(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.digest()


def verify(public: bytes, signature: bytes, digest: bytes) -> bool:
    """True when ``signature`` is ``public``'s Ed25519 signature of ``digest``."""
    if len(public) != KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, digest)
    except (InvalidSignature, ValueError):
        return False
    return True


class PinSource(IntEnum):
    """Where a pinned key came from; a higher source replaces a lower one."""

    GOSSIP = 1
    DIRECT = 2
    CONFIGURED = 3


@dataclass
class _Pin:
    key: bytes
    source: PinSource


class KeyRing:
    """Public keys pinned per node id."""

    def __init__(self, configured: Mapping[str, bytes] | None = None) -> None:
        self._pins: dict[str, _Pin] = {
            k: _Pin(bytes(v), PinSource.CONFIGURED) for k, v in (configured or {}).items()
        }

    def get(self, node_id: str) -> bytes | None:
        pin = self._pins.get(node_id)
        return None if pin is None else pin.key

    def offer(self, node_id: str, key: bytes, source: PinSource) -> tuple[bool, bool]:
        """Present ``key`` for ``node_id``; returns ``(usable, replaced)``.

        ``usable``: the key is (now) the pinned one. ``replaced``: a weaker, different pin
        was dropped for it (records verified with the old key must be discarded).
        """
        pin = self._pins.get(node_id)
        if pin is None:
            self._pins[node_id] = _Pin(bytes(key), source)
            return True, False
        if pin.key == key:
            pin.source = max(pin.source, source)
            return True, False
        if source > pin.source:
            self._pins[node_id] = _Pin(bytes(key), source)
            return True, True
        return False, False

    def __len__(self) -> int:
        return len(self._pins)
