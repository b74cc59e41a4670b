"""MoDeST: decentralized sampling -- a few nodes train each round, a few aggregate.

de Vos, Dhasade, Kermarrec, Lavoie, Pouwelse and Sharma, "MoDeST: Bridging the Gap between
Federated and Decentralized Learning with Decentralized Sampling", arXiv:2302.13837 (2023);
later "Decentralized Learning Made Practical with Client Sampling" (Plexus). Behaviour follows
the authors' code (devos50/decentralized-learning, ``accdfl/dfl``) as read in
``specs/algorithms-modest-sybilwall.md``, part A.

Each node keeps a membership view (:mod:`rumor.algorithms.modest_view`) and derives from it,
with no messages, the order of round ``r``: the view's active members sorted by
``MD5(id ‖ "-" ‖ r)``. Round ``r`` goes:

1. the **sample** of round ``r`` (s live members found by pinging down that order) holds the
   aggregated model θ_r; each member trains it (one local epoch by default) and sends the
   result to the first ``a`` live members of the order of round ``r + 1``, its
   **aggregators**, with its whole view;
2. an aggregator that holds ``ceil(sf · s)`` distinct models averages them uniformly into
   θ_{r+1}, pings down the order of ``r + 1`` for its ``s`` live members, sends them θ_{r+1}
   (and its view), then acknowledges (``AggAck``) the trainers it heard from.

Membership: views merge on every transfer (highest activity and announcement win); a JOIN
advert is held back until the receiver's next send, so a newcomer never enters a sample
that others are computing without it; a LEAVE applies at once; a member whose pings go
unanswered is suspected and skipped. Failures: an aggregator that got some but not enough
models finishes after ``aggregation_timeout`` with at least ``liveness_min`` of them (HEAD
behaviour), and with whatever arrived after a second timeout, so no round stalls there; a
trainer that gets no ``AggAck`` within ``ack_timeout`` resends its model to the next live
member of the order it has not tried (the spec's fix for an aggregator that crashes after
answering its ping). Aggregators deduplicate by sender, so a resend never counts twice.

Every message is typed (``protocol/proto/rumor/v1/modest.proto``). Nodes reach members that
are not graph neighbours through addresses learned from views (``ctx.learn_address``).

Parameters carry the reference code's defaults: ``sample_size`` s = 10,
``aggregators`` a = 1, ``success_fraction`` sf = 1.0, ``ping_timeout`` 5 s,
``ping_interval`` 1 s, ``inactivity_threshold`` 50 rounds, ``aggregation_timeout`` 300 s,
``liveness_min`` 3, ``local_steps`` 0 = one local epoch.

Example::

    rumor simulate --nodes 64 --topology regular:4 --algorithm modest \\
        --param sample_size=10 --rounds 40
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch
from google.protobuf import any_pb2

from rumor.algorithms.averaging import check_compatible, mixable
from rumor.algorithms.base import Context, MixingRule
from rumor.algorithms.modest_view import HASHES, JOIN, LEAVE, View, entries_from_proto
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.errors import Code, PeerUnavailable, Rejected
from rumor.protocol.framing import message_nbytes_on_wire
from rumor.protocol.v1 import modest_pb2

MODEL_KIND = "modest.model"
PING_KIND = "modest.ping"
PONG_KIND = "modest.pong"
ADVERT_KIND = "modest.advert"
VIEW_KIND = "modest.view"
ACK_KIND = "modest.ack"

TRAINED = modest_pb2.MODEST_MODEL_TRAINED
AGGREGATED = modest_pb2.MODEST_MODEL_AGGREGATED

P = TypeVar("P")
Tensors = dict[str, torch.Tensor]


class MoDeST(MixingRule):
    """Mostly-consistent decentralized sampling training.

    Parameters
    ----------
    sample_size:
        s, nodes that train per round.
    aggregators:
        a, nodes each trainer sends its model to.
    success_fraction:
        sf, fraction of the round's sample an aggregator waits for.
    ping_timeout, ping_interval:
        Seconds before an unanswered candidate counts as unavailable; re-ping period.
    inactivity_threshold:
        Rounds without activity after which a member leaves the candidates.
    aggregation_timeout:
        Seconds an aggregator waits after its first model before it finishes with what it
        holds (at least ``liveness_min`` models; any, after a second timeout).
    liveness_min:
        Models an aggregator needs to finish at the first timeout.
    ack_timeout:
        Seconds a trainer waits for an AggAck before resending; 0 means
        ``aggregation_timeout + ping_timeout`` (the spec's default).
    local_steps:
        SGD steps per round; 0 means one local epoch, as in the reference.
    keepalive:
        A node not contacted for this many seconds pings ~log2(n) random members, so idle
        members stay active in views and round estimates spread.
    join:
        Announce a JOIN at start (a node that arrives after the run began, knowing only its
        bootstrap peers): it asks them for their view, then tells ``advert_fanout`` members.
    advert_fanout:
        Members told about a JOIN or a LEAVE; 0 means s.
    hash:
        ``md5`` (the reference) or ``sha256`` (changes every sample).
    members:
        The initial population ``{node id: address}``; launchers fill it in ``prepare``.
    linger:
        Seconds a node that reached the last round keeps answering pings, so the others
        learn that the run is over; negative means ``2 · keepalive + ping_timeout``.
    stall_timeout:
        Seconds without round progress after which a node checks whether it is the first
        live member of the next order and, if so, restarts the rounds from its own model;
        0 means ``ack_timeout + aggregation_timeout + ping_timeout``, longer than the
        ordinary recovery paths, so it only acts when every member of a round is gone.
    give_up:
        Seconds without any round progress after which a node stops (a bound, not a
        protocol step); 0 disables it.
    """

    name = "modest"

    def __init__(
        self,
        sample_size: int = 10,
        aggregators: int = 1,
        success_fraction: float = 1.0,
        ping_timeout: float = 5.0,
        ping_interval: float = 1.0,
        inactivity_threshold: int = 50,
        aggregation_timeout: float = 300.0,
        liveness_min: int = 3,
        ack_timeout: float = 0.0,
        local_steps: int = 0,
        keepalive: float = 10.0,
        join: bool = False,
        advert_fanout: int = 0,
        hash: str = "md5",
        members: Mapping[str, str] | None = None,
        linger: float = -1.0,
        stall_timeout: float = 0.0,
        give_up: float = 3600.0,
    ) -> None:
        if sample_size < 1 or aggregators < 1:
            raise ValueError("sample_size and aggregators must be >= 1")
        if not 0.0 < success_fraction <= 1.0:
            raise ValueError("success_fraction must be in (0, 1]")
        if min(ping_timeout, ping_interval, aggregation_timeout, keepalive) <= 0:
            raise ValueError("timeouts must be > 0")
        if hash not in HASHES:
            raise ValueError(f"hash must be one of {HASHES}")
        if local_steps < 0 or liveness_min < 1 or inactivity_threshold < 0:
            raise ValueError("local_steps >= 0, liveness_min >= 1, inactivity_threshold >= 0")
        self.sample_size = int(sample_size)
        self.aggregators = int(aggregators)
        self.success_fraction = float(success_fraction)
        self.ping_timeout = float(ping_timeout)
        self.ping_interval = float(ping_interval)
        self.inactivity_threshold = int(inactivity_threshold)
        self.aggregation_timeout = float(aggregation_timeout)
        self.liveness_min = int(liveness_min)
        self.ack_timeout = float(ack_timeout) or self.aggregation_timeout + self.ping_timeout
        self.local_steps = int(local_steps)
        self.keepalive = float(keepalive)
        self.join = bool(join)
        self.advert_fanout = int(advert_fanout) or self.sample_size
        self.hash = hash
        self.members = {str(k): str(v) for k, v in (members or {}).items()}
        self.linger = float(linger) if linger >= 0 else 2 * self.keepalive + self.ping_timeout
        self.stall_timeout = float(stall_timeout) or (
            self.ack_timeout + self.aggregation_timeout + self.ping_timeout
        )
        self.give_up = float(give_up)
        self.recoveries = 0

        self._view: View | None = None
        self._active = False
        self._advert_index = 0
        self._progress = asyncio.Event()
        # trainer side
        self._latest: tuple[int, Tensors, int] | None = None  # (index, θ, participants)
        self._trained_round = -1
        self._training = False
        self._acks: dict[int, asyncio.Event] = {}
        self._ack_ok: dict[int, bool] = {}
        # aggregator side
        self._agg_est = -1
        self._buffer: dict[str, Tensors] = {}
        self._losses: dict[str, float] = {}
        self._expected = self.sample_size
        self._completed_agg = False
        # accounting (bytes this node put on the wire, by what they carried)
        self.wire_bytes_out = 0
        self.model_bytes_out = 0
        self.rounds_aggregated = 0
        self.rounds_trained = 0
        self.resends = 0

    @classmethod
    def prepare(cls, graph: Any, configs: list[Any]) -> list[Any]:
        """Every node starts knowing the whole initial population (as in the reference)."""
        members = {c.node_id: c.advertise or c.listen for c in configs}
        return [
            c.replace(params={**c.params, "members": dict(members)})
            if "members" not in c.params
            else c
            for c in configs
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "sample_size": self.sample_size,
            "aggregators": self.aggregators,
            "success_fraction": self.success_fraction,
            "ping_timeout": self.ping_timeout,
            "ping_interval": self.ping_interval,
            "inactivity_threshold": self.inactivity_threshold,
            "aggregation_timeout": self.aggregation_timeout,
            "liveness_min": self.liveness_min,
            "ack_timeout": self.ack_timeout,
            "local_steps": self.local_steps,
            "keepalive": self.keepalive,
            "join": self.join,
            "advert_fanout": self.advert_fanout,
            "hash": self.hash,
            "members": len(self.members),
            "linger": self.linger,
            "stall_timeout": self.stall_timeout,
            "give_up": self.give_up,
        }

    # ================================================================== state helpers
    def _setup(self, ctx: Context) -> View:
        if self._view is None:
            view = View(ctx.node_id, ctx.address)
            for nid, address in sorted(self.members.items()):
                view.add(nid, address)
            for nid in ctx.all_neighbors():
                view.add(nid, ctx.address_of(nid) or "")
            self._view = view
            self._active = True  # serving: answer pings, train and aggregate when asked
        return self._view

    @property
    def view(self) -> View:
        if self._view is None:
            raise RuntimeError("the view exists once the node serves")
        return self._view

    def round_estimate(self) -> int:
        """max(training round, aggregation index, highest activity in the view)."""
        train = self._latest[0] if self._latest is not None else -1
        return max(train, self._agg_est, self.view.round_estimate(), 0)

    def order(self, round: int) -> list[str]:
        """This node's order of the candidates of ``round`` (the sample is its live prefix)."""
        return self.view.ordered(round, self.inactivity_threshold, self.hash)

    def nominal_sample(self, round: int) -> list[str]:
        return self.order(round)[: self.sample_size]

    def _view_proto(self) -> modest_pb2.ModestView:
        self.view.me.last_active = self.round_estimate()
        return self.view.to_proto()

    @property
    def control_bytes_out(self) -> int:
        """Wire bytes besides model tensors: views, pings, adverts, acks, envelopes."""
        return self.wire_bytes_out - self.model_bytes_out

    def _bytes_fields(self) -> dict[str, Any]:
        return {
            "wire_bytes_out": self.wire_bytes_out,
            "model_bytes_out": self.model_bytes_out,
            "control_bytes_out": self.control_bytes_out,
            "view_size": len(self.view),
        }

    def _count(self, msg: Message) -> Message:
        self.wire_bytes_out += message_nbytes_on_wire(msg)
        self.model_bytes_out += msg.nbytes
        return msg

    async def _request(
        self, ctx: Context, peer: str, msg: Message, timeout: float | None = None
    ) -> Message | None:
        address = self.view.address_of(peer)
        if address and ctx.address_of(peer) is None:
            ctx.learn_address(peer, address)
        self._count(msg)
        return await ctx.request(peer, msg, timeout)

    async def _send(self, ctx: Context, peer: str, msg: Message) -> bool:
        try:
            await self._request(ctx, peer, msg)
        except (PeerUnavailable, Rejected) as exc:
            ctx.log("%s to %s failed: %s", msg.kind, peer, exc)
            return False
        return True

    # ================================================================== liveness
    def _ping_msg(self, ctx: Context) -> Message:
        est = self.round_estimate()
        payload = modest_pb2.ModestPing(
            round_estimate=est, index=self._advert_index, address=ctx.address
        )
        return ctx.message(PING_KIND, round=est, payload=payload)

    async def ping(self, ctx: Context, peer: str) -> bool:
        """True when ``peer`` answers within ``ping_timeout`` (re-pinged every interval)."""
        if peer == ctx.node_id:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ping_timeout
        while (remaining := deadline - loop.time()) > 0:
            started = loop.time()
            try:
                reply = await self._request(
                    ctx, peer, self._ping_msg(ctx), min(self.ping_interval, remaining)
                )
            except PeerUnavailable:
                await ctx.clock.sleep(min(self.ping_interval - (loop.time() - started), remaining))
                continue
            except Rejected:
                break  # it answers but no longer takes part
            if reply is not None and reply.kind == PONG_KIND:
                try:
                    pong = _unpack(reply, modest_pb2.ModestPong)
                except Rejected:
                    break
                self.view.heard_from(peer, max(pong.round_estimate, self.round_estimate()))
                return True
            break
        self.view.suspect(peer, self.round_estimate())
        return False

    async def find_available(
        self, ctx: Context, order: list[str], count: int, exclude: Iterable[str] = ()
    ) -> list[str]:
        """The first ``count`` members of ``order`` that answer a ping, in order.

        Pings ``count`` candidates at once; each one that times out is replaced by the next
        in order. Returns fewer when the order runs out. This node counts without a ping.
        """
        skip = set(exclude)
        queue = [n for n in order if n not in skip]
        ok: set[str] = set()
        pending: dict[asyncio.Future[bool], str] = {}
        pos = 0
        try:
            while len(ok) < count:
                while len(ok) + len(pending) < count and pos < len(queue):
                    nid = queue[pos]
                    pos += 1
                    if nid == ctx.node_id:
                        ok.add(nid)
                        continue
                    pending[asyncio.ensure_future(self.ping(ctx, nid))] = nid
                if not pending:
                    break
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in done:
                    nid = pending.pop(fut)
                    if fut.result():
                        ok.add(nid)
        finally:
            for fut in pending:
                fut.cancel()
        return [n for n in queue if n in ok][:count]

    async def _keepalive(self, ctx: Context) -> None:
        """Quiet for a while: ping a few random members (refreshes both sides' views)."""
        others = [n for n in self.view.candidates(0, 0) if n != ctx.node_id]
        if not others:
            return
        k = min(len(others), max(1, math.ceil(math.log2(len(others) + 1))))
        await asyncio.gather(*(self.ping(ctx, p) for p in ctx.rng.sample(others, k)))

    # ================================================================== membership
    async def _advertise(self, ctx: Context, change: int) -> None:
        """Announce a JOIN (first to bootstrap peers, whose views we take) or a LEAVE."""
        self._advert_index += 1
        me = self.view.me
        me.index, me.change = self._advert_index, change
        est = self.round_estimate()
        advert = modest_pb2.ModestAdvert(
            round_estimate=est, index=self._advert_index, change=change, address=ctx.address
        )
        told: set[str] = set()
        if change == JOIN:
            for peer in ctx.all_neighbors() or sorted(self.members):
                if peer == ctx.node_id:
                    continue
                try:
                    reply = await self._request(
                        ctx,
                        peer,
                        ctx.message(ADVERT_KIND, round=est, payload=advert),
                        self.ping_timeout,
                    )
                except (PeerUnavailable, Rejected) as exc:
                    ctx.log("join via %s failed: %s", peer, exc)
                    continue
                told.add(peer)
                if reply is not None and reply.kind == VIEW_KIND:
                    self._merge(_unpack(reply, modest_pb2.ModestView))
                    self.view.heard_from(peer, self.round_estimate())
            pool = [n for n in self.view.members() if n != ctx.node_id and n not in told]
        else:
            pool = [n for n in self.view.candidates(0, 0) if n != ctx.node_id]
        fanout = ctx.rng.sample(pool, min(len(pool), self.advert_fanout))
        msg = ctx.message(ADVERT_KIND, round=est, payload=advert)

        async def tell(peer: str) -> None:
            try:
                reply = await self._request(ctx, peer, msg, self.ping_timeout)
            except (PeerUnavailable, Rejected):
                return
            if reply is not None and reply.kind == VIEW_KIND:
                self._merge(_unpack(reply, modest_pb2.ModestView))

        await asyncio.gather(*(tell(p) for p in fanout))
        ctx.log(
            "announced %s to %d members",
            "JOIN" if change == JOIN else "LEAVE",
            len(told) + len(fanout),
        )

    def _merge(self, view: modest_pb2.ModestView) -> None:
        try:
            entries = entries_from_proto(view)
        except ValueError as exc:
            raise Rejected(Code.INVALID_ARGUMENT, f"modest view: {exc}") from exc
        self.view.merge(entries)

    def _flush(self, ctx: Context) -> None:
        applied = self.view.flush()
        if applied:
            ctx.log("joins applied: %s", ", ".join(applied))

    # ================================================================== messages
    async def on_message(self, ctx: Context, msg: Message) -> Message | None:
        self._setup(ctx)
        self._progress.set()
        if msg.kind == PING_KIND:
            return self._on_ping(ctx, msg)
        if msg.kind == MODEL_KIND:
            self._on_model(ctx, msg)
            return None
        if msg.kind == ACK_KIND:
            ack = _unpack(msg, modest_pb2.ModestAggAck)
            self._on_ack(ctx, msg.sender, int(ack.index), ack.success)
            return None
        if msg.kind == ADVERT_KIND:
            return self._on_advert(ctx, msg)
        raise Rejected(Code.INVALID_ARGUMENT, f"modest does not handle {msg.kind!r}")

    def _on_ping(self, ctx: Context, msg: Message) -> Message:
        ping = _unpack(msg, modest_pb2.ModestPing)
        if not self._active:
            raise Rejected(Code.FAILED_PRECONDITION, "not taking part in MoDeST rounds")
        self.view.heard_from(
            msg.sender, max(ping.round_estimate, self.round_estimate()), ping.address
        )
        est = self.round_estimate()
        pong = modest_pb2.ModestPong(round_estimate=est, index=self._advert_index)
        return self._count(ctx.message(PONG_KIND, round=est, payload=pong))

    def _on_advert(self, ctx: Context, msg: Message) -> Message | None:
        advert = _unpack(msg, modest_pb2.ModestAdvert)
        est = max(advert.round_estimate, self.round_estimate())
        if advert.change == JOIN:
            self.view.hold_join(msg.sender, advert.address, est, int(advert.index))
            ctx.log("JOIN from %s held until the next send", msg.sender)
            reply = ctx.message(VIEW_KIND, round=est, payload=self._view_proto())
            return self._count(reply)
        if advert.change == LEAVE:
            self.view.apply_leave(msg.sender, est, int(advert.index))
            ctx.log("%s left", msg.sender)
            return None
        raise Rejected(Code.INVALID_ARGUMENT, f"modest advert: unknown change {advert.change}")

    def _on_model(self, ctx: Context, msg: Message) -> None:
        header = _unpack(msg, modest_pb2.ModestTransfer)
        if msg.bundle is None:
            raise Rejected(Code.INVALID_ARGUMENT, "modest.model without a model")
        check_compatible(msg.bundle, mixable(ctx.model.state_dict()))
        if header.index < 0 or header.type not in (TRAINED, AGGREGATED):
            raise Rejected(Code.INVALID_ARGUMENT, "modest.model: bad index or type")
        loss = msg.bundle.meta.get("loss", math.nan)
        if not isinstance(loss, (int, float)) or isinstance(loss, bool):
            raise Rejected(Code.INVALID_ARGUMENT, f"modest.model: bad loss {loss!r}")
        self._merge(header.view)
        self.view.heard_from(msg.sender, max(header.round_estimate, self.round_estimate()))
        participants = max(1, int(header.participants))
        tensors = dict(msg.bundle.tensors)
        if header.type == TRAINED:
            self._on_trained(ctx, msg.sender, int(header.index), tensors, participants, loss)
        else:
            self._on_aggregated(ctx, int(header.index), tensors, participants)

    def _model_msg(
        self,
        ctx: Context,
        kind: int,
        index: int,
        tensors: Tensors,
        participants: int,
        loss: float = math.nan,
    ) -> Message:
        header = modest_pb2.ModestTransfer(
            type=kind,
            index=index,
            round_estimate=self.round_estimate(),
            view=self._view_proto(),
            participants=participants,
        )
        meta = {} if math.isnan(loss) else {"loss": float(loss)}
        return ctx.message(MODEL_KIND, round=index, bundle=Bundle(tensors, meta), payload=header)

    # ================================================================== trainer side
    def _on_aggregated(self, ctx: Context, index: int, tensors: Tensors, participants: int) -> None:
        """θ_index arrived: train it for round ``index`` unless something newer is known."""
        if self._latest is not None and index <= self._latest[0]:
            return  # duplicate (a > 1) or stale
        self._latest = (index, tensors, participants)
        for i, event in self._acks.items():
            if i <= index:
                event.set()  # a newer model implies those rounds went through
        if ctx.max_rounds is not None and index >= ctx.max_rounds:
            return  # the final model: nothing left to train
        if not self._training:
            self._training = True
            ctx.spawn(self._train_loop(ctx), "modest-train")

    def _local_steps(self, ctx: Context) -> int:
        if self.local_steps:
            return self.local_steps
        batch = int(getattr(ctx.trainer.train_loader, "batch_size", 32) or 32)
        return max(1, math.ceil(ctx.trainer.samples / batch))

    async def _train_loop(self, ctx: Context) -> None:
        try:
            while self._latest is not None and self._latest[0] > self._trained_round:
                if not self._active or ctx.should_stop(self._latest[0]):
                    return
                r, theta, participants = self._latest
                async with ctx.lock:
                    state = mixable(ctx.model.state_dict())
                    with torch.no_grad():
                        for k, v in state.items():
                            v.copy_(theta[k])
                    loss = await ctx.compute(ctx.trainer.train_steps, self._local_steps(ctx))
                    trained = {k: v.detach().clone() for k, v in state.items()}
                if self._latest[0] != r:
                    continue  # overtaken by a newer round while training
                self._trained_round = r
                await self._send_trained(ctx, r, trained, participants, loss)
        finally:
            self._training = False

    async def _send_trained(
        self, ctx: Context, r: int, trained: Tensors, participants: int, loss: float
    ) -> None:
        index = r + 1
        aggs = await self.find_available(ctx, self.order(index), self.aggregators)
        for agg in ctx.rng.sample(aggs, len(aggs)):
            await self._deliver_trained(ctx, agg, index, trained, participants, loss)
        self._flush(ctx)
        self.rounds_trained += 1
        ctx.end_round(r, loss=loss, role="trainer", aggregators=len(aggs), **self._bytes_fields())
        ctx.spawn(self._await_ack(ctx, index, trained, participants, loss, set(aggs)), "modest-ack")

    async def _deliver_trained(
        self,
        ctx: Context,
        peer: str,
        index: int,
        trained: Tensors,
        participants: int,
        loss: float,
    ) -> bool:
        if peer == ctx.node_id:
            copy = {k: v.clone() for k, v in trained.items()}
            self._on_trained(ctx, peer, index, copy, participants, loss)
            return True
        msg = self._model_msg(ctx, TRAINED, index, trained, participants, loss)
        return await self._send(ctx, peer, msg)

    def _obsolete(self, index: int) -> bool:
        """θ_index exists somewhere: a newer model arrived, or someone is past round index."""
        if self._latest is not None and self._latest[0] >= index:
            return True
        return self.view.round_estimate() > index

    async def _await_ack(
        self,
        ctx: Context,
        index: int,
        trained: Tensors,
        participants: int,
        loss: float,
        tried: set[str],
    ) -> None:
        """Resend to the next untried live member of the order until an aggregator acks."""
        event = self._acks.setdefault(index, asyncio.Event())
        try:
            for _ in range(len(self.view) + 3):  # each pass tries a new member or waits
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(event.wait(), self.ack_timeout)
                if self._ack_ok.get(index) or self._obsolete(index) or not self._active:
                    return
                event.clear()
                self._ack_ok.pop(index, None)
                nxt = await self.find_available(ctx, self.order(index), 1, exclude=tried)
                if not nxt:
                    ctx.log("round %d: no aggregator answers; waiting", index - 1)
                    continue
                tried.add(nxt[0])
                self.resends += 1
                ctx.log("round %d: no AggAck; resending to %s", index - 1, nxt[0])
                await self._deliver_trained(ctx, nxt[0], index, trained, participants, loss)
        finally:
            self._acks.pop(index, None)
            self._ack_ok.pop(index, None)

    def _on_ack(self, ctx: Context, sender: str, index: int, success: bool) -> None:
        event = self._acks.get(index)
        if event is None:
            return
        if not success:
            self.view.suspect(sender, self.round_estimate())
        self._ack_ok[index] = self._ack_ok.get(index, False) or success
        event.set()

    # ================================================================== aggregator side
    def _on_trained(
        self,
        ctx: Context,
        sender: str,
        index: int,
        tensors: Tensors,
        participants: int,
        loss: float,
    ) -> None:
        if index < self._agg_est or (index == self._agg_est and self._completed_agg):
            # the round went on without this model; the trainer need not resend
            ctx.spawn(self._ack(ctx, [sender], index, True), "modest-ack-late")
            return
        if index > self._agg_est:
            if self._buffer and not self._completed_agg:
                ctx.log(
                    "index %d overtaken by %d; dropping %d models",
                    self._agg_est,
                    index,
                    len(self._buffer),
                )
            self._agg_est = index
            self._buffer, self._losses = {}, {}
            self._completed_agg = False
            self._expected = participants
            ctx.spawn(self._aggregation_timer(ctx, index), "modest-agg-timer")
        self._expected = max(self._expected, participants)
        self._buffer.setdefault(sender, tensors)
        self._losses.setdefault(sender, float(loss))
        if len(self._buffer) >= self._needed():
            self._complete(ctx, index)

    def _needed(self) -> int:
        return max(1, math.ceil(self.success_fraction * min(self.sample_size, self._expected)))

    def _complete(self, ctx: Context, index: int) -> None:
        self._completed_agg = True
        buffer, losses = self._buffer, self._losses
        self._buffer, self._losses = {}, {}
        ctx.spawn(self._aggregate(ctx, index, buffer, losses), "modest-aggregate")

    async def _aggregation_timer(self, ctx: Context, index: int) -> None:
        for attempt in range(2):
            await ctx.clock.sleep(self.aggregation_timeout)
            if self._agg_est != index or self._completed_agg:
                return
            enough = min(self.liveness_min, self._needed())
            if len(self._buffer) >= enough or (attempt == 1 and self._buffer):
                ctx.log(
                    "index %d: aggregation timeout, finishing with %d of %d models",
                    index,
                    len(self._buffer),
                    self._needed(),
                )
                self._complete(ctx, index)
                return

    async def _aggregate(
        self, ctx: Context, index: int, buffer: dict[str, Tensors], losses: dict[str, float]
    ) -> None:
        models = list(buffer.values())
        avg = await ctx.compute(_average, models)
        ev = await self._evaluate(ctx, avg)
        participants = await self.find_available(ctx, self.order(index), self.sample_size)
        if self._agg_est > index:
            ctx.log("index %d overtaken by %d before sending; aborted", index, self._agg_est)
            return
        n = len(participants)
        await asyncio.gather(
            *(self._deliver_aggregated(ctx, p, index, avg, n) for p in participants)
        )
        self._flush(ctx)
        self.rounds_aggregated += 1
        finite = [v for v in losses.values() if math.isfinite(v)]
        ctx.end_round(
            index - 1,
            loss=sum(finite) / len(finite) if finite else None,
            eval=ev,
            role="aggregator",
            models=len(models),
            sample=n,
            resends=self.resends,
            **self._bytes_fields(),
        )
        await self._ack(ctx, list(buffer), index, True)

    async def _deliver_aggregated(
        self, ctx: Context, peer: str, index: int, avg: Tensors, participants: int
    ) -> None:
        if peer == ctx.node_id:
            self._on_aggregated(ctx, index, {k: v.clone() for k, v in avg.items()}, participants)
            return
        await self._send(ctx, peer, self._model_msg(ctx, AGGREGATED, index, avg, participants))

    async def _ack(self, ctx: Context, trainers: list[str], index: int, success: bool) -> None:
        async def one(peer: str) -> None:
            if peer == ctx.node_id:
                self._on_ack(ctx, peer, index, success)
                return
            payload = modest_pb2.ModestAggAck(index=index, success=success)
            msg = ctx.message(ACK_KIND, round=index, payload=payload)
            await self._send(ctx, peer, msg)

        await asyncio.gather(*(one(p) for p in trainers))

    async def _evaluate(self, ctx: Context, tensors: Tensors) -> dict[str, Any]:
        """Test metrics of ``tensors`` (swapped into the model and back, under the lock)."""
        async with ctx.lock:
            state = mixable(ctx.model.state_dict())
            saved = {k: v.detach().clone() for k, v in state.items()}
            with torch.no_grad():
                for k, v in state.items():
                    v.copy_(tensors[k])
            try:
                return dict(await ctx.compute(ctx.trainer.evaluate, cost_s=0.0))
            finally:
                with torch.no_grad():
                    for k, v in state.items():
                        v.copy_(saved[k])

    # ================================================================== the node's loop
    async def run(self, ctx: Context) -> None:
        self._setup(ctx)
        if self.join:
            await self._advertise(ctx, JOIN)
        elif ctx.node_id in self.nominal_sample(0):
            # round 0: the nominal sample trains the shared initial model
            theta = {k: v.detach().clone() for k, v in mixable(ctx.model.state_dict()).items()}
            self._on_aggregated(ctx, 0, theta, len(self.nominal_sample(0)))
        loop = asyncio.get_running_loop()
        last_est, last_change = self.round_estimate(), loop.time()
        last_recovery = last_change
        last_contact = loop.time()
        tick = min(self.keepalive, 1.0)  # how soon a stop request is noticed
        while not ctx.should_stop(self.round_estimate()):
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), tick)
                last_contact = loop.time()
            except asyncio.TimeoutError:
                if loop.time() - last_contact >= self.keepalive:
                    await self._keepalive(ctx)
                    last_contact = loop.time()
            est = self.round_estimate()
            if est != last_est:
                last_est, last_change, last_recovery = est, loop.time(), loop.time()
            elif self.give_up > 0 and loop.time() - last_change > self.give_up:
                ctx.log("no round progress for %.0f s; stopping", self.give_up)
                break
            elif loop.time() - last_recovery > self.stall_timeout:
                await self._recover(ctx)
                last_recovery = loop.time()
        await self._finish(ctx)

    async def _recover(self, ctx: Context) -> None:
        """No round progress for ``stall_timeout``: every member of the current round may be
        gone (trainers and aggregators at once). The first live member of the next order --
        the node that would aggregate it -- restarts the rounds from its own current model.
        Others find someone live before themselves and do nothing."""
        index = self.round_estimate() + 1
        first = await self.find_available(ctx, self.order(index), 1)
        if first != [ctx.node_id] or self._agg_est > index:
            return
        ctx.log(
            "no progress for %.0f s; restarting the rounds at index %d", self.stall_timeout, index
        )
        self.recoveries += 1
        async with ctx.lock:
            own = {k: v.detach().clone() for k, v in mixable(ctx.model.state_dict()).items()}
        self._agg_est, self._completed_agg = index, True
        self._buffer, self._losses = {}, {}
        await self._aggregate(ctx, index, {ctx.node_id: own}, {})

    async def _finish(self, ctx: Context) -> None:
        leaving = ctx.should_stop(-1)  # a stop request, not the end of the round budget
        if leaving:
            self._active = False
            if self._buffer and not self._completed_agg:
                await self._ack(ctx, list(self._buffer), self._agg_est, False)
            await self._advertise(ctx, LEAVE)
        else:
            # keep answering, and pinging a few members (pings carry the round estimate), for
            # a while: the news that the run is over spreads like an epidemic
            loop = asyncio.get_running_loop()
            end = loop.time() + self.linger
            while (remaining := end - loop.time()) > 0:
                await self._keepalive(ctx)
                await ctx.clock.sleep(min(self.keepalive / 2, remaining))
            self._active = False
        if self._latest is not None:
            async with ctx.lock:
                state = mixable(ctx.model.state_dict())
                with torch.no_grad():
                    for k, v in state.items():
                        v.copy_(self._latest[1][k])
        ev = await ctx.maybe_evaluate(max(0, self.round_estimate() - 1))
        if ev is not None:
            ctx.log("final model (index %s): %s", self._latest and self._latest[0], ev)


def _average(models: list[Tensors]) -> Tensors:
    """Uniform average (FedAvg with equal weights, as in the reference)."""
    with torch.no_grad():
        return {k: torch.stack([m[k] for m in models]).mean(0) for k in models[0]}


def _unpack(msg: Message, cls: type[P]) -> P:
    """The typed payload of ``msg``, or a Rejected naming what is wrong."""
    payload = msg.payload
    if payload is None:
        raise Rejected(Code.INVALID_ARGUMENT, f"{msg.kind} without a payload")
    if isinstance(payload, cls):
        return payload
    out = cls()
    descriptor = cls.DESCRIPTOR  # type: ignore[attr-defined]
    packed = isinstance(payload, any_pb2.Any)
    if not packed or not payload.Is(descriptor) or not payload.Unpack(out):
        raise Rejected(
            Code.INVALID_ARGUMENT, f"{msg.kind}: payload is not a {descriptor.full_name}"
        )
    return out
