"""Clusters across real network boundaries: one network namespace per machine.

Each test builds its own LAN (tests/netns_util.py: a bridge in its own namespace, one
namespace and veth per host, 10.213.x.y addresses that exist only there) and tears it down
in a finalizer. The nodes are real `rumor node` daemons talking mutual TLS with certificates
from rumor.keys; the tests read convergence from the nodes' metrics logs.

- ``hosts``: the commands `rumor deploy hosts` prints, each run in its host's namespace; the
  cluster converges, one host's link goes down for a few seconds and comes back, both sides
  keep going and the cluster converges again.
- ``compose``: the services of the generated docker-compose.yml, each run as a process in its
  own namespace with the service names in that namespace's /etc/hosts and the compose volumes
  mapped onto host folders, converge (the compose file's wiring, without a Docker engine).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rumor import keys
from rumor.runlog import read_jsonl
from tests import netns_util

pytestmark = pytest.mark.netns

REPO = Path(__file__).resolve().parents[1]
RUMOR_BIN = str(Path(sys.executable).with_name("rumor"))
N = 4
#: How long host h3's link stays down (s).
PARTITION_S = 8.0
NODE_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}

# The cluster both tests deploy: a ring of four digits MLPs, each starting from its own
# random weights so that consensus has to form, checked through metrics every round.
SPEC_BODY = """
topology = "ring:4"
algorithm = "dpsgd"
rounds = 1000000
dataset = "digits"
partition = "iid"
model = "mlp"
lr = 0.05
momentum = 0.9
seed = 3
init = "independent"
eval_every = 5
heartbeat_period = 0.25
request_timeout = 3.0
startup_wait = 90.0
checkpoints = false

[params]
local_steps = 2
round_timeout = 2.0

[tls]
dir = "certs"
"""


@pytest.fixture
def lab() -> Iterator[Callable[[int, list[str]], netns_util.Lab]]:
    reason = netns_util.unavailable()
    if reason:
        pytest.skip(reason)
    labs: list[netns_util.Lab] = []

    def make(subnet: int, names: list[str]) -> netns_util.Lab:
        made = netns_util.Lab(subnet=subnet)
        labs.append(made)
        return made.start(names)

    try:
        yield make
    finally:
        for made in labs:
            made.close()


def _rounds(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [r for r in read_jsonl(path) if r.get("event") == "round"]


def _wait(predicate: Callable[[], bool], timeout: float, what: str, procs: list[Any]) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        dead = [p.args for p in procs if p.poll() is not None]
        if dead:
            raise AssertionError(f"a node exited while waiting for {what}: {dead}")
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _last(records: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    assert values, f"no {key} logged"
    return float(values[-1])


def _first(records: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in records if r.get(key) is not None]
    assert values, f"no {key} logged"
    return float(values[0])


def _converged(metrics: dict[str, Path], at_least: int) -> dict[str, tuple[float, float]]:
    """Every node past round ``at_least``: consensus fell and accuracy rose on each.

    Returns each node's first and last neighbour distance (||x - neighbourhood mean||).
    """
    out = {}
    for node, path in metrics.items():
        rec = _rounds(path)
        assert rec[-1]["round"] >= at_least
        first_nd, last_nd = _first(rec, "neighbour_distance"), _last(rec, "neighbour_distance")
        first_acc, last_acc = _first(rec, "accuracy"), _last(rec, "accuracy")
        assert last_nd < 0.1 * first_nd, (node, first_nd, last_nd)
        assert last_acc > first_acc + 0.3 and last_acc > 0.8, (node, first_acc, last_acc)
        out[node] = (first_nd, last_nd)
    return out


def _write_spec(folder: Path, name: str, tables: str = "") -> Path:
    """The spec, its certificates (rumor.keys) beside it, and extra tables at the end."""
    keys.make_cluster([f"node-{i}" for i in range(N)], folder / "certs")
    spec = folder / "cluster.toml"
    spec.write_text(f'name = "{name}"\n{SPEC_BODY}\n{tables}')
    return spec


def _printed_commands(text: str) -> dict[str, list[list[str]]]:
    """``# on HOST (...)`` headers followed by that host's command lines."""
    out: dict[str, list[list[str]]] = {}
    host = None
    for line in text.splitlines():
        if line.startswith("# on "):
            host = line.split()[2]
            out[host] = []
        elif line.strip() and not line.startswith("#"):
            assert host is not None, f"command before any host: {line}"
            out[host].append(shlex.split(line))
    return out


