"""Per-edge gossip rates for DADAO: uniform, or chosen to minimise chi_1 * chi_2.

DADAO (Nabli & Oyallon, ICML 2023) needs a total gossip rate of
``lambda_mix = sqrt(2 chi_1(w) chi_2(w))`` when edge e fires with relative weight ``w_e``
(``sum w = 1``), with ``chi_1(w) = 1 / lambda_2(L(w))``, ``chi_2(w) = max_e 1/2
b_e^T L(w)^+ b_e`` and ``L(w) = sum_e w_e b_e b_e^T`` (:mod:`rumor.topology.spectral`). The
authors' code uses uniform weights ``1 / |E|``. Since both chi scale as ``1 / c`` under
``w -> c w``, choosing the weights means minimising ``chi_1(w) chi_2(w)`` over the simplex:
fewer communications per unit of time for the same guarantee.

This module's optimiser (a design choice of this project; the paper's edge-rate method, if
any, could not be checked) compares candidates and keeps the best:

* uniform weights, and weights proportional to the Metropolis-Hastings matrix;
* the fastest-mixing weights (maximise ``lambda_2``) and the least-resistance weights
  (minimise chi_2), each by projected gradient on smooth surrogates (a soft minimum of the
  positive eigenvalues, a soft maximum of the edge resistances), or by the SDPs of Sun, Boyd,
  Xiao & Diaconis ("The fastest mixing Markov process on a graph", 2006) and Ghosh, Boyd &
  Saberi ("Minimizing effective resistance of a graph", 2008) when ``cvxpy`` is importable;
* then projected gradient on ``log chi_1 + log chi_2`` from the best of them, keeping only
  steps that lower the true product (which is neither smooth nor convex).

Every weight stays above ``floor / |E|`` so that no edge is switched off (chi_2 counts the
graph's edges). ``rumor topology rates SPEC --optimize`` prints the result.

Example::

    >>> from rumor.topology import build
    >>> plan = optimize_weights(build("path:4"))
    >>> plan.product <= uniform_plan(build("path:4")).product
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

import networkx as nx
import numpy as np

from rumor.topology import dadao_constants, metropolis_hastings
from rumor.topology.canonical import edge_key

__all__ = ["RatePlan", "optimize_weights", "rate_plan", "uniform_plan"]

Edge = tuple[Hashable, Hashable]


@dataclass
class RatePlan:
    """Relative edge weights and the DADAO rates they give.

    ``rates[e] = lambda_mix * weights[e]`` with ``lambda_mix = sqrt(2 chi_1 chi_2)``;
    ``product = chi_1 * chi_2`` (of the weights summing to 1) is what the optimiser lowers.
    """

    weights: dict[Edge, float]
    chi_1: float
    chi_2: float
    method: str

    @property
    def product(self) -> float:
        return self.chi_1 * self.chi_2

    @property
    def lambda_mix(self) -> float:
        return math.sqrt(2.0 * self.product)

    @property
    def rates(self) -> dict[Edge, float]:
        return {e: self.lambda_mix * w for e, w in self.weights.items()}

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "chi_1": self.chi_1,
            "chi_2": self.chi_2,
            "chi_1_chi_2": self.product,
            "lambda_mix": self.lambda_mix,
            "edges": [
                {"u": u, "v": v, "weight": w, "rate": self.lambda_mix * w}
                for (u, v), w in self.weights.items()
            ],
        }


def rate_plan(G: nx.Graph, weights: Mapping[Edge, float], method: str = "given") -> RatePlan:
    """The plan of ``weights`` (normalised to sum 1)."""
    total = float(sum(weights.values()))
    if not total > 0:
        raise ValueError("edge weights must have a positive sum")
    w = {edge_key(*e): float(v) / total for e, v in weights.items()}
    chi_1, chi_2 = dadao_constants(G, w)
    return RatePlan(w, chi_1, chi_2, method)


def uniform_plan(G: nx.Graph) -> RatePlan:
    """Every edge at ``1 / |E|``: the authors' choice."""
    edges = _edges(G)
    return rate_plan(G, {e: 1.0 / len(edges) for e in edges}, "uniform")


