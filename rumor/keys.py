"""Key material for a cluster: one certificate authority, one certificate per node.

A node certificate names its node three ways: the subject common name is the node id, the
subject alternative names hold a DNS name equal to the node id and the URI
``rumor://node/<id>``, and they also hold every host name and IP address the node is reached
at. Peers check the DNS name (a client verifies the server against the peer id it expects),
and a server reads the URI (or the common name) to apply its allowlist of node ids. Keys are
ECDSA P-256: small, fast to make, and supported by gRPC's TLS.

Files (PEM): ``ca.crt`` and ``ca.key`` for the authority; ``node.crt``, ``node.key`` and a
copy of ``ca.crt`` in each node's folder, so one folder is all a node (or its container)
mounts. Private keys are written with mode 0600. This module never talks to the network.

Example::

    from rumor import keys
    keys.make_cluster(["node-0", "node-1"], "certs", hosts={"node-0": ["10.0.0.5"]})
    # certs/ca.crt, certs/ca.key, certs/node-0/{node.crt,node.key,ca.crt}, certs/node-1/...
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
NODE_CERT = "node.crt"
NODE_KEY = "node.key"
#: The URI subject alternative name that carries a node's id.
URI_PREFIX = "rumor://node/"
#: Node ids are DNS-name-like so they can be a certificate's DNS name and a TLS target name.
NODE_ID_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})$")
CA_DAYS = 3650
NODE_DAYS = 825


@dataclass(frozen=True)
class NodeFiles:
    """Where a node's certificate, key and CA certificate were written."""

    cert: Path
    key: Path
    ca: Path


def check_node_id(node_id: str) -> str:
    """``node_id`` if it can name a node in a certificate, else ValueError."""
    if not NODE_ID_RE.match(node_id):
        raise ValueError(
            f"node id {node_id!r} cannot go into a certificate: use letters, digits, '.', '_' "
            "or '-', starting with a letter or digit, at most 63 characters"
        )
    return node_id


def make_ca(out: str | Path, name: str = "rumor cluster CA", days: int = CA_DAYS) -> Path:
    """Write a new self-signed CA (``ca.crt``, ``ca.key``) into ``out``; return the folder.

    Refuses to overwrite an existing CA key: replacing it would orphan every node
    certificate it signed.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / CA_KEY).exists():
        raise FileExistsError(f"{out / CA_KEY} exists; remove it to make a new CA")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(out / CA_KEY, key)
    (out / CA_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return out


def issue_node(
    ca_dir: str | Path,
    node_id: str,
    out: str | Path,
    hosts: Iterable[str] = (),
    days: int = NODE_DAYS,
) -> NodeFiles:
    """Sign a certificate for ``node_id`` with the CA in ``ca_dir``; write it into ``out``.

    ``hosts`` are the names and IP addresses peers use to reach the node; the node id itself,
    ``localhost`` and ``127.0.0.1`` are always included so loopback tests and local clusters
    work with the same files.
    """
    check_node_id(node_id)
    ca_dir, out = Path(ca_dir), Path(out)
    ca_cert = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_dir / CA_KEY} is not an EC key made by `rumor keys ca`")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(_san(node_id, hosts)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True)
    files = NodeFiles(out / NODE_CERT, out / NODE_KEY, out / CA_CERT)
    _write_key(files.key, key)
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if files.ca.resolve() != (ca_dir / CA_CERT).resolve():
        files.ca.write_bytes((ca_dir / CA_CERT).read_bytes())
    return files


def make_cluster(
    node_ids: Iterable[str],
    out: str | Path,
    hosts: Mapping[str, Iterable[str]] | None = None,
    ca_name: str = "rumor cluster CA",
) -> dict[str, NodeFiles]:
    """A CA in ``out`` (made unless one is there) and a folder ``out/<id>`` per node."""
    out = Path(out)
    ids = [check_node_id(n) for n in node_ids]
    if len(set(ids)) != len(ids):
        raise ValueError("node ids must be distinct")
    if not (out / CA_KEY).exists():
        make_ca(out, ca_name)
    hosts = hosts or {}
    unknown = sorted(set(hosts) - set(ids))
    if unknown:
        raise ValueError(f"hosts given for unknown nodes: {', '.join(unknown)}")
    return {n: issue_node(out, n, out / n, hosts.get(n, ())) for n in ids}


def node_id_of(cert_pem: bytes) -> str | None:
    """The node id a certificate carries: its ``rumor://node/`` URI, else its common name."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(URI_PREFIX):
                return uri[len(URI_PREFIX) :]
    except x509.ExtensionNotFound:
        pass
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def _san(node_id: str, hosts: Iterable[str]) -> list[x509.GeneralName]:
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for host in [node_id, "localhost", "127.0.0.1", *hosts]:
        host = host.strip().strip("[]")
        if not host:
            continue
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if host not in dns:
                dns.append(host)
            continue
        if ip not in ips:
            ips.append(ip)
    return [
        *(x509.DNSName(d) for d in dns),
        *(x509.IPAddress(i) for i in ips),
        x509.UniformResourceIdentifier(URI_PREFIX + node_id),
    ]


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)
