"""server.limits: the token bucket behind the WebSocket message limit and the OSC warning log."""

from __future__ import annotations

import logging

import pytest

from musicrfm.server.limits import RateLimitedLog, TokenBucket


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_lets_a_burst_through_then_the_rate():
    clock = Clock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    assert [bucket.take() for _ in range(7)] == [True] * 5 + [False] * 2
    clock.now += 0.25  # 2.5 tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    clock.now += 60  # refills to the burst, no further
    assert sum(bucket.take() for _ in range(10)) == 5


def test_a_cost_spends_several_tokens_or_none():
    clock = Clock()
    bucket = TokenBucket(rate=1000, burst=1500, clock=clock)  # e.g. bytes
    assert bucket.take(1000) and not bucket.take(1000)
    assert bucket.tokens == 500  # the refused take spent nothing
    assert bucket.take(500)


def test_a_bucket_needs_positive_settings():
    for rate, burst in ((0, 1), (1, 0), (-1, 5), (float("nan"), 5)):
        with pytest.raises(ValueError, match="rate > 0 and burst > 0"):
            TokenBucket(rate, burst)


def test_the_log_limit_counts_what_it_suppresses(caplog):
    clock = Clock()
    logger = logging.getLogger("musicrfm.test-limits")
    limited = RateLimitedLog(logger, "OSC warnings", burst=3, window=6.0, clock=clock)  # 0.5 a second
    with caplog.at_level(logging.WARNING, logger=logger.name):
        for i in range(10):
            limited.warning("bad packet %d", i)
        assert [r.getMessage() for r in caplog.records] == ["bad packet 0", "bad packet 1", "bad packet 2"]
        clock.now += 4  # two warnings' worth
        limited.warning("bad packet %d", 10)
        limited.warning("bad packet %d", 11)
        limited.warning("bad packet %d", 12)
    assert [r.getMessage() for r in caplog.records[3:]] == ["7 more OSC warnings suppressed in the last 4 s",
                                                           "bad packet 10", "bad packet 11"]
    assert limited.suppressed == 1
