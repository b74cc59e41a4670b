"""Exit codes of ``rumor node`` (and the other long-running commands), in one place.

Supervisors (systemd, Kubernetes, compose restart policies) act on these: a configuration,
security or checkpoint error will fail again on restart, so restarting is pointless; a
failure (code 1) may be transient.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Why a node process ended."""

    #: The node finished its rounds, or stopped cleanly on SIGTERM/SIGINT.
    OK = 0
    #: Anything unexpected (a crash); may be transient, a restart may help.
    FAILURE = 1
    #: Bad configuration: unknown key, bad value, unknown algorithm, bad address.
    CONFIG = 2
    #: Security settings unusable: plain text off loopback without ``insecure``, missing or
    #: unreadable certificate, key, CA or token file.
    SECURITY = 3
    #: The latest checkpoint was made with a different training configuration (its config
    #: digest differs), or cannot be read.
    CHECKPOINT = 4
    #: The listen address cannot be bound (in use, or not an address of this machine).
    BIND = 5
    #: Fewer than ``min_peers`` neighbours answered within ``startup_wait``. Often a wrong
    #: host name or port (fix the config), but neighbours that start late make it transient:
    #: a restart may help.
    PEERS = 6


def epilog() -> str:
    """The exit-code table for ``--help`` texts."""
    rows = "\n".join(f"  {c.value}  {c.name.lower()}: {_doc(c)}" for c in ExitCode)
    return "Exit codes:\n\n" + rows


_DOCS = {
    ExitCode.OK: "finished its rounds, or stopped cleanly on SIGTERM/SIGINT",
    ExitCode.FAILURE: "unexpected failure",
    ExitCode.CONFIG: "bad configuration",
    ExitCode.SECURITY: "unusable security settings (plain text off loopback, missing keys)",
    ExitCode.CHECKPOINT: "checkpoint made with another configuration, or unreadable",
    ExitCode.BIND: "cannot bind the listen address",
    ExitCode.PEERS: "fewer than min_peers neighbours answered within startup_wait",
}


def _doc(code: ExitCode) -> str:
    return _DOCS[code]
