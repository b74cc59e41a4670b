"""Membership: who my neighbours are, and which of them are alive.

Neighbours come from the topology. A heartbeat loop pings every neighbour once per period
(dead ones too, so that a restarted node is taken back as soon as it answers); ``misses``
heartbeats in a row without an answer, or one failed exchange, mark a neighbour dead, and
rules skip dead neighbours instead of waiting on them. A neighbour that says it leaves is
dropped at once; one that says it finished still answers but is no longer waited for.

Whoever must react the moment the view changes subscribes: :meth:`Membership.lost` gives a
future that completes when a peer is marked dead or leaves (in-flight sends to it are cut
there), and :meth:`Membership.subscribe` registers a callback run on every change (a
round's inbox re-checks whom it still waits for). This module must not know about training
or rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from rumor.node.clock import Clock
from rumor.protocol.constants import HEARTBEAT_MISSES, HEARTBEAT_PERIOD_S
from rumor.protocol.errors import PeerUnavailable, Rejected
from rumor.protocol.transport import Transport
from rumor.protocol.v1 import node_pb2

log = logging.getLogger("rumor.membership")


@dataclass
class PeerInfo:
    node_id: str
    address: str
    alive: bool = True
    last_seen: float | None = None
    failures: int = 0
    degree: int | None = None
    round: int | None = None
    #: It said it left (finished or shut down): not expected back until it answers again.
    left: bool = False
    #: It said it finished its rounds but still serves (it lingers while neighbours train).
    finished: bool = False
    #: Completed when the peer is next marked dead or leaves (see Membership.lost).
    _lost: asyncio.Future[None] | None = field(default=None, repr=False)


class Membership:
    """The node's view of its neighbourhood."""

    def __init__(
        self,
        node_id: str,
        neighbours: dict[str, str],
        clock: Clock,
        period_s: float = HEARTBEAT_PERIOD_S,
        misses: int = HEARTBEAT_MISSES,
    ) -> None:
        self.node_id = node_id
        self.clock = clock
        self.period_s = period_s
        self.misses = misses
        self.peers = {nid: PeerInfo(nid, addr) for nid, addr in sorted(neighbours.items())}
        #: Addresses of nodes that are not neighbours (a rule learned them, e.g. from a
        #: membership view): reachable by ``request``, but neither heartbeated nor counted.
        self.contacts: dict[str, str] = {}
        self._listeners: dict[Callable[[], None], None] = {}

    def alive(self) -> list[str]:
        """Alive neighbours still running rounds: the ones to gossip with and wait for."""
        return [nid for nid, p in self.peers.items() if p.alive and not p.finished]

    def serving(self) -> list[str]:
        """Alive neighbours, including those that finished their rounds but still answer."""
        return [nid for nid, p in self.peers.items() if p.alive]

    def all_done(self) -> bool:
        """Every neighbour has finished its rounds or left (a dead one may still come back)."""
        return all(p.finished or p.left for p in self.peers.values())

    # --- subscriptions ---------------------------------------------------------------
    def subscribe(self, callback: Callable[[], None]) -> None:
        """Run ``callback()`` after every change of the view (idempotent per callback)."""
        self._listeners[callback] = None

    def lost(self, node_id: str) -> asyncio.Future[None] | None:
        """A future completed when ``node_id`` is next marked dead or leaves; None when it is
        not a neighbour or is not alive now (nothing to watch for)."""
        peer = self.peers.get(node_id)
        if peer is None or not peer.alive:
            return None
        if peer._lost is None or peer._lost.done():
            peer._lost = asyncio.get_running_loop().create_future()
        return peer._lost

    def _changed(self) -> None:
        for callback in list(self._listeners):
            callback()

    def _gone(self, peer: PeerInfo) -> None:
        """``peer`` stopped being alive: wake whoever waits on it, then every subscriber."""
        lost, peer._lost = peer._lost, None
        if lost is not None and not lost.done():
            lost.set_result(None)
        self._changed()

    def all(self) -> list[str]:
        return list(self.peers)

    def present(self) -> list[str]:
        """Neighbours that have not left or finished: alive, or unreachable for now."""
        return [nid for nid, p in self.peers.items() if not p.left and not p.finished]

    def address_of(self, node_id: str) -> str:
        """Where ``node_id`` listens: a neighbour's address, else a learned contact's."""
        peer = self.peers.get(node_id)
        return peer.address if peer is not None else self.contacts[node_id]

    def learn(self, node_id: str, address: str) -> None:
        """Remember how to reach a node that is not a neighbour (neighbours keep theirs)."""
        if node_id != self.node_id and node_id not in self.peers and address:
            self.contacts[node_id] = address

    def on_success(
        self,
        node_id: str,
        degree: int | None = None,
        round: int | None = None,
        *,
        heartbeat: bool = False,
        finished: bool | None = None,
    ) -> None:
        """``node_id`` answered or wrote to us. Only a heartbeat that does not say "leaving"
        takes back a neighbour that announced it left: an exchange still in flight when it
        left may complete afterwards, and must not make us wait for it again."""
        peer = self.peers.get(node_id)
        if peer is None:
            return
        if peer.left and not heartbeat:
            peer.last_seen = self.clock.now()
            return
        changed = not peer.alive or peer.left
        if not peer.alive:
            log.info("%s: neighbour %s is back", self.node_id, node_id)
        peer.alive = True
        peer.left = False
        peer.failures = 0
        peer.last_seen = self.clock.now()
        if degree is not None:
            peer.degree = degree
        if round is not None and round != peer.round:
            peer.round = round
            changed = True
        if finished is not None and finished != peer.finished:
            peer.finished = finished
            changed = True
        if changed:
            self._changed()

    def on_failure(self, node_id: str, weight: int = 1) -> None:
        """Count a missed heartbeat (weight 1) or a failed exchange (weight ``misses``)."""
        peer = self.peers.get(node_id)
        if peer is None:
            return
        peer.failures += weight
        if peer.alive and peer.failures >= self.misses:
            peer.alive = False
            log.warning(
                "%s: neighbour %s marked dead after %d failures",
                self.node_id,
                node_id,
                peer.failures,
            )
            self._gone(peer)

    def on_leave(self, node_id: str) -> None:
        peer = self.peers.get(node_id)
        if peer is not None and not peer.left:
            peer.alive = False
            peer.left = True
            peer.failures = self.misses
            log.info("%s: neighbour %s left", self.node_id, node_id)
            self._gone(peer)

    async def probe(
        self, transport: Transport, make_ping: Callable[[], node_pb2.Ping], timeout: float
    ) -> None:
        """Ping every neighbour once, concurrently, and update the view."""

        async def one(peer: PeerInfo) -> None:
            try:
                pong = await transport.ping(peer.address, make_ping(), timeout)
            except (PeerUnavailable, Rejected):
                self.on_failure(peer.node_id)
                return
            if pong.leaving:
                self.on_leave(peer.node_id)
            else:
                self.on_success(
                    peer.node_id,
                    degree=pong.degree,
                    round=pong.round,
                    heartbeat=True,
                    finished=pong.finished,
                )

        await asyncio.gather(*(one(p) for p in self.peers.values()))

    async def run(
        self,
        transport: Transport,
        make_ping: Callable[[], node_pb2.Ping],
        stopping: asyncio.Event,
    ) -> None:
        """Heartbeat until ``stopping`` is set: one probe per period, whatever its pings take
        (a ping's deadline is the period, 2 s at most), so a silent neighbour misses one beat
        per period and is marked dead ``misses`` periods after it fell silent."""
        timeout = max(0.05, min(self.period_s, 2.0))
        loop = asyncio.get_running_loop()
        while not stopping.is_set():
            started = loop.time()
            await self.probe(transport, make_ping, timeout)
            wait = max(0.0, self.period_s - (loop.time() - started))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), wait)

    async def wait_for_neighbours(
        self,
        transport: Transport,
        make_ping: Callable[[], node_pb2.Ping],
        limit_s: float,
    ) -> list[str]:
        """Until every neighbour answers once or ``limit_s`` passes; returns the missing.

        :meth:`wait_for_neighbours_why` does the same and also says why each is missing."""
        return list(await self.wait_for_neighbours_why(transport, make_ping, limit_s))

    async def wait_for_neighbours_why(
        self,
        transport: Transport,
        make_ping: Callable[[], node_pb2.Ping],
        limit_s: float,
        *,
        resolve_timeout_s: float = 5.0,
    ) -> dict[str, str]:
        """The start-up wait: each neighbour still missing after it -> its last error.

        It ends when every neighbour has answered, when ``limit_s`` has passed, or as soon as
        a neighbour that answered reports a round past 0: the cluster is already training
        (this node restarted, or started late), so waiting for the others, which may be
        cut off, only keeps this node idle; heartbeats take them in when they answer.

        An operator needs to see why a neighbour is missing (a mistyped host name, a closed
        port, a firewall), not only that it is, so the last error of each is kept. Host
        names are also resolved once, off the event loop and concurrently with the pings,
        because gRPC words a name that does not resolve vaguely, or as a mere deadline while
        its resolver backs off. The pings go on regardless: in Kubernetes a peer's DNS record
        appears only once its pod exists. Simulated nodes (virtual clock) have names, not
        hosts: nothing is resolved there.
        """
        loop = asyncio.get_running_loop()
        end = loop.time() + limit_s
        errors = {nid: f"no answer within {limit_s:g} s" for nid in self.peers}
        lookups: asyncio.Future[dict[str, str]] | None = None
        if not self.clock.virtual and limit_s > 0 and self.peers:
            lookups = asyncio.ensure_future(self._unresolved(min(limit_s, resolve_timeout_s)))
        missing = list(self.peers)
        unresolved: dict[str, str] = {}
        try:
            while missing and loop.time() < end:
                results = await asyncio.gather(
                    *(self._answers(transport, make_ping, nid, errors) for nid in missing)
                )
                missing = [nid for nid, ok in zip(missing, results, strict=True) if not ok]
                if missing and self._cluster_running(missing):
                    break
                if missing:
                    await asyncio.sleep(min(0.2, max(0.0, end - loop.time())))
            if lookups is not None and missing:
                unresolved = await lookups
        finally:
            if lookups is not None and not lookups.done():
                lookups.cancel()
                await asyncio.gather(lookups, return_exceptions=True)
        for nid in missing:
            # The failed lookup says it best, unless gRPC got past the name later (it
            # resolved after all, and the connection failed for another reason).
            if nid in unresolved and _about_the_name(errors[nid]):
                errors[nid] = unresolved[nid]
            self.on_failure(nid, self.misses)
        return {nid: errors[nid] for nid in missing}

    def _cluster_running(self, missing: list[str]) -> bool:
        """Whether a neighbour that answered reports a round past 0 (it is training)."""
        return any((p.round or 0) > 0 for nid, p in self.peers.items() if nid not in missing)

    async def _answers(
        self,
        transport: Transport,
        make_ping: Callable[[], node_pb2.Ping],
        node_id: str,
        errors: dict[str, str] | None = None,
    ) -> bool:
        """Whether ``node_id`` answers a ping now; if not, why goes to ``errors[node_id]``."""
        try:
            pong = await transport.ping(self.address_of(node_id), make_ping(), 1.0)
        except PeerUnavailable as exc:
            if errors is not None:
                errors[node_id] = _peer_detail(exc)
            return False
        except Rejected as exc:
            if errors is not None:
                errors[node_id] = f"refused: {exc}"
            return False
        if pong.leaving:
            self.on_leave(node_id)
        else:
            self.on_success(node_id, degree=pong.degree, round=pong.round, heartbeat=True)
        return True

    async def _unresolved(self, timeout_s: float) -> dict[str, str]:
        """Neighbours whose host name does not resolve within ``timeout_s`` -> the reason.

        Each name is looked up once (``loop.getaddrinfo``: a worker thread, the loop never
        blocks); addresses that are IP literals, or not ``host:port`` at all, are skipped."""
        import socket

        loop = asyncio.get_running_loop()
        hosts = {nid: _host_name(p.address) for nid, p in self.peers.items()}
        names = sorted({h for h in hosts.values() if h is not None})

        async def lookup(host: str) -> str | None:
            try:
                await asyncio.wait_for(
                    loop.getaddrinfo(host, None, type=socket.SOCK_STREAM), timeout_s
                )
            except socket.gaierror as exc:
                return f"cannot resolve host name {host!r}: {exc.strerror or exc}"
            except asyncio.TimeoutError:
                return f"cannot resolve host name {host!r}: no answer within {timeout_s:g} s"
            except (OSError, UnicodeError) as exc:  # e.g. a label too long for IDNA
                return f"cannot resolve host name {host!r}: {exc}"
            return None

        found = dict(zip(names, await asyncio.gather(*(lookup(h) for h in names)), strict=True))
        return {nid: err for nid, h in hosts.items() if h is not None and (err := found[h])}


def _host_name(address: str) -> str | None:
    """The host name to resolve in ``host:port``; None for an IP literal or a bare name
    (in-process addresses are node names)."""
    import ipaddress

    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


def _peer_detail(exc: PeerUnavailable) -> str:
    """The transport's reason, without the ``address:`` prefix PeerUnavailable adds."""
    return str(exc).removeprefix(f"{exc.peer}: ")


def _about_the_name(detail: str) -> bool:
    """Whether a transport error may come from the host name (or says nothing better)."""
    text = detail.lower()
    return any(word in text for word in ("resolv", "dns", "lookup", "deadline", "no answer within"))
