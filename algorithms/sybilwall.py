"""SybilWall: Sybil-resistant aggregation from the similarity of per-peer histories, fed by a
probabilistic gossip of signed histories.

Werthenbach & Pouwelse, "Towards Sybil Resilience in Decentralized Learning",
arXiv:2306.15044 (2023); we follow the authors' reference code as read in
``specs/algorithms-modest-sybilwall.md`` (Part B), with its two fixes. One round r at node i:

1. ``local_steps`` SGD steps;
2. send the model to every live neighbour (:func:`rumor.algorithms.rounds.exchange`), and to
   each neighbour n one history record drawn from the table (never n's own record, never a
   record that came from n, never i's own) with probability proportional to
   ``lambda exp(-lambda (d - 1))``, d the record's hop distance (``decay`` = lambda = 0.8);
3. wait up to ``round_timeout`` for the neighbours' models; each one becomes that neighbour's
   record (distance 1); a relayed record of a distant peer q is kept at distance d + 1 when q
   is unknown or the record is newer, and never overwrites a direct neighbour's record;
4. weights: FoolsGold's computation (:func:`rumor.algorithms.robust.similarity_weights` with
   no kappa: cosine similarity without the diagonal, pardoning with +1e-5, ``1 - max``,
   rescale, logit + 0.5, clip to [0, 1]) over the histories of *all* known peers, neighbours
   and distant ones (self excluded), after centring them (below); identical Sybil histories
   get weight exactly 0 wherever a twin is seen;
5. ``x_i <- (x_i + sum_j w_j x_j) / (1 + sum_j w_j)`` over this round's neighbour models.

Fixes to the reference code (spec, B.4 and B.7):

* **Weights over the right models.** The reference normalises the weights of *all* m
  histories and pairs them positionally with only the k neighbour models plus the own one, so
  with distant histories the own model gets a distant peer's weight and the used weights sum
  to less than 1 (the model shrinks toward 0). Here the similarity over all histories only
  scores peers; the k current neighbours' scores plus 1 for self are normalised and averaged.
* **Histories survive missed rounds.** The reference accumulates ``model - previous model``
  and adds the whole model again after a missed round. Here the history of peer j is
  ``H_j = latest model of j - theta_0`` (``history_mode = "telescoped"``, what the reference
  computes when no round is missed), or with ``history_mode = "sum_of_local_updates"`` the
  FoolsGold-faithful sum of j's own local updates, which j sends beside its model (twice the
  model bytes).

[DESIGN CHOICE] Centring (``centre = "local"``, the default). The reference's histories
fail as the spec's B.7.8 warns: gossip pulls the honest models together, so ``latest model -
theta_0`` is nearly the same vector for every honest peer and the weighting zeroes most
honest neighbours (clean accuracy drops, and a Sybil whose twin is not in view keeps weight 1
among the few peers left). Before the cosine step every history is shifted by the
coordinate-wise median of the own history and this round's neighbours' histories: what the
neighbourhood shares drops out and what is particular to each peer stays. A common shift
never separates twins (identical histories stay identical), histories with an exact twin are
left out of the median (so identical Sybils cannot move it however many there are), and the
histories stay functions of signed models, so a Sybil cannot
report one history and send another model (it can with ``sum_of_local_updates``, whose sum
no receiver can check: it depends on the sender's private aggregation). ``centre = "none"``
is the reference's weighting; ``"median"`` centres on all known histories.

Signed histories (spec, B.7.7): every node signs each record it originates (Ed25519 over
SHA-256 of origin, round, mode and tensors; :mod:`rumor.algorithms.signing`), relays forward
the signature, and a receiver verifies against the origin's pinned key before storing. A
forged or altered record is refused with ``PERMISSION_DENIED`` and logged. What is signed is
the *history source* V_j: the model in telescoped mode (receivers subtract theta_0
themselves), the update sum otherwise. Other guards: m = 0 keeps the own model; all weights 0
keeps the own model; a zero history has similarity 0; the table holds at most
``max_histories`` records (most distant, then oldest, evicted first); a missing neighbour is
skipped after the timeout.

Example::

    rumor simulate --nodes 32 --topology geometric:32:0.25 --algorithm sybilwall \\
        --partition dirichlet:0.1 --param local_steps=5
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from rumor.algorithms import robust
from rumor.algorithms.averaging import check_compatible, mixable, snapshot
from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.inbox import RoundInbox
from rumor.algorithms.rounds import exchange, flatten, unflatten_
from rumor.algorithms.signing import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    KeyRing,
    NodeKey,
    PinSource,
    record_digest,
    verify,
)
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, Rejected

__all__ = ["HISTORY_KIND", "MODEL_KIND", "Record", "SybilWall"]

MODEL_KIND = "sybilwall.model"
HISTORY_KIND = "sybilwall.history"
MODES = ("telescoped", "sum_of_local_updates")
CENTRES = ("none", "local", "median")
#: Prefix of the update-sum tensors beside the model in ``sum_of_local_updates`` mode.
UPDATE_PREFIX = "update/"
#: Longest relay path a record may claim (the graph diameter bounds real ones).
MAX_DISTANCE = 255
MAX_ID_LENGTH = 256
#: Verified (key, signature, digest) triples remembered, so re-sent records skip Ed25519.
VERIFIED_CACHE = 4096


@dataclass
class Record:
    """What a node knows of one peer: its latest signed history source and how far it is."""

    origin: str
    round: int
    distance: int
    via: str | None  # the neighbour that relayed it; None for a neighbour's own record
    source: dict[str, torch.Tensor]  # V: the model (telescoped) or the update sum
    signature: bytes
    key: bytes


def _hex(meta: dict[str, Any], name: str, size: int) -> bytes:
    value = meta.get(name)
    if not isinstance(value, str) or len(value) != 2 * size:
        raise Rejected(Code.INVALID_ARGUMENT, f"{name!r} must be {size} bytes of hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise Rejected(Code.INVALID_ARGUMENT, f"{name!r} is not hex") from None


class SybilWall(MixingRule):
    """SybilWall aggregation with probabilistic, signed history gossip.

    Parameters
    ----------
    local_steps:
        K, local SGD steps per round (the reference trains one epoch).
    round_timeout:
        Seconds to wait for the neighbours' models of a round.
    decay:
        lambda of the gossip law ``P(record) ~ lambda exp(-lambda (d - 1))`` (0.8).
    gossip:
        Send one history record per neighbour per round (False: the ablation without gossip).
    history_mode:
        ``"telescoped"`` (latest model - theta_0) or ``"sum_of_local_updates"``.
    max_histories:
        Records kept besides the neighbours' (64).
    centre:
        ``"local"`` (median of own and neighbours' histories), ``"median"`` (of all) or
        ``"none"`` (the reference): what is subtracted from every history before similarity.
    key_file:
        PEM file holding this node's Ed25519 key, created if absent; empty: a fresh key.
    peer_keys:
        ``{node_id: hex public key}`` pinned before any contact; others are pinned on first
        contact.
    """

    name: ClassVar[str] = "sybilwall"

    def __init__(
        self,
        local_steps: int = 1,
        round_timeout: float = 10.0,
        decay: float = 0.8,
        gossip: bool = True,
        history_mode: str = "telescoped",
        max_histories: int = 64,
        centre: str = "local",
        key_file: str = "",
        peer_keys: dict[str, str] | None = None,
    ) -> None:
        if local_steps < 0:
            raise ValueError("local_steps must be >= 0")
        if history_mode not in MODES:
            raise ValueError(f"history_mode must be one of {MODES}, got {history_mode!r}")
        if centre not in CENTRES:
            raise ValueError(f"centre must be one of {CENTRES}, got {centre!r}")
        if not decay > 0 or max_histories < 0:
            raise ValueError("need decay > 0 and max_histories >= 0")
        self.local_steps = int(local_steps)
        self.round_timeout = float(round_timeout)
        self.decay = float(decay)
        self.gossip = bool(gossip)
        self.history_mode = history_mode
        self.max_histories = int(max_histories)
        self.centre = centre
        self.key_file = key_file
        self._key = NodeKey.load_or_create(Path(key_file)) if key_file else NodeKey.generate()
        self._keys = KeyRing({k: bytes.fromhex(v) for k, v in (peer_keys or {}).items()})
        self._inbox = RoundInbox()
        self._records: dict[str, Record] = {}
        self._names: list[str] = []
        self._origin: torch.Tensor | None = None
        self._updates: dict[str, torch.Tensor] = {}
        self._verified: OrderedDict[tuple[bytes, bytes, bytes], None] = OrderedDict()
        self.forged = 0

    @property
    def public_key(self) -> bytes:
        return self._key.public

    # --- the round ---------------------------------------------------------------------------
    async def run(self, ctx: Context) -> None:
        state = mixable(ctx.model.state_dict())
        self._start(state)
        round = 0
        while not ctx.should_stop(round):
            async with ctx.lock:
                before = snapshot(state) if self.history_mode != "telescoped" else None
                loss = await ctx.compute(ctx.trainer.train_steps, self.local_steps)
                self.local_update(state, before)
            outgoing = self.model_message(ctx, round, state)
            gossip = [asyncio.ensure_future(ctx.send(p, m)) for p, m in self._gossip(ctx)]
            try:
                arrived = await exchange(ctx, self._inbox, round, outgoing, self.round_timeout)
            finally:
                await asyncio.gather(*gossip)
            for peer, msg in arrived.items():
                self._store_direct(peer, msg)
            fields: dict[str, Any] = {"histories": len(self._records)}
            if arrived:
                models = {p: flatten(m.bundle.tensors, self._names) for p, m in arrived.items()}  # type: ignore[union-attr]
                async with ctx.lock:
                    new, extra = await ctx.compute(self.aggregate, flatten(state), models)
                    unflatten_(state, new)
                fields.update(extra)
            self._evict(ctx)
            ev = await ctx.maybe_evaluate(round)
            ctx.end_round(
                round, loss=loss, eval=ev, received=len(arrived), forged=self.forged, **fields
            )
            round += 1

    def _start(self, state: dict[str, torch.Tensor]) -> None:
        self._names = list(state)
        self._origin = flatten(state)
        self._updates = {k: torch.zeros_like(v) for k, v in state.items()}

    @torch.no_grad()
    def local_update(
        self, state: dict[str, torch.Tensor], before: dict[str, torch.Tensor] | None
    ) -> None:
        """Add one round's local update (``state - before``) to the update sum."""
        if before is None or self.history_mode == "telescoped":
            return
        if not self._names:
            self._start(before)
        for k, v in state.items():
            self._updates[k].add_(v.detach() - before[k])

    def _source(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return state if self.history_mode == "telescoped" else self._updates

    def model_message(self, ctx: Context, round: int, state: dict[str, torch.Tensor]) -> Message:
        """This node's model of ``round`` with its signed history source."""
        if not self._names:
            self._start(state)
        source = self._source(state)
        signature = self._key.sign(record_digest(ctx.node_id, round, self.history_mode, source))
        tensors = dict(state)
        if self.history_mode != "telescoped":
            tensors.update({UPDATE_PREFIX + k: v for k, v in source.items()})
        meta = {"sig": signature.hex(), "key": self._key.public.hex(), "mode": self.history_mode}
        return ctx.message(MODEL_KIND, round=round, bundle=Bundle(tensors, meta))

    # --- histories -----------------------------------------------------------------------
    def history(self, record: Record) -> torch.Tensor:
        """``H`` of a record: ``V - theta_0`` (telescoped) or ``V`` (update sums)."""
        v = flatten(record.source, self._names)
        if self.history_mode == "telescoped":
            assert self._origin is not None
            return v - self._origin
        return v

    def _own_history(self, own: torch.Tensor) -> torch.Tensor:
        if self.history_mode == "telescoped":
            assert self._origin is not None
            return own - self._origin
        return flatten(self._updates, self._names)

    def aggregate(
        self, own: torch.Tensor, models: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Score every known history, keep the scores of this round's neighbours, append 1 for
        self, normalise and average (the first fix)."""
        peers = sorted(models)
        others = sorted(o for o in self._records if o not in models)
        order = [p for p in peers if p in self._records] + others
        histories = [self.history(self._records[o]) for o in order]
        if self.centre != "none" and histories:
            # exact twins never move the centre, however many of them there are
            single = robust.without_twins(histories)
            local = [i for i in single if i < len(order) - len(others)]
            pool = local if self.centre == "local" else single
            histories = robust.centred(
                histories, [self._own_history(own), *(histories[i] for i in pool)]
            )
        scores = robust.similarity_weights(histories)
        by_peer = dict(zip(order, scores.tolist(), strict=True))
        w = torch.tensor([by_peer.get(p, 0.0) for p in peers], dtype=torch.float64)
        out = robust.weighted_with_self(own, [models[p] for p in peers], w)
        return out, {
            "zero_weights": int((w == 0).sum()),
            "weight_sum": round(float(w.sum()), 6),
        }

    def _store_direct(self, peer: str, msg: Message) -> None:
        assert msg.bundle is not None
        tensors = msg.bundle.tensors
        if self.history_mode == "telescoped":
            source = {k: tensors[k] for k in self._names}
        else:
            source = {k: tensors[UPDATE_PREFIX + k] for k in self._names}
        self._records[peer] = Record(
            origin=peer,
            round=msg.round,
            distance=1,
            via=None,
            source=source,
            signature=bytes.fromhex(str(msg.bundle.meta["sig"])),
            key=bytes.fromhex(str(msg.bundle.meta["key"])),
        )

    def _gossip(self, ctx: Context) -> list[tuple[str, Message]]:
        """One record per live neighbour, drawn by ``lambda exp(-lambda (d - 1))``."""
        if not self.gossip:
            return []
        out = []
        for n in ctx.neighbors():
            candidates = [
                r
                for o, r in sorted(self._records.items())
                if o not in (n, ctx.node_id) and r.via != n
            ]
            if not candidates:
                continue
            weights = [self.decay * math.exp(-self.decay * (r.distance - 1)) for r in candidates]
            rec = ctx.rng.choices(candidates, weights=weights, k=1)[0]
            meta = {
                "origin": rec.origin,
                "distance": rec.distance,
                "sig": rec.signature.hex(),
                "key": rec.key.hex(),
                "mode": self.history_mode,
            }
            out.append(
                (n, ctx.message(HISTORY_KIND, round=rec.round, bundle=Bundle(rec.source, meta)))
            )
        return out

    def _evict(self, ctx: Context) -> None:
        """Keep the neighbours' records and at most ``max_histories`` others (nearest, newest)."""
        neighbours = set(ctx.all_neighbors())
        distant = [o for o, r in self._records.items() if o not in neighbours]
        if len(distant) <= self.max_histories:
            return
        distant.sort(key=lambda o: (self._records[o].distance, -self._records[o].round, o))
        for o in distant[self.max_histories :]:
            del self._records[o]

    # --- receiving -----------------------------------------------------------------------
    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        if msg.kind == MODEL_KIND:
            self._receive_model(ctx, msg)
        elif msg.kind == HISTORY_KIND:
            self._receive_history(ctx, msg)
        else:
            raise Rejected(Code.INVALID_ARGUMENT, f"sybilwall does not handle {msg.kind!r}")
        return None

    def _check(self, ctx: Context, msg: Message) -> tuple[bytes, bytes]:
        if msg.bundle is None:
            raise Rejected(Code.INVALID_ARGUMENT, f"{msg.kind} without tensors")
        meta = msg.bundle.meta
        if meta.get("mode") != self.history_mode:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"history mode {meta.get('mode')!r} does not match {self.history_mode!r}",
            )
        if msg.round < 0:
            raise Rejected(Code.INVALID_ARGUMENT, f"negative round {msg.round}")
        return _hex(meta, "sig", SIGNATURE_BYTES), _hex(meta, "key", KEY_BYTES)

    def _receive_model(self, ctx: Context, msg: Message) -> None:
        signature, key = self._check(ctx, msg)
        assert msg.bundle is not None
        reference = mixable(ctx.model.state_dict())
        if self.history_mode == "telescoped":
            check_compatible(msg.bundle, reference)
            source = {k: msg.bundle.tensors[k] for k in reference}
        else:
            # the model and, under UPDATE_PREFIX, the update sums: each exactly the model's
            # tensors (check_compatible refuses extras)
            model, updates = Bundle(), Bundle()
            for k, v in msg.bundle.tensors.items():
                if k.startswith(UPDATE_PREFIX):
                    updates.tensors[k[len(UPDATE_PREFIX) :]] = v
                else:
                    model.tensors[k] = v
            check_compatible(model, reference)
            check_compatible(updates, reference)
            source = {k: msg.bundle.tensors[UPDATE_PREFIX + k] for k in reference}
        usable, replaced = self._keys.offer(msg.sender, key, PinSource.DIRECT)
        if replaced:  # records verified with a key learned by gossip are not trusted any more
            self._records.pop(msg.sender, None)
            ctx.log("%s presented a key that differs from the relayed one; re-pinned", msg.sender)
        self._verify(ctx, msg, msg.sender, usable, signature, source)
        self._inbox.put(msg)

    def _receive_history(self, ctx: Context, msg: Message) -> None:
        signature, key = self._check(ctx, msg)
        assert msg.bundle is not None
        meta = msg.bundle.meta
        origin, distance = meta.get("origin"), meta.get("distance")
        if not isinstance(origin, str) or not 0 < len(origin) <= MAX_ID_LENGTH:
            raise Rejected(Code.INVALID_ARGUMENT, f"bad history origin {origin!r}")
        if not isinstance(distance, int) or isinstance(distance, bool):
            raise Rejected(Code.INVALID_ARGUMENT, f"bad history distance {distance!r}")
        if not 1 <= distance < MAX_DISTANCE:
            raise Rejected(Code.INVALID_ARGUMENT, f"history distance {distance} out of range")
        reference = mixable(ctx.model.state_dict())
        check_compatible(msg.bundle, reference)
        source = {k: msg.bundle.tensors[k] for k in reference}
        if origin == ctx.node_id:
            return  # a record about ourselves carries nothing we need
        pinned = self._keys.get(origin)
        usable = (
            pinned == key
            if pinned is not None
            else self._keys.offer(origin, key, PinSource.GOSSIP)[0]
        )
        self._verify(ctx, msg, origin, usable, signature, source)
        known = self._records.get(origin)
        if known is None or (msg.round > known.round and known.distance > 1):
            self._records[origin] = Record(
                origin, msg.round, distance + 1, msg.sender, source, signature, key
            )

    def _verify(
        self,
        ctx: Context,
        msg: Message,
        origin: str,
        usable: bool,
        signature: bytes,
        source: dict[str, torch.Tensor],
    ) -> None:
        key = self._keys.get(origin)
        digest = record_digest(origin, msg.round, self.history_mode, source)
        if usable and key is not None:
            # gossip re-delivers the same records: each (key, signature, digest) is checked once
            seen = (key, signature, digest)
            if seen in self._verified:
                self._verified.move_to_end(seen)
                return
            if verify(key, signature, digest):
                self._verified[seen] = None
                if len(self._verified) > VERIFIED_CACHE:
                    self._verified.popitem(last=False)
                return
        self.forged += 1
        why = "signed with a key other than the pinned one" if not usable else "bad signature"
        ctx.log(
            "refused %s of %s (round %d) from %s: %s",
            msg.kind,
            origin,
            msg.round,
            msg.sender,
            why,
            level=logging.WARNING,
        )
        raise Rejected(Code.PERMISSION_DENIED, f"history of {origin!r} round {msg.round}: {why}")

    def describe(self) -> dict[str, Any]:
        return {
            "local_steps": self.local_steps,
            "round_timeout": self.round_timeout,
            "decay": self.decay,
            "gossip": self.gossip,
            "history_mode": self.history_mode,
            "max_histories": self.max_histories,
            "centre": self.centre,
            "public_key": self._key.public.hex(),
        }