def test_hosts_commands_converge_survive_a_partition_and_converge_again(lab, tmp_path: Path):
    names = [f"h{i}" for i in range(N)]
    net = lab(1, names)
    hosts = "\n".join(f'{h} = "{net.hosts[h].address}"' for h in names)
    nodes = "\n".join(f'node-{i} = "h{i}"' for i in range(N))
    state = tmp_path / "state"
    spec = _write_spec(tmp_path, "lan", f"[hosts]\n{hosts}\n[nodes]\n{nodes}\n")
    spec.write_text(f'state_dir = "{state}"\n' + spec.read_text())
    out = tmp_path / "out"
    printed = subprocess.run(
        [sys.executable, "-m", "rumor", "deploy", "hosts", str(spec), "--out", str(out),
         "--config-dir", f"{out}/{{host}}", "--rumor-bin", RUMOR_BIN],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    commands = _printed_commands(printed)
    assert sorted(commands) == names and all(len(c) == 1 for c in commands.values()), printed
    # each machine's folder holds its config, its unit, and only its own private key
    assert sorted(p.name for p in (out / "h2" / "tls").iterdir()) == [
        "ca.crt", "node-2.crt", "node-2.key"
    ]  # fmt: skip
    assert (out / "h2" / "rumor-node-2.service").read_text().count("ExecStart=") == 1

    env = dict(os.environ, **NODE_ENV)
    procs = [net.run(h, cmd, env, tmp_path / f"{h}.log") for h in names for cmd in commands[h]]
    metrics = {f"node-{i}": state / f"node-{i}.metrics.jsonl" for i in range(N)}

    def past(r: int, who: list[str]) -> Callable[[], bool]:
        return lambda: all(_rounds(metrics[n])[-1:] and _rounds(metrics[n])[-1]["round"] >= r
                           for n in who)  # fmt: skip

    everyone = list(metrics)
    _wait(past(30, everyone), 240, "round 30 on every node", procs)
    before = _converged(metrics, 30)

    # partition: host h3 (node-3) loses its link; both sides must keep training
    victim, others = "node-3", ["node-0", "node-1", "node-2"]
    at_cut = {n: _rounds(p)[-1]["round"] for n, p in metrics.items()}
    net.link("h3", up=False)
    assert not net.reachable("h0", "h3")
    try:
        time.sleep(PARTITION_S)
        during = {n: _rounds(p)[-1]["round"] for n, p in metrics.items()}
    finally:
        net.link("h3", up=True)
    healed_at = time.monotonic()
    # both sides went on: node-3 alone (each of its rounds waits round_timeout for models
    # that cannot come), the other three among themselves
    assert during[victim] >= at_cut[victim] + 2, (at_cut, during)
    assert all(during[n] > at_cut[n] + 20 for n in others), (at_cut, during)
    alone = [r for r in _rounds(metrics[victim]) if at_cut[victim] < r["round"] <= during[victim]]
    assert alone[-1]["received"] == 0 and alone[-1]["alive"] == 0, alone
    for n in ("node-0", "node-2"):  # node-3's neighbours mixed without it
        last = [r for r in _rounds(metrics[n]) if r["round"] <= during[n]][-1]
        assert last["received"] == 1 and last["alive"] == 1, (n, last)

    # healed: node-3 and its neighbours exchange again, and the cluster converges again
    def exchanging_again() -> bool:
        last = {n: _rounds(p)[-1] for n, p in metrics.items()}
        return all(last[n]["received"] == 2 for n in ("node-0", "node-2", victim))

    _wait(exchanging_again, 90, "node-3 and its neighbours to exchange again", procs)
    resumed = {n: _rounds(p)[-1]["round"] for n, p in metrics.items()}
    _wait(past(max(resumed.values()) + 30, everyone), 120, "30 rounds after healing", procs)
    after = _converged(metrics, max(during.values()))
    assert all(resumed[n] > during[n] for n in everyone), (during, resumed)
    recovery_s = time.monotonic() - healed_at
    codes = net.stop()
    assert codes == [0] * N, codes
    print(json.dumps({"before": before, "after": after, "at_cut": at_cut, "during": during,
                      "resumed": resumed, "recovery_s": recovery_s}))  # fmt: skip


def _entrypoint() -> list[str]:
    """The image's ENTRYPOINT, read from the one Dockerfile the compose file builds."""
    for line in (REPO / "deploy" / "docker" / "Dockerfile").read_text().splitlines():
        if line.startswith("ENTRYPOINT"):
            return json.loads(line.split(None, 1)[1])
    raise AssertionError("the Dockerfile has no ENTRYPOINT")


def _mounts(service: dict[str, Any], compose_dir: Path, volumes_dir: Path) -> dict[str, Path]:
    """Container path -> host path for a service's volumes: what its mounts would show."""
    out = {}
    for vol in service["volumes"]:
        if vol["type"] == "bind":
            source = (compose_dir / vol["source"]).resolve()
            assert source.exists(), f"bind source missing: {vol['source']}"
        else:
            assert vol["type"] == "volume"
            source = volumes_dir / vol["source"]
            source.mkdir(parents=True, exist_ok=True)
        out[vol["target"]] = source
    return out


def _translate(text: str, mounts: dict[str, Path]) -> str:
    for target in sorted(mounts, key=len, reverse=True):
        text = text.replace(target, str(mounts[target]))
    return text


@pytest.mark.slow
def test_compose_services_as_processes_in_namespaces_converge(lab, tmp_path: Path) -> None:
    yaml = pytest.importorskip("yaml")
    spec = _write_spec(tmp_path, "wiring")
    compose_dir = tmp_path / "compose"
    subprocess.run(
        [sys.executable, "-m", "rumor", "deploy", "compose", str(spec), "--out", str(compose_dir)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    doc = yaml.safe_load((compose_dir / "docker-compose.yml").read_text())
    services = doc["services"]
    assert sorted(services) == [f"node-{i}" for i in range(N)]
    net = lab(2, list(services))
    names = {name: net.hosts[name].address for name in services}
    entrypoint = _entrypoint()
    procs = []
    metrics = {}
    for name, service in services.items():
        # what Docker would give the container: its own network namespace where the other
        # services' names resolve, its mounts, its environment, the image's entrypoint
        net.set_hosts_file(name, names)
        mounts = _mounts(service, compose_dir, tmp_path / "volumes" / name)
        shadow = tmp_path / "mounted" / name
        shadow.mkdir(parents=True)
        for target, source in list(mounts.items()):
            if source.suffix == ".toml":  # a config mentions container paths: map them too
                copy = shadow / source.name
                copy.write_text(_translate(source.read_text(), mounts))
                mounts[target] = copy
        argv = [RUMOR_BIN if a == "rumor" else a for a in entrypoint]
        argv += [_translate(a, mounts) for a in service["command"]]
        env = dict(os.environ, **{k: _translate(str(v), mounts) for k, v in
                                  service["environment"].items()})  # fmt: skip
        procs.append(net.run(name, argv, env, tmp_path / f"{name}.log"))
        state = mounts["/var/lib/rumor"]
        metrics[name] = state / f"{name}.metrics.jsonl"
    # the nodes found each other by service name: every node mixes both neighbours' models
    _wait(
        lambda: all(_rounds(p)[-1:] and _rounds(p)[-1]["round"] >= 40 for p in metrics.values()),
        240, "round 40 on every service", procs,
    )  # fmt: skip
    result = _converged(metrics, 40)
    assert all(_rounds(p)[-1]["received"] == 2 for p in metrics.values())
    codes = net.stop()
    assert codes == [0] * N, codes
    print(json.dumps(result))
