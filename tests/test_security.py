"""Mutual TLS, the cluster token and the allowlist, between real node processes on 127.0.0.1.

A guarded node process serves; callers in this process try it with a certificate from
another CA, with none, with an id not on the allowlist, and with a wrong token. Each is
refused, and the refusing node's log says why. Two mTLS nodes then train together.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from rumor import keys
from rumor.cluster import free_ports
from rumor.config import NodeConfig
from rumor.local_cluster import LocalCluster
from rumor.node.metrics import read_metrics
from rumor.protocol.errors import PeerUnavailable, Rejected
from rumor.protocol.grpc_transport import GrpcTransport
from rumor.protocol.security import Security, SecurityError, is_loopback
from rumor.protocol.v1 import node_pb2
from tests.conftest import run

NODES = ["node-0", "node-1", "node-2"]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("certs")
    keys.make_cluster(NODES, root / "cluster")
    keys.make_cluster(["node-1"], root / "rogue")  # same id, another CA
    (root / "token").write_text("s3cret-cluster-token\n")
    (root / "wrong-token").write_text("not-the-token\n")
    return {"cluster": root / "cluster", "rogue": root / "rogue", "root": root}


def _tls(folder: Path) -> dict[str, str]:
    return {
        "tls_cert": str(folder / keys.NODE_CERT),
        "tls_key": str(folder / keys.NODE_KEY),
        "tls_ca": str(folder / keys.CA_CERT),
    }


def _client(node_id: str, folder: Path | None, token_file: Path | None, server: str) -> Security:
    tls = _tls(folder) if folder is not None else {}
    return Security.from_settings(
        node_id,
        listen="127.0.0.1:0",
        peers={"node-0": server},
        token_file=str(token_file) if token_file else None,
        **tls,
    )


async def _ping(security: Security, address: str) -> node_pb2.Pong:
    transport = GrpcTransport("127.0.0.1:0", node_id=security.node_id, security=security)
    try:
        return await transport.ping(address, node_pb2.Ping(sender=security.node_id), 5.0)
    finally:
        await transport.stop(grace=0)


def _wait_for_log(path: Path, pattern: str, timeout: float = 20.0) -> str:
    """The first line of ``path`` matching ``pattern``, waiting up to ``timeout`` s."""
    end = time.monotonic() + timeout
    regex = re.compile(pattern)
    while time.monotonic() < end:
        text = path.read_text(errors="replace") if path.exists() else ""
        for line in text.splitlines():
            if regex.search(line):
                return line
        time.sleep(0.2)
    raise AssertionError(f"no line matching {pattern!r} in {path}:\n{text[-3000:]}")


def test_loopback_rules_decide_between_plain_text_and_tls() -> None:
    assert is_loopback("127.0.0.1:5000") and is_loopback("[::1]:5000")
    assert is_loopback("localhost:1")
    assert not is_loopback("0.0.0.0:5000") and not is_loopback("10.0.0.5:5000")
    assert not is_loopback("node-3:50051")
    assert Security.from_settings("a", listen="127.0.0.1:0").mode == "plaintext"
    with pytest.raises(SecurityError, match=r"outside loopback \(10\.0\.0\.6:1\)"):
        Security.from_settings("a", listen="127.0.0.1:0", peers={"b": "10.0.0.6:1"})
    insecure = Security.from_settings("a", listen="0.0.0.0:0", insecure=True)
    assert insecure.mode == "plaintext" and insecure.insecure
    with pytest.raises(SecurityError, match="missing"):
        Security.from_settings("a", listen="0.0.0.0:0", tls_cert="x.pem")
    with pytest.raises(SecurityError, match="allow_ids needs mutual TLS"):
        Security.from_settings("a", listen="127.0.0.1:0", allow_ids=["b"])


def test_node_certificate_names_the_node_in_cn_dns_and_uri(certs: dict[str, Path]) -> None:
    from cryptography import x509

    pem = (certs["cluster"] / "node-2" / keys.NODE_CERT).read_bytes()
    assert keys.node_id_of(pem) == "node-2"
    cert = x509.load_pem_x509_certificate(pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "node-2" in san.get_values_for_type(x509.DNSName)
    assert "rumor://node/node-2" in san.get_values_for_type(x509.UniformResourceIdentifier)
    assert (certs["cluster"] / "node-2" / keys.NODE_KEY).stat().st_mode & 0o077 == 0
    with pytest.raises(ValueError, match="cannot go into a certificate"):
        keys.check_node_id("bad id/with slash")


def test_guarded_node_refuses_foreign_ca_no_cert_unlisted_id_and_wrong_token(
    certs: dict[str, Path], tmp_path: Path
) -> None:
    cluster = certs["cluster"]
    port, dead = free_ports(2)
    address = f"127.0.0.1:{port}"
    # node-0 serves while it waits for its (absent) neighbour: nothing trains meanwhile.
    cfg = NodeConfig(
        node_id="node-0",
        listen=address,
        peers={"node-1": f"127.0.0.1:{dead}"},
        startup_wait=120.0,
        rounds=1,
        allow_ids=["node-1"],
        token_file=str(certs["root"] / "token"),
        **_tls(cluster / "node-0"),
    )
    server = LocalCluster([cfg], tmp_path)
    log = tmp_path / "node-0.log"
    with server:
        server.start()
        _wait_for_log(log, r"node-0: mutual TLS on every connection")

        async def scenario() -> None:
            # The allowed node with the right token gets through (the node is up).
            ok = _client("node-1", cluster / "node-1", certs["root"] / "token", address)
            for _ in range(100):
                try:
                    pong = await _ping(ok, address)
                    break
                except PeerUnavailable:
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError("the guarded node never answered an allowed caller")
            assert pong.node_id == "node-0"

            # 1. A certificate from another CA (the caller trusts the cluster CA, so it is the
            # server that refuses): the TLS handshake fails.
            rogue = _client("node-1", certs["rogue"] / "node-1", certs["root"] / "token", address)
            rogue.tls = dataclasses.replace(rogue.tls, ca=(cluster / keys.CA_CERT).read_bytes())
            with pytest.raises(PeerUnavailable):
                await _ping(rogue, address)
            # 2. No certificate at all (the CA is known, so only the server is verified).
            roots = (cluster / keys.CA_CERT).read_bytes()
            creds = grpc.ssl_channel_credentials(root_certificates=roots)
            async with grpc.aio.secure_channel(address, creds) as channel:
                call = channel.unary_unary(
                    "/rumor.v1.Node/Heartbeat",
                    request_serializer=node_pb2.Ping.SerializeToString,
                    response_deserializer=node_pb2.Pong.FromString,
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await call(node_pb2.Ping(sender="anonymous"), timeout=5.0)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            # 3. A valid certificate whose id is not on the allowlist.
            unlisted = _client("node-2", cluster / "node-2", certs["root"] / "token", address)
            with pytest.raises(Rejected) as denied:
                await _ping(unlisted, address)
            assert denied.value.code.value == "PERMISSION_DENIED"
            # 4. An allowed node with the wrong token.
            wrong = _client("node-1", cluster / "node-1", certs["root"] / "wrong-token", address)
            with pytest.raises(Rejected) as unauth:
                await _ping(wrong, address)
            assert unauth.value.code.value == "UNAUTHENTICATED"

        run(scenario(), timeout=60.0)
        # The refusing side says why, each in its own line.
        assert "CERTIFICATE_VERIFY_FAILED" in _wait_for_log(log, r"Handshake failed.*VERIFY")
        assert _wait_for_log(log, r"Handshake failed.*PEER_DID_NOT_RETURN_A_CERTIFICATE")
        line = _wait_for_log(log, r"WARNING node=node-0 rumor.security .*PERMISSION_DENIED")
        assert "node id node-2" in line and "allowlist" in line
        line = _wait_for_log(log, r"WARNING node=node-0 rumor.security .*UNAUTHENTICATED")
        assert "wrong cluster token" in line and "node id node-1" in line
        # The command-line clients reach a guarded node with an allowed certificate and token.
        status = _cli_status(address, cluster / "node-1", certs["root"] / "token")
        assert status[0]["node_id"] == "node-0", status
        refused = _cli_status(address, None, None)
        assert "error" in refused[0], refused
        assert server.stop(grace=10.0) == {"node-0": 0}


def _cli_status(address: str, tls_dir: Path | None, token: Path | None) -> list[dict[str, Any]]:
    from typer.testing import CliRunner

    from rumor.cli import app

    args = ["status", address, "--format", "json", "--timeout", "5"]
    if tls_dir is not None:
        args += ["--tls-dir", str(tls_dir)]
    if token is not None:
        args += ["--token-file", str(token)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_plain_text_off_loopback_is_refused_and_insecure_is_logged(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "rumor", "node", "--id", "edge-1", "--rounds", "1"]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    refused = subprocess.run(
        [*base, "--listen", "0.0.0.0:0"], capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.returncode == 3, refused.stderr
    assert "outside loopback (0.0.0.0:0)" in refused.stderr and "edge-1" in refused.stderr
    allowed = subprocess.run(
        [*base, "--listen", "0.0.0.0:0", "--insecure", "--eval-every", "0"],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
    )
    assert allowed.returncode == 0, allowed.stderr
    assert re.search(r"WARNING node=edge-1 rumor.security edge-1: INSECURE", allowed.stderr)


def test_two_mtls_nodes_with_token_and_allowlist_train_together(
    certs: dict[str, Path], tmp_path: Path
) -> None:
    cluster = certs["cluster"]
    ports = free_ports(2)
    ids = ["node-0", "node-1"]
    configs = [
        NodeConfig(
            node_id=nid,
            index=i,
            n_nodes=2,
            listen=f"127.0.0.1:{ports[i]}",
            peers={ids[1 - i]: f"127.0.0.1:{ports[1 - i]}"},
            algorithm="dpsgd",
            params={"local_steps": 1, "round_timeout": 5.0},
            rounds=12,
            init="independent",
            seed=5,
            eval_every=0,
            heartbeat_period=0.25,
            linger=3.0,
            allow_ids=[ids[1 - i]],
            token_file=str(certs["root"] / "token"),
            **_tls(cluster / nid),
        )
        for i, nid in enumerate(ids)
    ]
    with LocalCluster(configs, tmp_path) as nodes:
        nodes.start()
        assert nodes.wait(120.0), "the mTLS nodes did not finish"
        assert nodes.returncodes() == {"node-0": 0, "node-1": 0}
    for nid in ids:
        rounds = [
            r for r in read_metrics(tmp_path / f"{nid}.metrics.jsonl") if r["event"] == "round"
        ]
        assert len(rounds) == 12
        # Models crossed the mTLS link in (nearly) every round ...
        assert sum(r["received"] for r in rounds) >= 10
        # ... and the two models, drawn independently, were pulled together.
        first, last = rounds[0]["neighbour_distance"], rounds[-1]["neighbour_distance"]
        assert last < first / 3, (first, last)
        log = (tmp_path / f"{nid}.log").read_text()
        assert "mutual TLS on every connection" in log and "refused" not in log
