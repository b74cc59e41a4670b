"""Attackers as node roles: poisoned training data, Sybil identities, the attacked graph and
the attack's success rate.

Threat model (SybilWall, Werthenbach & Pouwelse, arXiv:2306.15044, and its reference code):
one adversary controls ``k`` Sybil identities attached to the honest graph through a few
*attack edges*. It trains one model on poisoned data and every identity sends that same
model; identities do not gossip histories. Two attacks:

* ``label-flip``: classes ``source`` and ``target`` (0 and 1) swap labels in the attacker's
  data, and every training row of those two classes is added (the "extra targeted samples");
  success = fraction of test rows of the two classes classified as the other one;
* ``backdoor``: a ``trigger`` x ``trigger`` patch of value 1 in the top-left corner of the
  image (8x8 digits: 3x3), label set to ``target``; the attacker's clean shard plus ``extra``
  triggered rows of other classes; success = fraction of triggered non-target test rows
  classified as ``target``.

A node becomes an attacker identity through its config (``role = "label-flip"`` or
``"backdoor"``, options in ``role_params``): :func:`poison` replaces its shard by the poisoned
rows, and :class:`SybilIdentity` wraps the cluster's rule so the identity speaks the honest
protocol but never mixes what it receives. Every identity has the same shard (the
attacker's), the same initial weights and the same batch order, so all of them send
bit-identical models without any channel between them: one attacker, ``k`` names.

[DESIGN CHOICE] The reference attacker also averages the honest models it receives before
training. Replicating one model across identities that sit on different attack edges would
then need a private channel between the Sybil processes; training only on poisoned data keeps
the identities exact twins with none, and makes the poisoned model stronger, not weaker.

Example (a 32-node honest random geometric graph, 4 Sybils on 8 attack edges)::

    graph = sybil_topology(32, sybils=4, attack_edges=8, seed=0)
    configs = attack_configs(graph, NodeConfig(algorithm="sybilwall"), "label-flip")
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import networkx as nx
import numpy as np
import torch

from rumor.algorithms.averaging import mixable, snapshot
from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.inbox import RoundInbox
from rumor.algorithms.rounds import exchange
from rumor.protocol.bundle import Bundle, Message

__all__ = [
    "ROLES",
    "SybilIdentity",
    "apply_trigger",
    "attach_sybils",
    "attack_configs",
    "attack_success",
    "attacked_configs",
    "honest_report",
    "poison",
    "sybil_nodes",
    "sybil_topology",
]

ROLES = ("honest", "label-flip", "backdoor")

_DEFAULTS: dict[str, dict[str, Any]] = {
    "label-flip": {"source": 0, "target": 1},
    "backdoor": {"target": 1, "trigger": 3, "extra": 300},
}


def role_options(role: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The options of ``role`` with defaults filled in; unknown roles or keys are errors."""
    if role not in _DEFAULTS:
        raise ValueError(f"unknown attack role {role!r}; expected one of {', '.join(ROLES)}")
    opts = dict(_DEFAULTS[role])
    unknown = sorted(set(params or {}) - set(opts))
    if unknown:
        raise ValueError(f"role {role!r} has no option(s) {', '.join(unknown)}")
    opts.update({k: int(v) for k, v in (params or {}).items()})
    return opts


# --- data ----------------------------------------------------------------------------------


def apply_trigger(x: torch.Tensor, size: int, image_shape: tuple[int, ...] | None) -> torch.Tensor:
    """A copy of rows ``x`` with a ``size`` x ``size`` patch of 1s in the top-left corner of
    every channel (rows are flattened ``image_shape`` images; without a shape, the first
    ``size * size`` features are set)."""
    out = x.clone()
    if image_shape is None or len(image_shape) != 3:
        out[:, : size * size] = 1.0
        return out
    c, h, w = image_shape
    view = out.view(len(out), c, h, w)
    view[:, :, : min(size, h), : min(size, w)] = 1.0
    return out


