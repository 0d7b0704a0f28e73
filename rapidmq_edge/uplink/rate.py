"""A token bucket: the drain-rate cap of an uplink (messages per second)."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; rate 0 = unlimited."""

    def __init__(
        self, rate: float, burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self.clock = clock
        self.tokens = self.burst
        self._last = clock()

    def available(self) -> int:
        """Whole tokens available now (a large number when unlimited)."""
        if not self.rate:
            return 1 << 30
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self._last) * self.rate)
        self._last = now
        return int(self.tokens)

    def take(self, n: int) -> None:
        """Spend ``n`` tokens (call after ``available``)."""
        if self.rate:
            self.tokens -= n

    def wait_time(self) -> float:
        """Seconds until one token is available."""
        if not self.rate or self.tokens >= 1:
            return 0.0
        return (1 - self.tokens) / self.rate
