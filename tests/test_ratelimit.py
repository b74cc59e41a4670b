"""The refusal log limiter: one line per key per period, counts of what it held back, a
bounded table of keys."""

from __future__ import annotations

import pytest

from rumor.protocol.ratelimit import RateLimiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_key_per_period_then_the_count_of_held_back_events() -> None:
    clock = FakeClock()
    limiter = RateLimiter(period_s=10.0, clock=clock)
    assert limiter.allow(("peer", "INVALID_ARGUMENT")) == 0
    assert [limiter.allow(("peer", "INVALID_ARGUMENT")) for _ in range(5)] == [None] * 5
    assert limiter.allow(("peer", "DATA_LOSS")) == 0  # another code: its own line
    assert limiter.allow(("other", "INVALID_ARGUMENT")) == 0  # another peer too
    clock.now = 9.9
    assert limiter.allow(("peer", "INVALID_ARGUMENT")) is None
    clock.now = 10.0
    assert limiter.allow(("peer", "INVALID_ARGUMENT")) == 6
    assert limiter.allow(("peer", "INVALID_ARGUMENT")) is None


def test_a_full_table_holds_new_keys_back_until_old_ones_expire() -> None:
    clock = FakeClock()
    limiter = RateLimiter(period_s=10.0, max_keys=3, clock=clock)
    assert [limiter.allow(i) for i in range(3)] == [0, 0, 0]
    # a peer cycling through invented ids gets no more lines than the table holds
    assert [limiter.allow(i) for i in range(3, 100)] == [None] * 97
    assert limiter.overflow == 97
    clock.now = 10.0
    assert limiter.allow("new") == 0  # expired keys make room


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RateLimiter(period_s=-1.0)
    with pytest.raises(ValueError):
        RateLimiter(max_keys=0)
