"""No node outlives its launcher: signals to ``rumor cluster up``, a SIGKILLed LocalCluster
owner, and the two mechanisms underneath (the lifeline pipe, the parent-death signal).

Real processes throughout. Every test kills what it started in a ``finally``, checking that
a pid still runs a rumor process before killing it (a pid can be reused).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from rumor.node import lifeline

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

#: Seconds within which every node must be gone once its launcher is stopped or killed.
GONE_WITHIN = 5.0
#: Seconds for three nodes to import torch, load the data and log a round (2 cores).
START_WITHIN = 90.0
#: A short gossip wait, so that a node stopping mid-round does not sit out the default 10 s
#: waiting for a neighbour that has already left: these tests time the launcher, not the rule.
FAST_ROUNDS = ["--param", "round_timeout=1", "--partition", "iid", "--eval-every", "1000"]


# ----------------------------------------------------------------- processes
def _alive(pid: int) -> bool:
    """Whether ``pid`` runs a rumor process: not gone, not a zombie, not a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in {"Z", "X"} and b"rumor" in cmdline


def _gone_after(pids: list[int], timeout: float) -> float | None:
    """Seconds until none of ``pids`` is alive, or None if some still are after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if not any(_alive(p) for p in pids):
            return time.monotonic() - start
        time.sleep(0.05)
    return None


def _node_pids(run_dir: Path) -> list[int]:
    try:
        return list(json.loads((run_dir / "pids.json").read_text()).values())
    except (OSError, ValueError):
        return []


def _all_running(run_dir: Path, n: int) -> bool:
    """Every node has a pid in ``pids.json`` and has logged a round."""
    if len(_node_pids(run_dir)) < n:
        return False
    for i in range(n):
        path = run_dir / f"node-{i}.metrics.jsonl"
        if not path.exists() or '"event":"round"' not in path.read_text():
            return False
    return True


def _wait_running(run_dir: Path, n: int, launcher: subprocess.Popen[bytes], err: Path) -> None:
    end = time.monotonic() + START_WITHIN
    while not _all_running(run_dir, n):
        if launcher.poll() is not None:
            raise AssertionError(f"launcher exited ({launcher.returncode}): {err.read_text()}")
        if time.monotonic() > end:
            raise AssertionError(f"{n} nodes not running after {START_WITHIN} s")
        time.sleep(0.2)


@contextmanager
def _launched(argv: list[str], run_dir: Path, err: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Start a launcher; on the way out kill it and every node it left, whatever happened."""
    with err.open("wb") as fh:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=fh)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        for pid in _node_pids(run_dir):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------- rumor cluster up
@pytest.mark.parametrize(
    "sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL], ids=lambda s: s.name
)
def test_no_node_outlives_cluster_up(sig: signal.Signals, tmp_path: Path) -> None:
    run_dir, err = tmp_path / "run", tmp_path / "stderr"
    argv = [
        sys.executable, "-m", "rumor", "cluster", "up", "--nodes", "3", "--topology", "ring",
        "--rounds", "100000", "--format", "json", "--no-plot", "--run-dir", str(run_dir),
        *FAST_ROUNDS,
    ]  # fmt: skip
    with _launched(argv, run_dir, err) as launcher:
        _wait_running(run_dir, 3, launcher, err)
        pids = _node_pids(run_dir)
        launcher.send_signal(sig)
        took = _gone_after(pids, GONE_WITHIN)
        print(f"{sig.name}: nodes gone after {took} s")
        assert took is not None, f"nodes left running {GONE_WITHIN} s after {sig.name}"
        code = launcher.wait(20)
    if sig == signal.SIGKILL:  # the lifeline and the parent-death signal did it
        assert code == -signal.SIGKILL
        return
    assert code == 128 + sig
    assert f"rumor cluster up: stopped by {sig.name}; 3 nodes stopped" in err.read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by"] == sig.name
    assert set(summary["exit_codes"]) == {"node-0", "node-1", "node-2"}


# ----------------------------------------------------------------- LocalCluster
OWNER = """
import sys, time
from pathlib import Path
from rumor.cluster import build_graph, cluster_configs, free_ports
from rumor.config import NodeConfig
from rumor.local_cluster import LocalCluster
from rumor.node import lifeline

if sys.argv[2] == "lifeline-only":  # no parent-death signal: the pipe alone must do it
    lifeline.die_with_parent = lambda *args, **kwargs: None

ports = free_ports(3)
base = NodeConfig(params={"round_timeout": 1.0}, rounds=100000, partition="iid",
                  eval_every=1000, linger=900.0)
configs = cluster_configs(build_graph("ring", 3, 0), base, lambda i: f"127.0.0.1:{ports[i]}")
LocalCluster(configs, Path(sys.argv[1])).start()
time.sleep(600)
"""


