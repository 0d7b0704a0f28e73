"""A problem that repeats (a commit failing every 0.5 s on a full disk, a peer refusing every
reconnect) is logged once when it starts, then at most once per ``every`` seconds with how
many times it happened meanwhile, and once when it stops: a few lines a day, not 700,000.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RepeatedLog"]


@dataclass(slots=True)
class _Run:
    first: float
    last_logged: float
    count: int = 1  # occurrences since it started
    unlogged: int = 0  # occurrences since the last line


class RepeatedLog:
    """Rate-limited logging of repeating problems, keyed by what repeats."""

    def __init__(self, log: logging.Logger, every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.every = every
        self.clock = clock
        self._runs: dict[str, _Run] = {}

    def __call__(self, key: str, level: int, msg: str, *args: object) -> bool:
        """Log ``msg % args`` at ``level`` if ``key`` is new or last logged ``every`` seconds
        ago (with the count since then); else only count it. True when a line was written."""
        now = self.clock()
        run = self._runs.get(key)
        if run is None:
            self._runs[key] = _Run(now, now)
            self.log.log(level, msg, *args)
            return True
        run.count += 1
        run.unlogged += 1
        if now - run.last_logged < self.every:
            return False
        self.log.log(level, msg + " (%d times in the last %.0f s, %d since it started)",
                     *args, run.unlogged, now - run.last_logged, run.count)
        run.last_logged = now
        run.unlogged = 0
        return True

    def active(self, key: str) -> bool:
        """True while ``key`` is repeating (until :meth:`clear`)."""
        return key in self._runs

    def clear(self, key: str, msg: str | None = None, *args: object) -> None:
        """``key`` stopped: log ``msg`` (at INFO, with the count and duration) if it was on."""
        run = self._runs.pop(key, None)
        if run is not None and msg is not None:
            self.log.info(msg + " (after %d occurrence(s) over %.0f s)", *args, run.count,
                          self.clock() - run.first)
