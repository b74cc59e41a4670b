"""Robust aggregation baselines as mixing rules: D-PSGD-style rounds with a robust merge.

Each round a node takes ``local_steps`` SGD steps, sends its model to every live neighbour,
waits up to ``round_timeout`` seconds for theirs (:func:`rumor.algorithms.rounds.exchange`)
and replaces its model by a robust aggregate of its own and the received models
(:mod:`rumor.algorithms.robust`):

* ``median``: coordinate-wise median (Yin et al., ICML 2018);
* ``trimmed-mean``: coordinate-wise trimmed mean, ``beta`` trimmed from each end;
* ``krum`` / ``multi-krum``: the model (or the mean of the ``m`` models) closest to its
  ``n - f - 2`` nearest others (Blanchard et al., NeurIPS 2017);
* ``foolsgold``: FoolsGold weights (Fung et al., RAID 2020) from each neighbour's history
  ``H_j = latest model of j - theta_0`` (the sum of its updates as seen by this node); the
  own model keeps trust 1 and the result is ``(x_i + sum_j w_j x_j) / (1 + sum_j w_j)``.

These are the FL defences that SybilWall's paper compares with, applied locally at every
node as the SybilWall reference code does. The own model is always one of the inputs, so an
isolated node keeps its model.

Example::

    rumor simulate --nodes 16 --topology random_regular:4 --algorithm trimmed-mean \\
        --param beta=0.2 --partition dirichlet:0.3
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from rumor.algorithms import robust
from rumor.algorithms.averaging import mixable, snapshot
from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.inbox import RoundInbox
from rumor.algorithms.rounds import check_model_message, exchange, flatten, unflatten_
from rumor.protocol.bundle import Bundle, Message

MODEL_KIND = "robust.model"

__all__ = [
    "MODEL_KIND",
    "FoolsGold",
    "Krum",
    "Median",
    "MultiKrum",
    "RobustGossip",
    "TrimmedMean",
]


class RobustGossip(MixingRule):
    """Rounds of local steps, a model exchange and a robust aggregate (abstract base).

    Parameters
    ----------
    local_steps:
        K, local SGD steps per round.
    round_timeout:
        Seconds to wait for the neighbours' models of a round before aggregating without them.
    """

    name: ClassVar[str] = ""

    def __init__(self, local_steps: int = 1, round_timeout: float = 10.0) -> None:
        if local_steps < 0:
            raise ValueError("local_steps must be >= 0")
        self.local_steps = int(local_steps)
        self.round_timeout = float(round_timeout)
        self._inbox = RoundInbox()

    def aggregate(
        self, own: torch.Tensor, received: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """The new flat model from the own one and the neighbours'; plus fields to log."""
        raise NotImplementedError

    def model_message(self, ctx: Context, round: int, state: dict[str, torch.Tensor]) -> Message:
        """The message that carries ``state`` as this node's model of ``round``."""
        return ctx.message(MODEL_KIND, round=round, bundle=Bundle(state))

    async def run(self, ctx: Context) -> None:
        state = mixable(ctx.model.state_dict())
        self.on_start(state)
        round = 0
        while not ctx.should_stop(round):
            async with ctx.lock:
                loss = await ctx.compute(ctx.trainer.train_steps, self.local_steps)
            outgoing = self.model_message(ctx, round, state)
            arrived = await exchange(ctx, self._inbox, round, outgoing, self.round_timeout)
            received = {p: flatten(m.bundle.tensors, list(state)) for p, m in arrived.items()}  # type: ignore[union-attr]
            self.observe(received)
            fields: dict[str, Any] = {}
            if received:
                async with ctx.lock:
                    new, fields = await ctx.compute(self.aggregate, flatten(state), received)
                    unflatten_(state, new)
            ev = await ctx.maybe_evaluate(round)
            ctx.end_round(round, loss=loss, eval=ev, received=len(received), **fields)
            round += 1

    def on_start(self, state: dict[str, torch.Tensor]) -> None:
        """Hook: the model before the first round."""

    def observe(self, received: dict[str, torch.Tensor]) -> None:
        """Hook: the models of a round, before aggregation."""

    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        check_model_message(ctx, msg, self.name, MODEL_KIND)
        self._inbox.put(msg)
        return None

    def describe(self) -> dict[str, Any]:
        return {"local_steps": self.local_steps, "round_timeout": self.round_timeout}


def _all(own: torch.Tensor, received: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [own, *(received[p] for p in sorted(received))]


class Median(RobustGossip):
    """Coordinate-wise median of the own and the neighbours' models."""

    name = "median"

    def aggregate(
        self, own: torch.Tensor, received: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return robust.median(_all(own, received)), {}


class TrimmedMean(RobustGossip):
    """Coordinate-wise trimmed mean; ``beta`` is the fraction trimmed from each end."""

    name = "trimmed-mean"

    def __init__(self, beta: float = 0.2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= beta < 0.5:
            raise ValueError(f"beta must be in [0, 1/2), got {beta}")
        self.beta = float(beta)

    def aggregate(
        self, own: torch.Tensor, received: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return robust.trimmed_mean(_all(own, received), self.beta), {}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "beta": self.beta}


class MultiKrum(RobustGossip):
    """The mean of the ``m`` models with the lowest Krum scores, tolerating ``f`` outliers."""

    name = "multi-krum"

    def __init__(self, f: int = 1, m: int = 3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if f < 0 or m < 1:
            raise ValueError(f"need f >= 0 and m >= 1, got f={f}, m={m}")
        self.f = int(f)
        self.m = int(m)

    def aggregate(
        self, own: torch.Tensor, received: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        vectors = _all(own, received)
        scores = robust.krum_scores(vectors, self.f)
        keep = torch.argsort(scores, stable=True)[: min(self.m, len(vectors))]
        out = torch.stack([vectors[int(i)] for i in keep]).mean(dim=0)
        return out, {"self_selected": bool((keep == 0).any())}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "f": self.f, "m": self.m}


class Krum(MultiKrum):
    """The single model with the lowest Krum score (Multi-Krum with m = 1)."""

    name = "krum"

    def __init__(self, f: int = 1, **kwargs: Any) -> None:
        super().__init__(f=f, m=1, **kwargs)

    def describe(self) -> dict[str, Any]:
        return {k: v for k, v in super().describe().items() if k != "m"}


class FoolsGold(RobustGossip):
    """FoolsGold weights over the neighbours' histories; the own model keeps trust 1.

    ``kappa`` is the paper's confidence parameter (1 by default).
    """

    name = "foolsgold"

    def __init__(self, kappa: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not kappa > 0:
            raise ValueError(f"kappa must be > 0, got {kappa}")
        self.kappa = float(kappa)
        self._origin: torch.Tensor | None = None
        self._latest: dict[str, torch.Tensor] = {}

    def on_start(self, state: dict[str, torch.Tensor]) -> None:
        self._origin = flatten(snapshot(state))

    def observe(self, received: dict[str, torch.Tensor]) -> None:
        self._latest.update(received)

    def histories(self, peers: list[str]) -> list[torch.Tensor]:
        """``H_j = latest model of j - theta_0`` for each of ``peers``."""
        assert self._origin is not None
        return [self._latest[p] - self._origin for p in peers]

    def aggregate(
        self, own: torch.Tensor, received: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        peers = sorted(received)
        out, w = robust.foolsgold(
            own, [received[p] for p in peers], self.histories(peers), self.kappa
        )
        return out, {"zero_weights": int((w == 0).sum()), "weight_sum": float(w.sum())}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "kappa": self.kappa}
