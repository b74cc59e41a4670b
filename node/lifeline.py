"""Nodes die with their launcher, however the launcher dies.

Launchers (``rumor cluster up``, :class:`rumor.local_cluster.LocalCluster`, the test labs)
start each node in its own session, so that a terminal's Ctrl-C reaches only the launcher,
which then stops the nodes in order. The price: when the launcher dies without that orderly
stop (SIGKILL, the OOM killer, a crash), nothing else would stop the nodes, and they would
serve on for their whole ``linger``.

The lifeline is a pipe. The launcher keeps its write end, never writes to it, and passes the
read end to every node it starts (``pass_fds``), with the descriptor's number in
``RUMOR_LIFELINE_FD``. The kernel closes the write end when the launcher exits, however it
exits, and the node's event loop then sees end-of-file: :func:`watch` asks the node to stop
(the same graceful path as SIGTERM) and arms a hard backstop that ends the process if that
stop hangs.

Why a pipe rather than polling the parent pid: a file descriptor survives any chain of
execs (``ip netns exec``, ``env``, a wrapper shell), needs no parent-child relation at all,
cannot be fooled by pid reuse, and costs nothing until it fires. :func:`die_with_parent`
adds Linux's parent-death signal as a second line of defence; it also covers the seconds a
node spends importing torch before its event loop watches the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

log = logging.getLogger("rumor.lifeline")

#: The environment variable naming the read end of the lifeline in a node.
ENV_FD = "RUMOR_LIFELINE_FD"
#: Seconds a node has to stop gracefully once its launcher is gone, before ``os._exit(1)``.
GRACE_S = 10.0
#: ``PR_SET_PDEATHSIG`` from ``<linux/prctl.h>``.
PR_SET_PDEATHSIG = 1


# ----------------------------------------------------------------- launcher side
class Lifeline:
    """The launcher's end: one pipe shared by every node it starts.

    The write end is never written: its only job is to exist while the launcher does. Both
    ends are close-on-exec in the launcher, so no child inherits the write end (a child
    holding it would keep every lifeline alive); each node gets only the read end, through
    ``pass_fds``.
    """

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()

    def popen_kwargs(self, env: Mapping[str, str]) -> dict[str, Any]:
        """``subprocess.Popen`` arguments that hand a child this lifeline (and, on Linux,
        the parent-death signal)."""
        return {
            "env": {**env, ENV_FD: str(self.read_fd)},
            "pass_fds": (self.read_fd,),
            "preexec_fn": die_with_parent(),
        }

    def close(self) -> None:
        """Cut the lifeline: every node still holding it stops. Idempotent."""
        for fd in (self._write_fd, self.read_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._write_fd = self.read_fd = -1


def die_with_parent(
    sig: int = signal.SIGTERM, parent: int | None = None
) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child receive ``sig`` when its parent dies (Linux).

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the
    process: start children from a thread that lives as long as the launcher (its main
    thread). If the parent died between the fork and the ``prctl``, the signal will never
    come, so the child compares its parent pid with ``parent`` (default: the caller) and
    exits at once. None off Linux. Everything is resolved here, in the parent: the forked
    child only calls a ready ctypes function.
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = _prctl()
    if prctl is None:
        return None
    launcher = os.getpid() if parent is None else parent

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != launcher:
            os._exit(1)

    return preexec


@functools.cache
def _prctl() -> Any:
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - a libc without prctl
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


# ----------------------------------------------------------------- node side
def watch(
    loop: asyncio.AbstractEventLoop,
    stop: Callable[[], None],
    grace: float = GRACE_S,
    environ: MutableMapping[str, str] = os.environ,
) -> bool:
    """Call ``stop`` when the launcher's lifeline breaks, and exit hard ``grace`` s later.

    Does nothing and returns False when ``RUMOR_LIFELINE_FD`` is absent (a node started by
    hand, systemd or Kubernetes) or does not name a pipe. The variable is removed from the
    environment, so processes this node starts do not take an unrelated descriptor for it.
    """
    fd = _lifeline_fd(environ.pop(ENV_FD, None))
    if fd is None:
        return False
    os.set_inheritable(fd, False)
    # The pipe is shared by every node: another one may have drained what woke this one.
    os.set_blocking(fd, False)
    loop.add_reader(fd, _on_readable, loop, fd, stop, grace)
    return True


def _lifeline_fd(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        fd = int(value)
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return fd
    except (ValueError, OSError):
        pass
    log.warning("%s=%r is not an open pipe: not watching the launcher", ENV_FD, value)
    return None


def _on_readable(
    loop: asyncio.AbstractEventLoop, fd: int, stop: Callable[[], None], grace: float
) -> None:
    """End-of-file or an error means the launcher is gone; bytes mean nothing."""
    try:
        if os.read(fd, 4096):
            return
    except BlockingIOError:
        return
    except OSError:
        pass
    loop.remove_reader(fd)
    os.close(fd)
    log.warning("launcher gone: stopping (hard exit in %g s if the stop hangs)", grace)
    arm_backstop(grace)
    stop()


def arm_backstop(grace: float) -> threading.Timer:
    """``os._exit(1)`` after ``grace`` seconds, from a daemon thread (it never delays a
    clean exit), in case the graceful stop hangs: nobody is left to SIGKILL this node."""
    timer = threading.Timer(grace, _hard_exit, args=(grace,))
    timer.daemon = True
    timer.start()
    return timer


def _hard_exit(grace: float) -> None:
    line = f"rumor node: launcher gone and not stopped after {grace:g} s: exiting\n"
    with contextlib.suppress(OSError):
        os.write(2, line.encode())
    os._exit(1)
