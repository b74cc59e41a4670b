"""Variance-corrected model averaging for gossip learning.

Tian, Al-Ars, Kitsak & Hofstee, "Vanishing Variance Problem in Fully Decentralized
Neural-Network Systems", arXiv:2404.04616 (2024). Averaging k *uncorrelated* models divides
the entry variance of every weight tensor by about k (for independent zero-mean tensors of
variance s^2 the mean has variance s^2 / k). Independently initialised gossip learners thus
lose the variance Xavier initialisation chose for them, and a deep network sits on a
plateau until the models have become correlated. The fix rescales every weight tensor of
the averaged model about its own mean, so that its variance is the mean variance of the
models that were averaged in:

    w <- m + (w - m) * sqrt(v* / v),   m, v = mean and variance of the tensor's entries,
                                       v* = mean over the received models of their variance.

The mean of each tensor is unchanged, only its spread is rescaled; once the models agree,
v = v* and the correction is the identity.

Defaults follow the authors' 2024 C++ simulator (the version contemporary with the paper):
one scalar target per weight tensor, the population variance, biases left alone, the target
taken from the *received* models only, applied at every averaging, and the gossip loop
"train, send to every neighbour, buffer what arrives, and once the buffer holds
``buffer_size`` models set x <- self_weight * x + (1 - self_weight) * mean(buffer), then
correct". Their PyTorch port also rescales biases (``include_biases=True`` here). BatchNorm
running statistics, integer buffers and tensors of fewer than two entries are never rescaled.
Statistics are computed in float32, also for float16/bfloat16 models.

Two ways to run it:

* ``mode="buffer"`` (default), the authors' loop, driven by what arrives rather than by
  lock-step rounds. A *round* (the unit of metrics and of the ``rounds`` budget) is
  ``local_steps`` training steps, one send of the model to every live neighbour, and at
  most one merge. The buffer keeps the latest model of each neighbour (so it is bounded by
  the degree); a merge needs ``min(buffer_size, live neighbours)`` of them, so a leaf of the
  graph still merges. After sending, a node waits at most ``wait_timeout`` seconds for its
  buffer to fill, which paces it to its live neighbours; a node that receives nothing
  keeps training.
* ``mode="dpsgd"``: D-PSGD rounds with Metropolis-Hastings weights
  (:class:`~rumor.algorithms.gossip.DPSGD`, unchanged), then the correction applied to the
  merged model with the round's received models as reference.

``ratio`` < 1 only moves part of the way (scale 1 + ratio * (sqrt(v*/v) - 1)); ``ratio=0``
is plain averaging with the same loop, the baseline the correction is measured against.

Example::

    rumor cluster up --nodes 8 --topology regular:8:4 --algorithm variance-corrected \\
        --init independent --param buffer_size=2 --param include_biases=false
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from rumor.algorithms.averaging import check_compatible, mixable, weighted_average_
from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.gossip import DPSGD
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, Rejected

__all__ = [
    "MODEL_KIND",
    "TARGETS",
    "VarianceCorrected",
    "corrected_names",
    "is_bias",
    "layer_variances",
    "mean_variances",
    "variance_correct_",
    "vc_average_",
]

MODEL_KIND = "vc.model"

#: Where the target variance of a tensor comes from: the mean over the received models
#: (the authors' "auto"/"others", default), the node's own model before averaging ("self"),
#: or the mean over self and the received models ("all", not in the authors' code).
TARGETS = ("others", "self", "all")
MODES = ("buffer", "dpsgd")
#: While waiting for its buffer, a node looks at its membership this often (seconds).
_RECHECK_S = 0.25

#: BatchNorm statistics are estimates of the data, not weights: never rescaled.
_BN_STATS = frozenset({"running_mean", "running_var"})

Variances = dict[str, float]


# --- the correction, as pure tensor arithmetic ----------------------------------------------


def is_bias(name: str) -> bool:
    """True for a bias by its state-dict name (``fc.bias``, ``attn.in_proj_bias``)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf == "bias" or leaf.endswith("_bias")


def _corrected(name: str, tensor: torch.Tensor, include_biases: bool) -> bool:
    if not tensor.is_floating_point() or tensor.numel() < 2:
        return False
    if name.rsplit(".", 1)[-1] in _BN_STATS:
        return False
    return include_biases or not is_bias(name)


def corrected_names(state: Mapping[str, torch.Tensor], include_biases: bool = False) -> list[str]:
    """The entries of ``state`` the correction rescales, in order.

    Floating-point tensors of at least two entries, except BatchNorm ``running_mean`` and
    ``running_var``, and except biases unless ``include_biases``.
    """
    return [k for k, t in state.items() if _corrected(k, t, include_biases)]


