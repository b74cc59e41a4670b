"""Sharpness-aware minimisation (SAM): one local step that descends at a perturbed point.

Foret, Kleiner, Mobahi & Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021; used as the local solver of DFedSAM (Shi et al., "Improving the
Model Consistency of Decentralized Federated Learning", ICML 2023, arXiv:2302.04083). On a
minibatch xi at weights y one SAM step is

    g = grad F(y; xi)
    e = rho * g / (||g||_2 + eps)           # one L2 norm over all parameters together
    y <- optimizer step from y with grad F(y + e; xi)     # same minibatch, weights restored

so the step follows the gradient at the worst point of a rho-ball around y (to first order),
which favours flat minima. ``rho = 0`` is exactly the optimizer's ordinary step (one
forward/backward pass, nothing perturbed).

Conventions, where the papers leave the choice open:

* The weights are restored by copying the saved ``y`` back (not by subtracting ``e``), so
  they are bit-identical to what they were before the perturbation.
* Buffers (BatchNorm running statistics) are updated by the first forward pass only; the
  pass at ``y + e`` runs in training mode (batch statistics) but its buffer updates are
  undone, so a SAM step moves the running statistics exactly as a plain step would.
* Weight decay and momentum belong to the optimizer, which sees the restored weights and the
  gradient taken at ``y + e``.
* The returned loss is the loss at ``y`` (the first pass), comparable with plain SGD's.

Example::

    from rumor.algorithms.sam import sam_step
    loss = sam_step(model, torch.nn.functional.cross_entropy, optimizer, (x, y), rho=0.05)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = ["EPS", "perturbation", "sam_step"]

#: Added to ||g|| before dividing, so a zero gradient gives a zero perturbation.
EPS = 1e-12

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def perturbation(
    grads: list[torch.Tensor | None], rho: float, eps: float = EPS
) -> list[torch.Tensor | None]:
    """``rho * g / (||g|| + eps)`` per tensor, with ``||g||`` the L2 norm over all tensors.

    ``None`` entries (parameters the loss does not depend on) stay ``None``. The per-tensor
    norms are combined in float64.
    """
    present = [g for g in grads if g is not None]
    if not present:
        return list(grads)
    total = float(torch.stack(torch._foreach_norm(present)).double().norm())
    shifts = iter(torch._foreach_mul(present, rho / (total + eps)))
    return [None if g is None else next(shifts) for g in grads]


def sam_step(
    model: nn.Module,
    loss_fn: LossFn,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, torch.Tensor],
    rho: float,
    eps: float = EPS,
) -> torch.Tensor:
    """One SAM step of ``optimizer`` on ``batch``; returns the (detached) loss at ``y``.

    Parameters
    ----------
    model:
        The network, in the mode the caller wants (training mode for local steps).
    loss_fn:
        ``(output, target) -> scalar`` loss, a mean over the batch.
    optimizer:
        Steps the model's trainable parameters; it receives the gradient at ``y + e``.
    batch:
        ``(x, target)``; both gradients are taken on this one minibatch.
    rho:
        rho, the radius of the perturbation (>= 0); 0 makes this a plain optimizer step.
    eps:
        Added to the gradient norm (1e-12).
    """
    if rho < 0 or not math.isfinite(rho):
        raise ValueError(f"rho must be a finite number >= 0, got {rho}")
    x, target = batch
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), target)
    if rho == 0:
        loss.backward()
        optimizer.step()
        return loss.detach()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    shifts = perturbation(list(grads), rho, eps)
    moved = [p for p, e in zip(params, shifts, strict=True) if e is not None]
    steps = [e for e in shifts if e is not None]
    saved = [p.detach().clone() for p in moved]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with torch.no_grad():
            torch._foreach_add_(moved, steps)
        loss_fn(model(x), target).backward()
    finally:
        with torch.no_grad():
            torch._foreach_copy_(moved, saved)
            for buf, old in buffers:
                buf.copy_(old)
    optimizer.step()
    return loss.detach()
