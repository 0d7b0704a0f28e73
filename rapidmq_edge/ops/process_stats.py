"""The gateway process as an operator sees it: event-loop lag, memory, open files.

:class:`LoopLag` wakes every ``interval`` seconds and records how late it woke (the time
the loop was busy elsewhere: the latency every message on the loop shares); the recent
samples give p50 / p99 / max. :func:`process_values` reads RSS and open file descriptors
from ``/proc`` (0 where there is none).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["LoopLag", "process_values"]


class LoopLag:
    """How late the event loop runs a timer, over the last ``window`` wake-ups."""

    def __init__(self, interval: float = 0.1, window: int = 3000) -> None:
        self.interval = interval
        self.samples: deque[float] = deque(maxlen=window)
        self.max_s = 0.0  # since start
        #: time.monotonic() of the last wake-up (0: never): a loop that stopped shows here
        self.last_tick = 0.0
        #: called with every sample (s): the /metrics histogram
        self.on_sample: Callable[[float], None] | None = None

    async def run(self) -> None:
        """Sample forever (cancel to stop)."""
        while True:  # perf_counter: the loop's clock may tick in whole milliseconds (uvloop)
            due = time.perf_counter() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, time.perf_counter() - due)
            self.samples.append(lag)
            self.last_tick = time.monotonic()
            if lag > self.max_s:
                self.max_s = lag
            if self.on_sample is not None:
                self.on_sample(lag)

    def snapshot(self) -> dict[str, float]:
        """p50 / p99 / max of the recent window and the largest since start, in ms."""
        s = sorted(self.samples)
        if not s:
            return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0, "max_since_start_ms": 0.0}
        return {
            "p50_ms": round(s[len(s) // 2] * 1000, 3),
            "p99_ms": round(s[min(len(s) - 1, int(len(s) * 0.99))] * 1000, 3),
            "max_ms": round(s[-1] * 1000, 3),
            "max_since_start_ms": round(self.max_s * 1000, 3),
        }


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def process_values() -> dict[str, Any]:
    """This process's pid, RSS and open file descriptors."""
    return {"pid": os.getpid(), "rss_bytes": _rss_bytes(), "open_fds": _open_fds()}
