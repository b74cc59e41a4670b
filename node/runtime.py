"""The node: a trainer, a mixing rule, a transport, membership and a clock, wired together.

:class:`Node` serves the transport (answering exchanges, heartbeats and status), runs the
heartbeat loop and the rule's own loop, records metrics, and shuts down cleanly: on a stop
request the rule finishes its current step, neighbours are told it leaves, the server drains.
:class:`NodeContext` is the narrow view a rule gets (see :class:`rumor.algorithms.base.Context`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from typing import Any, TypeVar

import torch

from rumor.algorithms.base import MixingRule, PulledModel
from rumor.node.checkpoint import NodeCheckpointer
from rumor.node.clock import Clock
from rumor.node.membership import Membership
from rumor.node.metrics import MetricsLog
from rumor.node.observe import PULL_KIND
from rumor.node.telemetry import Telemetry
from rumor.protocol.bundle import Bundle, Message
from rumor.protocol.codec import bundle_digest
from rumor.protocol.constants import (
    EXCHANGE_TIMEOUT_S,
    HEARTBEAT_MISSES,
    HEARTBEAT_PERIOD_S,
    PROTOCOL_VERSION,
)
from rumor.protocol.errors import Code, PeerUnavailable, Rejected
from rumor.protocol.transport import Transport
from rumor.protocol.v1 import node_pb2

T = TypeVar("T")
log = logging.getLogger("rumor.node")

#: Node-level reply to a pull (the request kind, PULL_KIND, lives in rumor.node.observe).
MODEL_KIND = "rumor.model"


#: How often a finished, lingering node checks whether its neighbours are done (s).
LINGER_POLL_S = 0.25

#: Compute jobs measured shorter than this (seconds) run on the event loop (NodeContext.compute).
INLINE_COMPUTE_S = 0.003


def _job_kind(fn: Callable[..., Any]) -> object:
    """What identifies a kind of compute job: the code it runs. Bound methods of one function
    share a kind; lambdas (and partials of functions) defined in different places do not."""
    target = getattr(fn, "func", fn)  # functools.partial
    target = getattr(target, "__func__", target)  # bound method
    kind = getattr(target, "__code__", target)
    try:
        hash(kind)
    except TypeError:
        return repr(type(kind))
    return kind


def _timed(fn: Callable[..., T], args: tuple[Any, ...]) -> tuple[T, float]:
    """``fn(*args)`` and its duration; grad mode on, as in a fresh worker thread."""
    t0 = time.perf_counter()
    with torch.enable_grad():
        result = fn(*args)
    return result, time.perf_counter() - t0


class NodeContext:
    """What a mixing rule sees of its node. See :class:`rumor.algorithms.base.Context`."""

    def __init__(self, node: Node) -> None:
        self._node = node
        self.node_id = node.node_id
        self.rng = random.Random(f"{node.seed}/{node.node_id}")
        self.clock = node.clock
        self.trainer = node.trainer
        self.model: torch.nn.Module = node.trainer.model
        self.lock = node.telemetry.model_lock()
        self.max_rounds = node.max_rounds
        self.params: Mapping[str, Any] = node.rule.describe()
        self.round = 0
        self.last_loss: float | None = None
        self.last_eval: dict[str, Any] = {}
        #: Rounds finished when ``last_eval`` was measured.
        self.evaluated_at = -1
        self.exchanges = 0
        self.round_ended_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        #: measured duration of each kind of compute job (EWMA, seconds), by _job_kind
        self._compute_s: dict[object, float] = {}

    # --- neighbourhood -------------------------------------------------------------------
    def neighbors(self) -> list[str]:
        return self._node.membership.alive()

    def all_neighbors(self) -> list[str]:
        return self._node.membership.all()

    def present_neighbors(self) -> list[str]:
        return self._node.membership.present()

    def serving_neighbors(self) -> list[str]:
        return self._node.membership.serving()

    def on_membership_change(self, callback: Callable[[], None]) -> None:
        self._node.membership.subscribe(callback)

    @property
    def degree(self) -> int:
        return len(self._node.membership.peers)

    # --- nodes beyond the neighbourhood (rules that sample the whole population) ---------
    @property
    def address(self) -> str:
        """Where this node listens, as peers should dial it."""
        return self._node.transport.address

    def address_of(self, peer: str) -> str | None:
        """Where ``peer`` listens, if this node knows (a neighbour or a learned contact)."""
        try:
            return self._node.membership.address_of(peer)
        except KeyError:
            return None

    def learn_address(self, peer: str, address: str) -> None:
        """Make ``peer`` reachable by ``request``/``send`` without making it a neighbour."""
        self._node.membership.learn(peer, address)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
        """Run ``coro`` beside the rule (timers, background sends); cancelled when the node
        stops, and its failure is logged rather than lost."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._task_done(t, name))
        return task

    def _task_done(self, task: asyncio.Task[Any], name: str) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: task %s failed", self.node_id, name, exc_info=task.exception())

    async def cancel_tasks(self) -> None:
        """Cancel what :meth:`spawn` started and wait for it (bounded: tasks only unwind)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def peer_round(self, peer: str) -> int | None:
        """The last round ``peer`` reported (heartbeats), if any."""
        info = self._node.membership.peers.get(peer)
        return None if info is None else info.round

    async def pull(self, peer: str, timeout: float | None = None) -> dict[str, torch.Tensor] | None:
        """A copy of ``peer``'s current model (read-only on its side), or None."""
        pulled = await self.pull_model(peer, timeout)
        return None if pulled is None else pulled.tensors

    async def pull_model(self, peer: str, timeout: float | None = None) -> PulledModel | None:
        """``peer``'s current model with the round it is at, or None (logged) on failure."""
        try:
            reply = await self.request(peer, self.message(PULL_KIND), timeout)
        except (PeerUnavailable, Rejected) as exc:
            self.log("pull from %s failed: %s", peer, exc)
            return None
        if reply is None or reply.bundle is None:
            return None
        meta = reply.bundle.meta
        round = meta.get("round")
        if not isinstance(round, int) or isinstance(round, bool) or round < 0:
            self.log("pull from %s: bad round %r", peer, round)
            return None
        return PulledModel(peer, round, bool(meta.get("finished")), reply.bundle.tensors)

    # --- control -------------------------------------------------------------------------
    @property
    def stopping(self) -> asyncio.Event:
        return self._node.stopping

    def should_stop(self, round: int) -> bool:
        if self._node.stopping.is_set():
            return True
        return self.max_rounds is not None and round >= self.max_rounds

    async def compute(self, fn: Callable[..., T], *args: Any, cost_s: float | None = None) -> T:
        """CPU work: a worker thread on a real node; inline plus a modelled cost in simulation.

        On a real node a job whose kind (the code it runs) has been measured to take less than
        ``INLINE_COMPUTE_S`` runs on the event loop instead: the hop to the worker thread (a
        thread wake-up and two GIL hand-offs) costs about as much as such a job, and the
        messages it would delay wait less than that. Longer jobs keep the loop free.
        """
        node = self._node
        with node.telemetry.span("compute", fn=getattr(fn, "__name__", "")):
            return await self._compute(fn, *args, cost_s=cost_s)

    async def _compute(self, fn: Callable[..., T], *args: Any, cost_s: float | None) -> T:
        node = self._node
        if node.executor is None:
            result = fn(*args)
            cost = node.step_cost_s if cost_s is None else cost_s
            if cost > 0:
                await self.clock.sleep(cost)
            return result
        kind = _job_kind(fn)
        estimate = self._compute_s.get(kind)
        if estimate is not None and estimate < INLINE_COMPUTE_S:
            result, seconds = _timed(fn, args)
        else:
            loop = asyncio.get_running_loop()
            result, seconds = await loop.run_in_executor(node.executor, _timed, fn, args)
        self._compute_s[kind] = seconds if estimate is None else 0.7 * estimate + 0.3 * seconds
        return result

    # --- messages ------------------------------------------------------------------------
    def message(
        self, kind: str, *, round: int = 0, bundle: Bundle | None = None, **fields: Any
    ) -> Message:
        return Message(
            kind=kind,
            sender=self.node_id,
            round=round,
            time=self.clock.now(),
            bundle=bundle,
            algorithm=self._node.rule.name,
            **fields,
        )

    @staticmethod
    def new_exchange_id() -> str:
        return uuid.uuid4().hex

    async def request(
        self, peer: str, msg: Message, timeout: float | None = None
    ) -> Message | None:
        node = self._node
        if self.address_of(peer) is None:
            raise PeerUnavailable(peer, "no known address")
        start, t0 = time.time(), time.perf_counter()
        try:
            reply = await _unless_lost(
                node.transport.request(
                    node.membership.address_of(peer), msg, timeout or node.request_timeout_s
                ),
                node.membership.lost(peer),
                peer,
            )
        except (PeerUnavailable, Rejected) as exc:
            error = "unavailable" if isinstance(exc, PeerUnavailable) else "rejected"
            node.telemetry.on_request(
                peer, msg.kind, msg.nbytes, 0, start, time.perf_counter() - t0, error
            )
            if isinstance(exc, PeerUnavailable):
                node.membership.on_failure(peer, node.membership.misses)
            raise
        received = 0 if reply is None else reply.nbytes
        node.telemetry.on_request(
            peer, msg.kind, msg.nbytes, received, start, time.perf_counter() - t0, None
        )
        node.membership.on_success(peer)
        self.exchanges += 1
        return reply

    async def send(self, peer: str, msg: Message, timeout: float | None = None) -> bool:
        try:
            await self.request(peer, msg, timeout)
        except PeerUnavailable as exc:
            log.info("%s: %s to %s failed: %s", self.node_id, msg.kind, peer, exc)
            return False
        except Rejected as exc:
            log.warning("%s: %s refused %s: %s", self.node_id, peer, msg.kind, exc)
            return False
        return True

    # --- bookkeeping ---------------------------------------------------------------------
    async def maybe_evaluate(self, round: int) -> dict[str, Any] | None:
        node = self._node
        last = self.max_rounds is not None and round + 1 >= self.max_rounds
        periodic = node.eval_every > 0 and (round + 1) % node.eval_every == 0
        if not (last or periodic):  # eval_every <= 0: only after the last round
            return None
        return await self._evaluate(round + 1)

    async def _evaluate(self, rounds_done: int) -> dict[str, Any]:
        async with self.lock:
            result = await self.compute(self._node.trainer.evaluate, cost_s=0.0)
        self.last_eval = dict(result)
        self.evaluated_at = rounds_done
        return self.last_eval

    async def evaluate_final(self) -> None:
        """Evaluate the final model unless the last evaluation already saw it: a node that
        jumped to the end of its budget (catch-up) never ran its last round's evaluation."""
        if self.last_eval and self.evaluated_at == self.round:
            return
        await self._evaluate(self.round)

    def end_round(self, round: int, **fields: Any) -> None:
        node = self._node
        self.round = round + 1
        self.round_ended_at = node.clock.now()
        if "loss" in fields:
            self.last_loss = fields["loss"]
        ev = fields.pop("eval", None) or {}
        node.telemetry.on_round(round, fields.get("loss"), ev.get("accuracy"))
        if node.checkpointer is not None:  # before the metrics line: a logged round is saved
            node.checkpointer.after_round(node, self.round)
        stats = node.transport.stats
        node.metrics.write(
            "round",
            round=round,
            loss=fields.pop("loss", None),
            accuracy=ev.get("accuracy"),
            test_loss=ev.get("loss"),
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            exchanges=self.exchanges,
            rejected=stats.rejected_in,
            digest=node.model_digest(),
            alive=len(self.neighbors()),
            **fields,
        )

    def note(self, event: str, **fields: Any) -> None:
        """Write one metrics line of ``event`` (a catch-up jump, say) with ``fields``."""
        self._node.metrics.write(event, **fields)

    def seconds_since_round(self) -> float | None:
        """Staleness: seconds on the node's clock since the last round ended (None before)."""
        ended = self.round_ended_at
        return None if ended is None else self._node.clock.now() - ended

    def log(self, msg: str, *args: Any, level: int = logging.INFO) -> None:
        log.log(level, f"{self.node_id}: {msg}", *args)


