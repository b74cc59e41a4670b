"""DADAO: decoupled accelerated decentralized asynchronous optimization.

Nabli & Oyallon, "DADAO: Decoupled Accelerated Decentralized Asynchronous Optimization",
ICML 2023 (PMLR 202:25604-25626; arXiv:2208.00779). It minimises ``sum_i f_i(x)`` over a
graph of nodes, each ``f_i`` L-smooth and mu-strongly convex, with two independent Poisson
processes: local gradient steps (rate 1 per node per time unit) and pairwise gossip on the
edges (total rate ``lambda_mix = sqrt(2 chi_1 chi_2)``). It needs
``O(n sqrt(L/mu) log(1/eps))`` gradients and ``O(n sqrt(chi_1 chi_2) sqrt(L/mu) log(1/eps))``
communications, with no inner consensus loop and no gradient tracking.

Every node keeps six vectors of the model's size, stacked as the rows of ``S``::

    x, x~   primal point (where gradients are taken) and its momentum
    y, y~   "gradient" dual pair
    z, z~   "consensus" dual pair; sum_i z_i = sum_i z~_i = 0 at all times

x starts from the model's parameters, the other five at zero. Between events ``S`` follows
the linear ODE ``dS/dt = M S`` of :func:`ode_matrix`, integrated exactly (:func:`flow`, a
closed form of ``expm(M t)``). A *gradient event* at node i, with
``r = grad f_i(x) - nu x - y~``, moves ``x -= gamma r``, ``x~ -= gamma~ r``,
``y~ += (delta + delta~) r``. A *communication event* on edge (i, j) swaps the messages
``m = y + z`` and, with ``D = m_i - m_j``, moves ``z_i -= beta D``, ``z~_i -= beta~ D`` and
``z_j += beta D``, ``z~_j += beta~ D``. Constants: :class:`Constants`.

What follows the authors' released code, and what this runtime adds (see
``docs/algorithms/dadao.md``):

* the constants, the ODE matrix, the gradient jump on y~ only (``y_jump="code"``; the
  alternative ``"split"`` puts delta on y and delta~ on y~), chi_1 of the rate-weighted
  Laplacian, uniform edge rates and L, mu as the max and min over the nodes' local problems;
* one Poisson clock per edge, owned by the node listed first in ``prepare``'s ordering, with
  rate ``lambda_ij / tau``; a gradient clock of rate ``1 / tau`` per node; ``tau`` seconds
  per time unit. The edge clock keeps its absolute schedule through slow round trips (a
  tick due during an exchange fires when it ends), so the realized communication rate is
  lambda_mix whenever the links keep up; a schedule restarted from each late exchange
  thins the process below lambda_mix when round trips are a sizable fraction of
  ``tau / lambda_ij``, and DADAO, whose beta~ is tuned for that rate, diverges. When round
  trips grow anyway, ``tau`` grows with them (``max_load``; see the class docstring);
* an exactly-once exchange: the initiator keeps the exchange (id, m_i) in a ledger until it
  has applied the reply; the responder applies on first receipt and keeps (id -> m_j) until
  the initiator acknowledges, so a retry with the same id is answered from the cache;
* one event instant per exchange: the responder applies its jump when the request arrives,
  and the initiator back-dates its own jump to that instant (its send and receive times and
  the responder's reported holding time, as in NTP). Both halves of the jump then evolve
  under the same ODE for the same time, so sum_i z_i and sum_i z~_i stay zero to round-off
  whatever the latency (with symmetric latency the estimate is exact; any error only touches
  the decaying mode of the (z, z~) block: ``alpha~ z + alpha z~`` summed over the nodes is
  conserved exactly);
* a gradient is computed on a snapshot of x off the event loop; its jump is back-dated to
  the snapshot instant, so a slow gradient does not age it. Every change to ``S`` is one
  synchronous block on the event loop: atomic without a lock, and no lock is held across an
  await, so gossip never waits for a gradient and vice versa.

Example::

    rumor simulate --nodes 10 --topology ring --algorithm dadao --dataset lsq:2000:10:100 \\
        --model linear:nobias --rounds 1500 --step-cost 0 --param tau=0.05
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rumor.algorithms.base import Context, MixingRule
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, PeerUnavailable, Rejected

__all__ = [
    "DADAO",
    "EXCHANGE_KIND",
    "REPLY_KIND",
    "Constants",
    "DualSums",
    "dual_sums",
    "flow",
    "jump_vector",
    "local_constants",
    "ode_matrix",
]

EXCHANGE_KIND = "dadao.exchange"
REPLY_KIND = "dadao.reply"

#: Rows of the stacked state.
X, X_T, Y, Y_T, Z, Z_T = range(6)

#: Rejection codes that mean "the responder refused before applying anything": the exchange
#: can be forgotten. Any other failure may have happened after the responder applied it, so
#: the exchange stays in the ledger and is retried with the same id.
_REFUSED = {
    Code.INVALID_ARGUMENT,
    Code.FAILED_PRECONDITION,
    Code.UNIMPLEMENTED,
    Code.PERMISSION_DENIED,
    Code.UNAUTHENTICATED,
    Code.RESOURCE_EXHAUSTED,
}

log = logging.getLogger("rumor.algorithms.dadao")


# --------------------------------------------------------------------------- constants, ODE


@dataclass(frozen=True)
class Constants:
    """DADAO's constants from L, mu and chi_1 (of the rate-weighted gossip Laplacian).

    With ``nu = mu / 2`` and ``s = sqrt(nu / L)``: ``alpha = s/4``, ``alpha~ = s/8``,
    ``eta = eta~ = s/8``, ``theta = 1/(2s)``, ``beta = 1/2``, ``beta~ = 2 chi_1 sqrt(L/nu)``,
    ``delta = s/4``, ``delta~ = 1``, ``gamma = 1/(4L)``, ``gamma~ = 1/(4 sqrt(L nu))``.
    """

    L: float
    mu: float
    chi_1: float
    nu: float
    alpha: float
    alpha_tilde: float
    eta: float
    theta: float
    beta: float
    beta_tilde: float
    delta: float
    delta_tilde: float
    gamma: float
    gamma_tilde: float

    @classmethod
    def from_problem(cls, L: float, mu: float, chi_1: float) -> Constants:
        if not (0 < mu <= L and math.isfinite(L)):
            raise ValueError(f"need 0 < mu <= L < inf, got L={L}, mu={mu}")
        if not (chi_1 > 0 and math.isfinite(chi_1)):
            raise ValueError(f"chi_1 must be positive and finite, got {chi_1}")
        nu = mu / 2.0
        s = math.sqrt(nu / L)
        return cls(
            L=L,
            mu=mu,
            chi_1=chi_1,
            nu=nu,
            alpha=s / 4.0,
            alpha_tilde=s / 8.0,
            eta=s / 8.0,
            theta=1.0 / (2.0 * s),
            beta=0.5,
            beta_tilde=2.0 * chi_1 / s,
            delta=s / 4.0,
            delta_tilde=1.0,
            gamma=1.0 / (4.0 * L),
            gamma_tilde=1.0 / (4.0 * math.sqrt(L * nu)),
        )


def ode_matrix(c: Constants) -> torch.Tensor:
    """The 6x6 matrix M of ``dS/dt = M S`` for ``S = (x, x~, y, y~, z, z~)`` (float64).

    ``dx = eta (x~ - x)``, ``dx~ = eta (x - x~)``, ``dy = alpha (y~ - y)``,
    ``dy~ = -theta (nu x~ + y + z)``, ``dz = alpha (z~ - z)``, ``dz~ = alpha~ (z - z~)``.
    """
    M = torch.zeros(6, 6, dtype=torch.float64)
    M[X, X], M[X, X_T] = -c.eta, c.eta
    M[X_T, X], M[X_T, X_T] = c.eta, -c.eta
    M[Y, Y], M[Y, Y_T] = -c.alpha, c.alpha
    M[Y_T, X_T], M[Y_T, Y], M[Y_T, Z] = -c.theta * c.nu, -c.theta, -c.theta
    M[Z, Z], M[Z, Z_T] = -c.alpha, c.alpha
    M[Z_T, Z], M[Z_T, Z_T] = c.alpha_tilde, -c.alpha_tilde
    return M


def flow(c: Constants, t: float) -> torch.Tensor:
    """``expm(M t)`` in closed form (float64), for time ``t >= 0`` in time units.

    The (x, x~) and (z, z~) blocks are autonomous 2x2 systems with a conserved combination
    and one decaying mode; (y, y~) is a damped oscillator ``A = [[-a, a], [-theta, 0]]``
    driven through y~ by x~ and z, i.e. by a constant plus the two decaying exponentials.
    For a drive ``e^{-k s} b`` the response is ``(A + kI)^{-1} (e^{At} - e^{-kt}) b``;
    ``A + kI`` is invertible for every real k because A's eigenvalues are complex
    (``alpha < 4 theta`` always holds since ``s <= 1/sqrt(2)``).
    """
    if t < 0:
        raise ValueError(f"flow needs t >= 0, got {t}")
    a, at, eta, th, nu = c.alpha, c.alpha_tilde, c.eta, c.theta, c.nu
    ex = math.exp(-2.0 * eta * t)
    sz = a + at
    ez = math.exp(-sz * t)
    # e^{At} for A = [[-a, a], [-th, 0]]: e^{mt} (cos(wt) I + sin(wt)/w (A - mI)), m = -a/2
    m = -a / 2.0
    w = math.sqrt(a * th - m * m)
    em, cw, sw = math.exp(m * t), math.cos(w * t), math.sin(w * t) / w
    e00, e01 = em * (cw + sw * (-a - m)), em * sw * a
    e10, e11 = em * sw * (-th), em * (cw + sw * (-m))

    def drive(k: float) -> tuple[float, float]:
        # (A + kI)^{-1} (e^{At} - e^{-kt} I) b with b = (0, -th)
        ek = math.exp(-k * t)
        v0, v1 = e01 * -th, (e11 - ek) * -th
        det = (k - a) * k + a * th
        return (k * v0 - a * v1) / det, (th * v0 + (k - a) * v1) / det

    g0, g1, g2 = drive(0.0), drive(2.0 * eta), drive(sz)
    E = [[0.0] * 6 for _ in range(6)]
    E[X][X], E[X][X_T] = (1 + ex) / 2, (1 - ex) / 2
    E[X_T][X], E[X_T][X_T] = (1 - ex) / 2, (1 + ex) / 2
    E[Z][Z], E[Z][Z_T] = (at + a * ez) / sz, (a - a * ez) / sz
    E[Z_T][Z], E[Z_T][Z_T] = (at - at * ez) / sz, (a + at * ez) / sz
    E[Y][Y], E[Y][Y_T], E[Y_T][Y], E[Y_T][Y_T] = e00, e01, e10, e11
    for row, k in ((Y, 0), (Y_T, 1)):
        # forcing weights: nu (x + x~)/2 + c (constant), -nu (x - x~)/2 (rate 2 eta),
        # a (z - z~)/sz (rate sz), with c = (at z + a z~) / sz
        E[row][X] = nu / 2 * (g0[k] - g1[k])
        E[row][X_T] = nu / 2 * (g0[k] + g1[k])
        E[row][Z] = (at * g0[k] + a * g2[k]) / sz
        E[row][Z_T] = (a * g0[k] - a * g2[k]) / sz
    return torch.from_numpy(np.array(E, dtype=np.float64))


def jump_vector(c: Constants, kind: str, y_jump: str = "code") -> torch.Tensor:
    """The 6 coefficients of an event's jump: ``S += outer(v, r)`` for a gradient event
    (``kind="gradient"``, r the residual) and ``S += outer(v, D)`` for the responder's side
    of an exchange (``kind="consensus"``; the initiator applies ``-v``)."""
    v = torch.zeros(6, dtype=torch.float64)
    if kind == "gradient":
        v[X], v[X_T] = -c.gamma, -c.gamma_tilde
        if y_jump == "code":
            v[Y_T] = c.delta + c.delta_tilde
        elif y_jump == "split":
            v[Y], v[Y_T] = c.delta, c.delta_tilde
        else:
            raise ValueError(f"y_jump must be 'code' or 'split', got {y_jump!r}")
    elif kind == "consensus":
        v[Z], v[Z_T] = c.beta, c.beta_tilde
    else:
        raise ValueError(f"unknown jump kind {kind!r}")
    return v


# --------------------------------------------------------------------------- ledgers


@dataclass
class _Pending:
    """An exchange this node started and has not yet applied: its sequence number and m_i."""

    seq: int
    m: torch.Tensor


@dataclass
class _Served:
    """What a responder remembers of one initiator: its epoch, the sequence number below
    which every exchange is known complete (``floor``), and the answers it may be asked to
    repeat: ``seq -> (m_j, D, time applied)``."""

    epoch: str
    floor: int = 0
    entries: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)

    def acknowledge(self, ack: int) -> None:
        if ack > self.floor:
            self.floor = ack
            for seq in [s for s in self.entries if s < ack]:
                del self.entries[seq]


def _natural_key(node_id: str) -> tuple[Any, ...]:
    """``node-2`` before ``node-10``: digits compare as numbers."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", node_id))


