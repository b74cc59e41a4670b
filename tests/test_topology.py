"""Tests of rumor.topology's graph builders, spec parser, file formats and relabelling."""

from __future__ import annotations

import doctest
import importlib
import json
import math
from pathlib import Path

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rumor.topology as topo
from rumor.topology import builders

# ---------------------------------------------------------------- builders

CASES = [
    (topo.ring, (8,), 8),
    (topo.ring, (3,), 3),
    (topo.path, (5,), 5),
    (topo.path, (1,), 1),
    (topo.star, (6,), 6),
    (topo.complete, (5,), 5),
    (topo.grid_2d, (3, 4), 12),
    (topo.grid_2d, (1, 5), 5),
    (topo.torus_2d, (3, 5), 15),
    (topo.hypercube, (4,), 16),
    (topo.hypercube, (0,), 1),
    (topo.exponential, (13,), 13),
    (topo.exponential, (2,), 2),
    (topo.erdos_renyi, (16, 0.3, 0), 16),
    (topo.random_regular, (16, 4, 0), 16),
    (topo.random_regular, (12, 2, 1), 12),
    (topo.barabasi_albert, (32, 2, 0), 32),
    (topo.watts_strogatz, (16, 4, 0.2, 0), 16),
    (topo.random_geometric, (32, 0.3, 0), 32),
    (topo.random_geometric, (40, 0.05, 3), 40),
]


def assert_topology(G: nx.Graph, n: int) -> None:
    assert type(G) is nx.Graph
    assert list(G.nodes) == list(range(n))
    assert nx.number_of_selfloops(G) == 0
    assert nx.is_connected(G)


@pytest.mark.parametrize(("builder", "args", "n"), CASES)
def test_builders_return_connected_integer_graphs(builder, args, n):
    assert_topology(builder(*args), n)


@pytest.mark.parametrize(("builder", "args", "n"), [c for c in CASES if len(c[1]) > 2])
def test_random_builders_are_reproducible(builder, args, n):
    first, second = builder(*args), builder(*args)
    assert sorted(first.edges) == sorted(second.edges)
    others = {tuple(sorted(builder(*args[:-1], seed).edges)) for seed in range(1, 6)}
    assert len(others) > 1, "the seed should change the graph"


def test_structure_of_deterministic_families():
    assert {d for _, d in topo.ring(9).degree} == {2}
    assert topo.grid_2d(3, 4).number_of_edges() == 2 * 12 - 3 - 4
    assert topo.grid_2d(3, 4).has_edge(5, 9) and topo.grid_2d(3, 4).has_edge(5, 6)
    torus = topo.torus_2d(4, 5)
    assert {d for _, d in torus.degree} == {4} and torus.number_of_edges() == 40
    assert torus.has_edge(0, 4) and torus.has_edge(0, 15)
    cube = topo.hypercube(5)
    assert {d for _, d in cube.degree} == {5} and cube.number_of_edges() == 5 * 16
    assert all(bin(u ^ v).count("1") == 1 for u, v in cube.edges)
    assert set(topo.star(6)[0]) == {1, 2, 3, 4, 5} and topo.star(6).number_of_edges() == 5
    assert topo.complete(6).number_of_edges() == 15


@pytest.mark.parametrize("n", [2, 3, 5, 8, 12, 16, 17])
def test_exponential_links_powers_of_two_both_ways(n):
    G = topo.exponential(n)
    hops = [2**k for k in range(int(math.log2(n - 1)) + 1)]
    for i in range(n):
        assert set(G[i]) == {(i + h) % n for h in hops} | {(i - h) % n for h in hops}
    if n & (n - 1) == 0:  # power of two: the regular graph of degree 2 log2(n) - 1
        assert {d for _, d in G.degree} == {max(1, 2 * int(math.log2(n)) - 1)}


def test_random_families_have_their_degrees_and_sizes():
    assert {d for _, d in topo.random_regular(20, 3, seed=4).degree} == {3}
    assert topo.watts_strogatz(20, 6, 0.5, seed=1).number_of_edges() == 60
    assert topo.barabasi_albert(20, 3, seed=1).number_of_edges() == 3 * 17


def test_erdos_renyi_first_draw_is_networkx_draw():
    expected = nx.gnp_random_graph(20, 0.4, seed=7)
    assert nx.is_connected(expected)
    assert sorted(topo.erdos_renyi(20, 0.4, seed=7).edges) == sorted(expected.edges)


