"""DFedSAM and DFedSAM-MGS: sharpness-aware local training plus Q gossip steps per round.

Shi, Shen, Wei, Sun, Yuan, Wang & Tao, "Improving the Model Consistency of Decentralized
Federated Learning", ICML 2023 (arXiv:2302.04083). One round t at node i:

    y <- x_i
    K times:  y <- SAM step on a fresh minibatch           (rumor.algorithms.sam)
    z <- y
    Q times:  send z to every neighbour; z <- w_ii z + sum_j w_ij z_j
    x_i <- z

with Metropolis-Hastings weights ``w_ij = 1 / (1 + max(d_i, d_j))`` (Xiao & Boyd, 2004).
DFedSAM is Q = 1; DFedSAM-MGS ("multiple gossip steps") takes Q > 1, which replaces the
mixing factor lambda = ||W - 11^T/n|| by lambda^Q at Q times the communication. ``rho = 0``
turns the SAM steps into plain optimizer steps: that is DFedAvg (local SGD, then gossip).

Choices, where the paper's box leaves the runtime open:

* **Train, then gossip.** Aggregation ends the round, as in the paper's algorithm: the model
  a node sends already holds its newest local steps, and the model evaluated at the end of a
  round is the mixed one. (Codebases that mix at the start of a round run the same sequence
  shifted by half a round.)
* **Tags.** Every model message carries its gossip step as ``Message.round = t * Q + q``:
  one integer that orders (round, step) pairs, so a :class:`RoundInbox` keeps a fast
  neighbour's step q + 1 apart from step q, holds future steps and drops past ones. The
  bundle's metadata repeats ``round``, ``step`` and ``steps`` (Q) and the sender's degree; a
  message whose tag does not match them, or whose Q differs from the receiver's, is refused.
* **Timeouts.** Each gossip step waits up to ``round_timeout`` seconds for the live
  neighbours' models of that step. A neighbour whose model did not come gives its weight to
  the node itself, so the row still sums to one (logged when the set of missing neighbours
  changes). Weights use the topology's degrees, which travel with every model, so both ends
  of an edge always agree on its weight without agreeing on who is alive.
* **BatchNorm.** Running means and variances are averaged like parameters;
  ``num_batches_tracked`` stays local (:func:`~rumor.algorithms.averaging.mixable`).
* **Restarts.** A node that finds any neighbour more than ``catch_up_lag`` rounds ahead
  averages its model with the current models of those ahead and jumps to their round
  (:func:`~rumor.algorithms.rounds.catch_up`).

Example::

    rumor cluster up --nodes 16 --topology ring --algorithm dfedsam-mgs \\
        --partition dirichlet:0.3 --param rho=0.05 --param local_steps=10
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from rumor.algorithms.averaging import mixable
from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.inbox import RoundInbox
from rumor.algorithms.rounds import ModelMixer, catch_up, check_model_message, exchange
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, Rejected

__all__ = ["MODEL_KIND", "DFedSAM", "DFedSAMMGS", "catch_up", "split_tag", "step_tag"]

MODEL_KIND = "dfedsam.model"

#: Rounds ahead of the current one whose messages an inbox keeps.
HORIZON_ROUNDS = 64


def step_tag(round: int, step: int, steps: int) -> int:
    """The message tag of gossip step ``step`` (0-based) of ``round``: ``round * steps + step``.

    Tags grow with (round, step) in lexicographic order, so "later" and "earlier" keep their
    meaning across round boundaries.
    """
    if steps < 1 or not 0 <= step < steps or round < 0:
        raise ValueError(f"no gossip step {step} of {steps} in round {round}")
    return round * steps + step


def split_tag(tag: int, steps: int) -> tuple[int, int]:
    """``(round, step)`` of a tag made by :func:`step_tag` with the same ``steps``."""
    if steps < 1 or tag < 0:
        raise ValueError(f"bad tag {tag} for {steps} steps per round")
    return divmod(tag, steps)


class DFedSAM(MixingRule):
    """DFedSAM: K local SAM steps, then Q Metropolis-Hastings gossip steps, every round.

    Parameters
    ----------
    rho:
        rho, the SAM perturbation radius (0.05; the CIFAR settings of the paper's lineage use
        0.01). 0 gives DFedAvg: plain local optimizer steps.
    local_steps:
        K, local steps per round (10). Ignored when ``local_epochs`` is set.
    gossip_steps:
        Q, gossip (mixing) steps per round (1 for DFedSAM; :class:`DFedSAMMGS` uses 4).
    local_epochs:
        When set, K = ceil(local_epochs * batches per pass over the node's data) instead of
        ``local_steps`` (the paper trains 5 local epochs per round). None by default.
    lr_decay:
        The learning rate of round t is lr_0 * lr_decay^t, lr_0 being the optimizer's rate
        when the node starts (1.0: constant; the paper's lineage uses 0.998).
    round_timeout:
        Seconds one gossip step waits for the neighbours' models (10.0).
    catch_up_lag:
        Rounds behind a neighbour before a node takes the models of those ahead and jumps (2).

    Example::

        rule = DFedSAM(rho=0.05, local_steps=10)   # or --algorithm dfedsam on the CLI
    """

    name = "dfedsam"
    #: Its state between rounds is the model; the learning-rate schedule follows the round.
    checkpointable = True

    def __init__(
        self,
        rho: float = 0.05,
        local_steps: int = 10,
        gossip_steps: int = 1,
        local_epochs: float | None = None,
        lr_decay: float = 1.0,
        round_timeout: float = 10.0,
        catch_up_lag: int = 2,
    ) -> None:
        if not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho must be a finite number >= 0, got {rho}")
        if local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {local_steps}")
        if gossip_steps < 1:
            raise ValueError(f"gossip_steps must be >= 1, got {gossip_steps}")
        if local_epochs is not None and not (math.isfinite(local_epochs) and local_epochs >= 0):
            raise ValueError(f"local_epochs must be a finite number >= 0, got {local_epochs}")
        if not 0 < lr_decay <= 1:
            raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay}")
        if round_timeout <= 0:
            raise ValueError(f"round_timeout must be > 0, got {round_timeout}")
        self.rho = float(rho)
        self.local_steps = int(local_steps)
        self.gossip_steps = int(gossip_steps)
        self.local_epochs = None if local_epochs is None else float(local_epochs)
        self.lr_decay = float(lr_decay)
        self.round_timeout = float(round_timeout)
        self.catch_up_lag = int(catch_up_lag)
        self._inbox = RoundInbox(horizon=HORIZON_ROUNDS * self.gossip_steps)
        self._mixer = ModelMixer()
        self._missing: set[str] = set()

    # --- the round -----------------------------------------------------------------------
    def steps_per_round(self, trainer: Any) -> int:
        """K for this node: ``local_steps``, or ``local_epochs`` passes over its batches."""
        if self.local_epochs is None:
            return self.local_steps
        try:
            batches = len(trainer.train_loader)
        except TypeError as exc:
            raise ValueError(
                "local_epochs needs a training loader with a length (batches per pass)"
            ) from exc
        return math.ceil(self.local_epochs * batches)

    async def run(self, ctx: Context) -> None:
        state = mixable(ctx.model.state_dict())
        trainer = ctx.trainer
        k = self.steps_per_round(trainer)
        lr0 = trainer.lr
        round = ctx.round  # nonzero after a resume from a checkpoint
        while not ctx.should_stop(round):
            round = await catch_up(ctx, state, round, self.catch_up_lag)
            if ctx.should_stop(round):
                break
            if self.lr_decay != 1.0:
                trainer.set_lr(lr0 * self.lr_decay**round)
            loss = None
            if k > 0:
                async with ctx.lock:
                    if self.rho > 0:
                        loss = await ctx.compute(trainer.sam_steps, k, self.rho)
                    else:
                        loss = await ctx.compute(trainer.train_steps, k)
            received = missing = 0
            drift: float | None = None
            for step in range(self.gossip_steps):
                if step > 0 and ctx.should_stop(round):
                    break  # shutting down: neighbours give this node's weight to themselves
                got, distance = await self.gossip(ctx, state, round, step)
                received += got
                missing += ctx.degree - got
                if step == 0:
                    drift = distance
            ev = await ctx.maybe_evaluate(round)
            ctx.end_round(
                round,
                loss=loss,
                eval=ev,
                neighbour_distance=drift,
                received=received,
                missing=missing,
                lr=trainer.lr,
            )
            round += 1

    async def gossip(
        self, ctx: Context, state: dict[str, torch.Tensor], round: int, step: int
    ) -> tuple[int, float | None]:
        """Gossip step ``step`` of ``round``: send ``state``, wait, mix in place.

        Sends the model to every live neighbour tagged with :func:`step_tag`, waits up to
        ``round_timeout`` for the neighbours' models of the same step, and mixes with
        Metropolis-Hastings weights; a neighbour missing at the timeout leaves its weight
        with the node. Returns the number of neighbours' models mixed in, and ``||x - a||``
        before the step (``a`` the weighted mean of those models; None when none came).
        """
        tag = step_tag(round, step, self.gossip_steps)
        meta = {
            "degree": ctx.degree,
            "round": round,
            "step": step,
            "steps": self.gossip_steps,
        }
        outgoing = ctx.message(MODEL_KIND, round=tag, bundle=Bundle(state, meta))
        # Mixing waits for the sends, so the live tensors cannot change while they stream.
        received = await exchange(ctx, self._inbox, tag, outgoing, self.round_timeout)
        self._note_missing(ctx, set(ctx.all_neighbors()) - received.keys(), round, step)
        return len(received), await self._mixer.mix_(ctx, state, received)

    def _note_missing(self, ctx: Context, missing: set[str], round: int, step: int) -> None:
        if missing != self._missing:
            ctx.log(
                "round %d step %d: no model from %s; their weight goes to self",
                round,
                step,
                ", ".join(sorted(missing)) or "nobody any more",
            )
        elif missing:
            ctx.log(
                "round %d step %d: still no model from %s",
                round,
                step,
                ", ".join(sorted(missing)),
                level=logging.DEBUG,
            )
        self._missing = set(missing)

    # --- messages ------------------------------------------------------------------------
    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        check_model_message(ctx, msg, self.name, MODEL_KIND)
        meta = msg.bundle.meta
        degree = _int(meta.get("degree"))
        if degree is None or degree < 1:
            raise Rejected(
                Code.INVALID_ARGUMENT, f"{MODEL_KIND}: bad degree {meta.get('degree')!r}"
            )
        steps = meta.get("steps")
        if steps != self.gossip_steps:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"{MODEL_KIND}: sender gossips {steps!r} steps per round, this node "
                f"{self.gossip_steps}",
            )
        round, step = _int(meta.get("round")), _int(meta.get("step"))
        if round is None or step is None or round < 0 or not 0 <= step < self.gossip_steps:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"{MODEL_KIND}: bad round/step {meta.get('round')!r}/{meta.get('step')!r}",
            )
        if step_tag(round, step, self.gossip_steps) != msg.round:
            raise Rejected(
                Code.INVALID_ARGUMENT,
                f"{MODEL_KIND}: tag {msg.round} is not round {round} step {step}",
            )
        self._inbox.put(msg)
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "rho": self.rho,
            "local_steps": self.local_steps,
            "gossip_steps": self.gossip_steps,
            "local_epochs": self.local_epochs,
            "lr_decay": self.lr_decay,
            "round_timeout": self.round_timeout,
            "catch_up_lag": self.catch_up_lag,
        }


class DFedSAMMGS(DFedSAM):
    """DFedSAM-MGS: DFedSAM with Q > 1 gossip steps per round (multiple gossip steps).

    Parameters are those of :class:`DFedSAM`; only the default of ``gossip_steps`` (Q)
    differs: 4. Each extra step is one more exchange with every neighbour, so a round costs
    Q * degree model transfers, and the consensus error left by a round's mixing shrinks by
    lambda^Q instead of lambda.

    Example::

        rule = DFedSAMMGS(rho=0.05, gossip_steps=4)   # or --algorithm dfedsam-mgs
    """

    name = "dfedsam-mgs"

    def __init__(
        self,
        rho: float = 0.05,
        local_steps: int = 10,
        gossip_steps: int = 4,
        local_epochs: float | None = None,
        lr_decay: float = 1.0,
        round_timeout: float = 10.0,
        catch_up_lag: int = 2,
    ) -> None:
        super().__init__(
            rho=rho,
            local_steps=local_steps,
            gossip_steps=gossip_steps,
            local_epochs=local_epochs,
            lr_decay=lr_decay,
            round_timeout=round_timeout,
            catch_up_lag=catch_up_lag,
        )


def _int(value: object) -> int | None:
    """``value`` if it is an int (not a bool), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
