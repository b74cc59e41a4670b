"""Tests of rumor.topology's mixing matrices and spectral constants against closed forms."""

from __future__ import annotations

import itertools
import json
import math

import networkx as nx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rumor.topology as topo

# ---------------------------------------------------------------- strategies


@st.composite
def connected_graphs(draw, min_n: int = 2, max_n: int = 16):
    n = draw(st.integers(min_n, max_n))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["er", "ba", "geometric", "tree"]))
    if kind == "er":
        return topo.erdos_renyi(n, draw(st.floats(0.5, 1.0)), seed)
    if kind == "ba":
        return topo.barabasi_albert(max(n, 2), 1 if n < 3 else draw(st.integers(1, 2)), seed)
    if kind == "geometric":
        return topo.random_geometric(n, draw(st.floats(0.0, 0.8)), seed)
    return topo.canonical(nx.random_labeled_tree(n, seed=seed))


@st.composite
def graphs_with_weights(draw, **kwargs):
    G = draw(connected_graphs(**kwargs))
    raw = draw(
        st.lists(st.floats(0.05, 20.0), min_size=G.number_of_edges(), max_size=G.number_of_edges())
    )
    total = sum(raw)
    return G, {topo.edge_key(u, v): r / total for (u, v), r in zip(G.edges, raw, strict=True)}


def reference_chis(G: nx.Graph, weights: dict | None = None) -> tuple[float, float]:
    """chi_1, chi_2 straight from the definitions, with a dense pseudo-inverse."""
    n, m = G.number_of_nodes(), G.number_of_edges()
    L = np.zeros((n, n))
    for u, v in G.edges:
        b = np.zeros(n)
        b[u], b[v] = 1.0, -1.0
        w = 1.0 / m if weights is None else weights[topo.edge_key(u, v)]
        L += w * np.outer(b, b)
    ev = np.linalg.eigvalsh(L)
    chi1 = 1.0 / min(e for e in ev if e > 1e-9 * ev.max())
    P = np.linalg.pinv(L)
    chi2 = 0.0
    for u, v in G.edges:
        b = np.zeros(n)
        b[u], b[v] = 1.0, -1.0
        chi2 = max(chi2, 0.5 * b @ P @ b)
    return chi1, chi2


def assert_doubly_stochastic(W: np.ndarray, G: nx.Graph) -> None:
    n = G.number_of_nodes()
    assert W.shape == (n, n)
    np.testing.assert_allclose(W, W.T, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(W.sum(axis=1), 1.0, atol=1e-12)
    assert (W >= -1e-15).all()
    off_edge = (nx.to_numpy_array(G, weight=None) == 0) & ~np.eye(n, dtype=bool)
    assert (W[off_edge] == 0).all()


# ---------------------------------------------------------------- mixing matrices


@pytest.mark.parametrize("n", [3, 4, 5, 6, 7, 8, 11, 16, 25])
def test_metropolis_ring_closed_form(n):
    W = topo.metropolis_hastings(topo.ring(n))
    A = nx.to_numpy_array(topo.ring(n))
    np.testing.assert_allclose(W, (A + np.eye(n)) / 3)
    # eigenvalues 1/3 + 2/3 cos(2 pi k / n); the SLEM is over k = 1..n-1, both signs
    eig = [1 / 3 + 2 / 3 * math.cos(2 * math.pi * k / n) for k in range(n)]
    np.testing.assert_allclose(sorted(np.linalg.eigvalsh(W)), sorted(eig), atol=1e-12)
    slem = max(abs(e) for e in eig[1:])
    assert topo.spectral_gap(W) == pytest.approx(1 - slem, abs=1e-12)
    # on rings lambda_2 is always the larger modulus, even for small even n
    assert topo.spectral_gap(W) == pytest.approx(
        1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)), abs=1e-12
    )


