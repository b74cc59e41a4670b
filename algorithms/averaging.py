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
    """Refuse a bundle whose tensors do not match ``reference`` by name, shape and dtype.

    Exactly the reference's names: a missing tensor means the sender's model differs from
    this node's (FAILED_PRECONDITION); an extra one, with nothing missing, is content the
    message kind does not define (INVALID_ARGUMENT). Extras are refused rather than ignored
    so that a peer cannot make a node receive, validate and hold memory it never uses, and
    so that two nodes whose models differ find out on the first exchange.
    """
    missing = [k for k in reference if k not in bundle.tensors]
    extra = [k for k in bundle.tensors if k not in reference]
    if missing:
        detail = f"bundle lacks {_names(missing)}"
        if extra:
            detail += f" and has {_names(extra)} that this node's model does not"
        raise Rejected(Code.FAILED_PRECONDITION, detail)
    if extra:
        raise Rejected(
            Code.INVALID_ARGUMENT, f"bundle has {_names(extra)} that this node's model does not"
        )
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


#: Tensor names quoted in one refusal; a bundle of thousands of wrong names stays one line.
_NAMES_IN_ERRORS = 5


def _names(names: list[str]) -> str:
    """``tensor 'a'`` or ``3 tensors 'a', 'b', 'c'``, at most a few quoted (each shortened)."""
    quoted = [repr(n if len(n) <= 120 else n[:120] + "...") for n in names[:_NAMES_IN_ERRORS]]
    listed = ", ".join(quoted)
    if len(names) > _NAMES_IN_ERRORS:
        listed += f" and {len(names) - _NAMES_IN_ERRORS} more"
    return f"tensor {listed}" if len(names) == 1 else f"{len(names)} tensors {listed}"


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


#: Elements per block of :func:`gossip_step_` on a large tensor: 64 Ki (256 KiB of float32).
#: A block's scratch and its slice of ``x`` stay in a core's L2 cache through the step's four
#: operations, so each byte of the model and of the neighbours' models crosses the memory bus
#: once; 256 KiB and 512 KiB blocks were fastest at 10 and 50 MB (``docs/performance.md``).
MIX_BLOCK = 1 << 16


class MixScratch:
    """Reusable scratch for :func:`gossip_step_`: one block per dtype for the large tensors,
    and a buffer per small tensor, allocated on first use and kept between rounds."""

    def __init__(self, block: int = MIX_BLOCK) -> None:
        if block <= 0:
            raise ValueError(f"block must be positive, not {block}")
        self.block = block
        self._blocks: dict[torch.dtype, torch.Tensor] = {}
        self._small: dict[str, torch.Tensor] = {}

    def blocked(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is mixed block by block (large and contiguous)."""
        return t.numel() >= self.block and t.is_contiguous()

    def block_of(self, dtype: torch.dtype) -> torch.Tensor:
        buf = self._blocks.get(dtype)
        if buf is None:
            buf = self._blocks[dtype] = torch.empty(self.block, dtype=dtype)
        return buf

    def like(self, name: str, t: torch.Tensor) -> torch.Tensor:
        buf = self._small.get(name)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._small[name] = torch.empty_like(t)
        return buf


@torch.no_grad()
def gossip_step_(
    state: Mapping[str, torch.Tensor],
    others: Iterable[tuple[float, Mapping[str, torch.Tensor]]],
    scratch: MixScratch,
) -> float:
    """``x <- (1 - sum_j w_j) x + sum_j w_j x_j`` in place; returns ||x - a|| before the step.

    ``a = sum_j w_j x_j / sum_j w_j`` is the neighbourhood average. Written as
    ``x += (sum_j w_j) (a - x)``, the step and the distance share a scratch buffer holding
    ``(a - x) / c`` with ``c = w_0 / sum_j w_j`` (``w_0`` the largest weight): the first two
    inputs are summed straight into it, ``x`` is folded in, the norm is taken and ``x`` is
    updated. Large tensors go through those four operations one :data:`MIX_BLOCK` at a time,
    so the scratch and ``x`` are read back from cache instead of memory (at 50 MB, 20.4 ->
    14.9 ms alone); small ones all at once with ``torch._foreach`` calls. The result is
    bitwise the same either way; only the distance's rounding differs.
    """
    ranked = sorted(others, key=lambda item: -item[0])
    total = sum(w for w, _ in ranked)
    if total <= 0:
        return float("nan")
    (w0, first), rest = ranked[0], ranked[1:]
    c = w0 / total  # scratch = a / c after the sums; c >= 1 / len(others), scaling stays tame
    coefs = [(w / w0, other) for w, other in rest]
    small: list[str] = []
    sq = 0.0
    for k, x in state.items():
        if scratch.blocked(x):
            sq += _step_blocks(k, x, first, coefs, c, total, scratch)
        else:
            small.append(k)
    if small:
        sq += _step_whole(state, small, first, coefs, c, total, scratch)
    return c * math.sqrt(sq)


def _step_whole(
    state: Mapping[str, torch.Tensor],
    names: list[str],
    first: Mapping[str, torch.Tensor],
    coefs: list[tuple[float, Mapping[str, torch.Tensor]]],
    c: float,
    total: float,
    scratch: MixScratch,
) -> float:
    """The step on whole tensors with ``_foreach`` calls; returns the squared scratch norm."""
    dst = [state[k] for k in names]
    buf = [scratch.like(k, state[k]) for k in names]
    if coefs:  # buf <- x_0 + (w_1 / w_0) x_1: two reads, one write
        w1, second = coefs[0]
        for k, b in zip(names, buf, strict=True):
            torch.add(first[k], second[k], alpha=w1, out=b)
    else:
        torch._foreach_copy_(buf, [first[k] for k in names])
    for weight, other in coefs[1:]:
        torch._foreach_add_(buf, [other[k] for k in names], alpha=weight)
    torch._foreach_add_(buf, dst, alpha=-1.0 / c)  # (a - x) / c
    sq = sum(float(n) ** 2 for n in torch._foreach_norm(buf))
    torch._foreach_add_(dst, buf, alpha=total * c)  # x + total (a - x)
    return sq


def _step_blocks(
    name: str,
    x: torch.Tensor,
    first: Mapping[str, torch.Tensor],
    coefs: list[tuple[float, Mapping[str, torch.Tensor]]],
    c: float,
    total: float,
    scratch: MixScratch,
) -> float:
    """The same operations on one large contiguous tensor, a block at a time."""
    flat = x.view(-1)
    src = first[name].reshape(-1)
    more = [(w, other[name].reshape(-1)) for w, other in coefs]
    whole = scratch.block_of(x.dtype)
    n, step = flat.numel(), scratch.block
    sq = 0.0
    for i in range(0, n, step):
        j = min(n, i + step)
        b, xb = whole[: j - i], flat[i:j]
        if more:
            w1, second = more[0]
            torch.add(src[i:j], second[i:j], alpha=w1, out=b)
            for weight, other in more[1:]:
                b.add_(other[i:j], alpha=weight)
        else:
            b.copy_(src[i:j])
        b.add_(xb, alpha=-1.0 / c)
        sq += float(torch.linalg.vector_norm(b)) ** 2
        xb.add_(b, alpha=total * c)
    return sq


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
