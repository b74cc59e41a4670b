"""A log-line limiter: at most one line per key per period, with a count of what it held back.

A node refuses bad input with a status the peer sees, and logs the refusal for its operator.
Logging every refusal lets one misbehaving or misconfigured peer fill the disk (a fuzzer
makes thousands of calls a second), while logging none hides the problem. So a refusal is
logged once per key (peer and status code, say) per period, and the next line that gets
through says how many were held back in between; counters in metrics keep the full count.

The table of keys is bounded: a peer that varies what it claims to be cannot grow it. When
it is full, entries whose period has passed are dropped first; a new key that still finds
no room is held back (and counted under :attr:`RateLimiter.overflow`), so the number of
lines per period never exceeds ``max_keys``. Not thread-safe: one event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable

__all__ = ["RateLimiter"]


class RateLimiter:
    """Decides which of many similar events get a log line.

    :meth:`allow` returns ``None`` for an event to hold back, or the number of events of the
    same key held back since that key's last line (``0`` usually) for one to log.
    """

    def __init__(
        self,
        period_s: float = 10.0,
        max_keys: int = 256,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if period_s < 0:
            raise ValueError(f"period_s must be >= 0, not {period_s}")
        if max_keys < 1:
            raise ValueError(f"max_keys must be >= 1, not {max_keys}")
        self.period_s = period_s
        self.max_keys = max_keys
        self._clock = clock
        #: key -> (time of its last line, events held back since)
        self._keys: dict[Hashable, tuple[float, int]] = {}
        #: Events held back because the table was full of keys still in their period.
        self.overflow = 0

    def allow(self, key: Hashable) -> int | None:
        """``None`` to hold this event back; else how many of ``key`` were held back before."""
        now = self._clock()
        entry = self._keys.get(key)
        if entry is not None:
            last, held = entry
            if now - last < self.period_s:
                self._keys[key] = (last, held + 1)
                return None
            self._keys[key] = (now, 0)
            return held
        if len(self._keys) >= self.max_keys:
            self._expire(now)
            if len(self._keys) >= self.max_keys:
                self.overflow += 1
                return None
        self._keys[key] = (now, 0)
        return 0

    def _expire(self, now: float) -> None:
        """Drop the keys whose period has passed (their held-back counts are forgotten)."""
        for key in [k for k, (last, _) in self._keys.items() if now - last >= self.period_s]:
            del self._keys[key]