def poison(
    role: str,
    dataset: Any,
    parts: list[np.ndarray],
    index: int,
    params: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> tuple[Any, list[np.ndarray]]:
    """The dataset and partition an attacker of ``role`` trains on, for shard ``index``.

    Returns a new dataset whose training rows are the original ones followed by the poisoned
    rows, and a partition in which shard ``index`` is exactly the poisoned rows; other shards
    and the test set are unchanged (nothing is modified in place).
    """
    opts = role_options(role, params)
    x, y = dataset.x_train, dataset.y_train
    shard = torch.as_tensor(np.asarray(parts[index]), dtype=torch.int64)
    if role == "label-flip":
        s, t = opts["source"], opts["target"]
        targeted = torch.nonzero((y == s) | (y == t)).reshape(-1)
        rows = torch.unique(torch.cat([shard, targeted]))
        px, py = x[rows].clone(), y[rows].clone()
        py[y[rows] == s] = t
        py[y[rows] == t] = s
    else:
        t = opts["target"]
        others = torch.nonzero(y != t).reshape(-1)
        gen = torch.Generator().manual_seed(int(seed) * 7919 + 17)
        pick = others[torch.randperm(len(others), generator=gen)[: opts["extra"]]]
        shape = tuple(dataset.info.get("image_shape") or ()) or None
        triggered = apply_trigger(x[pick], opts["trigger"], shape)
        px = torch.cat([x[shard], triggered])
        py = torch.cat([y[shard], torch.full((len(pick),), t, dtype=y.dtype)])
    n = len(x)
    new = type(dataset)(
        x_train=torch.cat([x, px]),
        y_train=torch.cat([y, py]),
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        num_classes=dataset.num_classes,
        name=f"{dataset.name}+{role}",
        info={**dataset.info, "attack": role, "attack_options": opts},
    )
    new_parts = list(parts)
    new_parts[index] = np.arange(n, n + len(px), dtype=np.int64)
    return new, new_parts


@torch.no_grad()
def attack_success(
    model: torch.nn.Module, dataset: Any, role: str, params: Mapping[str, Any] | None = None
) -> float:
    """Fraction of the targeted test rows that ``model`` classifies as the attacker wants."""
    opts = role_options(role, params)
    x, y = dataset.x_test, dataset.y_test
    if role == "label-flip":
        s, t = opts["source"], opts["target"]
        mask = (y == s) | (y == t)
        wanted = torch.where(y[mask] == s, t, s)
        rows = x[mask]
    else:
        t = opts["target"]
        mask = y != t
        shape = tuple(dataset.info.get("image_shape") or ()) or None
        rows = apply_trigger(x[mask], opts["trigger"], shape)
        wanted = torch.full((int(mask.sum()),), t, dtype=y.dtype)
    if len(rows) == 0:
        return float("nan")
    was_training = model.training
    model.eval()
    pred = model(rows).argmax(dim=1)
    model.train(was_training)
    return float((pred == wanted).float().mean())


def honest_report(nodes: Mapping[str, Any], configs: list[Any], role: str) -> dict[str, float]:
    """Mean clean accuracy and attack success of the honest nodes among ``nodes`` (id ->
    node with a ``trainer``), measured on the test set of the configs' dataset."""
    from rumor.node.data import get_dataset

    honest = [nodes[c.node_id] for c in configs if c.role == "honest"]
    if not honest:
        raise ValueError("no honest node to measure")
    data = get_dataset(configs[0].dataset, seed=configs[0].seed)
    params = next((c.role_params for c in configs if c.role == role), None)
    acc = [float(n.trainer.evaluate()["accuracy"]) for n in honest]
    asr = [attack_success(n.trainer.model, data, role, params) for n in honest]
    return {
        "honest_accuracy": sum(acc) / len(acc),
        "attack_success": sum(asr) / len(asr),
    }


# --- topology ------------------------------------------------------------------------------


def _prune(graph: nx.Graph, max_degree: int, rng: np.random.Generator) -> None:
    """Remove random edges at nodes above ``max_degree`` while the graph stays connected."""
    for _ in range(graph.number_of_edges()):
        over = sorted(n for n, d in graph.degree() if d > max_degree)
        if not over:
            return
        removable = []
        for u in over:
            for v in sorted(graph.neighbors(u)):
                graph.remove_edge(u, v)
                if nx.has_path(graph, u, v):
                    removable.append((u, v))
                graph.add_edge(u, v)
        if not removable:
            return
        u, v = removable[int(rng.integers(len(removable)))]
        graph.remove_edge(u, v)


def _spread(graph: nx.Graph, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` nodes far apart in hops: farthest-point traversal from a random start."""
    nodes = sorted(graph.nodes)
    chosen = [nodes[int(rng.integers(len(nodes)))]]
    dist = dict(nx.single_source_shortest_path_length(graph, chosen[0]))
    while len(chosen) < min(count, len(nodes)):
        far = max((d, -n) for n, d in dist.items() if n not in chosen)
        nxt = -far[1]
        chosen.append(nxt)
        for n, d in nx.single_source_shortest_path_length(graph, nxt).items():
            dist[n] = min(dist[n], d)
    return sorted(chosen)


def sybil_topology(
    honest: int,
    sybils: int,
    attack_edges: int,
    radius: float | None = None,
    max_degree: int = 7,
    seed: int = 0,
) -> nx.Graph:
    """An honest random geometric graph plus ``sybils`` Sybil nodes on ``attack_edges`` edges.

    Nodes ``0..honest-1`` are honest: a random geometric graph in the unit square (radius by
    default ``sqrt(7 / (pi n))``, mean degree about 5 after border effects), joined up if
    needed, with random edges pruned until no degree exceeds ``max_degree`` (as the SybilWall
    reference's generator does). ``attack_edges`` honest nodes, spread far apart in hops, are
    each linked to one Sybil; the attack edges are dealt round-robin to Sybils
    ``honest..honest+sybils-1`` (node attribute ``sybil=True``), so each Sybil has
    ``attack_edges / sybils`` honest neighbours and no Sybil-Sybil edges exist.

    >>> g = sybil_topology(32, sybils=2, attack_edges=4, seed=0)
    >>> g.number_of_nodes(), sum(1 for _, s in g.nodes(data="sybil") if s)
    (34, 2)
    """
    from rumor.topology.builders import random_geometric

    if sybils < 0 or attack_edges < sybils or attack_edges > honest:
        raise ValueError(
            f"need 0 <= sybils <= attack_edges <= honest, got sybils={sybils}, "
            f"attack_edges={attack_edges}, honest={honest}"
        )
    r = math.sqrt(7.0 / (math.pi * honest)) if radius is None else radius
    graph = nx.Graph(random_geometric(honest, r, seed=seed))
    rng = np.random.default_rng(seed)
    _prune(graph, max_degree, rng)
    return _attach(graph, sybils, attack_edges, rng)


def attach_sybils(graph: nx.Graph, sybils: int, attack_edges: int, seed: int = 0) -> nx.Graph:
    """A copy of the honest ``graph`` (nodes ``0..n-1``) with ``sybils`` Sybil nodes
    ``n..n+sybils-1`` on ``attack_edges`` edges to honest nodes spread far apart, dealt
    round-robin as in :func:`sybil_topology`; for any topology the CLI can build.

    >>> g = attach_sybils(nx.cycle_graph(8), sybils=1, attack_edges=2)
    >>> sybil_nodes(g), sorted(g.neighbors(8))
    ([8], [2, 6])
    """
    n = graph.number_of_nodes()
    if sorted(graph.nodes) != list(range(n)):
        raise ValueError("the honest graph's nodes must be 0..n-1")
    if sybils < 0 or attack_edges < sybils or attack_edges > n:
        raise ValueError(
            f"need 0 <= sybils <= attack_edges <= honest nodes, got sybils={sybils}, "
            f"attack_edges={attack_edges}, honest={n}"
        )
    return _attach(nx.Graph(graph), sybils, attack_edges, np.random.default_rng(seed))


def _attach(graph: nx.Graph, sybils: int, attack_edges: int, rng: np.random.Generator) -> nx.Graph:
    honest = graph.number_of_nodes()
    nx.set_node_attributes(graph, False, "sybil")
    if sybils:
        for j, target in enumerate(_spread(graph, attack_edges, rng)):
            s = honest + j % sybils
            graph.add_node(s, sybil=True)
            graph.add_edge(target, s)
    return graph


def sybil_nodes(graph: nx.Graph) -> list[int]:
    """The graph's Sybil nodes, sorted."""
    return sorted(n for n, s in graph.nodes(data="sybil") if s)


def attack_configs(
    graph: nx.Graph,
    base: Any,
    role: str,
    role_params: Mapping[str, Any] | None = None,
    address_of: Callable[[int], str] | None = None,
    listen_of: Callable[[int], str] | None = None,
) -> list[Any]:
    """Node configs for an attacked graph from :func:`sybil_topology`.

    Honest node ``i`` owns shard ``i``; every Sybil owns the attacker's shard (the last one,
    ``index = honest``) with ``role`` set, so all Sybils train identically.
    """
    from rumor.cluster import cluster_configs, node_name

    role_options(role, role_params)
    sybils = set(sybil_nodes(graph))
    honest = graph.number_of_nodes() - len(sybils)
    shards = honest + (1 if sybils else 0)
    configs = cluster_configs(graph, base, address_of or node_name, listen_of)
    out = []
    for i, cfg in zip(sorted(graph.nodes), configs, strict=True):
        if i in sybils:
            cfg = cfg.replace(role=role, role_params=dict(role_params or {}), index=honest)
        out.append(cfg.replace(n_nodes=shards))
    return out


def attacked_configs(
    graph: nx.Graph,
    base: Any,
    address_of: Callable[[int], str],
    sybils: int = 0,
    role: str = "label-flip",
    attack_edges: int | None = None,
    seed: int = 0,
) -> list[Any]:
    """Configs for an honest ``graph`` with, when ``sybils > 0``, one attacker's Sybils
    attached (:func:`attach_sybils`; ``attack_edges`` defaults to one per Sybil) and given
    ``role`` (:func:`attack_configs`); the command-line entry to attacked clusters."""
    from rumor.cluster import cluster_configs

    if not sybils:
        return cluster_configs(graph, base, address_of)
    edges = sybils if attack_edges is None else attack_edges
    attacked = attach_sybils(graph, sybils, edges, seed=seed)
    return attack_configs(attacked, base, role, address_of=address_of)


# --- the Sybil identity's rule ---------------------------------------------------------------


def _dpsgd_message(ctx: Context, round: int, state: dict[str, torch.Tensor]) -> Message:
    from rumor.algorithms.gossip import MODEL_KIND

    return ctx.message(MODEL_KIND, round=round, bundle=Bundle(state, {"degree": ctx.degree}))


#: How an identity builds the model message of rules that do not offer ``model_message``.
_ADAPTERS: dict[str, Callable[[Context, int, dict[str, torch.Tensor]], Message]] = {
    "dpsgd": _dpsgd_message,
}


class SybilIdentity(MixingRule):
    """One attacker identity: trains on poisoned data, sends its model in the protocol of the
    cluster's rule (``inner``), and never mixes what it receives.

    It paces itself on the honest rounds (it waits, up to the inner rule's ``round_timeout``,
    for its neighbours' models of a round, then discards them) so its models arrive on time.
    """

    def __init__(self, inner: MixingRule) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]  # speaks as the cluster's rule
        builder = getattr(inner, "model_message", None) or _ADAPTERS.get(inner.name)
        if builder is None:
            raise ValueError(f"attack roles are not supported with rule {inner.name!r}")
        self._build: Callable[[Context, int, dict[str, torch.Tensor]], Message] = builder
        self.local_steps = int(getattr(inner, "local_steps", 1))
        self.round_timeout = float(getattr(inner, "round_timeout", 10.0))
        self._inbox = RoundInbox()
        self._kind: str | None = None

    async def run(self, ctx: Context) -> None:
        state = mixable(ctx.model.state_dict())
        round = 0
        while not ctx.should_stop(round):
            track = getattr(self.inner, "local_update", None)
            async with ctx.lock:
                before = snapshot(state) if track is not None else None
                loss = await ctx.compute(ctx.trainer.train_steps, self.local_steps)
                if track is not None:  # rules whose histories sum local updates
                    track(state, before)
            outgoing = self._build(ctx, round, state)
            self._kind = outgoing.kind
            arrived = await exchange(ctx, self._inbox, round, outgoing, self.round_timeout)
            ev = await ctx.maybe_evaluate(round)
            ctx.end_round(round, loss=loss, eval=ev, received=len(arrived), sybil=True)
            round += 1

    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        if self._kind is None or msg.kind == self._kind:
            self._inbox.put(msg)
        return None  # everything else (history gossip, ...) is acknowledged and ignored

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "sybil": True}
