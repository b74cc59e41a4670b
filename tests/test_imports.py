"""What a ``rumor node`` process imports: none of the analysis libraries.

Every node is a separate process, so each module it imports is paid once per node. networkx
alone is about 12 MiB of resident memory and 300 modules, and the node needs none of it: it
computes its mixing row from degrees (:func:`rumor.topology.metropolis_weights`). These
checks run in fresh interpreters, since this test process has imported everything already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import networkx as nx
import pytest

from rumor.cluster import cluster_configs, free_ports
from rumor.config import NodeConfig
from rumor.local_cluster import LocalCluster

ROOT = Path(__file__).resolve().parents[1]

HEAVY = ("networkx", "matplotlib", "sklearn", "scipy")
"""Libraries a node must not import (the topology tools, plotting, claims use them)."""

NODE_MODULES = (
    "rumor.cli",
    "rumor.cli.node_cmd",
    "rumor.api",
    "rumor.config",
    "rumor.node.runtime",
    "rumor.node.trainer",
    "rumor.node.data",
    "rumor.algorithms.registry",
    "rumor.algorithms.gossip",
    "rumor.algorithms.rounds",
    "rumor.protocol.grpc_transport",
    "rumor.topology",
    "rumor.topology.mixing",
)

REPORT = f"import json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"


def _heavy_after(code: str) -> list[str]:
    """The :data:`HEAVY` modules loaded after a fresh interpreter runs ``code``."""
    probe = f"{code}\n{REPORT}"
    out = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=120,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_node_modules_import_no_analysis_library() -> None:
    assert _heavy_after("import " + ", ".join(NODE_MODULES)) == []


def test_the_per_node_mixing_row_needs_no_networkx() -> None:
    code = (
        "from rumor.topology import metropolis_weights\n"
        "assert metropolis_weights(2, {'a': 3}) == (0.75, {'a': 0.25})"
    )
    assert _heavy_after(code) == []


def test_graph_tools_still_load_networkx_when_used() -> None:
    """The lazy package namespace still hands out every public name, networkx and all."""
    code = (
        "import rumor.topology as t\n"
        "assert all(getattr(t, name) is not None for name in t.__all__)\n"
        "assert set(t.__all__) <= set(dir(t))\n"
        "from rumor.topology import canonical, metropolis_hastings, build\n"
        "import rumor.topology.canonical\n"
        "assert t.canonical is canonical and callable(canonical)\n"
        "assert metropolis_hastings(build('ring:4')).shape == (4, 4)"
    )
    assert _heavy_after(code) == ["networkx"]


SITECUSTOMIZE = """
import atexit, json, os, sys

def _dump():
    path = os.path.join(os.environ["RUMOR_TEST_MODULES_DIR"], f"{os.getpid()}.json")
    with open(path, "w") as fh:
        json.dump(sorted(sys.modules), fh)

atexit.register(_dump)
"""


def test_a_running_node_imports_no_analysis_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two real ``rumor node`` processes run a few gossip rounds (training, exchange over
    gRPC, evaluation) and, on exit, write down every module they loaded (a
    ``sitecustomize`` put on their path registers the hook)."""
    hook, dumps = tmp_path / "hook", tmp_path / "modules"
    hook.mkdir()
    dumps.mkdir()
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *([path] if path else [])]))
    monkeypatch.setenv("RUMOR_TEST_MODULES_DIR", str(dumps))
    ports = free_ports(2)
    base = NodeConfig(
        algorithm="dpsgd",
        params={"local_steps": 1},
        rounds=3,
        dataset="digits",
        model="mlp:32x32",
        batch_size=32,
        init="shared",
        eval_every=1,
        linger=0.5,
    )
    configs = cluster_configs(nx.path_graph(2), base, lambda i: f"127.0.0.1:{ports[i]}")
    cluster = LocalCluster(configs, tmp_path / "run")
    try:
        cluster.start()
        pids = {node_id: proc.pid for node_id, proc in cluster.procs.items()}
        finished = cluster.wait(90.0)
    finally:
        codes = cluster.stop(grace=10.0)
    assert finished and codes == {"node-0": 0, "node-1": 0}, codes
    for node_id, pid in pids.items():
        loaded = set(json.loads((dumps / f"{pid}.json").read_text()))
        assert "rumor.algorithms.gossip" in loaded  # the dump is that of a node that ran
        assert sorted(loaded & set(HEAVY)) == [], node_id