@pytest.mark.parametrize("defences", ["both", "lifeline-only"])
def test_nodes_of_a_sigkilled_local_cluster_owner_stop(defences: str, tmp_path: Path) -> None:
    run_dir, err = tmp_path / "run", tmp_path / "stderr"
    argv = [sys.executable, "-c", OWNER, str(run_dir), defences]
    with _launched(argv, run_dir, err) as owner:
        _wait_running(run_dir, 3, owner, err)
        pids = _node_pids(run_dir)
        owner.kill()
        took = _gone_after(pids, GONE_WITHIN)
        print(f"LocalCluster owner SIGKILL ({defences}): nodes gone after {took} s")
        assert took is not None, f"nodes left running {GONE_WITHIN} s after their owner died"


# ----------------------------------------------------------------- the mechanisms
WATCHER = """
import asyncio, sys
from rumor.node import lifeline

async def main(grace):
    stopped = asyncio.Event()
    stop = stopped.set if grace > 5 else (lambda: None)  # a short grace: a stop that hangs
    assert lifeline.watch(asyncio.get_running_loop(), stop, grace=grace)
    print("watching", flush=True)
    await stopped.wait()

asyncio.run(main(float(sys.argv[1])))
"""


def _watcher(grace: float) -> tuple[lifeline.Lifeline, subprocess.Popen[bytes]]:
    """A process that watches a lifeline (and nothing else: no parent-death signal)."""
    line = lifeline.Lifeline()
    kwargs = {**line.popen_kwargs(os.environ), "preexec_fn": None}
    proc = subprocess.Popen(
        [sys.executable, "-c", WATCHER, str(grace)], stdout=subprocess.PIPE, **kwargs
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"watching\n"
    return line, proc


@pytest.mark.parametrize(("grace", "code"), [(30.0, 0), (0.5, 1)], ids=["graceful", "backstop"])
def test_a_cut_lifeline_stops_the_node(grace: float, code: int) -> None:
    line, proc = _watcher(grace)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.5)  # an intact lifeline stops nothing
        line.close()
        assert proc.wait(5) == code
    finally:
        line.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_watch_needs_a_pipe(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    try:
        assert lifeline.watch(loop, lambda: None, environ={}) is False
        with (tmp_path / "f").open("w") as fh:
            env = {lifeline.ENV_FD: str(fh.fileno())}
            assert lifeline.watch(loop, lambda: None, environ=env) is False
            assert env == {}  # not passed on to the node's own children
        assert lifeline.watch(loop, lambda: None, environ={lifeline.ENV_FD: "x"}) is False
    finally:
        loop.close()


MIDDLE = """
import subprocess, sys, time
from rumor.node.lifeline import die_with_parent

child = subprocess.Popen([sys.executable, "-c", "import rumor, time; time.sleep(60)"],
                         preexec_fn=die_with_parent(), start_new_session=True)
print(child.pid, flush=True)
time.sleep(60)
"""


def test_the_parent_death_signal_stops_a_child_without_lifeline() -> None:
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE], stdout=subprocess.PIPE)
    child = 0
    try:
        assert middle.stdout is not None
        child = int(middle.stdout.readline())
        assert _alive(child)
        middle.kill()
        assert _gone_after([child], GONE_WITHIN) is not None
    finally:
        middle.kill()
        middle.wait(5)
        if child and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_child_whose_parent_died_before_prctl_exits() -> None:
    # The parent pid it checks against is not its parent: as if that parent had died.
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        preexec_fn=lifeline.die_with_parent(parent=-1),
    )
    try:
        assert proc.wait(5) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


# ----------------------------------------------------------------- the launcher's handlers
def test_stop_signals_cancel_the_run_and_restore_the_handlers() -> None:
    from rumor.cli.cluster_cmd import StopSignals

    async def run_forever() -> str:
        asyncio.get_running_loop().call_later(0.1, os.kill, os.getpid(), signal.SIGINT)
        await asyncio.sleep(30)
        return "finished"

    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        assert asyncio.run(asyncio.wait_for(signals.guard(run_forever()), 10)) is None
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal is ignored: the stop goes on
    assert signals.received == signal.SIGINT
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.netns
def test_the_lifeline_goes_through_ip_netns_exec(tmp_path: Path) -> None:
    import netns_util  # tests/ is on the path under pytest, with or without ``python -m``

    if (reason := netns_util.unavailable()) is not None:
        pytest.skip(reason)
    lab = netns_util.Lab(subnet=219)
    try:
        lab.start(["h0"])
        argv = [sys.executable, "-c", WATCHER, "30"]
        proc = lab.run("h0", argv, dict(os.environ), tmp_path / "h0.log")
        end = time.monotonic() + 20
        while b"watching" not in (tmp_path / "h0.log").read_bytes():
            assert proc.poll() is None and time.monotonic() < end, "the watcher did not start"
            time.sleep(0.05)
        assert lab._lifeline is not None
        lab._lifeline.close()  # what the kernel does when the test process dies
        assert proc.wait(5) == 0
    finally:
        lab.close()
