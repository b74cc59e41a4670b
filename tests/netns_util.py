"""Multi-host networks in network namespaces, for tests that need real network boundaries.

A :class:`Lab` makes one namespace per host and one more holding a Linux bridge; each host
namespace gets a veth pair whose other end is a port of that bridge, and an address in a
private range (``10.213.<subnet>.<10+i>/24``) that exists only inside the lab. The root
namespace is never touched: veths are created directly inside their namespaces. Names carry
a random tag so that concurrent runs never collide, and :meth:`Lab.close` (called from a
finalizer) kills the lab's processes and deletes its namespaces (which takes their veths and
the bridge with them) and any ``/etc/netns/<name>`` folder it made.

Needs root and ``ip netns``; :func:`unavailable` says why a lab cannot be built here.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rumor.node.lifeline import Lifeline

SUBNET_PREFIX = "10.213"
NETNS_ETC = Path("/etc/netns")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20, check=check)


def unavailable() -> str | None:
    """Why network-namespace tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the ip command (iproute2)"
    probe = f"rumorprobe{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Host:
    name: str
    netns: str
    address: str
    #: The bridge-side end of this host's veth pair (in the bridge namespace).
    port: str


@dataclass
class Lab:
    """Hosts on one bridged LAN, each in its own network namespace."""

    subnet: int
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    hosts: dict[str, Host] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _logs: list[IO[bytes]] = field(default_factory=list)
    _namespaces: list[str] = field(default_factory=list)
    _etc_dirs: list[Path] = field(default_factory=list)
    _lifeline: Lifeline | None = None
    _has_split_bridge: bool = False

    @property
    def bridge_ns(self) -> str:
        return f"rumor{self.tag}-br"

    def _add_ns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._namespaces.append(name)
        _ip("-n", name, "link", "set", "lo", "up")

    def start(self, names: list[str]) -> Lab:
        """Make the bridge and one namespace per host name."""
        self._add_ns(self.bridge_ns)
        _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        for i, name in enumerate(names):
            ns = f"rumor{self.tag}-{name}"
            port = f"v{self.tag}h{i}"
            self._add_ns(ns)
            # both ends are born inside their namespaces: the root namespace never sees them
            _ip(
                "link", "add", port, "netns", self.bridge_ns,
                "type", "veth", "peer", "name", "eth0", "netns", ns,
            )  # fmt: skip
            _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
            address = f"{SUBNET_PREFIX}.{self.subnet}.{10 + i}"
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            self.hosts[name] = Host(name, ns, address, port)
        return self

    def set_hosts_file(self, host: str, entries: dict[str, str]) -> Path:
        """``/etc/netns/<ns>/hosts``: what ``/etc/hosts`` says inside that namespace."""
        folder = NETNS_ETC / self.hosts[host].netns
        folder.mkdir(parents=True, exist_ok=True)
        self._etc_dirs.append(folder)
        lines = ["127.0.0.1 localhost"] + [f"{addr} {name}" for name, addr in entries.items()]
        path = folder / "hosts"
        path.write_text("\n".join(lines) + "\n")
        return path

    def link(self, host: str, up: bool) -> None:
        """Take a host's link (its port on the bridge) down or up."""
        _ip("-n", self.bridge_ns, "link", "set", self.hosts[host].port, "up" if up else "down")

    @property
    def split_bridge(self) -> str:
        """The second bridge (in the bridge namespace) that holds one side of a partition."""
        return "br1"

    def split(self, side: list[str]) -> None:
        """Partition the LAN in two: the ports of ``side`` move to a second bridge, the others
        stay on ``br0``. Frames no longer cross between the sides, so open connections hang
        (no reset) as they would behind a failed switch. Each port keeps its up/down state,
        so a split composes with :meth:`link`. :meth:`join` undoes it."""
        if not self._has_split_bridge:
            _ip("-n", self.bridge_ns, "link", "add", self.split_bridge, "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", self.split_bridge, "up")
            self._has_split_bridge = True
        for host in side:
            _ip("-n", self.bridge_ns, "link", "set", self.hosts[host].port,
                "master", self.split_bridge)  # fmt: skip

    def join(self) -> None:
        """Heal a partition: every host's port back on ``br0`` (a no-op without a split)."""
        if not self._has_split_bridge:
            return
        for host in self.hosts.values():
            _ip("-n", self.bridge_ns, "link", "set", host.port, "master", "br0")

    def reachable(self, src: str, dst: str, port: int = 9) -> bool:
        """Whether ``dst`` answers a TCP connect from ``src`` (a refusal counts: it answered)."""
        probe = (
            "import socket, sys\n"
            "try:\n"
            f"    socket.create_connection(({self.hosts[dst].address!r}, {port}), timeout=2)\n"
            "except ConnectionRefusedError:\n"
            "    pass\n"
            "except OSError:\n"
            "    sys.exit(1)\n"
        )
        out = subprocess.run(
            ["ip", "netns", "exec", self.hosts[src].netns, sys.executable, "-c", probe],
            capture_output=True, timeout=20, check=False,
        )  # fmt: skip
        return out.returncode == 0

    def run(
        self, host: str, argv: list[str], env: dict[str, str], log: Path, lifeline: bool = True
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside a host's namespace (``ip netns exec`` execs it in place).

        With ``lifeline`` a node stops by itself when this process dies without closing the
        lab (:mod:`rumor.node.lifeline`: the pipe goes through ``ip netns exec`` untouched);
        call from the main thread, as the parent-death signal follows the forking thread.
        """
        fh = log.open("ab")
        self._logs.append(fh)
        if lifeline and self._lifeline is None:
            self._lifeline = Lifeline()
        kwargs = self._lifeline.popen_kwargs(env) if lifeline and self._lifeline else {"env": env}
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.hosts[host].netns, *argv],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        self.procs.append(proc)
        return proc

    def stop(self, grace: float = 15.0) -> list[int | None]:
        """SIGTERM every process, SIGKILL what is left after ``grace``; their exit codes."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        while any(p.poll() is None for p in self.procs) and time.monotonic() < end:
            time.sleep(0.1)
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        return [p.returncode for p in self.procs]

    def close(self) -> None:
        """Kill what runs, delete the namespaces and the /etc/netns folders. Idempotent."""
        try:
            self.stop(grace=5.0)
        finally:
            for fh in self._logs:
                fh.close()
            if self._lifeline is not None:
                self._lifeline.close()
                self._lifeline = None
            for ns in reversed(self._namespaces):
                _ip("netns", "del", ns, check=False)
            self._namespaces.clear()
            for folder in self._etc_dirs:
                shutil.rmtree(folder, ignore_errors=True)
            self._etc_dirs.clear()
