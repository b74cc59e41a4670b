"""Shared tensor arithmetic for rules: compatibility checks, weighted in-place averaging,
distances. Rules compose these; nothing here knows about peers or rounds.

Averaging runs in place with one multiply and fused multiply-adds per tensor: temporaries
such as ``torch.stack(...).mean(0)`` cost 4-5x more because fresh memory is page-faulted in
(specs/transport-limits.md, section 4).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch

from rumor.protocol.bundle import Bundle
from rumor.protocol.errors import Code, Rejected


def mixable(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The floating-point entries of a state dict: parameters and float buffers.

    Integer buffers (BatchNorm's ``num_batches_tracked``) are counters, not averaged.
    """
    return {k: v for k, v in state.items() if v.is_floating_point()}


def check_compatible(bundle: Bundle, reference: Mapping[str, torch.Tensor]) -> None:
    """Refuse a bundle whose tensors do not match ``reference`` by name, shape and dtype."""
    missing = [k for k in reference if k not in bundle.tensors]
    if missing:
        raise Rejected(Code.FAILED_PRECONDITION, f"bundle lacks tensor {missing[0]!r}")
    for name, ref in reference.items():
        got = bundle.tensors[name]
        if got.shape != ref.shape:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"tensor {name!r}: shape {list(got.shape)} does not match {list(ref.shape)}",
            )
        if got.dtype != ref.dtype:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"tensor {name!r}: dtype {got.dtype} does not match {ref.dtype}",
            )


@torch.no_grad()
def weighted_average_(
    target: Mapping[str, torch.Tensor],
    self_weight: float,
    others: Iterable[tuple[float, Mapping[str, torch.Tensor]]],
) -> None:
    """``target <- self_weight * target + sum_j w_j * other_j``, in place, per tensor."""
    names = list(target)
    dst = [target[k] for k in names]
    if self_weight != 1.0:
        torch._foreach_mul_(dst, self_weight)
    for weight, other in others:
        torch._foreach_add_(dst, [other[k] for k in names], alpha=weight)


@torch.no_grad()
def gossip_step_(
    state: Mapping[str, torch.Tensor],
    others: Iterable[tuple[float, Mapping[str, torch.Tensor]]],
    scratch: Mapping[str, torch.Tensor],
) -> float:
    """``x <- (1 - sum_j w_j) x + sum_j w_j x_j`` in place; returns ||x - a|| before the step.

    ``a = sum_j w_j x_j / sum_j w_j`` is the neighbourhood average. Written as
    ``x += (sum_j w_j) (a - x)``, the step and the distance share a reusable ``scratch``
    buffer (same names and shapes as ``state``), so a round allocates nothing. The buffer
    holds ``(a - x) / c`` with ``c = w_0 / sum_j w_j`` (``w_0`` the largest weight): the first
    two inputs are summed straight into it and ``x`` is folded in with one more pass, which
    reads and writes about 30 % less memory than zeroing the buffer and adding each term.
    """
    ranked = sorted(others, key=lambda item: -item[0])
    total = sum(w for w, _ in ranked)
    if total <= 0:
        return float("nan")
    names = list(state)
    dst = [state[k] for k in names]
    buf = [scratch[k] for k in names]
    (w0, first), rest = ranked[0], ranked[1:]
    if rest:  # buf <- x_0 + (w_1 / w_0) x_1: two reads, one write
        w1, second = rest.pop(0)
        for k, b in zip(names, buf, strict=True):
            torch.add(first[k], second[k], alpha=w1 / w0, out=b)
    else:
        torch._foreach_copy_(buf, [first[k] for k in names])
    for weight, other in rest:
        torch._foreach_add_(buf, [other[k] for k in names], alpha=weight / w0)
    c = w0 / total  # buf = a / c now; c >= 1 / len(others), so the scaling stays tame
    torch._foreach_add_(buf, dst, alpha=-1.0 / c)  # (a - x) / c
    distance = c * math.sqrt(sum(float(n) ** 2 for n in torch._foreach_norm(buf)))
    torch._foreach_add_(dst, buf, alpha=total * c)  # x + total (a - x)
    return distance


@torch.no_grad()
def squared_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """sum over tensors of ||a - b||^2 (float64 accumulation)."""
    total = 0.0
    for k, t in a.items():
        total += float(torch.sum((t.double() - b[k].double()) ** 2))
    return total


@torch.no_grad()
def snapshot(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached copies, for values that must not change while they travel."""
    return {k: v.detach().clone() for k, v in tensors.items()}


def norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(torch.sum(t.double() ** 2)) for t in tensors.values()))