def test_erdos_renyi_redraws_until_connected():
    # p near the connectivity threshold: the first draw for some seed is disconnected
    seeds = [s for s in range(50) if not nx.is_connected(nx.gnp_random_graph(30, 0.1, seed=s))]
    assert seeds
    G = topo.erdos_renyi(30, 0.1, seed=seeds[0])
    assert_topology(G, 30)
    assert sorted(G.edges) == sorted(topo.erdos_renyi(30, 0.1, seed=seeds[0]).edges)


def test_erdos_renyi_gives_up_after_bounded_attempts():
    with pytest.raises(ValueError, match="no connected draw in 3 attempts"):
        topo.erdos_renyi(60, 0.01, seed=0, max_attempts=3)


def test_random_geometric_joins_components_through_closest_points():
    radius = 0.05
    G = topo.random_geometric(40, radius, seed=3)
    raw = nx.random_geometric_graph(40, radius, seed=3)
    components = nx.number_connected_components(raw)
    assert components > 1
    long_edges = [
        (u, v) for u, v in G.edges if math.dist(G.nodes[u]["pos"], G.nodes[v]["pos"]) > radius
    ]
    assert len(long_edges) == components - 1
    assert set(raw.edges) <= set(G.edges)


@pytest.mark.parametrize(
    "call",
    [
        lambda: topo.ring(2),
        lambda: topo.ring(3.0),
        lambda: topo.path(0),
        lambda: topo.star(0),
        lambda: topo.complete(0),
        lambda: topo.grid_2d(0, 3),
        lambda: topo.torus_2d(2, 5),
        lambda: topo.hypercube(-1),
        lambda: topo.exponential(0),
        lambda: topo.erdos_renyi(10, 0.0),
        lambda: topo.erdos_renyi(10, 1.5),
        lambda: topo.erdos_renyi(10, 0.5, seed=None),
        lambda: topo.random_regular(5, 3),
        lambda: topo.random_regular(4, 4),
        lambda: topo.random_regular(6, 1),
        lambda: topo.random_regular(6, 0),
        lambda: topo.barabasi_albert(3, 3),
        lambda: topo.barabasi_albert(5, 0),
        lambda: topo.watts_strogatz(10, 3, 0.1),
        lambda: topo.watts_strogatz(4, 4, 0.1),
        lambda: topo.watts_strogatz(10, 4, -0.1),
        lambda: topo.random_geometric(5, -1.0),
    ],
)
def test_impossible_parameters_raise_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_small_edge_cases_are_connected():
    assert_topology(topo.random_regular(1, 0), 1)
    assert_topology(topo.random_regular(2, 1), 2)
    assert_topology(topo.erdos_renyi(1, 0.0), 1)
    assert_topology(topo.watts_strogatz(5, 4, 0.3), 5)


