"""Round-tagged mailboxes: wait for the neighbours' messages of one round, up to a timeout.

Rounds are loose: a message of a future round is kept until its round comes, one of a past
round is dropped, and a neighbour that has not answered by the timeout is simply missing
(the caller decides what its weight becomes). Nothing here blocks without a bound.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Collection

from rumor.protocol.bundle import Message


class RoundInbox:
    """Messages of one kind, keyed by round and sender."""

    def __init__(self, horizon: int = 64) -> None:
        self._by_round: dict[int, dict[str, Message]] = defaultdict(dict)
        self._changed = asyncio.Event()
        self._floor = 0
        self._horizon = horizon
        self.dropped_stale = 0

    def put(self, msg: Message) -> bool:
        """Keep ``msg`` for its round; False when its round is already over.

        At most ``horizon`` future rounds are held; past that the lowest is dropped. Not the
        highest: a node far behind its neighbours is about to jump to their round
        (:func:`rumor.algorithms.rounds.catch_up`), and the messages of that round are the
        ones it will need.
        """
        if msg.round < self._floor:
            self.dropped_stale += 1
            return False
        self._by_round[msg.round][msg.sender] = msg
        while len(self._by_round) > self._horizon:
            self.dropped_stale += len(self._by_round.pop(min(self._by_round)))
        if msg.round not in self._by_round:
            return False
        self._changed.set()
        return True

    def poke(self) -> None:
        """Make a running :meth:`gather` re-read whom it waits for (the neighbourhood changed:
        a neighbour died, left, finished or fell behind)."""
        self._changed.set()

    async def gather(
        self,
        round: int,
        peers: Collection[str] | Callable[[], Collection[str]],
        timeout: float,
    ) -> dict[str, Message]:
        """Wait up to ``timeout`` seconds for ``round``'s messages from all of ``peers``.

        ``peers`` may be a function: it is called again whenever a message arrives or
        :meth:`poke` is called, so a neighbour declared dead mid-round stops being waited for
        at once. Returns every message of that round that arrived (from ``peers`` or anyone
        else); everything older than ``round`` is dropped afterwards, as is this round's
        mailbox.
        """
        expected = peers if callable(peers) else (lambda: peers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not set(expected()) <= self._by_round.get(round, {}).keys():
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except asyncio.TimeoutError:
                break
        got = self._by_round.pop(round, {})
        self._floor = round + 1
        for r in [r for r in self._by_round if r < self._floor]:
            self.dropped_stale += len(self._by_round.pop(r))
        return got