@pytest.mark.parametrize("n", [1, 2, 3, 6, 10])
def test_metropolis_complete_graph_is_exact_averaging(n):
    W = topo.metropolis_hastings(topo.complete(n))
    np.testing.assert_allclose(W, np.full((n, n), 1 / n))
    assert topo.spectral_gap(W) == pytest.approx(1.0, abs=1e-12)


def test_known_small_matrices():
    star = topo.star(4)  # hub degree 3, leaves 1: every edge weighs 1/4
    W = topo.metropolis_hastings(star)
    np.testing.assert_allclose(W[0], [0.25, 0.25, 0.25, 0.25])
    np.testing.assert_allclose(W[1], [0.25, 0.75, 0, 0])
    path_w = [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]]
    np.testing.assert_allclose(topo.max_degree(topo.path(3)), path_w)
    np.testing.assert_allclose(topo.uniform(topo.ring(5)), topo.metropolis_hastings(topo.ring(5)))


@settings(max_examples=50, deadline=None)
@given(connected_graphs(min_n=1))
def test_mixing_matrices_are_doubly_stochastic(G):
    assert_doubly_stochastic(topo.metropolis_hastings(G), G)
    assert_doubly_stochastic(topo.max_degree(G), G)
    assert (np.diag(topo.metropolis_hastings(G)) > 0).all()
    degrees = {d for _, d in G.degree}
    if len(degrees) == 1:
        assert_doubly_stochastic(topo.uniform(G), G)
    else:
        with pytest.raises(ValueError, match="metropolis"):
            topo.uniform(G)


@pytest.mark.parametrize("G", [topo.torus_2d(3, 4), topo.random_regular(10, 3, seed=2)])
def test_uniform_on_regular_graphs(G):
    W = topo.uniform(G)
    assert_doubly_stochastic(W, G)
    d = G.degree[0]
    assert set(np.round(W[W > 0], 12)) == {round(1 / (1 + d), 12)}


def test_mixing_matrix_dispatch():
    G = topo.barabasi_albert(10, 2, seed=0)
    np.testing.assert_array_equal(topo.mixing_matrix(G), topo.metropolis_hastings(G))
    np.testing.assert_array_equal(topo.mixing_matrix(G, "max_degree"), topo.max_degree(G))
    with pytest.raises(ValueError, match="unknown mixing kind"):
        topo.mixing_matrix(G, "laplace")
    with pytest.raises(ValueError, match="undirected"):
        topo.metropolis_hastings(nx.DiGraph([(0, 1)]))


@settings(max_examples=40, deadline=None)
@given(connected_graphs())
def test_local_metropolis_weights_match_the_matrix(G):
    W = topo.metropolis_hastings(G)
    for i in G:
        self_w, w = topo.metropolis_weights(G.degree[i], {j: G.degree[j] for j in G[i]})
        assert self_w == pytest.approx(W[i, i], abs=1e-12)
        assert w == pytest.approx({j: W[i, j] for j in G[i]}, abs=1e-12)


def test_metropolis_weights_missing_neighbours_go_to_self():
    self_w, w = topo.metropolis_weights(3, {"a": 1})
    assert w == {"a": 0.25} and self_w == 0.75
    assert topo.metropolis_weights(0, {}) == (1.0, {})
    with pytest.raises(ValueError, match="2 neighbours given for a node of degree 1"):
        topo.metropolis_weights(1, {"a": 1, "b": 1})
    with pytest.raises(ValueError):
        topo.metropolis_weights(-1, {})
    with pytest.raises(ValueError):
        topo.metropolis_weights(2, {"a": -3})


# ---------------------------------------------------------------- spectral gap


def test_spectral_gap_edge_cases():
    assert topo.spectral_gap(np.array([[1.0]])) == 1.0
    assert topo.spectral_gap(np.array([[0.0, 1.0], [1.0, 0.0]])) == pytest.approx(0.0)
    two_rings = nx.disjoint_union(topo.ring(4), topo.ring(5))
    assert topo.spectral_gap(topo.metropolis_hastings(two_rings)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="symmetric"):
        topo.spectral_gap(np.array([[0.5, 0.5], [0.1, 0.9]]))
    with pytest.raises(ValueError, match="square"):
        topo.spectral_gap(np.ones((2, 3)))