class NotEnoughPeers(Exception):
    """Fewer than ``min_peers`` neighbours answered during the start-up wait.

    Without it a node whose neighbours are all misconfigured trains alone and exits 0, which
    a supervisor takes for success; refusing to train makes the mistake visible. The message
    names every missing neighbour, its address and its last error. ``missing`` maps each to
    ``(address, error)``.
    """

    def __init__(
        self, answered: int, needed: int, wait_s: float, missing: dict[str, tuple[str, str]]
    ) -> None:
        self.answered = answered
        self.needed = needed
        self.missing = missing
        details = "; ".join(f"{nid} at {addr}: {err}" for nid, (addr, err) in missing.items())
        super().__init__(
            f"{answered} of {answered + len(missing)} neighbours answered within the "
            f"{wait_s:g} s start-up wait, min_peers is {needed}; missing {details}"
        )


class Node:
    """One rumor node. Works unchanged over gRPC or the in-process transport."""

    def __init__(
        self,
        *,
        node_id: str,
        rule: MixingRule,
        trainer: Any,
        transport: Transport,
        neighbours: dict[str, str],
        clock: Clock | None = None,
        max_rounds: int | None = None,
        metrics_path: str | None = None,
        eval_every: int = 1,
        seed: int = 0,
        simulated: bool = False,
        step_cost_s: float = 0.0,
        heartbeat_period_s: float = HEARTBEAT_PERIOD_S,
        heartbeat_misses: int = HEARTBEAT_MISSES,
        request_timeout_s: float = EXCHANGE_TIMEOUT_S,
        startup_wait_s: float = 30.0,
        min_peers: int = 0,
        linger_s: float = 0.0,
        linger_for_neighbours_s: float = 0.0,
        telemetry: Telemetry | None = None,
        checkpointer: NodeCheckpointer | None = None,
    ) -> None:
        self.node_id = node_id
        self.telemetry = telemetry or Telemetry()
        #: Saves and resumes this node (rumor.node.checkpoint); None: no checkpoints.
        self.checkpointer = checkpointer
        self.rule = rule
        self.trainer = trainer
        self.transport = transport
        self.clock = clock or Clock()
        self.max_rounds = max_rounds
        self.eval_every = eval_every
        self.seed = seed
        self.step_cost_s = step_cost_s
        self.request_timeout_s = request_timeout_s
        self.startup_wait_s = startup_wait_s
        if not 0 <= min_peers <= len(neighbours):
            raise ValueError(
                f"min_peers = {min_peers} must be between 0 and the number of neighbours "
                f"({len(neighbours)})"
            )
        #: Neighbours that must answer in the start-up wait, else NotEnoughPeers (0: none).
        self.min_peers = min_peers
        self.linger_s = linger_s
        self.linger_for_neighbours_s = linger_for_neighbours_s
        self.stopping = asyncio.Event()
        #: The round budget is spent (it may still serve, see _linger).
        self.finished = False
        #: Neighbours have been told it leaves.
        self.leaving = False
        self.membership = Membership(
            node_id, neighbours, self.clock, heartbeat_period_s, heartbeat_misses
        )
        self.metrics = MetricsLog(
            node_id, self.clock, metrics_path, keep_in_memory=simulated or metrics_path is None
        )
        self.executor = (
            None
            if simulated
            else concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"train-{node_id}")
        )
        self.ctx = NodeContext(self)

    # ------------------------------------------------------------------ lifecycle
    def request_stop(self) -> None:
        """Ask the node to finish its current step and shut down (SIGTERM/SIGINT)."""
        if not self.stopping.is_set():
            log.info("%s: stop requested", self.node_id)
        self.stopping.set()

    async def run(self) -> dict[str, Any]:
        """Serve, train and gossip until the round budget is spent or a stop is requested."""
        if self.checkpointer is not None:  # before serving: a refused checkpoint ends here
            self.checkpointer.resume(self)
        address = await self.transport.start(self)
        await self.telemetry.start(self)
        self.metrics.write(
            "start",
            address=address,
            algorithm=self.rule.name,
            params=_jsonable(self.ctx.params),
            **self.telemetry.describe(),
        )
        heartbeat: asyncio.Task[None] | None = None
        try:
            missing = await _unless_stopped(
                self.membership.wait_for_neighbours_why(
                    self.transport, self._ping, self.startup_wait_s
                ),
                self.stopping,
                default={nid: "stopped during the wait" for nid in self.membership.peers},
            )
            if missing and not self.stopping.is_set():
                where = {nid: self.membership.address_of(nid) for nid in missing}
                for nid, error in missing.items():
                    log.warning(
                        "%s: neighbour %s at %s unreachable at start-up: %s",
                        self.node_id,
                        nid,
                        where[nid],
                        error,
                    )
                answered = len(self.membership.peers) - len(missing)
                if answered < self.min_peers:
                    raise NotEnoughPeers(
                        answered,
                        self.min_peers,
                        self.startup_wait_s,
                        {nid: (where[nid], error) for nid, error in missing.items()},
                    )
                log.warning(
                    "%s: starting with %d of %d neighbours, without %s",
                    self.node_id,
                    answered,
                    len(self.membership.peers),
                    ", ".join(missing),
                )
            heartbeat = asyncio.create_task(
                self.membership.run(self.transport, self._ping, self.stopping)
            )
            await self.rule.run(self.ctx)
            await self.ctx.cancel_tasks()
            if self.checkpointer is not None:  # finished, or stopped cleanly (SIGTERM)
                self.checkpointer.save(self, "stop" if self.stopping.is_set() else "finished")
                await self.checkpointer.flush()
            if not self.stopping.is_set():
                await self.ctx.evaluate_final()
            self.finished = True
            self.metrics.write("finished", round=self.ctx.round, **_eval_fields(self.ctx))
            await self._linger()
        finally:
            self.stopping.set()
            await self.ctx.cancel_tasks()
            if heartbeat is not None:
                await asyncio.gather(heartbeat, return_exceptions=True)
            await self._announce_leave()
            stats = self.transport.stats
            self.metrics.write(
                "stop",
                round=self.ctx.round,
                bytes_in=stats.bytes_in,
                bytes_out=stats.bytes_out,
                exchanges=self.ctx.exchanges,
                rejected=stats.rejected_in,
                digest=self.model_digest(),
            )
            await self.transport.stop(grace=0.5)
            await self.telemetry.stop()
            self.metrics.close()
            if self.executor is not None:
                self.executor.shutdown(wait=True)
        return {"node": self.node_id, "round": self.ctx.round, **_eval_fields(self.ctx)}

    async def _linger(self) -> None:
        """Serve on after the last round (answering exchanges and pulls, heartbeating as
        ``finished``) for ``linger_s`` seconds, and beyond that while a neighbour still
        trains, up to ``linger_for_neighbours_s``: a neighbour that restarted or ran slow
        then finishes with partners instead of training alone. A stop request ends it."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        fixed_end = start + self.linger_s
        neighbours_end = start + self.linger_for_neighbours_s
        while not self.stopping.is_set():
            now = loop.time()
            waiting_for_neighbours = now < neighbours_end and not self.membership.all_done()
            if now >= fixed_end and not waiting_for_neighbours:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), LINGER_POLL_S)

    async def _announce_leave(self) -> None:
        """Tell the live neighbours this node leaves, so none waits for it (once)."""
        if self.leaving:
            return
        self.leaving = True
        ping = self._ping()

        async def one(address: str) -> None:
            with contextlib.suppress(PeerUnavailable, Rejected):
                await self.transport.ping(address, ping, 0.5)

        await asyncio.gather(*(one(p.address) for p in self.membership.peers.values() if p.alive))

    # ------------------------------------------------------------------ service side
    def _ping(self) -> node_pb2.Ping:
        return node_pb2.Ping(
            sender=self.node_id,
            address=self.transport.address,
            protocol_version=PROTOCOL_VERSION,
            round=self.ctx.round,
            degree=self.ctx.degree,
            leaving=self.leaving or self.stopping.is_set(),
            finished=self.finished,
        )

    async def handle_ping(self, ping: node_pb2.Ping) -> node_pb2.Pong:
        if ping.leaving:
            self.membership.on_leave(ping.sender)
        else:
            self._seen_again(ping.sender)
            self.membership.on_success(
                ping.sender,
                degree=ping.degree,
                round=ping.round,
                heartbeat=True,
                finished=ping.finished,
            )
        return node_pb2.Pong(
            node_id=self.node_id,
            protocol_version=PROTOCOL_VERSION,
            round=self.ctx.round,
            degree=self.ctx.degree,
            alive=self.membership.alive(),
            leaving=self.leaving or self.stopping.is_set(),
            finished=self.finished,
        )

    def _seen_again(self, node_id: str) -> None:
        """A neighbour this node counts as dead or gone called it: it is back (restarted, or
        its link healed), so the channel to it dials at once instead of after its backoff."""
        peer = self.membership.peers.get(node_id)
        if peer is not None and not peer.alive:
            self.transport.reconnect(peer.address)

    async def handle_message(self, msg: Message) -> Message | None:
        start, t0 = time.time(), time.perf_counter()
        reply = await self._answer(msg)
        self.telemetry.on_incoming(
            msg.sender,
            msg.kind,
            msg.nbytes,
            0 if reply is None else reply.nbytes,
            start,
            time.perf_counter() - t0,
        )
        return reply

    async def _answer(self, msg: Message) -> Message | None:
        if msg.kind == PULL_KIND:
            async with self.ctx.lock:
                state = {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}
            meta = {"round": self.ctx.round, "finished": self.finished}
            return self.ctx.message(MODEL_KIND, round=self.ctx.round, bundle=Bundle(state, meta))
        if msg.algorithm and msg.algorithm != self.rule.name:
            raise Rejected(
                Code.FAILED_PRECONDITION,
                f"algorithm {msg.algorithm!r} does not match this node's {self.rule.name!r}",
            )
        self._seen_again(msg.sender)
        self.membership.on_success(msg.sender)
        try:
            return await self.rule.on_message(self.ctx, msg)
        except Rejected:
            raise
        except Exception as exc:
            log.exception("%s: rule failed on %s from %s", self.node_id, msg.kind, msg.sender)
            raise Rejected(Code.INTERNAL, f"internal error on {msg.kind}: {exc}") from exc

    def status(self) -> node_pb2.StatusReply:
        stats = self.transport.stats
        reply = node_pb2.StatusReply(
            node_id=self.node_id,
            algorithm=self.rule.name,
            round=self.ctx.round,
            uptime_s=self.clock.now(),
            loss=_nan(self.ctx.last_loss),
            accuracy=_nan(self.ctx.last_eval.get("accuracy")),
            bytes_in=stats.bytes_in,
            bytes_out=stats.bytes_out,
            exchanges=self.ctx.exchanges,
            model_digest=self.model_digest(),
            rejected=stats.rejected_in,
            address=self.transport.address,
            finished=self.finished,
            since_round_s=_or_minus_one(self.ctx.seconds_since_round()),
        )
        now = self.clock.now()
        for peer in self.membership.peers.values():
            reply.peers.add(
                node_id=peer.node_id,
                address=peer.address,
                alive=peer.alive,
                last_seen_s=-1.0 if peer.last_seen is None else now - peer.last_seen,
                failures=peer.failures,
            )
        return reply

    def model_digest(self) -> str:
        return bundle_digest(self.trainer.model.state_dict())


def _or_minus_one(value: float | None) -> float:
    return -1.0 if value is None else value


async def _unless_lost(
    call: Coroutine[Any, Any, T], lost: asyncio.Future[None] | None, peer: str
) -> T:
    """``await call``, cut short when ``lost`` completes (membership marked ``peer`` dead or
    gone): a send to a peer behind a dead link would otherwise hold its caller, and the round
    waiting on it, for the whole request deadline. Raises PeerUnavailable when cut."""
    if lost is None:
        return await call
    task = asyncio.ensure_future(call)
    cut = False

    def cancel(_: asyncio.Future[None]) -> None:
        nonlocal cut
        cut = not task.done()
        task.cancel()

    lost.add_done_callback(cancel)
    try:
        return await task
    except asyncio.CancelledError:
        if cut:
            raise PeerUnavailable(peer, "marked dead while the call was in flight") from None
        raise
    finally:
        lost.remove_done_callback(cancel)


async def _unless_stopped(coro: Coroutine[Any, Any, T], stopping: asyncio.Event, default: T) -> T:
    """``await coro``, or ``default`` as soon as ``stopping`` is set (SIGTERM during a wait)."""
    task = asyncio.ensure_future(coro)
    stop = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, stop, return_exceptions=True)
    return task.result() if not task.cancelled() else default


def _nan(value: Any) -> float:
    return float("nan") if value is None else float(value)


def _eval_fields(ctx: NodeContext) -> dict[str, Any]:
    return {"accuracy": ctx.last_eval.get("accuracy"), "test_loss": ctx.last_eval.get("loss")}


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (int, float, str, bool)) else repr(v) for k, v in params.items()}