def _parse_exchange_id(exchange_id: str) -> tuple[str, int]:
    epoch, sep, seq = exchange_id.rpartition(":")
    if not sep or not epoch or not seq.isdigit():
        raise Rejected(Code.INVALID_ARGUMENT, f"bad dadao exchange id {exchange_id!r}")
    return epoch, int(seq)


def _number(meta: Mapping[str, Any], key: str) -> float:
    value = meta.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"meta {key!r} must be a finite number, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- the rule


class DADAO(MixingRule):
    """Decoupled accelerated decentralized asynchronous optimization (Nabli & Oyallon 2023).

    For L-smooth, mu-strongly convex local objectives, e.g. least squares with the model
    ``"linear:nobias"`` and the loss ``"half_mse"``. ``rumor simulate`` and
    ``rumor cluster up`` fill ``L``, ``mu``, ``chi_1`` and ``edge_rates`` through
    :meth:`prepare`; a node started by hand needs them as parameters.

    Parameters
    ----------
    L:
        Smoothness constant of every local objective f_i (max over the nodes).
    mu:
        Strong-convexity constant of every f_i (min over the nodes); nu = mu / 2.
    chi_1:
        chi_1(Lambda): inverse smallest positive eigenvalue of the rate-weighted gossip
        Laplacian ``Lambda = sum_ij lambda_ij (e_i - e_j)(e_i - e_j)^T``; sets beta~.
    edge_rates:
        ``{peer: lambda_ij}`` for the edges this node initiates, in events per time unit.
        Each edge is owned by exactly one of its ends.
    edge_rate:
        Instead of ``edge_rates``: one rate for every edge to a neighbour whose id sorts
        after this node's (``node-2`` < ``node-10``).
    rates:
        How :meth:`prepare` splits ``lambda_mix = sqrt(2 chi_1 chi_2)`` over the edges:
        ``"uniform"`` (the paper's code: ``lambda_mix / |E|`` each) or ``"optimized"``
        (:func:`rumor.algorithms.edge_rates.optimize_weights`). Default ``"uniform"``.
    tau:
        Seconds per time unit: the gradient clock ticks at ``1 / tau`` per second, edge
        (i, j) at ``lambda_ij / tau``. The starting value: it grows when round trips are
        slow (``max_load``). Default 0.05.
    y_jump:
        ``"code"`` (default, the authors' code: ``y~ += (delta + delta~) r``) or
        ``"split"`` (``y += delta r``, ``y~ += delta~ r``).
    batch:
        ``"full"`` (default: the exact local gradient) or ``"minibatch"`` (the next
        training minibatch: the stochastic variant).
    round_time:
        Time units per round; rounds pace metrics, evaluation and the budget. Default 1.
    exchange_timeout:
        Seconds to wait for a reply before retrying. Default 1.0.
    retries:
        Immediate retries (same exchange id) after a failed attempt; the exchange then
        stays in the ledger and is retried at the edge's next tick. Default 1.
    backlog:
        Mean edge intervals an edge may fall behind its schedule (ticks wait for the
        running exchange, then fire at once) before ticks are dropped. Default 20.
    max_load:
        Upper bound on an edge's load, round trip x edge rate / tau (the fraction of the
        time the edge is busy exchanging). When the moving average of a node's round trips
        exceeds it, the node raises tau to 1.25 x the round trip x its fastest edge rate /
        max_load, and every exchange carries tau so the cluster converges to the largest
        (a change of time unit: the algorithm in time units is unchanged). 0 keeps tau
        fixed. Default 0.25.

    Example
    -------
    >>> rule = DADAO(L=1.0, mu=0.01, chi_1=1.7, edge_rates={"node-1": 1.5})
    >>> round(rule.constants.beta_tilde, 3)
    48.083
    """

    name = "dadao"
    #: state_dict holds the 6 x d state, the exchange ledger and the unacknowledged answers.
    checkpointable = True

    def __init__(
        self,
        L: float | None = None,
        mu: float | None = None,
        chi_1: float | None = None,
        edge_rates: Mapping[str, float] | None = None,
        edge_rate: float | None = None,
        rates: str = "uniform",
        tau: float = 0.05,
        y_jump: str = "code",
        batch: str = "full",
        round_time: float = 1.0,
        exchange_timeout: float = 1.0,
        retries: int = 1,
        backlog: float = 20.0,
        max_load: float = 0.25,
    ) -> None:
        if tau <= 0 or round_time <= 0 or exchange_timeout <= 0 or backlog <= 0:
            raise ValueError("tau, round_time, exchange_timeout and backlog must be > 0")
        if not (0 <= max_load < 1):
            raise ValueError(f"max_load must be in [0, 1), got {max_load}")
        if y_jump not in ("code", "split"):
            raise ValueError(f"y_jump must be 'code' or 'split', got {y_jump!r}")
        if batch not in ("full", "minibatch"):
            raise ValueError(f"batch must be 'full' or 'minibatch', got {batch!r}")
        if rates not in ("uniform", "optimized"):
            raise ValueError(f"rates must be 'uniform' or 'optimized', got {rates!r}")
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if edge_rates is not None and edge_rate is not None:
            raise ValueError("give edge_rates or edge_rate, not both")
        for peer, rate in (edge_rates or {}).items():
            if not (rate >= 0 and math.isfinite(rate)):
                raise ValueError(f"edge rate to {peer!r} must be finite and >= 0, got {rate}")
        if edge_rate is not None and not (edge_rate >= 0 and math.isfinite(edge_rate)):
            raise ValueError(f"edge_rate must be finite and >= 0, got {edge_rate}")
        self.L = None if L is None else float(L)
        self.mu = None if mu is None else float(mu)
        self.chi_1 = None if chi_1 is None else float(chi_1)
        self.edge_rates = (
            None if edge_rates is None else {str(k): float(v) for k, v in edge_rates.items()}
        )
        self.edge_rate = None if edge_rate is None else float(edge_rate)
        self.rates = rates
        self.tau = float(tau)
        self.y_jump = y_jump
        self.batch = batch
        self.round_time = float(round_time)
        self.exchange_timeout = float(exchange_timeout)
        self.retries = int(retries)
        self.backlog = float(backlog)
        self.max_load = float(max_load)
        #: The configured tau: the floor of the adaptive tau, and what bounds a peer's.
        self.tau_min = self.tau
        self._rate_max = 0.0
        self._rtt_samples = 0
        #: Called after every change of the state by an event, with the event's kind:
        #: "gradient", "initiator" or "responder" (a test or monitoring hook).
        self.on_event: Callable[[str], None] | None = None
        #: Gradient events, exchanges completed as initiator, exchanges applied as responder.
        self.gradients = 0
        self.exchanges = 0
        self.served = 0
        #: Requests sent as initiator (first tries and retries), and retries answered from
        #: the responder's cache (their first reply was lost).
        self.attempts = 0
        self.repeated = 0
        #: Edge ticks dropped because an edge fell more than ``backlog`` intervals behind,
        #: and the moving average of the exchange round trip (seconds, initiator side).
        self.dropped = 0
        self.rtt = 0.0
        self.node_id = ""
        self._c: Constants | None = None
        if None not in (self.L, self.mu, self.chi_1):
            self._c = Constants.from_problem(self.L, self.mu, self.chi_1)  # type: ignore[arg-type]
        self._g_jump: torch.Tensor | None = None
        self._z_jump: torch.Tensor | None = None
        self._flow_cache: dict[float, torch.Tensor] = {}
        self._S: torch.Tensor | None = None
        self._t = 0.0
        self._clock: Any = None
        self._epoch = ""
        self._next_seq: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        self._served: dict[str, _Served] = {}
        self._restored: dict[str, Any] | None = None
        self._finish = False

    # ------------------------------------------------------------------ cluster-wide setup
    @classmethod
    def prepare(cls, graph: Any, configs: list[Any]) -> list[Any]:
        """Fill ``L``, ``mu`` (from the data, :func:`local_constants`), ``chi_1`` and the
        edge rates (from the graph) into every config's params, unless already given.

        Edge (u, v) with u < v in the graph's node order is owned by u, at rate
        ``lambda_mix * w_uv`` with ``w`` uniform (``1/|E|``) or optimized (``rates``).
        """
        from rumor.topology import chi_1 as chi_1_of
        from rumor.topology import dadao_rates

        if not configs:
            return configs
        params = dict(configs[0].params)
        weights = None
        if params.get("rates", "uniform") == "optimized":
            from rumor.algorithms.edge_rates import optimize_weights

            weights = optimize_weights(graph).weights
        _, rates = dadao_rates(graph, weights)
        chi = chi_1_of(graph, rates)
        if params.get("L") is None or params.get("mu") is None:
            big_l, mu = local_constants(configs[0])
        else:
            big_l, mu = float(params["L"]), float(params["mu"])
        order = {node: k for k, node in enumerate(sorted(graph.nodes))}
        id_of = {cfg.index: cfg.node_id for cfg in configs}
        owned: dict[str, dict[str, float]] = {cfg.node_id: {} for cfg in configs}
        for (u, v), rate in rates.items():
            first, second = (u, v) if order[u] < order[v] else (v, u)
            owned[id_of[first]][id_of[second]] = float(rate)
        out = []
        for cfg in configs:
            p = dict(cfg.params)
            if p.get("L") is None or p.get("mu") is None:
                p["L"], p["mu"] = big_l, mu
            if p.get("chi_1") is None:
                p["chi_1"] = chi
            if "edge_rates" not in p and "edge_rate" not in p:
                p["edge_rates"] = owned[cfg.node_id]
            out.append(cfg.replace(params=p))
        return out

    # ------------------------------------------------------------------ state
    @property
    def constants(self) -> Constants:
        if self._c is None:
            raise ValueError(
                "dadao needs L, mu and chi_1: start it through `rumor simulate` or "
                "`rumor cluster up` (which call DADAO.prepare), or pass them as params"
            )
        return self._c

    @property
    def state(self) -> torch.Tensor:
        """The stacked state (6 x d, float64) as of this node's last event (a copy)."""
        if self._S is None:
            raise RuntimeError("the rule has not started")
        return self._S.clone()

    @property
    def last_event_time(self) -> float:
        return self._t

    def state_at(self, t: float) -> torch.Tensor:
        """The state integrated to clock time ``t`` (seconds), without changing it."""
        if self._S is None:
            raise RuntimeError("the rule has not started")
        return self._flow(t - self._t) @ self._S

    def pending_seqs(self) -> dict[str, int]:
        """``{peer: sequence number}`` of the exchanges started and not yet applied."""
        return {peer: p.seq for peer, p in self._pending.items()}

    def _flow(self, seconds: float) -> torch.Tensor:
        units = max(0.0, seconds) / self.tau
        E = self._flow_cache.get(units)
        if E is None:
            E = flow(self.constants, units)
            if len(self._flow_cache) > 64:
                self._flow_cache.clear()
            self._flow_cache[units] = E
        return E

    def _integrate(self, now: float) -> None:
        assert self._S is not None
        if now > self._t:
            self._S = self._flow(now - self._t) @ self._S
            self._t = now

    def _jump(self, coeffs: torch.Tensor, vector: torch.Tensor, age: float) -> None:
        """``S += outer(E(age) coeffs, vector)``: a jump that happened ``age`` seconds ago,
        propagated to now (the state must already be integrated to now)."""
        assert self._S is not None
        if age > 0:
            coeffs = self._flow(age) @ coeffs
        self._S.add_(torch.outer(coeffs, vector))

    def _adopt_tau(self, ctx: Context, peer_tau: float | None) -> None:
        """Take a neighbour's larger tau (the cluster settles on its largest), up to 100 x
        the configured one so that no peer can stall the run."""
        if peer_tau is not None and peer_tau > self.tau:
            self._set_tau(ctx, min(peer_tau, 100.0 * self.tau_min), "a neighbour's")

    def _set_tau(self, ctx: Context, tau: float, why: str) -> None:
        """Change the time unit at this instant: the state is integrated to now under the
        old unit first, so the trajectory in time units is continuous."""
        if not (math.isfinite(tau) and tau > self.tau):
            return
        self._integrate(ctx.clock.now())
        ctx.log("tau %.4g -> %.4g s (%s)", self.tau, tau, why, level=logging.INFO)
        self.tau = tau

    def _bind(self, ctx: Context) -> None:
        """Attach to a node: constants, clock, and the state (x from the model) if new."""
        c = self.constants
        if self._clock is not None:
            return
        self._clock = ctx.clock
        self.node_id = ctx.node_id
        self._g_jump = jump_vector(c, "gradient", self.y_jump)
        self._z_jump = jump_vector(c, "consensus")
        now = ctx.clock.now()
        x = ctx.trainer.parameters_vector().to(torch.float64)
        if self._restored is not None:
            self._apply_restored(self._restored, now, x.numel())
            self._restored = None
        if self._S is None:
            self._S = torch.zeros(6, x.numel(), dtype=torch.float64)
            self._S[X] = x
            self._t = now
            new_id = getattr(ctx, "new_exchange_id", None)
            self._epoch = new_id() if new_id is not None else uuid.uuid4().hex

    def _publish(self, ctx: Context, x: torch.Tensor) -> None:
        """Write x into the model's parameters (what evaluation, pulls and digests see)."""
        ctx.trainer.load_vector(x.to(ctx.trainer.parameters_vector().dtype))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything a restarted node needs to keep sum z = 0: the state, the exchange
        ledger (started, not applied) and the responder's answers not yet acknowledged.
        Times are stored as ages relative to now."""
        if self._S is None:
            raise RuntimeError("the rule has not started")
        now = self._clock.now() if self._clock is not None else self._t
        return {
            "version": 1,
            "state": self.state_at(now),
            "epoch": self._epoch,
            "next_seq": dict(self._next_seq),
            "pending": {p: {"seq": e.seq, "m": e.m.clone()} for p, e in self._pending.items()},
            "served": {
                p: {
                    "epoch": b.epoch,
                    "floor": b.floor,
                    "entries": {
                        s: {"m": m.clone(), "d": d.clone(), "age": now - t}
                        for s, (m, d, t) in b.entries.items()
                    },
                }
                for p, b in self._served.items()
            },
            "counters": [self.gradients, self.exchanges, self.served],
            "tau": self.tau,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; applied when the rule next starts (or now,
        if it is running). The node's state continues from where it was saved."""
        if state.get("version") != 1:
            raise ValueError(f"unknown dadao state version {state.get('version')!r}")
        if self._clock is not None:
            self._apply_restored(dict(state), self._clock.now(), None)
        else:
            self._restored = dict(state)

    def _apply_restored(self, state: Mapping[str, Any], now: float, dim: int | None) -> None:
        S = state["state"].to(torch.float64).clone()
        if S.ndim != 2 or S.shape[0] != 6 or (dim is not None and S.shape[1] != dim):
            raise ValueError(f"saved dadao state has shape {tuple(S.shape)}, expected (6, {dim})")
        self._S, self._t = S, now
        self._epoch = str(state["epoch"])
        self._next_seq = {str(k): int(v) for k, v in state["next_seq"].items()}
        self._pending = {
            str(p): _Pending(int(e["seq"]), e["m"].to(torch.float64).clone())
            for p, e in state["pending"].items()
        }
        self._served = {}
        for p, b in state["served"].items():
            book = _Served(str(b["epoch"]), int(b["floor"]))
            for s, e in b["entries"].items():
                book.entries[int(s)] = (e["m"].clone(), e["d"].clone(), now - float(e["age"]))
            self._served[str(p)] = book
        self.gradients, self.exchanges, self.served = (int(v) for v in state["counters"])
        self.tau = max(self.tau, float(state.get("tau", self.tau)))

    # ------------------------------------------------------------------ control loop
    def finish(self) -> None:
        """End the run at the next event, as if the round budget were spent (the node then
        leaves as usual). For experiments that stop at a target accuracy."""
        self._finish = True

    def _done(self, ctx: Context, round: int) -> bool:
        return self._finish or ctx.should_stop(round)

    def _owned_edges(self, ctx: Context) -> dict[str, float]:
        if self.edge_rates is not None:
            known = set(ctx.all_neighbors())
            unknown = sorted(set(self.edge_rates) - known)
            if unknown:
                raise ValueError(f"edge_rates names non-neighbours: {', '.join(unknown)}")
            return {p: r for p, r in sorted(self.edge_rates.items()) if r > 0}
        if self.edge_rate is not None:
            mine = _natural_key(ctx.node_id)
            return {
                p: self.edge_rate
                for p in ctx.all_neighbors()
                if _natural_key(p) > mine and self.edge_rate > 0
            }
        raise ValueError(
            "dadao needs edge rates: start it through `rumor simulate` or `rumor cluster up` "
            "(DADAO.prepare computes them) or pass edge_rates / edge_rate"
        )

    async def run(self, ctx: Context) -> None:
        self._bind(ctx)
        edges = self._owned_edges(ctx)
        self._rate_max = max(edges.values(), default=0.0)
        seed = ctx.rng.getrandbits(64)
        done = asyncio.Event()
        tasks = [
            asyncio.ensure_future(
                self._edge_loop(ctx, peer, rate, random.Random(f"{seed}/edge/{peer}"), done)
            )
            for peer, rate in edges.items()
        ]
        try:
            await self._gradient_loop(ctx, random.Random(f"{seed}/gradient"))
        finally:
            done.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for peer in list(self._pending):
                await self.exchange(ctx, peer, attempts=1)
            self._integrate(ctx.clock.now())
            async with ctx.lock:
                self._publish(ctx, self._S[X])  # type: ignore[index]
        for result in results:
            if isinstance(result, Exception):
                raise result

    async def _gradient_loop(self, ctx: Context, rng: random.Random) -> None:
        clock = ctx.clock
        round = getattr(ctx, "round", 0)  # nonzero after a resume from a checkpoint
        next_round = clock.now() + self.round_time * self.tau
        next_grad = clock.now() + rng.expovariate(1.0) * self.tau
        while not self._done(ctx, round):
            await clock.sleep_until(min(next_grad, next_round))
            now = clock.now()
            if now >= next_round:
                self._integrate(now)
                async with ctx.lock:
                    self._publish(ctx, self._S[X])  # type: ignore[index]
                ev = await ctx.maybe_evaluate(round)
                ctx.end_round(
                    round,
                    eval=ev,
                    gradients=self.gradients,
                    exchanges_done=self.exchanges,
                    served=self.served,
                    pending=len(self._pending),
                    dropped=self.dropped,
                    rtt_ms=1e3 * self.rtt,
                    tau=self.tau,
                )
                round += 1
                next_round += self.round_time * self.tau
                continue
            await self._gradient_event(ctx)
            next_grad = max(next_grad + rng.expovariate(1.0) * self.tau, clock.now())

    async def _gradient_event(self, ctx: Context) -> None:
        t1 = ctx.clock.now()
        self._integrate(t1)
        assert self._S is not None and self._g_jump is not None
        x, y_t = self._S[X].clone(), self._S[Y_T].clone()
        async with ctx.lock:
            self._publish(ctx, x)
        g = await ctx.compute(self._local_gradient, ctx.trainer, x)
        t2 = ctx.clock.now()
        self._integrate(t2)
        r = g - self.constants.nu * x - y_t
        self._jump(self._g_jump, r, t2 - t1)
        self.gradients += 1
        if self.on_event is not None:
            self.on_event("gradient")

    def _local_gradient(self, trainer: Any, x: torch.Tensor) -> torch.Tensor:
        """grad f_i at the model's parameters (x), flat float64; the optimizer's weight
        decay (the ridge term SGD would add) is included."""
        grads = trainer.gradient("full" if self.batch == "full" else None)
        names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
        g = torch.cat([grads[n].reshape(-1) for n in names]).to(torch.float64)
        wd = float(trainer.optimizer.param_groups[0].get("weight_decay", 0.0) or 0.0)
        return g + wd * x if wd else g

    async def _edge_loop(
        self, ctx: Context, peer: str, rate: float, rng: random.Random, done: asyncio.Event
    ) -> None:
        """The Poisson clock of one owned edge, on an absolute schedule.

        An edge runs one exchange at a time, so a tick that falls due during a round trip
        waits for it and then fires at once: the realized rate stays ``rate`` per time unit
        as long as the edge keeps up (round trip below ``tau / rate`` on average). Restarting
        the schedule from a late exchange instead loses the lateness and thins the process,
        and DADAO diverges when the real communication rate falls below lambda_mix (beta~
        is tuned for it). Only a backlog of more than ``backlog`` mean intervals is dropped
        (counted, and logged once): the edge cannot keep up and ``tau`` must be raised.
        """
        clock = ctx.clock
        next_t = clock.now() + rng.expovariate(rate) * self.tau
        warned = False
        while not done.is_set():
            # sleep in slices of at most one time unit, so a stop is seen promptly
            while not done.is_set() and clock.now() < next_t:
                await clock.sleep(min(next_t - clock.now(), self.tau))
            if done.is_set():
                return
            if peer in ctx.neighbors():
                await self.exchange(ctx, peer, attempts=1 + self.retries)
            next_t += rng.expovariate(rate) * self.tau
            now = clock.now()
            max_lag = self.backlog / rate * self.tau
            if now - next_t > max_lag:
                dropped = 0
                while now - next_t > max_lag and dropped < 1_000_000:
                    next_t += rng.expovariate(rate) * self.tau
                    dropped += 1
                self.dropped += dropped
                if not warned:
                    warned = True
                    ctx.log(
                        "edge to %s cannot keep up: %d tick(s) dropped; round trip %.1f ms "
                        "vs %.1f ms between exchanges; the run may diverge, raise tau",
                        peer,
                        dropped,
                        1e3 * self.rtt,
                        1e3 * self.tau / rate,
                        level=logging.WARNING,
                    )

    # ------------------------------------------------------------------ the exchange
    async def exchange(self, ctx: Context, peer: str, attempts: int = 1) -> bool:
        """One communication event with ``peer`` (or the retry of the pending one).

        Returns True once the jump is applied here. The exchange stays in the ledger after
        a failure that may have reached the peer, and is retried with the same id.
        """
        self._bind(ctx)
        assert self._S is not None and self._z_jump is not None
        pend = self._pending.get(peer)
        if pend is None:
            self._integrate(ctx.clock.now())
            seq = self._next_seq.get(peer, 0)
            self._next_seq[peer] = seq + 1
            pend = self._pending[peer] = _Pending(seq, self._S[Y] + self._S[Z])
        exchange_id = f"{self._epoch}:{pend.seq}"
        for _ in range(attempts):
            t1 = ctx.clock.now()
            msg = ctx.message(
                EXCHANGE_KIND,
                bundle=Bundle({"m": pend.m}, {"ack": pend.seq, "tau": self.tau}),
                exchange_id=exchange_id,
            )
            self.attempts += 1
            try:
                reply = await ctx.request(peer, msg, self.exchange_timeout)
            except PeerUnavailable as exc:
                ctx.log("exchange %s with %s: %s", exchange_id, peer, exc, level=logging.DEBUG)
                continue
            except Rejected as exc:
                if exc.code in _REFUSED:
                    ctx.log("exchange %s refused by %s: %s", exchange_id, peer, exc)
                    del self._pending[peer]
                    return False
                ctx.log("exchange %s with %s: %s", exchange_id, peer, exc)
                continue
            t4 = ctx.clock.now()
            try:
                m_j, held, age, peer_tau = self._read_reply(reply, exchange_id, pend.m)
            except ValueError as exc:
                ctx.log("exchange %s with %s: bad reply: %s", exchange_id, peer, exc)
                continue
            # The responder applied its jump `age` before replying, and replied `held` after
            # the request arrived; the one-way delay is estimated as half of what remains.
            one_way = max(0.0, (t4 - t1 - held) / 2.0)
            self.rtt = t4 - t1 if self.rtt == 0 else 0.9 * self.rtt + 0.1 * (t4 - t1)
            self._rtt_samples += 1
            back = min(max(0.0, one_way + age), t4)
            self._integrate(t4)
            self._jump(-self._z_jump, pend.m - m_j, back)
            del self._pending[peer]
            self.exchanges += 1
            self._adopt_tau(ctx, peer_tau)
            if self.max_load > 0 and self._rtt_samples >= 10:
                need = self.rtt * self._rate_max / self.max_load
                if need > self.tau:
                    self._set_tau(ctx, 1.25 * need, f"round trip {1e3 * self.rtt:.1f} ms")
            if self.on_event is not None:
                self.on_event("initiator")
            return True
        return False

    def _read_reply(
        self, reply: Message | None, exchange_id: str, mine: torch.Tensor
    ) -> tuple[torch.Tensor, float, float, float | None]:
        if reply is None or reply.kind != REPLY_KIND or reply.bundle is None:
            raise ValueError("not a dadao reply")
        if reply.exchange_id != exchange_id:
            raise ValueError(f"reply to {reply.exchange_id!r}")
        m = reply.bundle.tensors.get("m")
        if m is None or m.shape != mine.shape or m.dtype != torch.float64:
            raise ValueError("reply lacks a float64 'm' of the right shape")
        if not bool(torch.isfinite(m).all()):
            raise ValueError("reply 'm' is not finite")
        meta = reply.bundle.meta
        peer_tau = _number(meta, "tau") if "tau" in meta else None
        held, age = max(0.0, _number(meta, "held")), max(0.0, _number(meta, "age"))
        return m, held, age, peer_tau

    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        if msg.kind != EXCHANGE_KIND:
            raise Rejected(Code.INVALID_ARGUMENT, f"dadao does not handle {msg.kind!r}")
        try:
            self._bind(ctx)
        except ValueError as exc:
            raise Rejected(Code.FAILED_PRECONDITION, str(exc)) from None
        assert self._S is not None and self._z_jump is not None
        t_in = ctx.clock.now()
        epoch, seq = _parse_exchange_id(msg.exchange_id)
        if msg.bundle is None:
            raise Rejected(Code.INVALID_ARGUMENT, "dadao.exchange without a message")
        m_i = msg.bundle.tensors.get("m")
        if m_i is None or m_i.dtype != torch.float64 or m_i.shape != self._S[Y].shape:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"dadao.exchange needs a float64 'm' of shape {list(self._S[Y].shape)}",
            )
        if not bool(torch.isfinite(m_i).all()):
            raise Rejected(Code.INVALID_ARGUMENT, "dadao.exchange: 'm' is not finite")
        try:
            ack = int(_number(msg.bundle.meta, "ack"))
        except ValueError as exc:
            raise Rejected(Code.INVALID_ARGUMENT, f"dadao.exchange: {exc}") from None
        if ack > seq:
            raise Rejected(Code.INVALID_ARGUMENT, f"ack {ack} beyond exchange {seq}")
        try:
            peer_tau = _number(msg.bundle.meta, "tau") if "tau" in msg.bundle.meta else None
        except ValueError as exc:
            raise Rejected(Code.INVALID_ARGUMENT, f"dadao.exchange: {exc}") from None
        book = self._served.get(msg.sender)
        if book is None or book.epoch != epoch:
            if book is not None and book.entries:
                ctx.log(
                    "%s restarted without its ledger: %d exchange(s) it started cannot "
                    "complete; sum z is off by their jumps",
                    msg.sender,
                    len(book.entries),
                    level=logging.WARNING,
                )
            book = self._served[msg.sender] = _Served(epoch)
        book.acknowledge(ack)
        cached = book.entries.get(seq)
        if cached is not None:
            self.repeated += 1
        else:
            if seq < book.floor:
                raise Rejected(Code.FAILED_PRECONDITION, f"exchange {msg.exchange_id} is complete")
            self._integrate(t_in)
            m_j = self._S[Y] + self._S[Z]
            d = m_i - m_j
            self._jump(self._z_jump, d, 0.0)
            cached = book.entries[seq] = (m_j, d, t_in)
            self.served += 1
            if self.on_event is not None:
                self.on_event("responder")
        now = ctx.clock.now()
        meta = {"age": now - cached[2], "held": now - t_in, "tau": self.tau}
        self._adopt_tau(ctx, peer_tau)
        return ctx.message(
            REPLY_KIND, bundle=Bundle({"m": cached[0]}, meta), exchange_id=msg.exchange_id
        )

    def describe(self) -> dict[str, Any]:
        return {
            "L": self.L,
            "mu": self.mu,
            "chi_1": self.chi_1,
            "edge_rates": self.edge_rates,
            "edge_rate": self.edge_rate,
            "rates": self.rates,
            "tau": self.tau,
            "y_jump": self.y_jump,
            "batch": self.batch,
            "round_time": self.round_time,
            "exchange_timeout": self.exchange_timeout,
            "retries": self.retries,
            "backlog": self.backlog,
            "max_load": self.max_load,
        }