def test_spectral_gap_bigger_for_better_connected_graphs():
    gaps = [
        topo.spectral_gap(topo.metropolis_hastings(topo.build(s)))
        for s in ("ring:16", "torus:4x4", "hypercube:4", "exponential:16", "complete:16")
    ]
    # torus:4x4 and hypercube:4 are the same graph (gap 0.4), equal up to rounding
    assert all(a <= b + 1e-12 for a, b in itertools.pairwise(gaps)), gaps


# ---------------------------------------------------------------- Laplacian constants


@pytest.mark.parametrize("n", [2, 3, 5, 8, 13])
def test_complete_graph_closed_forms(n):
    G = topo.complete(n)
    m = n * (n - 1) // 2
    ev = np.linalg.eigvalsh(topo.sampling_laplacian(G))
    np.testing.assert_allclose(ev[1:], 2 / (n - 1), rtol=1e-10)  # n / |E|
    assert topo.chi_1(G) == pytest.approx((n - 1) / 2, rel=1e-10)
    for u, v in [(0, 1), (0, n - 1)]:
        assert topo.effective_resistance(G, u, v) == pytest.approx(2 / n, rel=1e-10)
    # pinv(L / |E|) = |E| pinv(L): chi_2 = 1/2 |E| 2/n = (n - 1) / 2
    assert topo.chi_2(G) == pytest.approx(0.5 * m * 2 / n, rel=1e-10)
    assert topo.chi_2(G) == pytest.approx((n - 1) / 2, rel=1e-10)
    assert topo.algebraic_connectivity(G) == pytest.approx(n, rel=1e-10)


@pytest.mark.parametrize("n", [3, 4, 5, 8, 12, 31])
def test_ring_closed_forms(n):
    G = topo.ring(n)
    lam = 2 - 2 * math.cos(2 * math.pi / n)
    assert topo.algebraic_connectivity(G) == pytest.approx(lam, rel=1e-10)
    assert topo.chi_1(G) == pytest.approx(n / lam, rel=1e-10)  # L_norm = L / n
    for k in range(n):  # k hops: resistors k and n - k in parallel
        assert topo.effective_resistance(G, 0, k) == pytest.approx(k * (n - k) / n, abs=1e-10)
    assert topo.effective_resistance(G, 0, 1) == pytest.approx((n - 1) / n)
    assert topo.chi_2(G) == pytest.approx(0.5 * n * (n - 1) / n, rel=1e-10)


def test_path_and_star_resistances():
    assert topo.effective_resistance(topo.path(6), 0, 5) == pytest.approx(5.0)
    assert topo.effective_resistance(topo.star(6), 2, 4) == pytest.approx(2.0)
    assert topo.effective_resistance(topo.path(6), 3, 3) == 0.0
    # a tree's every edge is a bridge: resistance 1, so chi_2 = |E| / 2
    assert topo.chi_2(topo.star(6)) == pytest.approx(5 / 2)


def test_effective_resistance_with_conductances_and_gaps():
    G = topo.path(3)
    weights = {(0, 1): 2.0, (1, 2): 0.5}
    assert topo.effective_resistance(G, 0, 2, weights) == pytest.approx(0.5 + 2.0)
    assert topo.effective_resistance(G, 0, 2, {(0, 1): 1.0, (1, 2): 0.0}) == math.inf
    two = nx.disjoint_union(topo.ring(3), topo.ring(3))
    assert topo.effective_resistance(two, 0, 4) == math.inf
    assert topo.effective_resistance(two, 3, 4) == pytest.approx(2 / 3)
    with pytest.raises(nx.NodeNotFound):
        topo.effective_resistance(G, 0, 7)


