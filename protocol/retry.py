"""Retries with exponential backoff and full jitter, in one place.

Full jitter (sleep a uniform time in [0, min(cap, base * 2**attempt)]) spreads the retries of
many nodes that lost the same peer at once, instead of letting them hammer it in lockstep.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from rumor.protocol.constants import RETRY_ATTEMPTS, RETRY_BASE_S, RETRY_MAX_S

T = TypeVar("T")


@dataclass
class Retry:
    """``attempts`` tries in all; the waits between them grow from ``base_s`` up to ``cap_s``."""

    attempts: int = RETRY_ATTEMPTS
    base_s: float = RETRY_BASE_S
    cap_s: float = RETRY_MAX_S
    rng: random.Random = field(default_factory=random.Random)

    def backoff(self, attempt: int) -> float:
        """Wait before retry number ``attempt`` (0-based)."""
        return self.rng.uniform(0.0, min(self.cap_s, self.base_s * (2**attempt)))

    async def run(
        self,
        fn: Callable[[float | None], Awaitable[T]],
        retryable: Callable[[BaseException], bool],
        budget_s: float | None = None,
    ) -> T:
        """Call ``fn(remaining_budget)`` until it succeeds, fails for good, or time runs out.

        ``budget_s`` bounds the whole sequence (calls and waits); each call gets what is
        left of it as its own deadline.
        """
        loop = asyncio.get_running_loop()
        end = None if budget_s is None else loop.time() + budget_s
        attempt = 0
        while True:
            remaining = None if end is None else end - loop.time()
            try:
                return await fn(remaining)
            except Exception as exc:
                attempt += 1
                if attempt >= self.attempts or not retryable(exc):
                    raise
                wait = self.backoff(attempt - 1)
                if end is not None and loop.time() + wait >= end:
                    raise
                await asyncio.sleep(wait)
