"""Rate limits: one token bucket, for anything a peer can send or make the server do too often.

A WebSocket client's messages (app.py) and the OSC server's warnings (osc.py) are both limited by a
`TokenBucket`; a cost other than 1 lets the same bucket bound bytes as well as messages.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up (a full bucket to start with).

    `take(cost)` spends `cost` tokens if the bucket holds them: a steady `rate` goes through, a burst of up
    to `burst` at once, and anything beyond is refused rather than queued (the caller decides what a refusal
    means: an error message, a dropped datagram, a suppressed log line).
    """

    rate: float
    burst: float
    clock: Callable[[], float] = time.monotonic  # injectable, so a test can step time
    tokens: float = field(init=False)
    _stamp: float = field(init=False)

    def __post_init__(self) -> None:
        if not self.rate > 0 or not self.burst > 0:
            raise ValueError(f"a token bucket needs rate > 0 and burst > 0, got {self.rate} and {self.burst}")
        self.tokens, self._stamp = float(self.burst), self.clock()

    def take(self, cost: float = 1.0) -> bool:
        """Spend `cost` tokens if they are there (True), else spend nothing (False)."""
        now = self.clock()
        self.tokens = min(float(self.burst), self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False


class RateLimitedLog:
    """Warnings through a token bucket: bursts of `burst`, then `burst` per `window` seconds on average.

    What the bucket refuses is counted, and the count is logged with the next warning let through, so a
    flood of bad packets costs a few lines, not one line each, and still says how many there were.
    """

    def __init__(self, logger: logging.Logger, what: str = "warnings", *, burst: int = 20, window: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.logger, self.what = logger, what
        self.bucket = TokenBucket(burst / window, burst, clock)
        self.clock = clock
        self.suppressed = 0
        self._since = 0.0  # when the first suppressed warning came

    def warning(self, text: str, *args: Any, exc_info: bool = False) -> None:
        if not self.bucket.take():
            if not self.suppressed:
                self._since = self.clock()
            self.suppressed += 1
            return
        if self.suppressed:
            self.logger.warning("%d more %s suppressed in the last %.0f s", self.suppressed, self.what,
                                self.clock() - self._since)
            self.suppressed = 0
        self.logger.warning(text, *args, exc_info=exc_info)