def optimize_weights(
    G: nx.Graph,
    iterations: int = 200,
    floor: float = 1e-2,
    use_cvxpy: bool | None = None,
) -> RatePlan:
    """Edge weights with a small ``chi_1 * chi_2``; never worse than uniform.

    Parameters
    ----------
    G:
        A connected undirected graph.
    iterations:
        Projected-gradient steps of each descent (bounded; each costs one ``n x n``
        eigendecomposition).
    floor:
        Every weight stays at least ``floor / |E|``.
    use_cvxpy:
        Also solve the two SDPs with cvxpy; default: when cvxpy is importable.
    """
    if not nx.is_connected(G):
        raise ValueError("edge rates need a connected graph")
    edges = _edges(G)
    index = {u: i for i, u in enumerate(G)}
    pairs = np.array([(index[u], index[v]) for u, v in edges])
    n, m = G.number_of_nodes(), len(edges)
    lo = floor / m
    plans = [uniform_plan(G)]
    W = metropolis_hastings(G)
    plans.append(_plan(G, edges, np.array([W[i, j] for i, j in pairs]), "metropolis"))
    start = np.full(m, 1.0 / m)
    fast = _descend(_soft_lambda_2(n, pairs), start, lo, iterations)
    plans.append(_plan(G, edges, fast, "fastest-mixing (projected gradient)"))
    short = _descend(_soft_resistance(n, pairs), start, lo, iterations)
    plans.append(_plan(G, edges, short, "least-resistance (projected gradient)"))
    if use_cvxpy is None:
        try:
            import cvxpy  # noqa: F401

            use_cvxpy = True
        except ImportError:
            use_cvxpy = False
    if use_cvxpy:
        for name, w in _sdp_candidates(n, pairs, lo).items():
            plans.append(_plan(G, edges, w, name))
    best = min(plans, key=lambda p: p.product)
    w0 = np.array([best.weights[e] for e in edges])
    polished = _descend(_log_product(n, pairs), w0, lo, iterations, exact=_product(n, pairs))
    plans.append(_plan(G, edges, polished, f"{best.method}, then log chi_1 chi_2 descent"))
    return min(plans, key=lambda p: p.product)


# --------------------------------------------------------------------------- internals


def _edges(G: nx.Graph) -> list[Edge]:
    edges = sorted({edge_key(u, v) for u, v in G.edges() if u != v}, key=repr)
    if not edges:
        raise ValueError("the graph has no edges")
    return edges


def _plan(G: nx.Graph, edges: list[Edge], w: np.ndarray, method: str) -> RatePlan:
    return rate_plan(G, dict(zip(edges, (float(v) for v in w), strict=True)), method)


def _laplacian(n: int, pairs: np.ndarray, w: np.ndarray) -> np.ndarray:
    L = np.zeros((n, n))
    i, j = pairs.T
    np.add.at(L, (i, j), -w)
    np.add.at(L, (j, i), -w)
    np.add.at(L, (i, i), w)
    np.add.at(L, (j, j), w)
    return L


