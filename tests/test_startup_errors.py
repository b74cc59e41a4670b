"""Start-up errors an operator sees: a neighbour that cannot be reached is named with its
address and the reason (an unresolvable host, a closed port), ``min_peers`` turns "trains
alone" into exit code 6, and ``rumor deploy check`` refuses host names that do not resolve.

Real node processes on 127.0.0.1; the only name looked up is under the reserved ``.invalid``
top-level domain, which never resolves.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rumor import config as config_io
from rumor.cli import app
from rumor.cluster import free_ports
from rumor.config import NodeConfig
from rumor.deploy.spec import SpecError, from_dict
from rumor.exit_codes import ExitCode
from rumor.node.clock import Clock
from rumor.node.membership import Membership
from rumor.protocol.errors import Code, PeerUnavailable, Rejected
from rumor.protocol.v1 import node_pb2

BAD_HOST = "nosuchhost.invalid"


def _node_config(tmp_path: Path) -> tuple[Path, int]:
    """A node whose two neighbours are unreachable: one by name, one on a closed port."""
    closed = free_ports(1)[0]
    cfg = NodeConfig(
        node_id="node-0",
        listen="127.0.0.1:0",
        peers={"node-3": f"{BAD_HOST}:50051", "node-4": f"127.0.0.1:{closed}"},
        rounds=1,
        model="logreg",
        eval_every=0,
        params={"round_timeout": 0.2},
        startup_wait=2.0,
        insecure=True,  # the .invalid peer is off loopback
        metrics=str(tmp_path / "node-0.metrics.jsonl"),
    )
    path = tmp_path / "node.toml"
    path.write_text(config_io.dumps(cfg))
    return path, closed


def _run_node(config: Path, *flags: str) -> tuple[subprocess.CompletedProcess[str], float]:
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "rumor", "node", "--config", str(config), *flags],
        capture_output=True,
        text=True,
        timeout=60,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    return result, time.monotonic() - start


def _warnings(stderr: str, *words: str) -> list[str]:
    lines = stderr.splitlines()
    return [line for line in lines if " WARNING " in line and all(w in line for w in words)]


def test_each_unreachable_neighbour_gets_one_warning_naming_it_and_the_error(
    tmp_path: Path,
) -> None:
    config, closed = _node_config(tmp_path)
    stderr = _start_up_log(config)
    unresolved = _warnings(
        stderr,
        f"neighbour node-3 at {BAD_HOST}:50051 unreachable at start-up",
        f"cannot resolve host name '{BAD_HOST}'",
    )
    refused = _warnings(
        stderr,
        f"neighbour node-4 at 127.0.0.1:{closed} unreachable at start-up",
        "Connection refused",
    )
    assert len(unresolved) == 1 and len(refused) == 1, stderr
    assert len(_warnings(stderr, "unreachable at start-up")) == 2, stderr
    # min_peers defaults to 0: the node trains with whoever answered (nobody), as before
    assert len(_warnings(stderr, "starting with 0 of 2 neighbours")) == 1, stderr


def _start_up_log(config: Path, timeout: float = 30.0) -> str:
    """The node's log up to the end of its start-up wait; then it is stopped (SIGTERM), since
    what it does after start-up is not under test here."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "rumor", "node", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    lines: list[str] = []
    started = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "starting with" in line or "Traceback" in line:
                started.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert started.wait(timeout), "".join(lines)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        finally:
            proc.kill()
        reader.join(5)
    return "".join(lines)


