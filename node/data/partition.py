"""Splitting a training set between nodes: IID, Dirichlet label skew, pathological shards.

Every partitioner returns one sorted int64 index array per node. Partitions are
reproducible (a seeded :class:`numpy.random.Generator`, never global state), disjoint (every
index used at most once) and leave no node empty; when that is impossible they raise
:class:`ValueError` rather than hand back an empty shard. Every node of a run computes the
same partition from the same seed and keeps only its own part.

This module must not load data or touch tensors beyond reading labels: it only deals
indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["dirichlet", "iid", "label_histogram", "partition", "shards"]


def _labels(labels: Any) -> np.ndarray:
    """Labels as a 1-D numpy array (accepts tensors, lists, ``(n, 1)`` columns)."""
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D (or a single column), got shape {arr.shape}")
    return arr


def _class_labels(labels: Any, what: str) -> np.ndarray:
    arr = _labels(labels)
    if arr.dtype.kind not in "biu":
        if arr.dtype.kind == "f" and np.all(arr == np.round(arr)):
            arr = arr.astype(np.int64)
        else:
            raise ValueError(f"{what} needs integer class labels, got dtype {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise ValueError(f"{what} needs non-negative class labels, got {arr.min()}")
    return arr.astype(np.int64)


def _check_nodes(n_items: int, n_nodes: int, per_node: int = 1) -> None:
    if n_nodes < 1:
        raise ValueError(f"n_nodes must be >= 1, got {n_nodes}")
    if n_items < n_nodes * per_node:
        raise ValueError(
            f"cannot give each of {n_nodes} nodes {per_node} item(s) out of {n_items} items"
        )


def iid(n_items: int, n_nodes: int, seed: int = 0) -> list[np.ndarray]:
    """A uniformly random split into ``n_nodes`` parts whose sizes differ by at most one."""
    _check_nodes(n_items, n_nodes)
    perm = np.random.default_rng(seed).permutation(n_items)
    return [np.sort(p).astype(np.int64) for p in np.array_split(perm, n_nodes)]


def dirichlet(
    labels: Any,
    n_nodes: int,
    alpha: float,
    seed: int = 0,
    min_size: int = 1,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Label-skewed split: each class is shared out by proportions drawn from Dirichlet(alpha).

    Dirichlet label skew was introduced by Hsu, Qi & Brown, "Measuring the effects of
    non-identical data distribution for federated visual classification" (2019), who draw
    each client's class mix from ``Dir(alpha p)``. This implements the widely used per-class
    variant (Yurochkin et al., "Bayesian nonparametric federated learning of neural
    networks", ICML 2019; Li et al., "Federated learning on non-IID data silos: an
    experimental study", ICDE 2022): for every class ``c``, proportions ``q_c ~ Dir(alpha 1)``
    over the nodes, and the class's (shuffled) items are cut at the cumulative proportions.
    Small ``alpha`` gives each node few classes; large ``alpha`` tends to IID.

    The whole draw is repeated (at most ``max_tries`` times, same seeded stream) until every
    node holds at least ``min_size`` items. Cutting at ``floor(cumsum(q) * len)``, as the
    reference code does, can never give the first node an item of a class smaller than the
    number of nodes (a one-item class always lands on the last node), so labels made of many
    tiny classes may fail every draw. Only then, up to ``max_tries`` more draws split each
    class by a multinomial draw of its size with the same proportions (unbiased, and any node
    can receive any item); splits the reference rule achieves are unchanged. If none
    succeeds, :class:`ValueError` suggests a larger ``alpha`` or a smaller ``min_size``.
    """
    y = _class_labels(labels, "dirichlet partition")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_size < 1:
        raise ValueError(f"min_size must be >= 1 (no node may be empty), got {min_size}")
    _check_nodes(len(y), n_nodes, min_size)
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(y == c) for c in np.unique(y)]
    for multinomial in (False, True):
        for _ in range(max_tries):
            parts: list[list[np.ndarray]] = [[] for _ in range(n_nodes)]
            for idx in members:
                idx = rng.permutation(idx)
                q = rng.dirichlet(np.full(n_nodes, float(alpha)))
                if multinomial:
                    cuts = np.cumsum(rng.multinomial(len(idx), q))[:-1]
                else:
                    cuts = (np.cumsum(q)[:-1] * len(idx)).astype(np.int64)
                for node, chunk in enumerate(np.split(idx, cuts)):
                    parts[node].append(chunk)
            out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
            if min(len(p) for p in out) >= min_size:
                return out
    raise ValueError(
        f"dirichlet(alpha={alpha}) left a node with fewer than {min_size} items in {2 * max_tries} "
        f"draws ({len(y)} items, {n_nodes} nodes); use a larger alpha or a smaller min_size"
    )


def shards(labels: Any, n_nodes: int, shards_per_node: int = 2, seed: int = 0) -> list[np.ndarray]:
    """The pathological non-IID split of McMahan et al., "Communication-efficient learning of
    deep networks from decentralized data" (AISTATS 2017).

    Items are sorted by label (ties in a seeded random order), cut into
    ``n_nodes * shards_per_node`` contiguous shards of (almost) equal size, and each node is
    dealt ``shards_per_node`` random shards, so it sees about ``shards_per_node`` classes.
    Regression targets are accepted too (sorted by value).
    """
    y = _labels(labels)
    if shards_per_node < 1:
        raise ValueError(f"shards_per_node must be >= 1, got {shards_per_node}")
    n_shards = n_nodes * shards_per_node
    _check_nodes(len(y), n_nodes, shards_per_node)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    order = perm[np.argsort(y[perm], kind="stable")]
    pieces = np.array_split(order, n_shards)
    deal = rng.permutation(n_shards).reshape(n_nodes, shards_per_node)
    return [np.sort(np.concatenate([pieces[s] for s in row])).astype(np.int64) for row in deal]


def partition(spec: str, labels: Any, n_nodes: int, seed: int = 0) -> list[np.ndarray]:
    """Partition by a spec string: ``"iid"``, ``"dirichlet:<alpha>[:<min_size>]"`` or
    ``"shards:<shards_per_node>"``."""
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    args = rest.split(":") if rest else []
    try:
        if kind == "iid" and not args:
            return iid(len(_labels(labels)), n_nodes, seed)
        if kind == "dirichlet" and 1 <= len(args) <= 2:
            min_size = int(args[1]) if len(args) == 2 else 1
            return dirichlet(labels, n_nodes, float(args[0]), seed, min_size=min_size)
        if kind == "shards" and len(args) <= 1:
            return shards(labels, n_nodes, int(args[0]) if args else 2, seed)
    except ValueError as exc:
        raise ValueError(f"partition {spec!r}: {exc}") from None
    raise ValueError(
        f"unknown partition spec {spec!r}; expected 'iid', 'dirichlet:ALPHA[:MIN_SIZE]' "
        "or 'shards:N'"
    )


def label_histogram(
    labels: Any, parts: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Counts of each class on each node: an int64 array of shape ``(nodes, classes)``."""
    y = _class_labels(labels, "label_histogram")
    k = int(y.max()) + 1 if num_classes is None and y.size else int(num_classes or 0)
    if y.size and int(y.max()) >= k:
        raise ValueError(f"label {int(y.max())} out of range for num_classes={k}")
    return np.stack([np.bincount(y[np.asarray(p)], minlength=k)[:k] for p in parts]).astype(
        np.int64
    )