@torch.no_grad()
def layer_variances(state: Mapping[str, torch.Tensor], include_biases: bool = False) -> Variances:
    """Population variance of the entries of every corrected tensor, computed in float32."""
    return {
        k: float(torch.var(state[k].detach().float(), correction=0))
        for k in corrected_names(state, include_biases)
    }


def mean_variances(records: Sequence[Mapping[str, float]]) -> Variances:
    """Per tensor, the mean of the variances in ``records`` (one record per model)."""
    if not records:
        raise ValueError("mean_variances needs at least one record")
    names = list(records[0])
    for rec in records[1:]:
        if set(rec) != set(names):
            raise ValueError("variance records name different tensors")
    return {k: sum(rec[k] for rec in records) / len(records) for k in names}


@torch.no_grad()
def variance_correct_(
    averaged: Mapping[str, torch.Tensor],
    target: Mapping[str, float] | Sequence[Mapping[str, torch.Tensor]],
    *,
    include_biases: bool = False,
    ratio: float = 1.0,
    eps: float = 1e-12,
) -> dict[str, float]:
    """Rescale each corrected tensor of ``averaged`` about its mean to a target variance.

    ``target`` is either a mapping tensor name -> target variance (e.g. from
    :func:`mean_variances` of variances recorded on arrival) or the received models
    themselves (their mean variance per tensor is the target). Every tensor ``w`` with mean
    ``m`` and variance ``v`` becomes ``m + (w - m) * s`` with
    ``s = 1 + ratio * (sqrt(v* / v) - 1)``, in place. A tensor with ``v <= eps`` has no
    spread to rescale and is left as it is (rather than divided by zero). Statistics are
    float32; the update keeps the tensor's dtype. Returns the scale applied per tensor.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if isinstance(target, Mapping):
        if any(isinstance(v, torch.Tensor) for v in target.values()):
            raise TypeError("target: pass a list of models, or a mapping name -> variance")
        targets: Mapping[str, float] = target
    else:
        targets = mean_variances([layer_variances(m, include_biases) for m in target])
    scales: dict[str, float] = {}
    for name in corrected_names(averaged, include_biases):
        if name not in targets:
            raise KeyError(f"no target variance for tensor {name!r}")
        t = averaged[name]
        x = t.detach().float()
        var, mean = torch.var_mean(x, correction=0)
        v, m, want = float(var), float(mean), float(targets[name])
        if not (v > eps and math.isfinite(v) and math.isfinite(want) and want >= 0.0):
            scales[name] = 1.0
            continue
        scale = 1.0 + ratio * (math.sqrt(want / v) - 1.0)
        scales[name] = scale
        if scale == 1.0:
            continue
        if t.dtype in (torch.float32, torch.float64):
            t.mul_(scale).add_(m * (1.0 - scale))
        else:  # half precision: rescale in float32, store back
            t.copy_(x.sub(m).mul_(scale).add_(m))
    return scales


@torch.no_grad()
def vc_average_(
    state: Mapping[str, torch.Tensor],
    received: Sequence[Mapping[str, torch.Tensor]],
    *,
    self_weight: float = 0.5,
    target: str = "others",
    include_biases: bool = False,
    ratio: float = 1.0,
    eps: float = 1e-12,
    received_variances: Sequence[Mapping[str, float]] | None = None,
) -> dict[str, float]:
    """``state <- self_weight * state + (1 - self_weight) * mean(received)``, then corrected.

    ``received_variances`` are the received models' variances if they were recorded on
    arrival (:func:`layer_variances`); otherwise they are computed here. Returns the scale
    applied per tensor (empty for ``ratio=0``, which is plain averaging).
    """
    if not received:
        raise ValueError("vc_average_ needs at least one received model")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    want: Variances = {}
    if ratio > 0:
        others = (
            list(received_variances)
            if received_variances is not None
            else [layer_variances(m, include_biases) for m in received]
        )
        if target == "others":
            want = mean_variances(others)
        elif target == "self":
            want = layer_variances(state, include_biases)
        else:
            want = mean_variances([layer_variances(state, include_biases), *others])
    share = (1.0 - self_weight) / len(received)
    weighted_average_(state, self_weight, [(share, m) for m in received])
    if ratio == 0:
        return {}
    return variance_correct_(state, want, include_biases=include_biases, ratio=ratio, eps=eps)


def _mean_scale(scales: Mapping[str, float]) -> float | None:
    return sum(scales.values()) / len(scales) if scales else None


# --- the rule -----------------------------------------------------------------------------


class _CorrectedDPSGD(DPSGD):
    """D-PSGD whose merge is followed by the correction (the ``mode="dpsgd"`` engine)."""

    def __init__(self, outer: VarianceCorrected, **params: Any) -> None:
        super().__init__(**params)
        self._outer = outer

    async def _mix(
        self, ctx: Context, state: dict[str, torch.Tensor], received: dict[str, Message], round: int
    ) -> float | None:
        vc = self._outer
        if not received or vc.ratio == 0:
            return await super()._mix(ctx, state, received, round)
        others = [layer_variances(m.bundle.tensors, vc.include_biases) for m in received.values()]  # type: ignore[union-attr]
        mine = layer_variances(state, vc.include_biases)
        want = {
            "others": lambda: mean_variances(others),
            "self": lambda: mine,
            "all": lambda: mean_variances([mine, *others]),
        }[vc.target]()
        distance = await super()._mix(ctx, state, received, round)
        async with ctx.lock:
            scales = variance_correct_(
                state, want, include_biases=vc.include_biases, ratio=vc.ratio, eps=vc.eps
            )
        vc.last_scale = _mean_scale(scales)
        return distance


class VarianceCorrected(MixingRule):
    """Gossip learning with variance-corrected averaging (Tian et al., arXiv:2404.04616).

    Resumable from a checkpoint: the model and round are its state; models buffered but not
    yet merged when a node stops are dropped (neighbours send new ones every round).

    Parameters
    ----------
    mode:
        ``"buffer"`` (default): the authors' loop (train, send to all neighbours, merge the
        buffered models once there are ``buffer_size`` of them). ``"dpsgd"``: D-PSGD rounds
        with Metropolis-Hastings weights, corrected after each merge.
    buffer_size:
        Models that must be buffered before a merge (2, the authors' default); capped at the
        number of neighbours still present. ``mode="buffer"`` only.
    self_weight:
        Weight of the node's own model in a merge (0.5, the authors' "train 50 average 50";
        0 is their "train 0 average 100"). ``mode="buffer"`` only.
    local_steps:
        Training steps per round (1).
    include_biases:
        Also rescale biases (False: the 2024 C++ rule; True: the PyTorch port).
    ratio:
        Partial correction r in [0, 1] (1.0): the scale is ``1 + r (sqrt(v*/v) - 1)``. 0 is
        plain averaging.
    target:
        ``"others"`` (default): mean variance of the received models; ``"self"``: the node's
        own variance before the merge; ``"all"``: mean over self and received (non-canonical).
    eps:
        Tensors whose variance after averaging is at most ``eps`` (1e-12) are not rescaled.
    send_timeout:
        Seconds one send may take before it is given up (10.0). ``mode="buffer"`` only.
    wait_timeout:
        Seconds a node waits, after sending, for its buffer to fill before it trains on
        without merging (2.0; 0 never waits). This only paces a node to live neighbours
        (without it a fast node would run through its budget before any model arrives); it
        never makes a node depend on one. ``mode="buffer"`` only.
    round_timeout, catch_up_lag:
        As for :class:`~rumor.algorithms.gossip.DPSGD` (10.0, 2). ``mode="dpsgd"`` only.

    Example::

        rule = VarianceCorrected(buffer_size=2, include_biases=False, ratio=1.0)
        # or from a config: algorithm = "variance-corrected", params = {mode = "dpsgd"}
    """

    name = "variance-corrected"
    checkpointable = True

    def __init__(
        self,
        mode: str = "buffer",
        buffer_size: int = 2,
        self_weight: float = 0.5,
        local_steps: int = 1,
        include_biases: bool = False,
        ratio: float = 1.0,
        target: str = "others",
        eps: float = 1e-12,
        send_timeout: float = 10.0,
        wait_timeout: float = 2.0,
        round_timeout: float = 10.0,
        catch_up_lag: int = 2,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if not 0.0 <= float(ratio) <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
        if not 0.0 <= float(self_weight) <= 1.0:
            raise ValueError(f"self_weight must be in [0, 1], got {self_weight}")
        if int(buffer_size) < 1:
            raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
        if int(local_steps) < 1:
            raise ValueError(f"local_steps must be >= 1, got {local_steps}")
        if float(wait_timeout) < 0 or float(send_timeout) <= 0:
            raise ValueError("wait_timeout must be >= 0 and send_timeout > 0")
        if float(eps) < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not isinstance(include_biases, bool):
            raise ValueError(f"include_biases must be true or false, got {include_biases!r}")
        self.mode = mode
        self.buffer_size = int(buffer_size)
        self.self_weight = float(self_weight)
        self.local_steps = int(local_steps)
        self.include_biases = include_biases
        self.ratio = float(ratio)
        self.target = target
        self.eps = float(eps)
        self.send_timeout = float(send_timeout)
        self.wait_timeout = float(wait_timeout)
        #: Mean scale of the last correction (None before the first one, or with ratio 0).
        self.last_scale: float | None = None
        # sender -> (its latest model, that model's variances recorded on arrival)
        self._buffer: dict[str, tuple[dict[str, torch.Tensor], Variances]] = {}
        self._arrived = asyncio.Event()
        self._inner: _CorrectedDPSGD | None = None
        if mode == "dpsgd":
            self._inner = _CorrectedDPSGD(
                self,
                local_steps=self.local_steps,
                round_timeout=float(round_timeout),
                catch_up_lag=int(catch_up_lag),
            )

    # --- control loop ---------------------------------------------------------------------
    async def run(self, ctx: Context) -> None:
        if self._inner is not None:
            await self._inner.run(ctx)
            return
        state = mixable(ctx.model.state_dict())
        round = ctx.round  # nonzero after a resume from a checkpoint
        while not ctx.should_stop(round):
            async with ctx.lock:
                loss = await ctx.compute(ctx.trainer.train_steps, self.local_steps)
            # The model is only written by this loop, so the live tensors can travel as they
            # are: nothing changes them until every send has returned.
            outgoing = ctx.message(MODEL_KIND, round=round, bundle=Bundle(state))
            peers = ctx.neighbors()
            sent = await asyncio.gather(*(ctx.send(p, outgoing, self.send_timeout) for p in peers))
            if self.wait_timeout > 0:
                await self._wait_for_buffer(ctx)
            merged = 0
            if self._buffer and len(self._buffer) >= self._needed(ctx):
                merged = await self._merge(ctx, state)
            ev = await ctx.maybe_evaluate(round)
            ctx.end_round(
                round,
                loss=loss,
                eval=ev,
                sent=sum(sent),
                merged=merged,
                vc_scale=self.last_scale if merged else None,
            )
            round += 1

    def _needed(self, ctx: Context) -> int:
        """Buffered models that trigger a merge: ``buffer_size``, or fewer with fewer live
        neighbours (so a leaf of the graph, or a node whose neighbours died, still merges)."""
        senders = len(set(ctx.neighbors()) | set(self._buffer))
        return max(1, min(self.buffer_size, senders))

    async def _wait_for_buffer(self, ctx: Context) -> None:
        """Wait up to ``wait_timeout`` seconds for the buffer to hold enough models to merge.

        Never longer: a node whose neighbours are slow, silent or gone trains on without
        them. Every node sends before it waits, so two waiting neighbours cannot block each
        other. Membership is looked at again every ``_RECHECK_S`` seconds, so a wait ends
        early once every neighbour has left.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        while ctx.neighbors() and len(self._buffer) < self._needed(ctx):
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), min(remaining, _RECHECK_S))

    async def _merge(self, ctx: Context, state: dict[str, torch.Tensor]) -> int:
        entries = list(self._buffer.values())
        self._buffer.clear()
        models = [m for m, _ in entries]
        variances = [v for _, v in entries]

        def merge() -> dict[str, float]:
            return vc_average_(
                state,
                models,
                self_weight=self.self_weight,
                target=self.target,
                include_biases=self.include_biases,
                ratio=self.ratio,
                eps=self.eps,
                received_variances=variances,
            )

        async with ctx.lock:
            scales = await ctx.compute(merge, cost_s=0.0)
        self.last_scale = _mean_scale(scales)
        return len(models)

    # --- messages -------------------------------------------------------------------------
    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        if self._inner is not None:
            return await self._inner.on_message(ctx, msg)
        if msg.kind != MODEL_KIND:
            raise Rejected(Code.INVALID_ARGUMENT, f"{self.name} does not handle {msg.kind!r}")
        if msg.bundle is None:
            raise Rejected(Code.INVALID_ARGUMENT, f"{MODEL_KIND} without a model")
        reference = mixable(ctx.model.state_dict())
        check_compatible(msg.bundle, reference)
        if msg.sender not in ctx.all_neighbors():
            raise Rejected(Code.FAILED_PRECONDITION, f"{msg.sender!r} is not a neighbour")
        tensors = {k: msg.bundle.tensors[k] for k in reference}
        variances = layer_variances(tensors, self.include_biases) if self.ratio > 0 else {}
        bad = [k for k, v in variances.items() if not math.isfinite(v)]
        if bad:
            raise Rejected(Code.INVALID_ARGUMENT, f"tensor {bad[0]!r} is not finite")
        # A newer model from the same sender supersedes the older one: the buffer holds at
        # most one model per neighbour.
        self._buffer[msg.sender] = (tensors, variances)
        self._arrived.set()
        return None

    def describe(self) -> dict[str, Any]:
        common = {
            "mode": self.mode,
            "local_steps": self.local_steps,
            "include_biases": self.include_biases,
            "ratio": self.ratio,
            "target": self.target,
            "eps": self.eps,
        }
        if self._inner is not None:
            return {**common, **self._inner.describe()}
        return {
            **common,
            "buffer_size": self.buffer_size,
            "self_weight": self.self_weight,
            "send_timeout": self.send_timeout,
            "wait_timeout": self.wait_timeout,
        }