# --------------------------------------------------------------------------- health check


@dataclass
class DualSums:
    """``sum_i z_i`` and ``sum_i z~_i`` (max-abs entry) after removing the half-applied
    exchanges, and the scale they compare with (max-abs entry of any single z_i, z~_i)."""

    z: float
    z_tilde: float
    scale: float

    def relative(self) -> float:
        return max(self.z, self.z_tilde) / self.scale if self.scale > 0 else 0.0


def dual_sums(rules: Sequence[DADAO] | Iterable[DADAO], t: float) -> DualSums:
    """The zero-sum invariant of the consensus duals, over the rules of a whole cluster that
    share one clock (a simulation), at clock time ``t``.

    An exchange the responder has applied and the initiator not yet (it is still in the
    initiator's ledger) contributes only the responder's half; that half, propagated to
    ``t``, is taken out, so the result is zero to round-off at every instant.
    """
    rules = list(rules)
    by_id = {r.node_id: r for r in rules}
    total = torch.zeros(2, rules[0].state.shape[1], dtype=torch.float64)
    scale = 0.0
    for r in rules:
        S = r.state_at(t)
        total += S[Z : Z_T + 1]
        scale = max(scale, float(S[Z : Z_T + 1].abs().max()))
        assert r._z_jump is not None
        for sender, book in r._served.items():
            initiator = by_id.get(sender)
            if initiator is None:
                continue
            pending = initiator.pending_seqs().get(r.node_id)
            for seq, (_, d, t_applied) in book.entries.items():
                if seq == pending:
                    half = r._flow(t - t_applied) @ r._z_jump
                    total -= torch.outer(half[Z : Z_T + 1], d)
    return DualSums(float(total[0].abs().max()), float(total[1].abs().max()), scale)