def _spectrum(n: int, pairs: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positive eigenvalues and their eigenvectors of L(w) (the all-ones one dropped)."""
    ev, V = np.linalg.eigh(_laplacian(n, pairs, w))
    return ev[1:], V[:, 1:]


Objective = Callable[[np.ndarray], tuple[float, np.ndarray]]


def _soft_lambda_2(n: int, pairs: np.ndarray) -> Objective:
    """-softmin of the positive eigenvalues (to minimise), and its gradient in w."""

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        ev, V = _spectrum(n, pairs, w)
        p = 20.0 / ev[0]
        a = np.exp(-p * (ev - ev[0]))
        a /= a.sum()
        value = ev[0] - math.log(float(np.exp(-p * (ev - ev[0])).sum())) / p
        diff = V[pairs[:, 0]] - V[pairs[:, 1]]  # (m, n-1): d lambda_k / d w_e = diff^2
        return -value, -(diff**2) @ a

    return f


def _resistances(n: int, pairs: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ev, V = _spectrum(n, pairs, w)
    U = V / np.sqrt(ev)
    B = U[pairs[:, 0]] - U[pairs[:, 1]]  # rows: L^{+1/2} b_e
    return np.sum(B**2, axis=1), B


def _soft_resistance(n: int, pairs: np.ndarray) -> Objective:
    """Softmax of the edge resistances, and its gradient: dR_f/dw_e = -(b_e^T L^+ b_f)^2."""

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        R, B = _resistances(n, pairs, w)
        p = 20.0 / R.max()
        a = np.exp(p * (R - R.max()))
        a /= a.sum()
        cross = B @ B.T  # (e, f): b_e^T L^+ b_f
        return float(a @ R), -(cross**2) @ a

    return f


def _product(n: int, pairs: np.ndarray) -> Callable[[np.ndarray], float]:
    def f(w: np.ndarray) -> float:
        ev, _ = _spectrum(n, pairs, w)
        R, _ = _resistances(n, pairs, w)
        return float(R.max() / 2.0 / ev[0])

    return f


def _log_product(n: int, pairs: np.ndarray) -> Objective:
    """log chi_1 + log chi_2 (at a simple lambda_2 and a unique worst edge) and gradient."""

    def f(w: np.ndarray) -> tuple[float, np.ndarray]:
        ev, V = _spectrum(n, pairs, w)
        R, B = _resistances(n, pairs, w)
        k = int(np.argmax(R))
        d_l2 = (V[pairs[:, 0], 0] - V[pairs[:, 1], 0]) ** 2
        d_r = -((B @ B[k]) ** 2)
        value = -math.log(ev[0]) + math.log(R[k] / 2.0)
        return value, -d_l2 / ev[0] + d_r / R[k]

    return f


def _project(v: np.ndarray, lo: float) -> np.ndarray:
    """Euclidean projection onto {w >= lo, sum w = 1}."""
    m = len(v)
    budget = 1.0 - m * lo
    u = v - lo
    s = np.sort(u)[::-1]
    css = np.cumsum(s) - budget
    k = np.nonzero(s - css / np.arange(1, m + 1) > 0)[0][-1]
    shift = css[k] / (k + 1)
    return np.maximum(u - shift, 0.0) + lo


def _descend(
    f: Objective,
    w: np.ndarray,
    lo: float,
    iterations: int,
    exact: Callable[[np.ndarray], float] | None = None,
) -> np.ndarray:
    """Projected gradient with a step that doubles on success and halves on failure; a step
    is taken only if it lowers ``exact`` (default: ``f`` itself)."""
    score = exact or (lambda v: f(v)[0])
    w = _project(w, lo)
    best = score(w)
    step = 0.1 / len(w)
    for _ in range(iterations):
        _, g = f(w)
        norm = float(np.linalg.norm(g))
        if norm == 0 or step < 1e-12:
            break
        trial = _project(w - step * g / norm, lo)
        value = score(trial)
        if value < best:
            w, best, step = trial, value, step * 2.0
        else:
            step /= 2.0
    return w


def _sdp_candidates(n: int, pairs: np.ndarray, lo: float) -> dict[str, np.ndarray]:
    """The two SDPs, with cvxpy: maximise lambda_2 (fastest mixing); minimise chi_2."""
    import cvxpy as cp

    m = len(pairs)
    B = np.zeros((n, m))
    B[pairs[:, 0], np.arange(m)] = 1.0
    B[pairs[:, 1], np.arange(m)] = -1.0
    J = np.ones((n, n)) / n
    out: dict[str, np.ndarray] = {}
    w = cp.Variable(m)
    s = cp.Variable()
    L = B @ cp.diag(w) @ B.T
    cons = [w >= lo, cp.sum(w) == 1, L - s * (np.eye(n) - J) >> 0]
    try:
        cp.Problem(cp.Maximize(s), cons).solve()
        if w.value is not None:
            out["fastest-mixing (SDP)"] = np.maximum(np.asarray(w.value), lo)
    except cp.error.SolverError:
        pass
    w2 = cp.Variable(m)
    r = cp.Variable()
    L2 = B @ cp.diag(w2) @ B.T + J
    cons2: list[Any] = [w2 >= lo, cp.sum(w2) == 1]
    for e in range(m):
        b = B[:, e : e + 1]
        cons2.append(cp.bmat([[L2, b], [b.T, cp.reshape(2 * r, (1, 1))]]) >> 0)
    try:
        cp.Problem(cp.Minimize(r), cons2).solve()
        if w2.value is not None:
            out["least-resistance (SDP)"] = np.maximum(np.asarray(w2.value), lo)
    except cp.error.SolverError:
        pass
    return out