def test_min_peers_not_reached_exits_6_with_one_line_and_a_clean_shutdown(
    tmp_path: Path,
) -> None:
    config, closed = _node_config(tmp_path)
    result, elapsed = _run_node(config, "--min-peers", "1")
    assert result.returncode == ExitCode.PEERS == 6, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    ours = [line for line in result.stderr.splitlines() if line.startswith("rumor node ")]
    assert len(ours) == 1, result.stderr
    line = ours[0]
    assert line.startswith("rumor node node-0: too few neighbours") and "min_peers is 1" in line
    assert f"node-3 at {BAD_HOST}:50051: cannot resolve host name" in line
    assert f"node-4 at 127.0.0.1:{closed}: " in line and "Connection refused" in line
    assert line.endswith("(exit 6: peers)")
    # it refused after the start-up wait, without training, and shut down cleanly
    assert elapsed < 30
    events = [json.loads(x) for x in (tmp_path / "node-0.metrics.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "stop"]
    assert events[-1]["round"] == 0


@pytest.mark.parametrize("value", ["3", "-1"])
def test_min_peers_out_of_range_is_a_configuration_error(tmp_path: Path, value: str) -> None:
    config, _ = _node_config(tmp_path)
    result, _ = _run_node(config, "--min-peers", value)
    assert result.returncode == ExitCode.CONFIG, result.stderr
    assert f"min_peers = {value}" in result.stderr and "number of peers (2)" in result.stderr
    assert not (tmp_path / "node-0.metrics.jsonl").exists()  # refused before starting


def test_exit_code_6_is_listed_in_node_help() -> None:
    out = CliRunner().invoke(app, ["node", "--help"], terminal_width=200).output
    assert "6  peers" in out and "--min-peers" in out


# ----------------------------------------------------------------------------- deploy check

SPEC = f"""
name = "t"
topology = "ring:4"
insecure = true
[hosts]
alpha = "{BAD_HOST}"
beta = "127.0.0.1"
gamma = "localhost"
[nodes]
node-0 = "alpha"
node-1 = "beta"
node-2 = "gamma"
node-3 = {{ host = "alpha", port = 50052 }}
"""


def _check(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["deploy", "check", *args])
    return result.exit_code, result.output


def test_deploy_check_refuses_a_host_name_that_does_not_resolve(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(SPEC)
    start = time.monotonic()
    code, out = _check(str(path))
    assert code == 2, out
    assert f"hosts.alpha = '{BAD_HOST}' (node-0, node-3) does not resolve" in out
    assert "beta" not in out and "gamma" not in out  # an IP literal and localhost are fine
    assert time.monotonic() - start < 10
    code, out = _check(str(path), "--no-resolve")
    assert code == 0, out
    assert f"node-0: alpha ({BAD_HOST}:50051)" in out
    path.write_text(SPEC.replace(BAD_HOST, "127.0.0.2"))
    code, out = _check(str(path))
    assert code == 0, out


def test_a_spec_without_hosts_resolves_nothing(tmp_path: Path) -> None:
    """Compose and Kubernetes name nodes by service names: nothing to look up here."""
    path = tmp_path / "cluster.toml"
    path.write_text('name = "t"\ntopology = "ring:4"\ninsecure = true\n')
    code, out = _check(str(path))
    assert code == 0, out


def test_spec_min_peers_above_the_lowest_degree_is_refused() -> None:
    base = {"name": "t", "topology": "ring:4", "insecure": True}
    assert from_dict({**base, "min_peers": 2}).settings["min_peers"] == 2
    with pytest.raises(SpecError, match="min_peers = 3 must be between 0 and the topology's"):
        from_dict({**base, "min_peers": 3})


# ----------------------------------------------------------------------------- membership


class _Transport:
    """Answers pings from a table: address -> the error it raises (absent: it answers)."""

    def __init__(self, errors: dict[str, Exception]) -> None:
        self.errors = errors

    async def ping(self, peer: str, ping: node_pb2.Ping, timeout: float) -> node_pb2.Pong:
        if peer in self.errors:
            raise self.errors[peer]
        return node_pb2.Pong(node_id=peer)


def test_the_start_up_wait_keeps_each_missing_neighbours_last_error() -> None:
    peers = {
        "dns": f"{BAD_HOST}:1",  # gRPC only says "deadline": the lookup says more
        "late": f"late.{BAD_HOST}:1",  # gRPC got past the name: its error stands
        "shut": "127.0.0.1:9",
        "token": "127.0.0.1:10",
        "ok": "127.0.0.1:11",
    }
    dns = PeerUnavailable(peers["dns"], "Deadline Exceeded", Code.DEADLINE_EXCEEDED)
    transport: Any = _Transport(
        {
            peers["dns"]: dns,
            peers["late"]: PeerUnavailable(peers["late"], "Connection refused"),
            peers["shut"]: PeerUnavailable(peers["shut"], "Connection refused"),
            peers["token"]: Rejected(Code.PERMISSION_DENIED, "bad token"),
        }
    )

    async def wait() -> tuple[dict[str, str], list[str]]:
        why = await Membership("me", peers, Clock()).wait_for_neighbours_why(
            transport, node_pb2.Ping, 0.5
        )
        plain = await Membership("me", peers, Clock()).wait_for_neighbours(
            transport, node_pb2.Ping, 0.3
        )
        return why, plain

    why, plain = asyncio.run(asyncio.wait_for(wait(), 20))
    assert why.pop("dns").startswith(f"cannot resolve host name '{BAD_HOST}': ")
    assert why == {
        "late": "Connection refused",
        "shut": "Connection refused",
        "token": "refused: PERMISSION_DENIED: bad token",
    }
    assert plain == ["dns", "late", "shut", "token"]  # the old call still returns the ids