# --------------------------------------------------------------------------- constants


def local_constants(config: Any) -> tuple[float, float]:
    """``(L, mu)`` for a node config's problem: the max smoothness and min strong convexity
    over the nodes' local objectives, as the authors' code takes them.

    For a linear model with a squared loss on a regression dataset they are exact: the
    extreme eigenvalues of each shard's Hessian ``c X_i^T X_i / m_i + weight_decay I``
    (``c = 1`` for ``half_mse``, 2 for ``mse``; a bias adds a column of ones). Otherwise the
    dataset's own ``info["L"]``, ``info["mu"]`` (global constants) are used, if it has them.
    """
    import numpy as np

    from rumor.node.data import get_dataset, partition

    ds = get_dataset(config.dataset, seed=config.seed)
    loss = config.loss or ("cross_entropy" if ds.num_classes else "mse")
    kind, _, arg = config.model.partition(":")
    wd = float(config.weight_decay)
    if ds.num_classes is None and kind == "linear" and loss in ("mse", "half_mse"):
        factor = 2.0 if loss == "mse" else 1.0
        parts = partition(config.partition, ds.y_train, config.n_nodes, seed=config.seed)
        x = ds.x_train.double().numpy()
        if arg != "nobias":
            x = np.hstack([x, np.ones((len(x), 1))])
        big_l, mu = 0.0, math.inf
        for part in parts:
            xi = x[np.asarray(part)]
            ev = np.linalg.eigvalsh(factor * xi.T @ xi / len(xi)) + wd
            big_l, mu = max(big_l, float(ev[-1])), min(mu, float(ev[0]))
        if mu <= 0:
            raise ValueError(
                "a node's local least-squares problem is not strongly convex (too few rows "
                "per node, or a bias without weight decay); give mu, or add weight decay"
            )
        return big_l, mu
    if "L" in ds.info and "mu" in ds.info:
        return float(ds.info["L"]), float(ds.info["mu"])
    raise ValueError(
        f"cannot derive L and mu for dataset {config.dataset!r} with model {config.model!r}; "
        "pass them as --param L=... --param mu=..."
    )