@settings(max_examples=30, deadline=None)
@given(connected_graphs(min_n=2, max_n=12))
def test_effective_resistance_matches_the_laplacian_pseudo_inverse(G):
    """R_uv = (e_u - e_v)^T L^+ (e_u - e_v), with L^+ from numpy's float64 pinv.

    The definition is the reference: networkx's ``resistance_distance`` disagreed with it
    beyond 1e-8 on some generated graphs.
    """
    nodes = list(G)
    u, v = nodes[0], nodes[-1]
    if u != v:
        lap = nx.laplacian_matrix(G, nodelist=nodes).toarray().astype(np.float64)
        pinv = np.linalg.pinv(lap)
        i, j = 0, len(nodes) - 1
        expected = pinv[i, i] + pinv[j, j] - 2 * pinv[i, j]
        assert topo.effective_resistance(G, u, v) == pytest.approx(expected, rel=1e-8)


@settings(max_examples=40, deadline=None)
@given(graphs_with_weights())
def test_chis_match_the_definitions(case):
    G, weights = case
    for w in (None, weights):
        chi1, chi2 = reference_chis(G, w)
        assert topo.chi_1(G, w) == pytest.approx(chi1, rel=1e-7)
        assert topo.chi_2(G, w) == pytest.approx(chi2, rel=1e-7)
        assert topo.dadao_constants(G, w) == pytest.approx((chi1, chi2), rel=1e-7)


@settings(max_examples=50, deadline=None)
@given(graphs_with_weights())
def test_chi_2_at_most_chi_1(case):
    G, weights = case
    assert topo.chi_2(G) <= topo.chi_1(G) * (1 + 1e-9)
    assert topo.chi_2(G, weights) <= topo.chi_1(G, weights) * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(graphs_with_weights(), st.floats(1e-3, 1e3))
def test_scaling_the_rates_scales_the_chis(case, c):
    G, weights = case
    scaled = {e: c * w for e, w in weights.items()}
    assert topo.chi_1(G, scaled) == pytest.approx(topo.chi_1(G, weights) / c, rel=1e-7)
    assert topo.chi_2(G, scaled) == pytest.approx(topo.chi_2(G, weights) / c, rel=1e-7)
    total, _ = topo.dadao_rates(G, weights)
    assert topo.dadao_rates(G, scaled)[0] == pytest.approx(total / c, rel=1e-7)


@settings(max_examples=30, deadline=None)
@given(graphs_with_weights())
def test_chi_2_is_half_the_largest_edge_resistance(case):
    G, weights = case
    largest = max(topo.effective_resistance(G, u, v, weights) for u, v in G.edges)
    assert topo.chi_2(G, weights) == pytest.approx(largest / 2, rel=1e-7)


def test_default_weights_are_uniform_edge_sampling():
    G = topo.barabasi_albert(15, 2, seed=3)
    m = G.number_of_edges()
    uniform = {topo.edge_key(u, v): 1 / m for u, v in G.edges}
    expected = nx.laplacian_matrix(G).toarray() / m
    np.testing.assert_allclose(topo.sampling_laplacian(G), expected, atol=1e-15)
    np.testing.assert_allclose(topo.sampling_laplacian(G, uniform), expected, atol=1e-15)
    assert topo.chi_1(G, uniform) == pytest.approx(topo.chi_1(G))
    reversed_keys = {(v, u): w for (u, v), w in uniform.items()}
    assert topo.chi_2(G, reversed_keys) == pytest.approx(topo.chi_2(G))


