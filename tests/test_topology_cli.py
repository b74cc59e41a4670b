"""Tests of the ``rumor topology`` commands, registered on a fresh Typer app.

The command module is loaded from its file, so that these tests do not depend on the other
command modules the root ``rumor.cli`` package imports.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import rumor.topology as topo

MODULE_PATH = Path(__file__).resolve().parents[1] / "rumor" / "cli" / "topology_cmd.py"


def load_command_module():
    spec = importlib.util.spec_from_file_location("_rumor_topology_cmd_under_test", MODULE_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def app() -> typer.Typer:
    root = typer.Typer()

    @root.callback()
    def main() -> None:
        """Stand-in for the rumor root command."""

    load_command_module().register(root)
    return root


def invoke(app: typer.Typer, *args: str):
    return CliRunner().invoke(app, ["topology", *args])


def test_command_module_imports_nothing_heavy():
    before = set(sys.modules)
    load_command_module()
    new = set(sys.modules) - before
    assert not {m for m in new if m.split(".")[0] in ("torch", "matplotlib", "sklearn")}


def test_analyze_table(app):
    result = invoke(app, "analyze", "ring:8")
    assert result.exit_code == 0, result.output
    for key in ("spectral_gap", "chi_1", "lambda_mix", "diameter"):
        assert key in result.stdout
    assert "13.6569" in result.stdout  # chi_1 of the 8-ring: 8 / (2 - 2 cos(pi / 4))


def test_analyze_json_matches_analyze(app):
    result = invoke(app, "analyze", "ws:4:0.2", "--n", "12", "--seed", "3", "--format", "json")
    assert result.exit_code == 0, result.output
    expected = topo.analyze(topo.build("ws:4:0.2", n=12, seed=3))
    assert json.loads(result.stdout) == pytest.approx(expected)


def test_analyze_disconnected_file_prints_nulls(app, tmp_path):
    import networkx as nx

    topo.save(nx.disjoint_union(topo.ring(3), topo.ring(3)), tmp_path / "two.json")
    result = invoke(app, "analyze", str(tmp_path / "two.json"), "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["is_connected"] is False and report["chi_1"] is None
    table = invoke(app, "analyze", str(tmp_path / "two.json"))
    assert table.exit_code == 0
    chi_1_row = next(line for line in table.stdout.splitlines() if "chi_1" in line)
    assert chi_1_row.rstrip(" │|").endswith("-")


@pytest.mark.parametrize("suffix", [".edgelist", ".txt", ".graphml", ".json"])
def test_build_writes_loadable_files(app, tmp_path, suffix):
    out = tmp_path / "nested" / f"g{suffix}"
    result = invoke(app, "build", "regular:12:3", "--out", str(out), "--seed", "4")
    assert result.exit_code == 0, result.output
    assert "12 nodes, 18 edges" in result.stdout
    assert sorted(topo.load(out).edges) == sorted(topo.random_regular(12, 3, seed=4).edges)


def test_build_rejects_unknown_extension(app, tmp_path):
    result = invoke(app, "build", "ring:5", "--out", str(tmp_path / "g.png"))
    assert result.exit_code == 2
    assert "unknown topology file type" in result.stderr


def test_mixing_json_is_the_matrix(app):
    result = invoke(app, "mixing", "ba:10:2", "--format", "json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "metropolis" and data["nodes"] == list(range(10))
    W = topo.metropolis_hastings(topo.build("ba:10:2"))
    np.testing.assert_allclose(data["matrix"], W)


def test_mixing_kinds(app):
    result = invoke(app, "mixing", "ring:4", "--kind", "max-degree")
    assert result.exit_code == 0, result.output
    assert "0.3333" in result.stdout and "max-degree" in result.stdout
    uniform = invoke(app, "mixing", "torus:3x3", "--kind", "uniform", "--format", "json")
    np.testing.assert_allclose(
        json.loads(uniform.stdout)["matrix"], topo.uniform(topo.torus_2d(3, 3))
    )
    refused = invoke(app, "mixing", "star:4", "--kind", "uniform")
    assert refused.exit_code == 2 and "regular" in refused.stderr
    bad_kind = invoke(app, "mixing", "ring:4", "--kind", "laplace")
    assert bad_kind.exit_code != 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["analyze", "nope:3"], "unknown topology 'nope'"),
        (["analyze", "ring:8", "--n", "9"], "but n=9"),
        (["mixing", "ring"], "does not match ring:N"),
        (["analyze", "missing.graphml"], "missing.graphml"),
    ],
)
def test_bad_specs_exit_with_a_message(app, args, message):
    result = invoke(app, *args)
    assert result.exit_code == 2
    assert message in result.stderr and result.stdout == ""


def test_help_lists_the_commands(app):
    result = invoke(app, "--help")
    assert result.exit_code == 0
    for command in ("analyze", "build", "mixing"):
        assert command in result.stdout
