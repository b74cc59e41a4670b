"""A2CiD2: accelerating asynchronous communication in decentralized deep learning.

Nabli, Belilovsky & Oyallon, "A2CiD2: Accelerating Asynchronous Communication in
Decentralized Deep Learning", NeurIPS 2023 (arXiv:2306.08289). It keeps only DADAO's
communication acceleration (:mod:`rumor.algorithms.dadao`) and pairs it with ordinary local
training, so it works for deep, non-convex models. Each node keeps its parameters x and a
momentum copy x~ (initially equal). Between events

    dx/dt = eta (x~ - x),    dx~/dt = eta (x - x~)

(integrated exactly: the mean of x and x~ is constant, their difference decays like
``exp(-2 eta t)``). A *gradient event* is a normal optimizer step on x, and x~ takes the
same step (``x~ -= lr * momentum buffer`` for SGD with momentum, as the authors' code reads
it from the optimizer; the same as the step x took). A *communication event* on edge (i, j)
integrates, then ``x~_i += beta~ (x_j - x_i)`` and ``x_i <- (x_i + x_j) / 2``, and the
same with i and j swapped. With chi_1, chi_2 of the rate-weighted Laplacian of the
pairings, ``eta = 1 / (2 sqrt(chi_1 chi_2))`` and ``beta~ = sqrt(chi_1 / chi_2) / 2``.

Time is counted in gradient steps: ``tau`` seconds per unit, by default an exponential
moving average (weight 0.5) of the measured duration of one step, as in the authors' code.
Each node takes steps back to back and starts pairwise averagings on a Poisson clock of
``rate_com / 2`` per unit with a uniformly chosen live neighbour, so every node takes part in
``rate_com`` averagings per step on average (on a d-regular graph each edge fires at
``rate_com / d``, i.e. the Laplacian is ``rate_com (I - W)`` with W the row-normalised
adjacency, as in the paper). The pairwise update uses the exchanged pair on both sides, so
the sums of x and of x~ over the nodes are unchanged by gossip. Gossip never waits for a
training step (the authors run it in a separate process for the same reason): while a step
runs, exchanges and the ODE act on a copy of x from before the step, and the step's change
is added to that copy when the step ends. The Poisson clock keeps an absolute schedule and
one exchange in flight, so a slow peer delays but does not thin the communications.

Example::

    rumor simulate --nodes 16 --topology ring --algorithm acid --model mlp --momentum 0.9 \\
        --param rate_com=1
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Mapping
from typing import Any

import torch

from rumor.algorithms.base import Context, MixingRule
from rumor.node.optim import SGD
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, PeerUnavailable, Rejected

__all__ = ["EXCHANGE_KIND", "REPLY_KIND", "ACiD", "pairing_rates"]

EXCHANGE_KIND = "acid.exchange"
REPLY_KIND = "acid.reply"

#: Weight of the newest step duration in the moving average that defines a time unit.
EMA_WEIGHT = 0.5

#: Exchanges a node may have started and not finished.
MAX_IN_FLIGHT = 1


def pairing_rates(graph: Any, rate_com: float) -> dict[tuple[Any, Any], float]:
    """Rate of every edge when each node starts ``rate_com / 2`` averagings per unit with a
    uniformly chosen neighbour: ``(rate_com / 2) (1 / d_i + 1 / d_j)``."""
    deg = dict(graph.degree())
    return {
        (u, v): 0.5 * rate_com * (1.0 / deg[u] + 1.0 / deg[v]) for u, v in graph.edges() if u != v
    }


class ACiD(MixingRule):
    """Asynchronous pairwise averaging with A2CiD2's continuous momentum.

    Parameters
    ----------
    rate_com:
        Pairwise averagings each node takes part in per gradient step (the paper's rate of
        communication). Default 1.
    chi_1, chi_2:
        chi_1 and chi_2 of the rate-weighted Laplacian of the pairings (see
        :func:`pairing_rates`); :meth:`prepare` computes them from the topology. They set
        ``eta = 1 / (2 sqrt(chi_1 chi_2))`` and ``beta~ = sqrt(chi_1 / chi_2) / 2``.
    accelerate:
        False turns the momentum off (eta = beta~ = 0): plain asynchronous averaging with
        the same clocks, the paper's baseline. Default True.
    tau:
        Seconds per time unit; default None: the moving average of the step duration.
    local_steps:
        Gradient steps per round (rounds pace metrics and the budget). Default 1.
    exchange_timeout:
        Seconds an exchange may take before it is abandoned. Default 10.

    Example
    -------
    >>> rule = ACiD(rate_com=1.0, chi_1=9.0, chi_2=4.0)
    >>> round(rule.eta, 4), round(rule.beta_tilde, 4)
    (0.0833, 0.75)
    """

    name = "acid"
    #: state_dict holds x~ and the time unit; the node saves the model and round.
    checkpointable = True

    def __init__(
        self,
        rate_com: float = 1.0,
        chi_1: float | None = None,
        chi_2: float | None = None,
        accelerate: bool = True,
        tau: float | None = None,
        local_steps: int = 1,
        exchange_timeout: float = 10.0,
    ) -> None:
        if not (rate_com > 0 and math.isfinite(rate_com)):
            raise ValueError(f"rate_com must be positive, got {rate_com}")
        if tau is not None and tau <= 0:
            raise ValueError("tau must be > 0")
        if local_steps < 1 or exchange_timeout <= 0:
            raise ValueError("local_steps must be >= 1 and exchange_timeout > 0")
        for name, value in (("chi_1", chi_1), ("chi_2", chi_2)):
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be positive and finite, got {value}")
        self.rate_com = float(rate_com)
        self.chi_1 = None if chi_1 is None else float(chi_1)
        self.chi_2 = None if chi_2 is None else float(chi_2)
        self.accelerate = bool(accelerate)
        self.tau = None if tau is None else float(tau)
        self.local_steps = int(local_steps)
        self.exchange_timeout = float(exchange_timeout)
        #: Gradient steps taken, and averagings applied (as initiator or responder).
        self.steps = 0
        self.averagings = 0
        self._unit: float | None = self.tau
        self._xt: torch.Tensor | None = None
        self._x_during_step: torch.Tensor | None = None
        self._t = 0.0

    @classmethod
    def prepare(cls, graph: Any, configs: list[Any]) -> list[Any]:
        """Fill chi_1 and chi_2 of the pairings' Laplacian into every config's params."""
        from rumor.topology import dadao_constants

        if not configs:
            return configs
        rate_com = float(configs[0].params.get("rate_com", 1.0))
        chi_1, chi_2 = dadao_constants(graph, pairing_rates(graph, rate_com))
        out = []
        for cfg in configs:
            p = dict(cfg.params)
            if p.get("chi_1") is None or p.get("chi_2") is None:
                p["chi_1"], p["chi_2"] = chi_1, chi_2
            out.append(cfg.replace(params=p))
        return out

    @property
    def eta(self) -> float:
        if not self.accelerate:
            return 0.0
        return 1.0 / (2.0 * math.sqrt(self._chis()[0] * self._chis()[1]))

    @property
    def beta_tilde(self) -> float:
        if not self.accelerate:
            return 0.0
        chi_1, chi_2 = self._chis()
        return 0.5 * math.sqrt(chi_1 / chi_2)

    def _chis(self) -> tuple[float, float]:
        if self.chi_1 is None or self.chi_2 is None:
            raise ValueError(
                "acid needs chi_1 and chi_2: start it through `rumor simulate` or "
                "`rumor cluster up` (ACiD.prepare computes them), pass them, or set "
                "accelerate=false"
            )
        return self.chi_1, self.chi_2

    @property
    def momentum(self) -> torch.Tensor:
        """x~ (flat, a copy)."""
        if self._xt is None:
            raise RuntimeError("the rule has not started")
        return self._xt.clone()

    # ------------------------------------------------------------------ state and ODE
    def _start(self, ctx: Context) -> None:
        _ = self.eta  # fail early without chi_1, chi_2
        self._t = ctx.clock.now()  # after a resume the ODE runs on from here: downtime is
        if self._xt is None:  # no time unit of the node's own
            self._xt = ctx.trainer.parameters_vector().clone()
        elif self._xt.shape != ctx.trainer.parameters_vector().shape:
            raise ValueError(
                f"saved momentum has {self._xt.numel()} entries, the model "
                f"{ctx.trainer.parameters_vector().numel()}"
            )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """x~ (the continuous momentum), the time unit and the averaging count."""
        if self._xt is None:
            raise RuntimeError("the rule has not started")
        state: dict[str, Any] = {"version": 1, "xt": self._xt.clone()}
        state["averagings"] = self.averagings
        if self._unit is not None:
            state["unit"] = float(self._unit)
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output before :meth:`run` starts."""
        if state.get("version") != 1:
            raise ValueError(f"unknown acid state version {state.get('version')!r}")
        self._xt = state["xt"].clone()
        self.averagings = int(state.get("averagings", 0))
        if "unit" in state and self.tau is None:
            self._unit = float(state["unit"])

    def _x(self, ctx: Context) -> torch.Tensor:
        """x as the rule sees it: the parameters, or, while a step runs, the parameters from
        before the step plus what gossip and the ODE changed since (a copy)."""
        if self._x_during_step is not None:
            return self._x_during_step.clone()
        return ctx.trainer.parameters_vector()

    def _set_x(self, ctx: Context, x: torch.Tensor) -> None:
        if self._x_during_step is not None:
            self._x_during_step = x
        else:
            ctx.trainer.load_vector(x)

    def _integrate(self, ctx: Context) -> torch.Tensor:
        """Advance (x, x~) to now; returns x (a copy). One synchronous block."""
        assert self._xt is not None
        x = self._x(ctx)
        now = ctx.clock.now()
        if self._unit is not None and now > self._t and self.eta > 0:
            decay = math.exp(-2.0 * self.eta * (now - self._t) / self._unit)
            mean, half = (x + self._xt) / 2, (x - self._xt) * (decay / 2)
            x = mean + half
            self._xt = mean - half
            self._set_x(ctx, x.clone())
        self._t = now
        return x

    def _average(self, ctx: Context, mine: torch.Tensor, theirs: torch.Tensor) -> None:
        """This side's half of a pairwise averaging, with the exchanged pair."""
        assert self._xt is not None
        diff = theirs - mine
        self._xt += self.beta_tilde * diff
        self._set_x(ctx, self._x(ctx) + diff / 2)
        self.averagings += 1

    # ------------------------------------------------------------------ loops
    async def run(self, ctx: Context) -> None:
        self._start(ctx)
        done = asyncio.Event()
        gossip = asyncio.ensure_future(self._gossip_loop(ctx, done))
        try:
            round = ctx.round  # nonzero after a resume from a checkpoint
            while not ctx.should_stop(round):
                losses = [await self._gradient_event(ctx) for _ in range(self.local_steps)]
                await asyncio.sleep(0)  # let waiting exchanges in
                ev = await ctx.maybe_evaluate(round)
                ctx.end_round(round, loss=sum(losses) / len(losses), eval=ev, unit_s=self._unit)
                round += 1
        finally:
            done.set()
            await asyncio.gather(gossip, return_exceptions=True)

    async def _gradient_event(self, ctx: Context) -> float:
        """One optimizer step. Gossip goes on meanwhile: it changes a copy of x from before
        the step, and the step's change is added to it when the step is done."""
        trainer = ctx.trainer
        before = self._integrate(ctx)
        self._x_during_step = before.clone()
        start = ctx.clock.now()
        try:
            loss = await ctx.compute(trainer.train_steps, 1)
        except BaseException:
            ctx.trainer.load_vector(self._x_during_step)
            self._x_during_step = None
            raise
        took = ctx.clock.now() - start
        async with ctx.lock:
            step = self._step_taken(trainer, before)
            change = trainer.parameters_vector() - before
            x = self._integrate(ctx)
            self._x_during_step = None
            trainer.load_vector(x + change)
            assert self._xt is not None
            self._xt += step
        if self.tau is None and took > 0:
            self._unit = (
                took if self._unit is None else EMA_WEIGHT * took + (1 - EMA_WEIGHT) * self._unit
            )
        self.steps += 1
        return float(loss)

    @staticmethod
    def _step_taken(trainer: Any, before: torch.Tensor) -> torch.Tensor:
        """The optimizer's step: ``-lr * momentum buffer`` for SGD with momentum (the
        authors' reading), otherwise the change of x."""
        opt = trainer.optimizer
        group = opt.param_groups[0]
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        if (
            isinstance(opt, (torch.optim.SGD, SGD))
            and len(opt.param_groups) == 1
            and group.get("momentum", 0.0)
            and not group.get("nesterov", False)
            and all("momentum_buffer" in opt.state.get(p, {}) for p in params)
        ):
            buf = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in params])
            return -float(group["lr"]) * buf.to(before.dtype)
        return trainer.parameters_vector() - before

    async def _gossip_loop(self, ctx: Context, done: asyncio.Event) -> None:
        """Poisson ticks on an absolute schedule; each tick starts an exchange as its own
        task (at most ``MAX_IN_FLIGHT`` at once), so waiting for a busy peer does not slow
        the clock down."""
        rng = ctx.rng
        clock = ctx.clock
        in_flight: set[asyncio.Future[None]] = set()
        next_t = clock.now()
        try:
            while not done.is_set():
                unit = self._unit if self._unit is not None else 0.01
                next_t = max(next_t + rng.expovariate(self.rate_com / 2.0) * unit, clock.now())
                while not done.is_set() and clock.now() < next_t:
                    await clock.sleep(min(next_t - clock.now(), max(unit, 1e-3)))
                if done.is_set():
                    return
                peers = ctx.neighbors()
                if peers and len(in_flight) < MAX_IN_FLIGHT:
                    task = asyncio.ensure_future(self._exchange(ctx, rng.choice(peers)))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
        finally:
            await asyncio.gather(*in_flight, return_exceptions=True)

    async def _exchange(self, ctx: Context, peer: str) -> None:
        mine = self._integrate(ctx)
        msg = ctx.message(EXCHANGE_KIND, bundle=Bundle({"x": mine}))
        try:
            reply = await ctx.request(peer, msg, self.exchange_timeout)
        except (PeerUnavailable, Rejected) as exc:
            ctx.log("averaging with %s failed: %s", peer, exc)
            return
        theirs = None if reply is None or reply.bundle is None else reply.bundle.tensors.get("x")
        if (
            reply is None
            or reply.kind != REPLY_KIND
            or theirs is None
            or theirs.shape != mine.shape
        ):
            ctx.log("averaging with %s: unexpected answer", peer)
            return
        self._integrate(ctx)
        self._average(ctx, mine, theirs.to(mine.dtype))

    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        if msg.kind != EXCHANGE_KIND or msg.bundle is None or "x" not in msg.bundle.tensors:
            raise Rejected(Code.INVALID_ARGUMENT, f"acid does not handle {msg.kind!r}")
        theirs = msg.bundle.tensors["x"]
        try:
            self._start(ctx)
        except ValueError as exc:
            raise Rejected(Code.FAILED_PRECONDITION, str(exc)) from None
        mine = self._integrate(ctx)
        if theirs.shape != mine.shape or theirs.dtype != mine.dtype:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"acid.exchange: expected {mine.dtype} of shape {list(mine.shape)}",
            )
        if not bool(torch.isfinite(theirs).all()):
            raise Rejected(Code.INVALID_ARGUMENT, "acid.exchange: x is not finite")
        self._average(ctx, mine, theirs)
        return ctx.message(REPLY_KIND, bundle=Bundle({"x": mine}))

    def describe(self) -> dict[str, Any]:
        return {
            "rate_com": self.rate_com,
            "chi_1": self.chi_1,
            "chi_2": self.chi_2,
            "accelerate": self.accelerate,
            "tau": self.tau,
            "local_steps": self.local_steps,
            "exchange_timeout": self.exchange_timeout,
        }
