"""Robust aggregation functions over flat model vectors: median, trimmed mean, Krum,
Multi-Krum, FoolsGold, and the similarity weights SybilWall builds on.

Pure functions on lists of 1-D tensors (one flattened model or history per peer); nothing
here knows about peers, rounds or the network, so each function can be checked by hand.
The rules that use them are :mod:`rumor.algorithms.robust_gossip` and
:mod:`rumor.algorithms.sybilwall`.

References:

* coordinate-wise median and trimmed mean: Yin, Chen, Ramchandran & Bartlett,
  "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018;
* Krum and Multi-Krum: Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with
  Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017;
* FoolsGold: Fung, Yoon & Beschastnikh, "The Limitations of Federated Learning in Sybil
  Settings", RAID 2020 (Algorithm 1: cosine similarity of historical updates, pardoning,
  rescaling and a logit with confidence kappa).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = [
    "centred",
    "cosine_similarity_matrix",
    "foolsgold",
    "foolsgold_weights",
    "krum",
    "krum_scores",
    "median",
    "multi_krum",
    "similarity_weights",
    "trimmed_mean",
    "weighted_with_self",
    "without_twins",
]


def _stack(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not vectors:
        raise ValueError("need at least one vector")
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"need 1-D vectors of one length, got shapes {sorted(shapes)}")
    return torch.stack([v.detach() for v in vectors])


@torch.no_grad()
def median(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Coordinate-wise median; for an even count, the mean of the two middle values."""
    x = _stack(vectors)
    n = x.shape[0]
    s = torch.sort(x, dim=0).values
    if n % 2:
        return s[n // 2].clone()
    return (s[n // 2 - 1] + s[n // 2]) / 2


@torch.no_grad()
def trimmed_mean(vectors: Sequence[torch.Tensor], beta: float) -> torch.Tensor:
    """Coordinate-wise beta-trimmed mean: drop the ``floor(beta n)`` largest and smallest
    values of each coordinate and average the rest (``0 <= beta < 1/2``)."""
    if not 0.0 <= beta < 0.5:
        raise ValueError(f"beta must be in [0, 1/2), got {beta}")
    x = _stack(vectors)
    n = x.shape[0]
    k = math.floor(beta * n)
    s = torch.sort(x, dim=0).values
    return s[k : n - k].mean(dim=0)


@torch.no_grad()
def krum_scores(vectors: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """Krum score of each vector: the sum of squared distances to its ``n - f - 2`` nearest
    other vectors (at least one, so small neighbourhoods still get a ranking)."""
    if f < 0:
        raise ValueError(f"f must be >= 0, got {f}")
    x = _stack(vectors).double()
    n = x.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    d = torch.cdist(x, x).pow(2)
    d.fill_diagonal_(float("inf"))
    closest = max(1, min(n - 1, n - f - 2))
    return torch.sort(d, dim=1).values[:, :closest].sum(dim=1)


def krum(vectors: Sequence[torch.Tensor], f: int) -> torch.Tensor:
    """The vector with the lowest Krum score (ties: the first)."""
    scores = krum_scores(vectors, f)
    return vectors[int(torch.argmin(scores))].detach().clone()


@torch.no_grad()
def multi_krum(vectors: Sequence[torch.Tensor], f: int, m: int) -> torch.Tensor:
    """The mean of the ``m`` vectors with the lowest Krum scores (m = 1 is Krum)."""
    if m < 1:
        raise ValueError(f"m must be >= 1, got {m}")
    scores = krum_scores(vectors, f)
    keep = torch.argsort(scores, stable=True)[: min(m, len(vectors))]
    return _stack([vectors[int(i)] for i in keep]).mean(dim=0)


@torch.no_grad()
def cosine_similarity_matrix(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Pairwise cosine similarities (float64). A zero vector's similarity to anything is 0,
    so a peer whose model never moved is not mistaken for a twin."""
    x = _stack(vectors).double()
    norms = x.norm(dim=1)
    unit = torch.where(norms[:, None] > 0, x / norms.clamp_min(1e-300)[:, None], 0.0)
    return unit @ unit.T


@torch.no_grad()
def centred(vectors: Sequence[torch.Tensor], around: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``vectors`` minus the coordinate-wise median of ``around``.

    Removes what the histories share (the consensus the gossip pulls every honest model
    toward), so cosine similarity compares what is particular to each peer. Vectors that are
    identical stay identical: a common shift cannot separate twins.
    """
    c = median(around)
    return [v.detach().double() - c for v in vectors]


@torch.no_grad()
def without_twins(vectors: Sequence[torch.Tensor]) -> list[int]:
    """Indices of the vectors that have no exact duplicate among ``vectors``."""
    if not vectors:
        return []
    _, inverse, counts = torch.unique(
        _stack(vectors), dim=0, return_inverse=True, return_counts=True
    )
    return [i for i, g in enumerate(inverse.tolist()) if int(counts[g]) == 1]


@torch.no_grad()
def similarity_weights(
    histories: Sequence[torch.Tensor],
    *,
    kappa: float | None = None,
    epsilon: float = 1e-5,
) -> torch.Tensor:
    """FoolsGold's weights from per-peer histories; float64, each in [0, 1].

    1. ``CS`` = cosine similarities with the diagonal set to 0;
       ``v_j = max_l CS[j, l]`` (+ ``epsilon`` when ``kappa is None``, SybilWall's variant).
    2. Pardoning: ``CS[j, l] *= v_j / v_l`` whenever ``v_j < v_l``, so an honest peer that
       merely resembles a Sybil-like one is not punished for it.
    3. ``w_j = 1 - max_l CS[j, l]`` clipped to [0, 1], rescaled by the largest weight.
    4. Logit: ``w_j = kappa (ln(w_j / (1 - w_j)) + 0.5)`` clipped to [0, 1].

    ``kappa`` given (FoolsGold, default 1 in the paper): weights of exactly 1 become 0.99
    before the logit and the logit is multiplied by ``kappa``. ``kappa=None`` (SybilWall's
    reference code): no 0.99 mapping (+inf clips to 1), no confidence factor, and ``epsilon``
    added to ``v``. If every weight is 0 (every peer has a twin) all weights are 0.
    """
    m = len(histories)
    if m == 0:
        return torch.zeros(0, dtype=torch.float64)
    cs = cosine_similarity_matrix(histories)
    cs.fill_diagonal_(0.0)
    if m == 1:
        return torch.ones(1, dtype=torch.float64)
    v = cs.max(dim=1).values
    if kappa is None:
        v = v + epsilon
    pardon = v[:, None] < v[None, :]
    ratio = v[:, None] / torch.where(v[None, :] != 0, v[None, :], 1.0)
    cs = torch.where(pardon, cs * ratio, cs)
    w = (1.0 - cs.max(dim=1).values).clamp(0.0, 1.0)
    top = float(w.max())
    if top <= 0.0:
        return torch.zeros(m, dtype=torch.float64)
    w = w / top
    if kappa is not None:
        w = torch.where(w == 1.0, torch.full_like(w, 0.99), w)
    logit = torch.log(w / (1.0 - w)) + 0.5  # w = 0 gives -inf, w = 1 gives +inf
    if kappa is not None:
        logit = kappa * logit
    logit = torch.nan_to_num(logit, nan=0.0, posinf=1.0, neginf=0.0)
    return logit.clamp(0.0, 1.0)


def foolsgold_weights(histories: Sequence[torch.Tensor], kappa: float = 1.0) -> torch.Tensor:
    """FoolsGold's per-peer weights (Fung et al., Algorithm 1) with confidence ``kappa``."""
    return similarity_weights(histories, kappa=kappa)


@torch.no_grad()
def foolsgold(
    own: torch.Tensor,
    models: Sequence[torch.Tensor],
    histories: Sequence[torch.Tensor],
    kappa: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregate ``models`` (one per peer, paired with ``histories``) with FoolsGold weights.

    Decentralized form: the own model gets trust 1 and the result is
    ``(own + sum_j w_j x_j) / (1 + sum_j w_j)``. Returns the aggregate and the weights.
    """
    if len(models) != len(histories):
        raise ValueError(f"{len(models)} models but {len(histories)} histories")
    w = foolsgold_weights(histories, kappa) if models else torch.zeros(0, dtype=torch.float64)
    return weighted_with_self(own, models, w), w


@torch.no_grad()
def weighted_with_self(
    own: torch.Tensor, models: Sequence[torch.Tensor], weights: torch.Tensor
) -> torch.Tensor:
    """``(own + sum_j w_j x_j) / (1 + sum_j w_j)``: the own model always keeps trust 1."""
    total = 1.0 + float(weights.sum()) if len(models) else 1.0
    out = own.detach().double().clone()
    for w, x in zip(weights.tolist(), models, strict=True):
        if w > 0:
            out.add_(x.detach().double(), alpha=w)
    return (out / total).to(own.dtype)