def test_weights_are_validated():
    G = topo.path(3)
    with pytest.raises(ValueError, match="no weight for 1 edge"):
        topo.chi_1(G, {(0, 1): 1.0})
    with pytest.raises(ValueError, match="not an edge"):
        topo.chi_1(G, {(0, 1): 0.5, (1, 2): 0.4, (0, 2): 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        topo.chi_1(G, {(0, 1): 1.5, (1, 2): -0.5})
    with pytest.raises(ValueError, match="two weights"):
        topo.chi_1(G, {(0, 1): 0.5, (1, 0): 0.5, (1, 2): 0.0})
    with pytest.raises(ValueError, match="no edges"):
        topo.chi_1(topo.path(1))


def test_disconnected_graphs():
    two = nx.disjoint_union(topo.ring(3), topo.ring(4))
    assert topo.chi_1(two) == math.inf
    assert topo.chi_2(two) == pytest.approx(0.5 * 7 * 3 / 4)  # the 4-ring's edges
    assert topo.algebraic_connectivity(two) == 0.0
    with pytest.raises(ValueError, match="connected"):
        topo.dadao_rates(two)
    cut = {(0, 1): 1.0, (1, 2): 0.0}
    assert topo.chi_1(topo.path(3), cut) == math.inf
    assert topo.chi_2(topo.path(3), cut) == math.inf


def test_dadao_rates():
    G = topo.ring(8)
    total, rates = topo.dadao_rates(G)
    assert total == pytest.approx(math.sqrt(2 * topo.chi_1(G) * topo.chi_2(G)))
    assert set(rates) == {topo.edge_key(u, v) for u, v in G.edges}
    assert all(u < v for u, v in rates)
    assert sum(rates.values()) == pytest.approx(total)
    assert set(np.round(list(rates.values()), 12)) == {round(total / 8, 12)}
    n = 6
    total_k, _ = topo.dadao_rates(topo.complete(n))
    assert total_k == pytest.approx(math.sqrt(2) * (n - 1) / 2)

    weights = {(0, 1): 0.5, (1, 2): 0.25, (2, 3): 0.25}
    total_w, rates_w = topo.dadao_rates(topo.path(4), weights)
    assert rates_w == pytest.approx({e: total_w * w for e, w in weights.items()})


# ---------------------------------------------------------------- analyze

KEYS = [
    "n",
    "edges",
    "degree_min",
    "degree_mean",
    "degree_max",
    "is_connected",
    "diameter",
    "algebraic_connectivity",
    "spectral_gap",
    "chi_1",
    "chi_2",
    "lambda_mix",
]


def test_analyze_ring():
    n = 10
    report = topo.analyze(topo.ring(n))
    assert list(report) == KEYS
    lam = 2 - 2 * math.cos(2 * math.pi / n)
    assert report["n"] == n and report["edges"] == n and report["diameter"] == n // 2
    assert report["degree_min"] == report["degree_max"] == 2 and report["degree_mean"] == 2.0
    assert report["is_connected"] is True
    assert report["algebraic_connectivity"] == pytest.approx(lam)
    assert report["spectral_gap"] == pytest.approx(1 - (1 / 3 + 2 / 3 * math.cos(2 * math.pi / n)))
    assert report["chi_1"] == pytest.approx(n / lam)
    assert report["chi_2"] == pytest.approx((n - 1) / 2)
    assert report["lambda_mix"] == pytest.approx(math.sqrt(2 * n / lam * (n - 1) / 2))
    json.dumps(report, allow_nan=False)


def test_analyze_degenerate_graphs():
    single = topo.analyze(topo.path(1))
    assert single["n"] == 1 and single["edges"] == 0 and single["diameter"] == 0
    assert single["spectral_gap"] == 1.0
    assert single["chi_1"] is single["algebraic_connectivity"] is None
    split = topo.analyze(nx.disjoint_union(topo.ring(3), topo.path(2)))
    assert split["is_connected"] is False and split["diameter"] is None
    assert split["chi_1"] is None and split["lambda_mix"] is None
    assert split["algebraic_connectivity"] == 0.0 and split["spectral_gap"] == pytest.approx(0.0)
    json.dumps(split, allow_nan=False)
    with pytest.raises(ValueError):
        topo.analyze(nx.Graph())
