"""Clocks: when events fire. Wall time for real nodes, virtual time for simulation.

Rules never call ``time.time()`` or ``asyncio.sleep`` directly; they ask the :class:`Clock`.
The same coroutines then run in wall-clock time over gRPC, or on a
:class:`VirtualTimeLoop` where time jumps to the next timer whenever every task waits, so a
simulation of hundreds of nodes runs as fast as its compute allows and repeats exactly
under a seed. This module must not know about models, networks or rules.
"""

from __future__ import annotations

import asyncio
import math
import random
import selectors
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class SimulationDeadlock(RuntimeError):
    """Every task waits and no timer is pending: a simulated run can never make progress."""


class _VirtualSelector(selectors.BaseSelector):
    """A selector that polls real I/O without blocking and turns waiting into a time jump."""

    def __init__(self, loop: VirtualTimeLoop, inner: selectors.BaseSelector, idle_s: float):
        self._loop = loop
        self._inner = inner
        self._idle_s = idle_s

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._inner.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._inner.modify(fileobj, events, data)

    def get_map(self) -> Any:
        return self._inner.get_map()

    def close(self) -> None:
        self._inner.close()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._inner.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            # Nothing is scheduled in virtual time. Only a real thread or socket can still
            # wake the loop (the self-pipe); give it a bounded real wait, then give up.
            events = self._inner.select(self._idle_s)
            if not events:
                raise SimulationDeadlock(
                    f"no task can make progress at virtual time {self._loop.time():.6f}"
                )
            return events
        self._loop.advance(timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An asyncio loop whose ``time()`` is virtual and jumps to the next timer when idle.

    Timers (``call_later``, ``asyncio.sleep``, ``wait_for``) are ordered exactly as on a
    real loop, so ordinary asyncio code runs unchanged. Work done in threads is not
    modelled: simulated nodes run their compute inline and charge a modelled cost.
    """

    def __init__(self, idle_real_timeout_s: float = 5.0) -> None:
        self._vtime = 0.0
        super().__init__(_VirtualSelector(self, selectors.DefaultSelector(), idle_real_timeout_s))
        self._clock_resolution = 1e-9

    def time(self) -> float:
        return self._vtime

    def advance(self, seconds: float) -> None:
        """Move virtual time forward (never backward)."""
        if seconds > 0:
            self._vtime += seconds


def run_virtual(main: Coroutine[Any, Any, T], idle_real_timeout_s: float = 5.0) -> T:
    """Run ``main`` to completion on a fresh :class:`VirtualTimeLoop`."""
    loop = VirtualTimeLoop(idle_real_timeout_s)
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            _cancel_all(loop)
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())


class Clock:
    """Time as the running event loop sees it, measured from the clock's creation.

    The same class serves wall time (on uvloop or asyncio) and virtual time (on a
    :class:`VirtualTimeLoop`): it only reads ``loop.time()`` and sleeps on the loop.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._t0 = self._loop.time()

    @property
    def virtual(self) -> bool:
        return isinstance(self._loop, VirtualTimeLoop)

    def now(self) -> float:
        """Seconds since this clock started."""
        return self._loop.time() - self._t0

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))

    async def sleep_until(self, t: float) -> None:
        await self.sleep(t - self.now())

    @staticmethod
    def exponential(rate: float, rng: random.Random) -> float:
        """Waiting time to the next event of a Poisson process of ``rate`` events per second."""
        if rate <= 0:
            return math.inf
        return rng.expovariate(rate)

    async def poisson_ticks(
        self, rate: float, rng: random.Random, stop: Callable[[], bool]
    ) -> AsyncIterator[float]:
        """Async iterator over the event times of a Poisson process, until ``stop()``."""
        while not stop():
            await self.sleep(self.exponential(rate, rng))
            if stop():
                return
            yield self.now()