@st.composite
def random_specs(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["er", "regular", "ba", "ws", "geometric"]))
    n = draw(st.integers(4, 24))
    if kind == "er":
        return builders.erdos_renyi, (n, draw(st.floats(0.4, 1.0)), seed), n
    if kind == "regular":
        d = draw(st.integers(3, n - 1).filter(lambda d: n * d % 2 == 0))
        return builders.random_regular, (n, d, seed), n
    if kind == "ba":
        return builders.barabasi_albert, (n, draw(st.integers(1, n - 1)), seed), n
    if kind == "ws":
        k = 2 * draw(st.integers(1, (n - 1) // 2))
        return builders.watts_strogatz, (n, k, draw(st.floats(0, 1)), seed), n
    return builders.random_geometric, (n, draw(st.floats(0, 1.5)), seed), n


@settings(max_examples=60, deadline=None)
@given(random_specs())
def test_random_builders_connected_and_seeded(case):
    builder, args, n = case
    G = builder(*args)
    assert_topology(G, n)
    assert sorted(G.edges) == sorted(builder(*args).edges)


# ---------------------------------------------------------------- spec parser

SPECS = {
    "ring:8": topo.ring(8),
    "grid:4x4": topo.grid_2d(4, 4),
    "grid:2X3": topo.grid_2d(2, 3),
    "torus:4x4": topo.torus_2d(4, 4),
    "hypercube:3": topo.hypercube(3),
    "erdos_renyi:16:0.3": topo.erdos_renyi(16, 0.3, seed=0),
    "regular:16:4": topo.random_regular(16, 4, seed=0),
    "ba:32:2": topo.barabasi_albert(32, 2, seed=0),
    "ws:16:4:0.2": topo.watts_strogatz(16, 4, 0.2, seed=0),
    "exponential:16": topo.exponential(16),
    "geometric:32:0.3": topo.random_geometric(32, 0.3, seed=0),
    "complete:5": topo.complete(5),
    "star:6": topo.star(6),
    "path:5": topo.path(5),
    " Ring:5 ": topo.ring(5),
    "random-regular:10:3": topo.random_regular(10, 3, seed=0),
    "er:12:0.5": topo.erdos_renyi(12, 0.5, seed=0),
    "grid:12": topo.grid_2d(3, 4),
}


@pytest.mark.parametrize("spec", SPECS)
def test_build_parses_every_spec(spec):
    G = topo.build(spec)
    assert sorted(G.edges) == sorted(SPECS[spec].edges)
    assert_topology(G, SPECS[spec].number_of_nodes())


def test_build_takes_size_from_n():
    assert sorted(topo.build("ring", n=7).edges) == sorted(topo.ring(7).edges)
    assert sorted(topo.build("grid", n=12).edges) == sorted(topo.grid_2d(3, 4).edges)
    assert sorted(topo.build("torus", n=16).edges) == sorted(topo.torus_2d(4, 4).edges)
    assert sorted(topo.build("hypercube", n=8).edges) == sorted(topo.hypercube(3).edges)
    ws = topo.build("ws:4:0.2", n=16, seed=5)
    assert sorted(ws.edges) == sorted(topo.watts_strogatz(16, 4, 0.2, seed=5).edges)
    assert topo.build("regular:3", n=10).degree[0] == 3
    assert topo.build("ring:8", n=8).number_of_nodes() == 8


def test_build_passes_the_seed_to_random_families_only():
    a, b = topo.build("er:16:0.3", seed=3), topo.erdos_renyi(16, 0.3, seed=3)
    assert sorted(a.edges) == sorted(b.edges)
    assert sorted(topo.build("ring:6", seed=9).edges) == sorted(topo.ring(6).edges)


@pytest.mark.parametrize(
    ("spec", "n", "message"),
    [
        ("ring:8", 9, "has 8 nodes, but n=9"),
        ("nope:3", None, "unknown topology 'nope'"),
        ("ring:x", None, "bad value 'x'"),
        ("ring", None, "does not match ring:N"),
        ("ws:16:4", None, "does not match ws:N:K:P"),
        ("ws:16:4:0.2:9", None, "does not match"),
        ("er:16:lots", None, "bad value 'lots'"),
        ("hypercube", 6, "power of two"),
        ("torus", 7, "torus"),
        ("ring:2", None, "'ring:2'.*n must be >= 3"),
        ("regular:7:3", None, "even"),
    ],
)
def test_build_rejects_bad_specs(spec, n, message):
    with pytest.raises(ValueError, match=message):
        topo.build(spec, n=n)


def test_build_reads_files(tmp_path):
    G = topo.torus_2d(3, 4)
    for suffix in (".edgelist", ".txt", ".graphml", ".json"):
        path = tmp_path / f"g{suffix}"
        topo.save(G, path)
        assert sorted(topo.build(str(path)).edges) == sorted(G.edges)
        assert topo.build(str(path), n=12).number_of_nodes() == 12
        with pytest.raises(ValueError, match="but n=5"):
            topo.build(str(path), n=5)
    with pytest.raises(FileNotFoundError):
        topo.build(str(tmp_path / "missing.json"))


# ---------------------------------------------------------------- files

GRAPHS = [topo.ring(6), topo.path(1), topo.barabasi_albert(20, 2, seed=1), topo.hypercube(3)]


@pytest.mark.parametrize("suffix", [".edgelist", ".txt", ".graphml", ".json", ".GraphML"])
@pytest.mark.parametrize("G", GRAPHS, ids=["ring", "single", "ba", "cube"])
def test_save_load_round_trip(tmp_path, suffix, G):
    path = tmp_path / "sub" / f"graph{suffix}"
    topo.save(G, path)
    H = topo.load(path)
    assert list(H.nodes) == list(G.nodes)
    assert sorted(H.edges) == sorted(G.edges)


def test_formats_keep_what_they_can(tmp_path):
    G = topo.random_geometric(12, 0.4, seed=2)
    G.graph["name"] = "office"
    for u, v in G.edges:
        G[u][v]["weight"] = float(u + v) / 2
    topo.save(G, tmp_path / "g.json")
    topo.save(G, tmp_path / "g.graphml")
    topo.save(G, tmp_path / "g.edgelist")
    from_json = topo.load(tmp_path / "g.json")
    assert from_json.nodes[3]["pos"] == pytest.approx(list(G.nodes[3]["pos"]))
    assert from_json.graph["name"] == "office"
    from_graphml = topo.load(tmp_path / "g.graphml")
    assert "pos" not in from_graphml.nodes[3]
    for H in (from_json, from_graphml, topo.load(tmp_path / "g.edgelist")):
        assert {(u, v): d["weight"] for u, v, d in H.edges(data=True)} == {
            (u, v): d["weight"] for u, v, d in G.edges(data=True)
        }


def test_load_relabels_arbitrary_labels(tmp_path):
    path = tmp_path / "hosts.txt"
    path.write_text("# office\nbeta gamma\nalpha beta  # trailing comment\ndelta\n")
    G = topo.load(path)
    assert list(G.nodes) == [0, 1, 2, 3]
    assert [G.nodes[i]["label"] for i in range(4)] == ["alpha", "beta", "delta", "gamma"]
    assert sorted(G.edges) == [(0, 1), (1, 3)]

    numbered = tmp_path / "numbered.edgelist"
    numbered.write_text("10 2\n2 1\n")  # integer labels keep their numeric order
    H = topo.load(numbered)
    assert sorted(H.edges) == [(0, 1), (1, 2)] and H.nodes[2]["label"] == "10"


def test_load_reads_networkx_writers(tmp_path):
    G = nx.DiGraph([("a", "b"), ("b", "a"), ("b", "c"), ("c", "c")])
    nx.write_graphml(G, tmp_path / "d.graphml")
    H = topo.load(tmp_path / "d.graphml")
    assert type(H) is nx.Graph and sorted(H.edges) == [(0, 1), (1, 2)]

    W = nx.Graph()
    W.add_edge(1, 2, weight=0.5)
    W.add_edge(2, 3, weight=2.0)
    nx.write_edgelist(W, tmp_path / "w.edgelist", data=True)
    assert topo.load(tmp_path / "w.edgelist")[1][2]["weight"] == 2.0

    with (tmp_path / "links.json").open("w") as f:
        json.dump(nx.node_link_data(topo.ring(4), edges="links"), f)
    assert sorted(topo.load(tmp_path / "links.json").edges) == sorted(topo.ring(4).edges)


def test_load_rejects_malformed_files(tmp_path):
    (tmp_path / "bad.edgelist").write_text("0 1\n1 2 3 4\n")
    with pytest.raises(ValueError, match=r"bad\.edgelist:2"):
        topo.load(tmp_path / "bad.edgelist")
    (tmp_path / "bad.json").write_text('{"nodes": []}')
    with pytest.raises(ValueError, match="node-link"):
        topo.load(tmp_path / "bad.json")
    (tmp_path / "bad.graphml").write_text("<not graphml")
    with pytest.raises(ValueError, match="GraphML"):
        topo.load(tmp_path / "bad.graphml")
    with pytest.raises(ValueError, match="unknown topology file type"):
        topo.save(topo.ring(3), tmp_path / "g.gml")
    with pytest.raises(ValueError, match="cannot be written"):
        topo.save(nx.path_graph(["a b", "c"]), tmp_path / "g.txt")


def test_explicit_format_overrides_suffix(tmp_path):
    topo.save(topo.ring(5), tmp_path / "ring.dat", format="json")
    assert topo.load(tmp_path / "ring.dat", format="json").number_of_edges() == 5
    assert json.loads((tmp_path / "ring.dat").read_text())["nodes"][0] == {"id": 0}


# ---------------------------------------------------------------- relabelling, docs


def test_canonical_makes_simple_undirected_integer_graphs():
    M = nx.MultiDiGraph([(3, 1), (1, 3), (1, 3), (2, 2), (5, 1)])
    G = topo.canonical(M)
    assert type(G) is nx.Graph and list(G.nodes) == [0, 1, 2, 3]
    assert sorted(G.edges) == [(0, 2), (0, 3)]
    assert topo.edge_key(4, 1) == (1, 4) and topo.edge_key("b", "a") == ("a", "b")


MODULES = ["canonical", "builders", "io", "spec", "mixing", "spectral", "analysis"]


@pytest.mark.parametrize("module", ["rumor.topology", *(f"rumor.topology.{m}" for m in MODULES)])
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
    assert module == "rumor.topology" or result.attempted > 0


def test_topology_imports_nothing_heavy():
    import subprocess
    import sys

    code = (
        "import sys, rumor.topology; "
        "print(sorted(m for m in ('torch', 'matplotlib', 'sklearn', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert out.stdout.strip() == "[]"
